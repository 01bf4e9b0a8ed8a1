"""Requests under /v1/ take the lean middleware stack; every other page the full one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from asgiref.sync import SyncToAsync
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started

from gateway import api
from gateway.models import ApiKey
from llmsite.asgi import application
from llmsite.lean import LeanASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)

# What SecurityMiddleware and XFrameOptionsMiddleware add to every page.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "x-frame-options": "DENY",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def call(
    app, path: str, *, host: str = "localhost", key: str | None = None
) -> Answer:
    """One GET through an ASGI application, as a server would send it."""
    headers = [(b"host", host.encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", 80),
    }
    sent: list[dict] = []
    requests = iter([{"type": "http.request", "body": b""}])
    never = asyncio.Event()

    async def receive() -> dict:
        message = next(requests, None)
        if message is None:
            # The client stays connected until the handler is done.
            await never.wait()
        return message

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *bodies = sent
    return Answer(
        status=start["status"],
        headers={
            name.decode().lower(): value.decode() for name, value in start["headers"]
        },
        body=b"".join(message.get("body", b"") for message in bodies),
    )


@pytest.fixture
def sync_calls(monkeypatch) -> Iterator[list[str]]:
    """The names of the functions run through sync_to_async, in order."""
    calls: list[str] = []
    run_in_thread = SyncToAsync.thread_handler

    def recording(self, *args, **kwargs):
        calls.append(getattr(self.func, "__qualname__", repr(self.func)))
        return run_in_thread(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "thread_handler", recording)
    yield calls


@pytest.fixture
def alice_key(owner) -> Iterator[str]:
    api.forget_keys()
    yield ApiKey.generate(owner, "alice's script")[1]
    api.forget_keys()


async def test_an_api_request_runs_no_middleware_in_a_thread(alice_key, sync_calls):
    # The first request caches the key; the next is the steady state.
    await call(application, "/v1/models", key=alice_key)
    sync_calls.clear()

    answer = await call(application, "/v1/models", key=alice_key)

    assert answer.status == 200
    assert json.loads(answer.body)["object"] == "list"
    assert not [name for name in sync_calls if "Middleware" in name]
    # Django's handler itself still sends request_started and closes the
    # response (request_finished) in a thread: they close database connections.
    assert sync_calls[0] == "Signal.asend.<locals>.sync_send"
    assert sync_calls[-1] == "HttpResponseBase.close"
    assert "set-cookie" not in answer.headers
    assert "vary" not in answer.headers


async def test_a_page_still_goes_through_the_full_stack(sync_calls):
    answer = await call(application, "/accounts/login/")

    assert answer.status == 200
    assert "csrftoken=" in answer.headers["set-cookie"]
    assert "Cookie" in answer.headers["vary"]
    assert answer.headers.items() >= SECURITY_HEADERS.items()
    assert {
        "SessionMiddleware.process_request",
        "CsrfViewMiddleware.process_view",
        "AuthenticationMiddleware.process_request",
        "MessageMiddleware.process_response",
    } <= set(sync_calls)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/no-such-thing"])
async def test_api_answers_keep_the_headers_the_full_stack_sends(path, alice_key):
    lean = await call(application, path, key=alice_key)
    full = await call(ASGIHandler(), path, key=alice_key)

    assert lean.status == full.status
    assert lean.body == full.body
    assert lean.headers == full.headers
    assert lean.headers.items() >= SECURITY_HEADERS.items()
    assert lean.headers["content-length"] == str(len(lean.body))


async def test_an_api_request_is_refused_for_a_host_not_allowed():
    answer = await call(application, "/v1/models", host="evil.example")

    assert answer.status == 400


async def test_an_api_request_sends_the_request_signals():
    signals: list[str] = []

    def started(**kwargs):
        signals.append("started")

    def finished(**kwargs):
        signals.append("finished")

    request_started.connect(started)
    request_finished.connect(finished)
    try:
        await call(application, "/v1/models")
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)

    assert signals == ["started", "finished"]


def test_the_lean_list_refuses_a_sync_middleware(settings):
    settings.LEAN_MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]

    with pytest.raises(ImproperlyConfigured, match="SessionMiddleware"):
        LeanASGIHandler()


async def test_api_requests_share_one_sync_thread(alice_key):
    # Django's own handler starts a thread per request for thread-sensitive
    # work (and joins it on the event loop when the request ends); the lean
    # handler runs that work on asgiref's one shared thread.
    # Thread objects, not idents: an ident is reused once its thread ends.
    threads: list[threading.Thread] = []

    def started(**kwargs):
        threads.append(threading.current_thread())

    request_started.connect(started)
    try:
        for _ in range(3):
            assert (await call(application, "/v1/models", key=alice_key)).status == 200
        lean_threads = set(threads)
        threads.clear()
        for _ in range(2):
            await call(ASGIHandler(), "/v1/models", key=alice_key)
    finally:
        request_started.disconnect(started)

    assert len(lean_threads) == 1
    assert lean_threads.isdisjoint(threads)
    # Two requests through Django's handler: two threads of their own.
    assert len(set(threads)) == 2
    assert not SyncToAsync.context_to_thread_executor
