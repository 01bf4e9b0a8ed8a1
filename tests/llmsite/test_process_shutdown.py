"""A real web server (daphne and uvicorn) stopped by SIGTERM or killed mid-answer.

Needs PostgreSQL and Redis (DATABASE_URL=postgres://..., REDIS_URL=redis://...):
the server runs in a subprocess, on a database this module creates for itself
(the test database of pytest-django lives inside a transaction the server
cannot see), against the simulated upstream in another subprocess, answering
slowly enough that the answers are in flight when the signal lands.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")
GRACE = 3
LEASE = 3
MODEL = "house-model"

pytestmark = [
    pytest.mark.skipif(
        not (DATABASE_URL.startswith("postgres") and REDIS_URL),
        reason="needs PostgreSQL and Redis (DATABASE_URL=postgres://..., REDIS_URL)",
    ),
    # The server's database is this module's own, not pytest-django's.
    pytest.mark.django_db(transaction=True),
]

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
from gateway.models import ApiKey, Budget, BudgetScope, Endpoint, ModelRoute

user = get_user_model().objects.create_user("alice", password="not-used-here")
endpoint = Endpoint.objects.create(name="sim", base_url="{base_url}", timeout=30)
ModelRoute.objects.create(
    model_name="{model}", endpoint=endpoint, upstream_model="sim-small"
)
Budget.objects.create(scope=BudgetScope.USER, user=user, token_limit=1_000_000)
_, raw_key = ApiKey.generate(user, "process test")
client = Client()
client.force_login(user)
print(json.dumps({{"cookie": client.cookies["sessionid"].value, "key": raw_key}}))
"""


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
    """The database, environment and upstream shared by every server started."""

    def __init__(self, tmp: Path) -> None:
        parts = urlsplit(DATABASE_URL)
        self.db_name = f"{parts.path.lstrip('/') or 'llmsite'}_proc"
        self.admin_url = urlunsplit(parts._replace(path="/postgres"))
        self.url = urlunsplit(parts._replace(path=f"/{self.db_name}"))
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "llmsite.settings",
            "DATABASE_URL": self.url,
            "REDIS_URL": REDIS_URL,
            # Keys of their own in the shared Redis database.
            "CACHE_KEY_PREFIX": f"proc-{uuid.uuid4().hex[:8]}",
            "DATA_DIR": str(tmp),
            "SHUTDOWN_GRACE_SECONDS": str(GRACE),
            "CHAT_LEASE_SECONDS": str(LEASE),
            "CHAT_RESUME_GRACE_SECONDS": "30",
            "RATE_LIMIT_RPM": "0",
            "USAGE_WRITE_DELAY_MS": "50",
        }
        self.upstream: subprocess.Popen[Any] | None = None

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(query, args)
            return cursor.fetchall() if cursor.description else []

    def create(self) -> dict[str, str]:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.manage("migrate", "--noinput")
        port = free_port()
        self.upstream = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "simulate_upstream",
                "--port",
                str(port),
                "--tokens-per-second",
                "10",
                "--completion-tokens",
                "2000",
                "--models",
                "sim-small",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, self.upstream)
        script = SETUP.format(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL)
        return json.loads(self.manage("shell", "-c", script).strip().splitlines()[-1])

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

    def drop(self) -> None:
        import psycopg

        if self.upstream is not None:
            stop(self.upstream)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def serve(self, server: str, log: Path) -> tuple[subprocess.Popen[Any], int]:
        port = free_port()
        if server == "daphne":
            command = [".venv/bin/daphne", "-b", "127.0.0.1", "-p", str(port)]
        else:
            command = [".venv/bin/uvicorn", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "llmsite.asgi:application"],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, process)
        except BaseException:
            stop(process)
            raise
        return process, port


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("proc"))
    site.credentials = site.create()  # type: ignore[attr-defined]
    yield site
    site.drop()


@pytest.fixture
def clean(site: Site) -> Site:
    """No conversations or records of an earlier test; the budget back to full."""
    site.sql("DELETE FROM chat_message")
    site.sql("DELETE FROM chat_conversation")
    site.sql("DELETE FROM gateway_usagerecord")
    site.sql("DELETE FROM gateway_budgetcounter")
    return site


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


def ask(tab: ChatTab) -> str:
    """Send a question in a new conversation; its id once the answer streams."""
    tab.send(
        {
            "type": "send",
            "conversation_id": None,
            "content": "Tell me a long story.",
            "model": MODEL,
        }
    )
    frames = tab.until("delta")
    assert frames[0]["type"] == "start", frames
    return frames[0]["conversation_id"]


class V1Plain(threading.Thread):
    """A plain /v1 request on a thread of its own."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = httpx.post(
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {self.key}"},
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Take your time."}],
                },
                timeout=30,
            )
        except BaseException as exc:
            self.error = exc


class V1Stream(threading.Thread):
    """A streamed /v1 request read line by line on a thread of its own."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.lines: list[str] = []
        self.content = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                f"http://127.0.0.1:{self.port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {self.key}"},
                json={
                    "model": MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "Go on."}],
                },
                timeout=30,
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        self.content.set()
        except BaseException as exc:
            self.error = exc


