"""The OpenAI-compatible /v1 API against real simulated upstreams on sockets."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from gateway import accounting, api, client
from gateway.models import ApiKey, Endpoint, ModelRoute, RouteKind, UsageRecord
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens
from llmsite.lean import django_http_application
from tests.gateway.usage_support import close_thread_connections, forget_process_state

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "house-model"
MESSAGES = [{"role": "user", "content": "Tell me something."}]
ANSWER = "".join(generated_tokens(8))
COMPLETIONS = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    api.forget_keys()
    yield
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


@pytest.fixture
async def primary():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=8)) as server:
        yield server


@pytest.fixture
async def backup():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=8)) as server:
        yield server


async def add_route(
    name: str,
    server: SimulatedUpstream,
    priority: int,
    *,
    model_name: str = MODEL,
    upstream_model: str = "sim-small",
    kind: str = RouteKind.CHAT,
    **fields: Any,
) -> Endpoint:
    """An endpoint on a simulated upstream, routed to by `model_name`.

    One attempt where another route can answer (the default), so a 503 fails
    over at once; `fields` set more of the endpoint.
    """
    endpoint = await Endpoint.objects.acreate(
        name=name,
        base_url=server.base_url,
        priority=priority,
        timeout=5,
        max_retries=1,
        **fields,
    )
    await ModelRoute.objects.acreate(
        model_name=model_name,
        endpoint=endpoint,
        upstream_model=upstream_model,
        kind=kind,
        priority=priority,
    )
    return endpoint


@pytest.fixture
async def route(primary):
    await add_route("primary", primary, 1)
    yield
    await client.aclose_all()


@pytest.fixture
async def two_routes(primary, backup):
    await add_route("primary", primary, 1)
    await add_route("backup", backup, 2)
    yield
    await client.aclose_all()


@pytest.fixture
def alice_key(owner) -> tuple[ApiKey, str]:
    return ApiKey.generate(owner, "alice's script")


class Program:
    """A program calling the API, with a given Authorization header or none."""

    def __init__(self, authorization: str | None) -> None:
        self.client = AsyncClient()
        # Per request: AsyncClient(headers=...) does not reach ASGI requests.
        self.headers = {"Authorization": authorization} if authorization else {}

    async def get(self, path: str):
        return await self.client.get(path, headers=self.headers)

    async def post(self, path: str, data: str):
        return await self.client.post(
            path, data=data, content_type="application/json", headers=self.headers
        )


@pytest.fixture
def alice(alice_key) -> Program:
    """Alice's program, calling with her key."""
    return Program(f"Bearer {alice_key[1]}")


async def post(program: Program, body: object):
    data = body if isinstance(body, str) else json.dumps(body)
    return await program.post(COMPLETIONS, data)


async def read_events(response) -> list[dict | str]:
    """The SSE data lines of a streamed response, JSON-decoded except [DONE]."""
    body = b"".join([part async for part in response.streaming_content]).decode()
    events: list[dict | str] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def records() -> list[UsageRecord]:
    await accounting.flush()
    return await sync_to_async(list)(UsageRecord.objects.order_by("created_at"))


# --- Authentication ---------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer llms-not-a-key", "Basic YWxpY2U6cGFzcw==", "Bearer "],
    ids=["missing", "unknown", "not-bearer", "empty"],
)
async def test_a_request_without_a_valid_key_gets_401(route, primary, authorization):
    response = await post(
        Program(authorization), {"model": MODEL, "messages": MESSAGES}
    )

    assert response.status_code == 401
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "param": None,
    }
    assert b"llms-not-a-key" not in response.content
    assert primary.stats.chat_requests == 0
    assert await records() == []


async def test_a_revoked_key_stops_working_at_once(route, alice, alice_key):
    key, raw = alice_key
    assert (await alice.get("/v1/models")).status_code == 200

    key.revoked_at = timezone.now()
    await key.asave()
    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert raw not in response.content.decode()


async def test_a_key_of_a_deactivated_user_is_refused(route, alice, owner):
    owner.is_active = False
    await owner.asave()

    assert (await alice.get("/v1/models")).status_code == 401


