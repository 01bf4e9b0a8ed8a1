"""A hostile upstream on a socket, through /v1 (plain and streamed) and the chat path.

Every mode of `tests.gateway.hostile_upstream` must end each request within
the bounds set below (small, so the file runs in seconds): a clean answer or a
clean error, never a 500; exactly one usage record that says why; the budget
reservation settled; the upstream connection closed; memory bounded; and no
secret (the endpoint key, an extra header value, or any 10-character piece of
them), NUL or lone surrogate in what users, logs or records see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import tracemalloc
from dataclasses import dataclass, field

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client

from gateway import accounting, api, client, service
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetScope,
    Endpoint,
    ModelRoute,
    UsageRecord,
)
from tests.gateway.hostile_upstream import HostileUpstream
from tests.gateway.usage_support import close_thread_connections, forget_process_state

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "house-model"
MESSAGES = [{"role": "user", "content": "Tell me something."}]
KEY = "sk-hostile-Q7ZbW9wPn2LrT5vY8aC3dF6gH1jK4mN0"
ORG_TOKEN = "org-7f3e9c0a5b1d"
SECRETS = (KEY, ORG_TOKEN)
# The bounds under test, small enough for a fast suite.
MAX_SECONDS = 1.5
IDLE_SECONDS = 0.75
MAX_TOKENS = 50
# Generous: the point is "bounded", against +1 GB in 20 s before the fix.
MAX_MEMORY_GROWTH = 8 * 1024 * 1024
MAX_REQUEST_SECONDS = MAX_SECONDS + 2.0


@pytest.fixture(autouse=True)
def _bounds(settings):
    # The personas' password hashing would cost more than the requests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    settings.GATEWAY_REQUEST_MAX_SECONDS = MAX_SECONDS
    settings.GATEWAY_MAX_RESPONSE_BYTES = 1024 * 1024
    settings.GATEWAY_MAX_SSE_EVENT_BYTES = 256 * 1024
    settings.GATEWAY_MAX_BYTES_BEFORE_CONTENT = 64 * 1024
    settings.GATEWAY_MAX_CHUNKS_BEFORE_CONTENT = 200
    settings.GATEWAY_MAX_STREAM_BYTES = 2 * 1024 * 1024
    # Degraded mode would answer from a kept answer instead of failing.
    settings.GATEWAY_RESPONSE_CACHE_TTL = 0
    forget_process_state()
    api.forget_keys()
    yield
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


@pytest.fixture
def logs(caplog):
    """Everything the gateway logs, whatever the logging config propagates."""
    logger = logging.getLogger("gateway")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.setLevel(previous)
    logger.removeHandler(caplog.handler)


@pytest.fixture
async def hostile():
    async with HostileUpstream(interval=0.3) as server:
        yield server
    await client.aclose_all()


@pytest.fixture
def budget(owner):
    return Budget.objects.create(
        scope=BudgetScope.USER, user=owner, token_limit=10_000_000
    )


@pytest.fixture
def alice_key(owner) -> str:
    return ApiKey.generate(owner, "alice's script")[1]


async def add_route(server: HostileUpstream, mode: str) -> None:
    endpoint = Endpoint(
        name=mode,
        base_url=server.url(mode),
        timeout=IDLE_SECONDS,
        first_token_timeout=IDLE_SECONDS,
        connect_timeout=IDLE_SECONDS,
        max_retries=1,
        extra_headers={"X-Org-Token": ORG_TOKEN},
    )
    endpoint.api_key = KEY
    await endpoint.asave()
    await ModelRoute.objects.acreate(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model="sim-small",
        max_output_tokens=MAX_TOKENS,
        context_window=8000,
    )


# --- One request, three ways --------------------------------------------------------


@dataclass
class Outcome:
    """What a caller saw, reduced to what the assertions need."""

    status: int  # HTTP status; 200 for a chat answer, 0 for a chat refusal
    text: str = ""
    finish_reason: str | None = None
    error: str = ""  # the error message shown, if any
    seen: list[str] = field(default_factory=list)  # every string shown


async def via_v1(key: str, stream: bool) -> Outcome:
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream}
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )
    if getattr(response, "streaming", False):
        raw = b"".join([part async for part in response.streaming_content]).decode()
    else:
        raw = response.content.decode()
    outcome = Outcome(response.status_code, seen=[raw])
    if response.status_code != 200:
        outcome.error = json.loads(raw)["error"]["message"]
        return outcome
    if not stream:
        payload = json.loads(raw)
        choice = payload["choices"][0]
        outcome.text = choice["message"]["content"]
        outcome.finish_reason = choice["finish_reason"]
        return outcome
    for line in raw.splitlines():
        data = line.removeprefix("data: ")
        if not line.startswith("data: ") or data == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            outcome.error = event["error"]["message"]
            continue
        for choice in event["choices"]:
            outcome.text += choice["delta"].get("content") or ""
            outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
    return outcome


async def via_chat(user_id: int) -> Outcome:
    caller = service.Caller(user_id)
    text = ""
    try:
        async with contextlib.aclosing(
            service.stream_chat(caller, MODEL, MESSAGES)
        ) as events:
            async for event in events:
                if isinstance(event, service.Delta):
                    text += event.text
                elif isinstance(event, service.Done):
                    frame = json.dumps(event.to_dict())
                    outcome = Outcome(
                        200, event.text, event.finish_reason, seen=[frame]
                    )
                    if event.error is not None:
                        outcome.error = event.error.message
                    assert event.text == text
                    return outcome
    except service.Rejected as rejected:
        return Outcome(
            0, error=rejected.message, seen=[json.dumps(rejected.error.to_dict())]
        )
    raise AssertionError("the chat stream ended without Done")


# --- The modes -------------------------------------------------------------------

# What each caller must see: "error" (a clean refusal, no text), "cut" (text
# cut at max_tokens, finish_reason "length"), "partial" (some text, then an
# error), "ok", or "estimated" (ok, with usage we counted ourselves). Then a
# piece of text the usage record (error type, message or hops) must contain.
ERROR, CUT, PARTIAL, OK, ESTIMATED = "error", "cut", "partial", "ok", "estimated"

CASES = {
    # mode: {channel: (expected, reason in the record)}
    "nul_error": dict.fromkeys(("plain", "stream", "chat"), (ERROR, "badrequest")),
    "binary_error": dict.fromkeys(("plain", "stream", "chat"), (ERROR, "server error")),
    "key_at_cut": dict.fromkeys(("plain", "stream", "chat"), (ERROR, "server error")),
    "retry_after_inf": dict.fromkeys(
        ("plain", "stream", "chat"), (ERROR, "rate limited")
    ),
    "key_in_line": {
        "plain": (ERROR, "not JSON"),
        "stream": (ERROR, "not a JSON object"),
        "chat": (ERROR, "not a JSON object"),
    },
    "empty_chunks": {
        "plain": (ERROR, "byte limit"),
        "stream": (ERROR, "stream_limit"),
        "chat": (ERROR, "stream_limit"),
    },
    "endless_content": {
        "plain": (ERROR, "byte limit"),
        "stream": (CUT, "output_limit"),
        "chat": (CUT, "output_limit"),
    },
    "keepalive_only": {
        "plain": (ERROR, "APIDeadlineError"),
        "stream": (ERROR, "no first token within 0.75 s"),
        "chat": (ERROR, "no first token within 0.75 s"),
    },
    "drip": {
        "plain": (ERROR, "APIDeadlineError"),
        "stream": (PARTIAL, "APIDeadlineError"),
        "chat": (PARTIAL, "APIDeadlineError"),
    },
    **{
        mode: dict.fromkeys(("plain", "stream", "chat"), (ESTIMATED, ""))
        for mode in (
            "usage_huge",
            "usage_float",
            "usage_string",
            "usage_negative",
            "usage_bool",
            "usage_not_object",
        )
    },
    "choices_five": dict.fromkeys(("plain", "stream", "chat"), (ERROR, "no choices")),
    "bad_shapes": dict.fromkeys(("plain", "stream", "chat"), (ESTIMATED, "")),
    "plain_answer": dict.fromkeys(("plain", "stream", "chat"), (OK, "")),
    "long_plain": dict.fromkeys(("plain", "stream", "chat"), (CUT, "output_limit")),
    "deep_json": dict.fromkeys(("plain", "stream", "chat"), (ERROR, "not JSON")),
}
PARAMS = [
    pytest.param(mode, channel, id=f"{mode}-{channel}")
    for mode, channels in CASES.items()
    for channel in channels
]


def assert_clean(texts: list[str]) -> None:
    """No secret, nor any 10-character piece of one, NUL or lone surrogate."""
    blob = "\n".join(texts)
    for secret in SECRETS:
        for start in range(len(secret) - 9):
            assert secret[start : start + 10] not in blob, secret[start : start + 10]
    assert "\x00" not in blob
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in blob)


def admin_pages(staff, record: UsageRecord) -> list[str]:
    """The usage list and the record's page, as an admin reads them."""
    browser = Client()
    browser.force_login(staff)
    pages = []
    for url in (
        "/admin/gateway/usagerecord/",
        f"/admin/gateway/usagerecord/{record.pk}/change/",
    ):
        response = browser.get(url)
        assert response.status_code == 200, url
        pages.append(response.content.decode())
    return pages


