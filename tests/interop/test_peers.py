"""scripts/peers.py as `make run-model` uses it: the llama.cpp server on its port."""

from __future__ import annotations

import os
import sys

from scripts import peers
from tests.interop.conftest import PeerProcess, free_port, require_peer


def test_serve_listens_on_its_port_whatever_port_the_web_server_has(tmp_path):
    # `make run-model PORT=8765` hands PORT to everything run.sh starts; the
    # llama.cpp server would read it and take the web server's port.
    require_peer("llama")
    port, web_port = free_port(), free_port()
    server = PeerProcess(
        [sys.executable, "-m", "scripts.peers", "serve", "llama", "--port", str(port)],
        {**os.environ, "PORT": str(web_port), "HOST": "0.0.0.0"},
        tmp_path / "server.log",
        port,
    )
    try:
        server.wait_ready("/v1/models", timeout=30)

        assert f"Uvicorn running on http://127.0.0.1:{port}" in server.output()
    finally:
        server.stop()


def test_the_llama_environment_drops_only_host_and_port():
    base = {"HOST": "0.0.0.0", "PORT": "8765", "PATH": "/usr/bin", "HOME": "/root"}

    assert peers.llama_env(base) == {"PATH": "/usr/bin", "HOME": "/root"}
