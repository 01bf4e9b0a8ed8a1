"""A real web server (daphne and uvicorn) stopped by SIGTERM or killed mid-answer.

Needs PostgreSQL and Redis (DATABASE_URL=postgres://..., REDIS_URL=redis://...):
the server runs in a subprocess (tests/servers.py), against the simulated
upstream in another subprocess, answering slowly enough that the answers are
in flight when the signal lands.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import ChatTab, Site, ask, needs_postgres_and_redis, stop

GRACE = 3
LEASE = 3
MODEL = "house-model"

pytestmark = [
    needs_postgres_and_redis,
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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    site = Site(
        tmp_path_factory.mktemp("proc"),
        "proc",
        SHUTDOWN_GRACE_SECONDS=str(GRACE),
        CHAT_LEASE_SECONDS=str(LEASE),
        CHAT_RESUME_GRACE_SECONDS="30",
        RATE_LIMIT_RPM="0",
        USAGE_WRITE_DELAY_MS="50",
    )
    try:
        site.create()
        # Slow, long answers: still in flight when the signal lands.
        base_url = site.upstream(
            "--tokens-per-second",
            "10",
            "--completion-tokens",
            "2000",
            "--models",
            "sim-small",
        )
        site.credentials = site.shell(  # type: ignore[attr-defined]
            SETUP.format(base_url=base_url, model=MODEL)
        )
        yield site
    finally:
        site.drop()


@pytest.fixture
def clean(site: Site) -> Site:
    """No conversations or records of an earlier test; the budget back to full."""
    site.sql("DELETE FROM chat_message")
    site.sql("DELETE FROM chat_conversation")
    site.sql("DELETE FROM gateway_usagerecord")
    site.sql("DELETE FROM gateway_budgetcounter")
    return site


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
        conversation_id = ask(tab, MODEL)
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
        conversation_id = ask(tab, MODEL)
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
