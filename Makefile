# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test lint format bench bench-compare browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-run: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.installed-run

## run: set up (venv, dependencies, migrations, admin user, demo endpoints) and
## start the simulated upstreams, the monitor and the web server.
run: $(VENV)/.installed-run
	HOST=$(HOST) PORT=$(PORT) scripts/run.sh

## test: set up what the tests need (dev dependencies, Chromium) and run them all.
test: $(VENV)/.installed-dev browser
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

## bench-compare: /v1 on daphne and uvicorn, the LiteLLM proxy and the upstream
## called directly, side by side (bench/README.md); LiteLLM's virtualenv is
## built into .cache/bench on first use. BENCH_ARGS="--seconds 5 ..." to vary.
bench-compare: $(VENV)/.installed-run
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# The browser tests drive Debian's Chromium; Playwright's own download cannot be used.
browser:
	@test -x /usr/bin/chromium || { \
		echo "Installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) staticfiles test-artifacts .pytest_cache .ruff_cache