def budget_counter(site: Site) -> tuple[int, int]:
    [(used, reserved)] = site.sql(
        "SELECT used_tokens, reserved_tokens FROM gateway_budgetcounter"
    )
    return used, reserved


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_sigterm_keeps_the_answers_in_flight_and_settles_their_budget(
    clean, server, tmp_path
):
    site = clean
    process, port = site.serve(server, tmp_path / "server.log")
    try:
        tab = ChatTab(port, site.credentials["cookie"])
        conversation_id = ask(tab)
        v1 = V1Stream(port, site.credentials["key"])
        v1.start()
        plain = V1Plain(port, site.credentials["key"])
        plain.start()
        assert v1.content.wait(15), (v1.lines, v1.error)
        # The plain request is in flight once its reservation is taken.
        deadline = time.monotonic() + 10
        while budget_counter(site)[1] == 0 or len(
            site.sql("SELECT 1 FROM gateway_usagerecord")
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)

        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            refused = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {site.credentials['key']}"},
                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                timeout=5,
            )
            # daphne still listens while it drains; uvicorn stops listening.
            assert refused.status_code == 503
            assert int(refused.headers["Retry-After"]) > 0
        except httpx.ConnectError:
            assert server == "uvicorn"
        tab.rest(GRACE + 5)
        process.wait(timeout=GRACE + 15)
        took = time.monotonic() - began
        v1.join(10)
        plain.join(10)
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text(errors="replace")

    assert took < GRACE + 4, log[-3000:]
    [(status, content, meta)] = site.sql(
        "SELECT status, content, meta FROM chat_message "
        "WHERE conversation_id = %s AND role = 'assistant'",
        uuid.UUID(conversation_id),
    )
    assert status == "partial", log[-3000:]
    assert len(content) > 10
    assert meta["stop_reason"] == "shutdown"
    records = site.sql(
        "SELECT source, status, completion_tokens FROM gateway_usagerecord "
        "ORDER BY source"
    )
    assert [(r[0], r[1]) for r in records] == [
        ("api", "cancelled"),
        ("api", "cancelled"),
        ("chat", "cancelled"),
    ], log[-3000:]
    # The streamed answers count the tokens sent until the cut (the plain
    # request's record has no text to count).
    assert records[2][2] > 0 and max(records[0][2], records[1][2]) > 0
    used, reserved = budget_counter(site)
    assert reserved == 0
    assert used > 0
    assert v1.error is None, v1.error
    # The plain request cut at the deadline is told why, and when to retry.
    assert plain.error is None, plain.error
    assert plain.response is not None and plain.response.status_code == 503
    assert plain.response.json()["error"]["code"] == "server_restarting"
    # The /v1 stream ends with the reason, not a dropped connection.
    assert (
        v1.lines[-2:]
        == [
            v1.lines[-2],
            "data: [DONE]",
        ]
        and "server_restarting" in v1.lines[-2]
    ), v1.lines[-3:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_after_kill_9_the_answer_opens_as_interrupted_and_can_be_retried(
    clean, server, tmp_path
):
    site = clean
    process, port = site.serve(server, tmp_path / "server.log")
    try:
        tab = ChatTab(port, site.credentials["cookie"])
        conversation_id = ask(tab)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        killed_at = time.monotonic()
        tab.rest(1)
    finally:
        stop(process)
    [(status, request_id)] = site.sql(
        "SELECT status, request_id FROM chat_message "
        "WHERE conversation_id = %s AND role = 'assistant'",
        uuid.UUID(conversation_id),
    )
    assert status == "streaming"
    assert request_id is not None
    [(reserved,)] = site.sql("SELECT reserved_tokens FROM gateway_budgetcounter")
    assert reserved > 0

    # One monitor round: its sweeper sees the reserving process is gone from
    # this machine, releases the reservation and writes the request's record.
    site.manage("monitor", "--once")
    [(reserved,)] = site.sql("SELECT reserved_tokens FROM gateway_budgetcounter")
    assert reserved == 0
    assert site.sql(
        "SELECT status, error_type FROM gateway_usagerecord WHERE request_id = %s",
        request_id,
    ) == [("error", "interrupted")]
    assert site.sql("SELECT count(*) FROM gateway_budgethold") == [(0,)]

    process, port = site.serve(server, tmp_path / "server.log")
    try:
        tab = ChatTab(port, site.credentials["cookie"])
        deadline = time.monotonic() + LEASE + 5
        while True:
            tab.send({"type": "open", "conversation_id": conversation_id})
            opened = tab.until("opened")[-1]
            messages = opened["messages"]
            if messages[-1]["role"] == "assistant" or time.monotonic() > deadline:
                break
            # Still claimed by the dead process for at most CHAT_LEASE_SECONDS.
            time.sleep(0.5)
        assert [(m["role"], m["status"]) for m in messages] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
        ]
        # The dead process's claim on the conversation lasts CHAT_LEASE_SECONDS
        # (the sweeper may have marked the answer interrupted before that).
        time.sleep(max(0.0, killed_at + LEASE + 0.5 - time.monotonic()))
        tab.send({"type": "regenerate", "conversation_id": conversation_id})
        start = tab.until("start")[-1]
        assert start["user_message"]["id"] == messages[0]["id"]
        tab.until("delta")
        tab.send({"type": "stop", "conversation_id": conversation_id})
        done = tab.until("done")[-1]
        assert done["answer"]["status"] == "partial"
        tab.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=GRACE + 15)
        finally:
            stop(process)
    # The retry is a new version of the answer; the interrupted one is kept.
    assert site.sql(
        "SELECT status, active FROM chat_message "
        "WHERE conversation_id = %s AND role = 'assistant' ORDER BY id",
        uuid.UUID(conversation_id),
    ) == [("interrupted", False), ("partial", True)]