@pytest.mark.parametrize(("mode", "channel"), PARAMS)
async def test_a_hostile_upstream_ends_cleanly_and_accountably(
    mode, channel, hostile, owner, staff, budget, alice_key, logs
):
    expected, reason = CASES[mode][channel]
    await add_route(hostile, mode)

    tracemalloc.start()
    started = time.monotonic()
    try:
        if channel == "chat":
            outcome = await via_chat(owner.pk)
        else:
            outcome = await via_v1(alice_key, stream=channel == "stream")
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Bounded time and memory, and the upstream connection closed.
    assert elapsed < MAX_REQUEST_SECONDS
    assert peak < MAX_MEMORY_GROWTH
    assert await hostile.wait_idle()
    # What the caller saw.
    if expected == ERROR:
        assert outcome.status in (0, 502, 503)
        assert outcome.error and not outcome.text
    elif expected == PARTIAL:
        assert outcome.status == 200
        assert "drop" in outcome.text and outcome.error
    else:
        assert outcome.status == 200
        assert outcome.text and not outcome.error
    if expected == CUT:
        assert outcome.finish_reason == "length"
    if mode == "bad_shapes":
        # Only strings are text; NUL and lone surrogates never get through.
        assert outcome.text in ("Hello", "Hello world")
        # A finish reason is a short clean name, or none at all.
        assert outcome.finish_reason.startswith("stop")
        assert len(outcome.finish_reason) <= 40
    # Exactly one usage record, which says why.
    await accounting.flush()
    records = await sync_to_async(list)(UsageRecord.objects.all())
    assert len(records) == 1
    (record,) = records
    hops = json.dumps(record.fallback_hops)
    why = f"{record.error_type} {record.error_message} {hops}"
    assert reason in why
    if expected in (ERROR, PARTIAL):
        assert record.status == "error"
    else:
        assert record.status == "ok"
    if expected == ESTIMATED:
        assert record.tokens_estimated
        assert 0 < record.completion_tokens < MAX_TOKENS
        assert 0 < record.prompt_tokens < 100
    if expected == CUT:
        assert record.tokens_estimated
        assert record.completion_tokens <= MAX_TOKENS * 2
    # The reservation settled to what the record says.
    counters = await sync_to_async(list)(BudgetCounter.objects.filter(budget=budget))
    assert [(c.reserved_tokens, c.used_tokens) for c in counters] == [
        (0, record.prompt_tokens + record.completion_tokens)
    ]
    # Nothing secret or unstorable anywhere a person or the database sees it.
    assert logs.text if expected in (ERROR, PARTIAL) else True
    assert_clean(
        [
            *outcome.seen,
            outcome.error,
            outcome.text,
            logs.text,
            record.error_message,
            record.error_type,
            hops,
            record.upstream_model,
            *await sync_to_async(admin_pages)(staff, record),
        ]
    )


# --- Health checks (what the monitor stores) ------------------------------------


def config_for(server: HostileUpstream, mode: str) -> client.EndpointConfig:
    return client.EndpointConfig(
        id=None,
        name=mode,
        base_url=server.url(mode),
        api_key=KEY,
        timeout=IDLE_SECONDS,
        first_token_timeout=IDLE_SECONDS,
        extra_headers=(("X-Org-Token", ORG_TOKEN),),
    )


async def test_a_model_list_is_cleaned_redacted_and_capped(hostile):
    health = await client.health_check(config_for(hostile, "bad_models"))

    assert health.ok
    assert health.models[:4] == (
        "ok-model",
        "nulmodel[2J",
        "key-[redacted]",
        "m" * 200,
    )
    assert len(health.models) == client.MAX_MODELS
    assert_clean(list(health.models))


@pytest.mark.parametrize("mode", ["nul_error", "binary_error", "key_at_cut"])
async def test_a_failed_health_check_carries_a_clean_message(hostile, mode):
    health = await client.health_check(config_for(hostile, mode))

    assert not health.ok and health.error is not None
    assert health.error.message.startswith("server error")
    assert_clean([health.error.message, str(health.error), repr(health.error)])
