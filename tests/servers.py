"""Real server processes for tests: a database of their own, upstreams, web servers.

Needs PostgreSQL and Redis (DATABASE_URL=postgres://..., REDIS_URL=redis://...):
every process runs on a database a `Site` creates for itself (the test
database of pytest-django lives inside a transaction the processes cannot
see), with keys of its own in the shared Redis database, and the test drives
them from outside as a browser or a program would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")

needs_postgres_and_redis = pytest.mark.skipif(
    not (DATABASE_URL.startswith("postgres") and REDIS_URL),
    reason="needs PostgreSQL and Redis (DATABASE_URL=postgres://..., REDIS_URL)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


class Site:
    """The database and environment shared by every process started for it.

    `name` ends the database's name (the one in DATABASE_URL, then `_name`);
    `env` overrides settings for every process. All processes share DATA_DIR,
    hence the generated SECRET_KEY, as a deployment must.
    """

    def __init__(self, tmp: Path, name: str, **env: str) -> None:
        parts = urlsplit(DATABASE_URL)
        self.db_name = f"{parts.path.lstrip('/') or 'llmsite'}_{name}"
        self.admin_url = urlunsplit(parts._replace(path="/postgres"))
        self.url = urlunsplit(parts._replace(path=f"/{self.db_name}"))
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "llmsite.settings",
            "DATABASE_URL": self.url,
            "REDIS_URL": REDIS_URL,
            # Keys of their own in the shared Redis database.
            "CACHE_KEY_PREFIX": f"{name}-{uuid.uuid4().hex[:8]}",
            "DATA_DIR": str(tmp),
            **env,
        }
        self.processes: list[subprocess.Popen[Any]] = []

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(query, args)
            return cursor.fetchall() if cursor.description else []

    def create(self) -> None:
        """A fresh database, migrated."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.manage("migrate", "--noinput")

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def shell(self, script: str) -> Any:
        """Run Python in `manage.py shell`; the JSON it prints last."""
        return json.loads(self.manage("shell", "-c", script).strip().splitlines()[-1])

    def upstream(self, *args: str) -> str:
        """Start a simulated upstream (`simulate_upstream` options); its base URL."""
        port = free_port()
        process = self.start("simulate_upstream", "--port", str(port), *args, log=None)
        wait_for_port(port, process)
        return f"http://127.0.0.1:{port}/v1"

    def start(self, *args: str, log: Path | None, **env: str) -> subprocess.Popen[Any]:
        """Start a `manage.py` command in the background (stopped by `drop`)."""
        return self._popen([sys.executable, "manage.py", *args], log, env)

    def launch(
        self, server: str, log: Path, **env: str
    ) -> tuple[subprocess.Popen[Any], int]:
        """Start daphne or uvicorn on a free port, without waiting for it."""
        port = free_port()
        if server == "daphne":
            command = [".venv/bin/daphne", "-b", "127.0.0.1", "-p", str(port)]
        else:
            command = [".venv/bin/uvicorn", "--host", "127.0.0.1", "--port", str(port)]
        return self._popen([*command, "llmsite.asgi:application"], log, env), port

    def serve(
        self, server: str, log: Path, **env: str
    ) -> tuple[subprocess.Popen[Any], int]:
        """Start daphne or uvicorn on a free port; return once it listens."""
        process, port = self.launch(server, log, **env)
        try:
            wait_for_port(port, process)
        except BaseException:
            stop(process)
            raise
        return process, port

    def _popen(
        self, command: list[str], log: Path | None, env: dict[str, str]
    ) -> subprocess.Popen[Any]:
        output: Any = log.open("ab") if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def drop(self) -> None:
        """Stop every process still running, then drop the database."""
        import psycopg

        for process in self.processes:
            stop(process)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


class ChatTab:
    """A websocket to the chat, as the page opens it."""

    def __init__(self, port: int, cookie: str) -> None:
        from websockets.sync.client import connect

        self._connection = connect(
            f"ws://127.0.0.1:{port}/ws/chat/",
            origin=f"http://127.0.0.1:{port}",
            additional_headers={"Cookie": f"sessionid={cookie}"},
            open_timeout=10,
        )
        self.socket = self._connection.__enter__()

    def send(self, frame: dict[str, Any]) -> None:
        self.socket.send(json.dumps(frame))

    def until(self, *types: str, timeout: float = 15) -> list[dict[str, Any]]:
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            frame = json.loads(self.socket.recv(timeout=deadline - time.monotonic()))
            frames.append(frame)
            if frame["type"] in types:
                return frames

    def rest(self, timeout: float) -> list[dict[str, Any]]:
        """Every frame until the server closes the socket (or the time is up)."""
        from websockets.exceptions import ConnectionClosed

        frames = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                frames.append(json.loads(self.socket.recv(timeout=1)))
        except (ConnectionClosed, TimeoutError):
            pass
        return frames

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


def ask(tab: ChatTab, model: str, content: str = "Tell me a long story.") -> str:
    """Send a question in a new conversation; its id once the answer streams."""
    tab.send(
        {"type": "send", "conversation_id": None, "content": content, "model": model}
    )
    frames = tab.until("delta")
    assert frames[0]["type"] == "start", frames
    return frames[0]["conversation_id"]
