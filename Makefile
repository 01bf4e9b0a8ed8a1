# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run run-model test peers lint format bench bench-compare browser clean

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

## run-model: `make run` with a real model: SmolLM2 on the llama.cpp server as
## the primary endpoint of the model `smollm2`, the simulator as its fallback.
## The server is built once (3-4 minutes) into ~/.cache/llmsite/peers.
run-model: $(VENV)/.installed-run
	$(BIN)/python -m scripts.peers build llama
	HOST=$(HOST) PORT=$(PORT) DEMO_REAL_MODEL=1 scripts/run.sh

## test: set up what the tests need (dev dependencies, Chromium, the real peers
## of the interop tests) and run them all.
test: $(VENV)/.installed-dev browser peers
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

## bench-compare: /v1 on daphne and uvicorn, the LiteLLM proxy and the upstream
## called directly, side by side (bench/README.md); LiteLLM is the peer of
## `make peers`, built on first use. BENCH_ARGS="--seconds 5 ..." to vary.
bench-compare: $(VENV)/.installed-run
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# The interop tests' real upstreams, each built once into a cached virtualenv
# (scripts/peers.py). A build that fails here leaves their tests skipped with
# the reason; .ci/run makes those skips failures (LLMSITE_REQUIRE_PEERS=1).
peers: $(VENV)/.installed-run
	$(BIN)/python -m scripts.peers build llama || echo "llama.cpp server not built: its interop tests will say so"
	$(BIN)/python -m scripts.peers build litellm || echo "LiteLLM proxy not built: its interop tests will say so"

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
