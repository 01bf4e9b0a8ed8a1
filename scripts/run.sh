#!/usr/bin/env bash
# Starts the whole app for a laptop: two simulated upstreams, the monitor and
# daphne. Ctrl-C stops them all. DEMO_REAL_MODEL=1 (`make run-model`) also
# starts the llama.cpp server on SmolLM2 (built by `scripts.peers build llama`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
PRIMARY_PORT=${DEMO_PRIMARY_PORT:-9101}
FALLBACK_PORT=${DEMO_FALLBACK_PORT:-9102}
MODEL_PORT=${DEMO_MODEL_PORT:-9103}
REAL_MODEL=${DEMO_REAL_MODEL:-}

demo_args=(--primary-port "$PRIMARY_PORT" --fallback-port "$FALLBACK_PORT")
if [ "$REAL_MODEL" = 1 ]; then
    demo_args+=(--model-port "$MODEL_PORT")
fi

$PY manage.py migrate --noinput
$PY manage.py setup_demo "${demo_args[@]}"

pids=()
# The model server is not in pids: stopping it alone shows a live failover.
model_pids=()
stop() {
    trap - EXIT INT TERM
    kill "${pids[@]}" "${model_pids[@]}" 2>/dev/null || true
    wait || true
}
trap stop EXIT INT TERM

# The demo upstreams answer at a readable pace, so streaming can be watched.
$PY manage.py simulate_upstream --port "$PRIMARY_PORT" --tokens-per-second 25 \
    --models sim-small,sim-large,sim-embed & pids+=($!)
$PY manage.py simulate_upstream --port "$FALLBACK_PORT" --tokens-per-second 25 \
    --models sim-small,sim-large,sim-embed & pids+=($!)
if [ "$REAL_MODEL" = 1 ]; then
    # It reports every tensor it loads: its output goes to a file instead.
    mkdir -p var
    $PY -m scripts.peers serve llama --port "$MODEL_PORT" >var/llama-server.log 2>&1 &
    model_pids+=($!)
fi
if $PY manage.py help monitor >/dev/null 2>&1; then
    $PY manage.py monitor & pids+=($!)
fi
.venv/bin/daphne -b "$HOST" -p "$PORT" llmsite.asgi:application & pids+=($!)

echo
echo "llmsite is running at http://$HOST:$PORT/  (admin: http://$HOST:$PORT/admin/)"
if [ "$REAL_MODEL" = 1 ]; then
    echo "Pick the model smollm2 for SmolLM2 on the llama.cpp server (port $MODEL_PORT,"
    echo "log in var/llama-server.log; stop it alone to watch the fallback answer)."
fi
echo "Press Ctrl-C to stop."
# Stop everything as soon as any one of them exits.
wait -n "${pids[@]}"