async def test_last_used_at_is_written_once_a_minute_not_per_request(
    route, alice, alice_key
):
    key, _ = alice_key
    await alice.get("/v1/models")
    await key.arefresh_from_db()
    first = key.last_used_at
    assert first is not None

    await alice.get("/v1/models")
    await key.arefresh_from_db()
    assert key.last_used_at == first

    # Another process (or this one after a minute) may write it again.
    api.forget_keys()
    await ApiKey.objects.filter(pk=key.pk).aupdate(
        last_used_at=first - timedelta(minutes=2)
    )
    await alice.get("/v1/models")
    await key.arefresh_from_db()
    assert key.last_used_at > first


# --- Models -------------------------------------------------------------------------


async def test_models_lists_each_enabled_public_name_once(two_routes, alice):
    endpoint = await Endpoint.objects.acreate(
        name="off", base_url="https://off.test/v1", enabled=False
    )
    await ModelRoute.objects.acreate(
        model_name="hidden-model", endpoint=endpoint, upstream_model="x"
    )

    response = await alice.get("/v1/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"


# --- Completions ----------------------------------------------------------------


async def test_a_plain_completion_answers_in_openai_shape_with_one_record(
    route, alice, alice_key, owner
):
    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", ANSWER)
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert response["X-LLMSite-Endpoint"] == "primary"
    assert response["X-LLMSite-Fallbacks"] == "0"
    assert response["X-LLMSite-Cached"] == "false"
    (record,) = await records()
    assert (record.source, record.status) == ("api", "ok")
    assert (record.api_key_id, record.user_id) == (alice_key[0].pk, owner.pk)
    assert record.request_id.hex == body["id"].removeprefix("chatcmpl-")
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage["prompt_tokens"],
        8,
    )


async def test_a_streamed_completion_relays_chunks_then_usage_then_done(
    route, alice, alice_key
):
    response = await post(
        alice,
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["X-LLMSite-Endpoint"] == "primary"
    events = await read_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {MODEL}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in chunks
        if chunk["choices"]
    )
    assert text == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 8
    (record,) = await records()
    assert (record.source, record.status) == ("api", "ok")
    assert record.api_key_id == alice_key[0].pk
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage["prompt_tokens"],
        8,
    )


async def test_a_stream_without_include_usage_has_no_usage_chunk(route, alice):
    response = await post(alice, {"model": MODEL, "messages": MESSAGES, "stream": True})

    events = await read_events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_fallback_is_reported_in_the_headers(
    two_routes, primary, backup, alice, stream
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await post(
        alice, {"model": MODEL, "messages": MESSAGES, "stream": stream}
    )

    assert response.status_code == 200
    assert response["X-LLMSite-Endpoint"] == "backup"
    assert response["X-LLMSite-Fallbacks"] == "1"
    if stream:
        await read_events(response)
    (record,) = await records()
    assert record.endpoint_name == "backup"
    assert [hop["endpoint"] for hop in record.fallback_hops] == ["primary"]
    # The trail: each endpoint tried, in order, with outcome and times.
    primary_try, backup_try = record.trail
    assert (primary_try["endpoint"], primary_try["outcome"]) == ("primary", "failed")
    assert primary_try["status_code"] == 503
    assert (backup_try["endpoint"], backup_try["outcome"]) == ("backup", "ok")
    assert backup_try["started_ms"] >= primary_try["started_ms"]
    assert primary_try["duration_ms"] >= 0 and backup_try["duration_ms"] >= 0


# --- Refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_over_the_rate_limit_gets_429_with_retry_after(
    route, alice, alice_key, settings, stream
):
    settings.RATE_LIMIT_RPM = 1
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream}
    first = await post(alice, body)
    if stream:
        await read_events(first)

    response = await post(alice, body)

    assert response.status_code == 429
    assert 59 <= int(response["Retry-After"]) <= 60
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limited", "rate_limit_error")
    # Alice's key has no limit of its own: hers is the one used up.
    assert re.fullmatch(
        r"Your limit of 1 request per minute is used up; it resets in (59|60) s\.",
        error["message"],
    )
    rejected = [r for r in await records() if r.status == "rejected"]
    assert len(rejected) == 1
    assert (rejected[0].source, rejected[0].api_key_id) == ("api", alice_key[0].pk)
    assert rejected[0].error_type == "rate_limited"


async def test_an_unknown_model_gets_404_naming_the_param(route, alice):
    response = await post(alice, {"model": "no-such-model", "messages": MESSAGES})

    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")


async def test_every_endpoint_down_gets_503(route, primary, alice):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await post(alice, {"model": MODEL, "messages": MESSAGES, "stream": True})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "all_endpoints_unavailable"
    assert "Retry-After" in response
    (record,) = await records()
    assert (record.source, record.status) == ("api", "error")


