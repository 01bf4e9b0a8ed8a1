"""Real peers as upstreams: the llama.cpp server and the LiteLLM proxy.

Each peer is built once into its own cached virtualenv (scripts/peers.py;
`make test` builds them). Where a build is not possible here, the peer's tests
are skipped with the reason, except under LLMSITE_REQUIRE_PEERS=1 (set by
.ci/run), where a missing peer fails them: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from channels.layers import channel_layers

from scripts import peers


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    """A channel layer per test: the Redis one stays bound to its first loop."""
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


def require_peer(name: str) -> None:
    """Skip (or fail, in CI) unless the peer's virtualenv is built."""
    if peers.is_built(name):
        return
    reason = (
        f"the {name} peer is not built in {peers.venv(name)}: "
        f"`.venv/bin/python -m scripts.peers build {name}` builds it "
        "(make test tries it first)"
    )
    if os.environ.get("LLMSITE_REQUIRE_PEERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PeerProcess:
    """A peer server in a subprocess, its output in a log file kept for failures."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None, log: Path, port: int
    ) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, path: str, timeout: float = 120) -> None:
        """Until `path` answers 200; fails with the peer's output if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"peer at {self.base_url} did not start:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[PeerProcess]:
    """The llama.cpp server on SmolLM2 (2,048-token window), once per session."""
    require_peer("llama")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    server = PeerProcess(peers.llama_server_argv(port), peers.llama_env(), log, port)
    try:
        server.wait_ready("/v1/models")
        yield server
    finally:
        server.stop()