async def test_a_failure_after_streaming_started_ends_with_an_error_event(
    route, primary, alice
):
    primary.set_behaviour(
        Behaviour(completion_tokens=8, fault="drop", fault_after_tokens=3)
    )

    response = await post(alice, {"model": MODEL, "messages": MESSAGES, "stream": True})

    assert response.status_code == 200
    events = await read_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    text = "".join(
        event["choices"][0]["delta"].get("content") or ""
        for event in events[:-2]
        if isinstance(event, dict) and event.get("choices")
    )
    assert text
    assert ANSWER.startswith(text)
    (record,) = await records()
    assert (record.source, record.status) == ("api", "error")


# --- Bad requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("{not json", None),
        ("[1, 2]", None),
        ({"messages": MESSAGES}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": ["hi"]}, "messages[0]"),
        (
            {"model": MODEL, "messages": [{"role": "king", "content": "x"}]},
            "messages[0].role",
        ),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": "10"}, "max_tokens"),
        ({"model": MODEL, "messages": MESSAGES, "n": 2}, "n"),
    ],
)
async def test_a_malformed_body_gets_400_naming_the_field(
    route, primary, alice, body, param
):
    response = await post(alice, body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert primary.stats.chat_requests == 0
    assert await records() == []


# --- Disconnects ----------------------------------------------------------------


def asgi_scope(key: str) -> dict:
    """An ASGI request to /v1/chat/completions with this key, for raw ASGI tests."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": COMPLETIONS,
        "raw_path": COMPLETIONS.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", 80),
    }


async def test_a_client_disconnect_closes_the_upstream_stream(
    route, primary, alice_key
):
    # Long and slow: the upstream is still answering when the client leaves.
    primary.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=20))
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True})
    scope = asgi_scope(alice_key[1])
    first_text = asyncio.Event()
    requests = iter([{"type": "http.request", "body": body.encode()}])
    sent: list[dict] = []

    async def receive() -> dict:
        message = next(requests, None)
        if message is not None:
            return message
        await first_text.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if b'"content":"' in message.get("body", b"") and b'"content":""' not in (
            message.get("body", b"")
        ):
            first_text.set()

    await asyncio.wait_for(django_http_application()(scope, receive, send), timeout=10)

    await primary.wait_for_disconnects(1)
    assert sent[0]["status"] == 200
    (record,) = await records()
    assert (record.source, record.status) == ("api", "cancelled")
    assert 0 < record.completion_tokens < 400


# --- The official SDK -------------------------------------------------------------


@pytest.fixture
def live_asgi_url(transactional_db) -> Iterator[str]:
    """Our ASGI app under uvicorn in a thread, on the test database."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(django_http_application(), lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)
    sock.close()


def wait_for_records(count: int) -> list[UsageRecord]:
    # The records are written by the server's loop; poll rather than flush it.
    deadline = time.monotonic() + 5
    while len(found := list(UsageRecord.objects.all())) < count:
        assert time.monotonic() < deadline, f"expected {count} usage records"
        time.sleep(0.02)
    return found


def test_the_official_openai_sdk_works_unchanged(owner, live_asgi_url):
    openai = pytest.importorskip("openai")
    key, raw = ApiKey.generate(owner, "sdk")
    with SimulatedUpstream(
        behaviour=Behaviour(completion_tokens=8)
    ).run_in_thread() as (upstream):
        endpoint = Endpoint.objects.create(
            name="primary", base_url=upstream.base_url, timeout=5, max_retries=1
        )
        ModelRoute.objects.create(
            model_name=MODEL, endpoint=endpoint, upstream_model="sim-small"
        )
        sdk = openai.OpenAI(base_url=live_asgi_url, api_key=raw, max_retries=0)

        assert [model.id for model in sdk.models.list()] == [MODEL]
        plain = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert plain.choices[0].message.content == ANSWER
        assert plain.usage.completion_tokens == 8
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        ) == (ANSWER)
        assert chunks[-1].usage.completion_tokens == 8
        with pytest.raises(openai.NotFoundError) as refused:
            sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
        assert refused.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=live_asgi_url, api_key="llms-wrong", max_retries=0
            ).models.list()

    found = wait_for_records(3)
    assert sorted(r.status for r in found) == ["ok", "ok", "rejected"]
    assert {(r.source, r.api_key_id) for r in found} == {("api", key.pk)}
