"""The router against httpx.MockTransport upstreams and real Endpoint rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.db import connection

from gateway import client, router, tokens
from gateway.client import APIEndpointError, APIRequestError, EndpointConfig
from gateway.context import ContextWindowExceeded
from gateway.models import Endpoint, ModelRoute
from gateway.router import (
    CONTINUE_INSTRUCTION,
    AllEndpointsUnavailable,
    Delta,
    Fallback,
    ModelNotFound,
    RetryPolicy,
)

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "house-model"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


# --- Upstreams ----------------------------------------------------------------


class Body(httpx.AsyncByteStream):
    """An SSE body in pieces; may fail or hang at the end; records closing."""

    def __init__(self, *pieces: bytes | Exception, hang: bool = False) -> None:
        self.pieces = pieces
        self.hang = hang
        self.closed = False

    async def __aiter__(self):
        for piece in self.pieces:
            if isinstance(piece, Exception):
                raise piece
            yield piece
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    data = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def usage_chunk(prompt: int, completion: int) -> bytes:
    data = {
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def answer(*words: str, usage: tuple[int, int] | None = (11, 2)) -> httpx.Response:
    pieces = [chunk(w) for w in words] + [chunk(finish="stop")]
    if usage:
        pieces.append(usage_chunk(*usage))
    pieces.append(b"data: [DONE]\n\n")
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Body(*pieces)
    )


def plain(text: str) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-9",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 4},
        },
    )


def status(code: int, **headers: str) -> httpx.Response:
    return httpx.Response(
        code, headers=headers, json={"error": {"message": f"simulated {code}"}}
    )


class Upstreams:
    """Scripted answers per host; a host with nothing scripted answers 500."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[httpx.Response | Exception]] = {}
        self.requests: dict[str, list[dict]] = {}

    def script(self, host: str, *responses: httpx.Response | Exception) -> None:
        self.scripts.setdefault(host, []).extend(responses)

    def count(self, host: str) -> int:
        return len(self.requests.get(host, []))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.requests.setdefault(host, []).append(json.loads(request.content))
        queue = self.scripts.get(host) or [status(500)]
        response = queue.pop(0) if queue else status(500)
        if isinstance(response, Exception):
            raise response
        return response


@pytest.fixture
def upstreams():
    scripted = Upstreams()
    client.pools.transport = httpx.MockTransport(scripted)
    client._no_stream_usage.clear()
    yield scripted
    client.pools.transport = None
    client._no_stream_usage.clear()


@pytest.fixture(autouse=True)
def _fresh_routes():
    # Bulk updates (queryset.aupdate) send no signals to drop the snapshots.
    router.forget_routes()
    yield
    router.forget_routes()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def policy(sleeps) -> RetryPolicy:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return RetryPolicy(max_backoff=30, max_retry_after=60, jitter=0, sleep=sleep)


@pytest.fixture
async def endpoints():
    """Two endpoints serving MODEL: "alpha" first, "beta" as its fallback."""
    alpha = await Endpoint.objects.acreate(
        name="alpha", base_url="https://alpha.test/v1", priority=1
    )
    beta = await Endpoint.objects.acreate(
        name="beta", base_url="https://beta.test/v1", priority=2
    )
    await ModelRoute.objects.acreate(
        model_name=MODEL, endpoint=alpha, upstream_model="gpt-4o-mini", priority=1
    )
    await ModelRoute.objects.acreate(
        model_name=MODEL, endpoint=beta, upstream_model="llama-3-8b", priority=2
    )
    return alpha, beta


async def run(messages=MESSAGES, **kwargs) -> list:
    async with router.stream_chat(MODEL, messages, **kwargs) as stream:
        return [event async for event in stream]


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


@contextlib.asynccontextmanager
async def count_queries():
    """Count the SQL the async ORM runs (in asgiref's one sync thread)."""
    queries: list[str] = []

    def record(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    # The connection is looked up inside that thread, not in the loop's.
    await sync_to_async(lambda: connection.execute_wrappers.append(record))()
    try:
        yield queries
    finally:
        await sync_to_async(lambda: connection.execute_wrappers.remove(record))()


# --- The happy path -----------------------------------------------------------


async def test_it_streams_an_answer_with_upstream_usage(upstreams, endpoints, policy):
    upstreams.script("alpha.test", answer("Hel", "lo"))

    events = await run(policy=policy)

    assert kinds(events) == ["Started", "Delta", "Delta", "Finished"]
    started, result = events[0], events[-1].result
    assert (started.endpoint, started.upstream_model) == ("alpha", "gpt-4o-mini")
    assert result.text == "Hello"
    assert result.ok and result.status == "ok"
    assert (result.endpoint, result.endpoint_id) == ("alpha", endpoints[0].pk)
    assert result.finish_reason == "stop"
    assert result.usage == router.Usage(11, 2, estimated=False)
    assert (result.attempts, result.hops, result.cached) == (1, [], False)
    assert result.context is not None and result.context.window == 8000
    assert result.ttft_ms is not None and result.latency_ms >= result.ttft_ms
    sent = upstreams.requests["alpha.test"][0]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == MESSAGES


async def test_a_plain_success_costs_one_query(upstreams, endpoints, policy):
    upstreams.script("alpha.test", answer("Hi"))

    async with count_queries() as queries:
        events = await run(policy=policy)

    assert events[-1].result.text == "Hi"
    assert len(queries) == 1


async def test_routes_are_kept_briefly_so_the_next_request_costs_no_query(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", answer("one"), answer("two"))
    await run(policy=policy)

    async with count_queries() as queries:
        result = (await run(policy=policy))[-1].result

    assert result.text == "two"
    assert queries == []


async def test_saving_a_route_drops_the_kept_routes(upstreams, endpoints, policy):
    upstreams.script("alpha.test", answer("one"))
    upstreams.script("beta.test", answer("two"))
    await run(policy=policy)
    route = await ModelRoute.objects.aget(endpoint__name="alpha")
    route.enabled = False
    await route.asave()

    result = (await run(policy=policy))[-1].result

    assert result.endpoint == "beta"


async def test_without_a_route_ttl_every_request_reads_the_routes(
    upstreams, endpoints, policy, settings
):
    settings.GATEWAY_ROUTE_CACHE_SECONDS = 0
    upstreams.script("alpha.test", answer("one"), answer("two"))
    await run(policy=policy)

    async with count_queries() as queries:
        await run(policy=policy)

    assert len(queries) == 1


async def test_requests_that_miss_the_kept_routes_together_read_them_once(
    endpoints, policy
):
    router.forget_routes()

    async with count_queries() as queries:
        found = await asyncio.gather(*(router.load_routes(MODEL) for _ in range(5)))

    assert len(queries) == 1
    assert [[r.endpoint.name for r in routes] for routes in found] == [
        ["alpha", "beta"]
    ] * 5


async def test_unknown_model_names_are_not_kept(endpoints, policy):
    for name in ("nope-1", "nope-2"):
        await router.load_routes(name)

    assert ("chat", "nope-1") not in router._routes
    assert ("chat", "nope-2") not in router._routes


async def test_usage_is_estimated_when_the_upstream_sends_none(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", answer("Hello", " world", usage=None))

    result = (await run(policy=policy))[-1].result

    assert result.usage.estimated is True
    assert result.usage.completion_tokens == tokens.count_text(
        "Hello world", "gpt-4o-mini"
    )
    assert result.usage.prompt_tokens == result.context.tokens


async def test_params_pass_through_and_max_tokens_is_capped(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", answer("ok"))

    await run(
        params={"temperature": 0.2, "max_tokens": 99999, "model": "x"}, policy=policy
    )

    sent = upstreams.requests["alpha.test"][0]
    assert sent["temperature"] == 0.2
    assert sent["max_tokens"] == 2000
    assert sent["model"] == "gpt-4o-mini"


async def test_an_unknown_model_is_model_not_found(upstreams, endpoints, policy):
    events = [e async for e in router.stream_chat("nope", MESSAGES, policy=policy)]

    assert kinds(events) == ["Finished"]
    assert isinstance(events[0].result.error, ModelNotFound)


# --- Retries ------------------------------------------------------------------


async def only_alpha() -> None:
    """Leave alpha as the only route: the last route, which gets the retries."""
    await Endpoint.objects.filter(name="beta").aupdate(enabled=False)


async def test_the_last_route_is_retried_with_exponential_backoff(
    upstreams, endpoints, policy, sleeps
):
    await only_alpha()
    upstreams.script("alpha.test", status(503), status(502), answer("Hi"))

    events = await run(policy=policy)

    result = events[-1].result
    assert result.text == "Hi"
    assert result.endpoint == "alpha"
    assert result.attempts == 3
    assert result.hops == []
    assert sleeps == [2.0, 4.0]
    statuses = [e for e in events if isinstance(e, router.Status)]
    assert [(s.kind, s.seconds) for s in statuses] == [("retry", 2.0), ("retry", 4.0)]
    assert statuses[0].text == "alpha failed (HTTP 503), retrying in 2 s…"
    assert statuses[1].text == "alpha failed (HTTP 502), retrying in 4 s…"
    assert [(a.outcome, a.status_code) for a in result.trail] == [
        ("failed", 503),
        ("failed", 502),
        ("ok", None),
    ]


async def test_backoff_has_jitter_within_its_bound(upstreams, endpoints, sleeps):
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    policy = RetryPolicy(jitter=0.25, sleep=sleep, random=lambda: 1.0)
    await only_alpha()
    upstreams.script("alpha.test", status(503), status(503), answer("Hi"))

    await run(policy=policy)

    assert sleeps == [2.5, 5.0]


async def test_backoff_is_capped_by_the_setting(upstreams, endpoints, settings, sleeps):
    settings.GATEWAY_MAX_BACKOFF = 25

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    await Endpoint.objects.filter(name="alpha").aupdate(backoff_multiplier=20)
    await only_alpha()
    upstreams.script("alpha.test", status(503), status(503), answer("Hi"))

    await run(policy=RetryPolicy.from_settings(sleep=sleep, jitter=0))

    assert sleeps == [20.0, 25.0]


async def test_the_last_route_waits_for_its_retry_after(
    upstreams, endpoints, policy, sleeps
):
    await only_alpha()
    upstreams.script("alpha.test", status(429, **{"retry-after": "7"}), answer("Hi"))

    events = await run(policy=policy)

    assert events[-1].result.endpoint == "alpha"
    assert sleeps == [7.0]
    (status_event,) = [e for e in events if isinstance(e, router.Status)]
    assert status_event.kind == "rate_limit_wait"
    assert status_event.text == "waiting for alpha's rate limit (7 s)…"


async def test_a_retry_after_beyond_the_cap_fails_over_at_once(
    upstreams, endpoints, policy, sleeps
):
    upstreams.script("alpha.test", status(429, **{"retry-after": "600"}))
    upstreams.script("beta.test", answer("From beta"))

    events = await run(policy=policy)

    result = events[-1].result
    assert result.endpoint == "beta"
    assert sleeps == []
    assert upstreams.count("alpha.test") == 1
    hop = result.hops[0]
    assert (hop.endpoint, hop.reason, hop.to_endpoint) == (
        "alpha",
        "rate_limited",
        "beta",
    )
    assert (hop.error_type, hop.status_code) == ("APIRateLimitError", 429)


async def test_a_permanent_error_is_neither_retried_nor_failed_over(
    upstreams, endpoints, policy, sleeps
):
    upstreams.script("alpha.test", status(400))
    upstreams.script("beta.test", answer("never"))

    result = (await run(policy=policy))[-1].result

    assert isinstance(result.error, APIRequestError)
    assert result.status == "error"
    assert upstreams.count("alpha.test") == 1
    assert upstreams.count("beta.test") == 0
    assert sleeps == []
    await endpoints[0].arefresh_from_db()
    assert endpoints[0].consecutive_failures == 0


async def test_an_endpoint_refusing_the_key_fails_over_without_retrying(
    upstreams, endpoints, policy, sleeps
):
    upstreams.script("alpha.test", status(401))
    upstreams.script("beta.test", answer("From beta"))

    result = (await run(policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert upstreams.count("alpha.test") == 1
    assert sleeps == []
    assert result.hops[0].reason == "endpoint_rejected"
    assert isinstance(result.hops[0], router.Hop)


# --- Fallback -----------------------------------------------------------------


async def test_it_fails_over_on_5xx_and_reports_the_hop(
    upstreams, endpoints, policy, sleeps
):
    upstreams.script("alpha.test", status(503), status(503), status(503))
    upstreams.script("beta.test", answer("From", " beta"))

    events = await run(policy=policy)

    assert kinds(events) == [
        "Fallback",
        "Status",
        "Started",
        "Delta",
        "Delta",
        "Finished",
    ]
    hop = events[0].hop
    assert (hop.endpoint, hop.reason, hop.to_endpoint) == (
        "alpha",
        "server_error",
        "beta",
    )
    # Another route can answer: no retry, no backoff.
    assert (hop.attempts, hop.status_code, hop.mid_stream) == (1, 503, False)
    assert sleeps == []
    assert upstreams.count("alpha.test") == 1
    assert events[1].kind == "failover"
    assert events[1].text == "alpha failed (HTTP 503), trying beta…"
    result = events[-1].result
    assert (result.endpoint, result.upstream_model) == ("beta", "llama-3-8b")
    assert result.attempts == 2
    assert [(a.endpoint, a.outcome) for a in result.trail] == [
        ("alpha", "failed"),
        ("beta", "ok"),
    ]
    assert result.hops == [hop]
    assert hop.to_dict()["endpoint"] == "alpha"


async def test_routes_are_tried_by_priority(upstreams, endpoints, policy):
    await ModelRoute.objects.filter(endpoint__name="beta").aupdate(priority=0)
    upstreams.script("beta.test", answer("beta first"))

    result = (await run(policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert upstreams.count("alpha.test") == 0


async def test_disabled_routes_and_endpoints_are_not_tried(
    upstreams, endpoints, policy
):
    await Endpoint.objects.filter(name="alpha").aupdate(enabled=False)
    upstreams.script("beta.test", answer("ok"))

    result = (await run(policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert result.hops == []


async def test_a_saturated_endpoint_is_skipped_as_rate_limited_locally(
    upstreams, endpoints, policy
):
    asked: list[tuple[str, int]] = []

    async def admit(config: EndpointConfig, estimated_tokens: int) -> bool:
        asked.append((config.name, estimated_tokens))
        return config.name != "alpha"

    upstreams.script("beta.test", answer("ok"))

    result = (await run(admit=admit, policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert upstreams.count("alpha.test") == 0
    assert result.hops[0].reason == "rate_limited_locally"
    assert asked[0][0] == "alpha"
    # The prompt (as alpha's model counts it) plus the output the route reserves.
    prompt = tokens.count_messages(MESSAGES, "gpt-4o-mini").tokens
    assert asked[0] == ("alpha", prompt + 2000)


async def test_a_route_whose_window_is_too_small_is_skipped(
    upstreams, endpoints, policy
):
    await ModelRoute.objects.filter(endpoint__name="alpha").aupdate(
        context_window=300, max_output_tokens=100
    )
    upstreams.script("beta.test", answer("ok"))
    long = [{"role": "user", "content": "word " * 400}]

    result = (await run(long, policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert result.hops[0].reason == "context_window_exceeded"
    assert upstreams.count("alpha.test") == 0


async def test_no_route_large_enough_is_a_context_window_error(
    upstreams, endpoints, policy
):
    await ModelRoute.objects.aupdate(context_window=300, max_output_tokens=100)
    long = [{"role": "user", "content": "word " * 400}]

    result = (await run(long, policy=policy))[-1].result

    assert isinstance(result.error, ContextWindowExceeded)
    assert upstreams.count("alpha.test") == upstreams.count("beta.test") == 0


async def test_every_route_failing_ends_with_when_to_retry(
    upstreams, endpoints, policy
):
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script("alpha.test", status(503))
    upstreams.script("beta.test", status(429, **{"retry-after": "12"}))

    events = await run(policy=policy)

    assert kinds(events) == ["Fallback", "Status", "Fallback", "Finished"]
    result = events[-1].result
    assert isinstance(result.error, AllEndpointsUnavailable)
    assert result.error.retry_after == 12.0
    assert [h.to_endpoint for h in result.hops] == ["beta", None]
    # The record names the endpoint that failed last.
    assert (result.endpoint, result.endpoint_id, result.text) == (
        "beta",
        endpoints[1].id,
        "",
    )


# --- Mid-stream failover ------------------------------------------------------


async def test_a_stream_dying_mid_answer_continues_on_the_next_route(
    upstreams, endpoints, policy, sleeps
):
    dying = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        stream=Body(
            chunk("The answer"), chunk(" is"), httpx.RemoteProtocolError("cut")
        ),
    )
    upstreams.script("alpha.test", dying)
    upstreams.script("beta.test", answer(" forty-two.", usage=(30, 4)))

    events = await run(policy=policy)

    assert kinds(events) == [
        "Started",
        "Delta",
        "Delta",
        "Fallback",
        "Status",
        "Started",
        "Delta",
        "Finished",
    ]
    assert (
        events[4].text
        == "alpha stopped mid-answer (connection failed), continuing on beta…"
    )
    assert text_of(events) == "The answer is forty-two."
    hop = events[3].hop
    assert (hop.endpoint, hop.to_endpoint, hop.mid_stream) == ("alpha", "beta", True)
    assert hop.reason == "connection_error"
    result = events[-1].result
    assert result.text == "The answer is forty-two."
    assert result.endpoint == "beta"
    assert [s.route.endpoint.name for s in result.segments] == ["alpha", "beta"]
    # The first segment's tokens are ours to count, so the sum is estimated.
    assert result.usage.estimated is True
    assert result.usage.completion_tokens == 4 + tokens.count_text(
        "The answer is", "gpt-4o-mini"
    )
    assert sleeps == []
    continued = upstreams.requests["beta.test"][0]["messages"]
    assert continued[: len(MESSAGES)] == MESSAGES
    assert continued[-2:] == [
        {"role": "assistant", "content": "The answer is"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


async def test_a_second_mid_stream_failure_sends_the_whole_partial_answer_once(
    upstreams, endpoints, policy
):
    gamma = await Endpoint.objects.acreate(
        name="gamma", base_url="https://gamma.test/v1", priority=3
    )
    await ModelRoute.objects.acreate(
        model_name=MODEL, endpoint=gamma, upstream_model="llama-3-8b", priority=3
    )

    def dying(*words: str) -> httpx.Response:
        pieces = [chunk(w) for w in words] + [httpx.ReadError("reset")]
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Body(*pieces)
        )

    upstreams.script("alpha.test", dying("One,"))
    upstreams.script("beta.test", dying(" two,"))
    upstreams.script("gamma.test", answer(" three."))

    result = (await run(policy=policy))[-1].result

    assert result.text == "One, two, three."
    assert result.endpoint == "gamma"
    assert [(h.endpoint, h.to_endpoint) for h in result.hops] == [
        ("alpha", "beta"),
        ("beta", "gamma"),
    ]
    sent = upstreams.requests["gamma.test"][0]["messages"]
    assert sent == [
        *MESSAGES,
        {"role": "assistant", "content": "One, two,"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


async def test_an_empty_answer_is_a_complete_answer(upstreams, endpoints, policy):
    upstreams.script("alpha.test", answer(usage=(5, 0)))

    events = await run(policy=policy)

    assert kinds(events) == ["Started", "Finished"]
    result = events[-1].result
    assert (result.ok, result.text, result.finish_reason) == (True, "", "stop")
    assert result.ttft_ms is None


async def test_a_mid_stream_failure_with_no_route_left_keeps_the_partial_text(
    upstreams, endpoints, policy
):
    await ModelRoute.objects.filter(endpoint__name="beta").adelete()
    upstreams.script(
        "alpha.test",
        httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=Body(chunk("Half an"), httpx.ReadTimeout("stall")),
        ),
    )

    result = (await run(policy=policy))[-1].result

    assert isinstance(result.error, AllEndpointsUnavailable)
    assert result.text == "Half an"
    assert result.hops[0].reason == "timeout"
    assert result.hops[0].mid_stream is True
    assert result.usage.completion_tokens > 0


# --- Stopping -----------------------------------------------------------------


async def test_stopping_closes_the_upstream_and_keeps_a_result(
    upstreams, endpoints, policy
):
    body = Body(chunk("Partial"), hang=True)
    upstreams.script(
        "alpha.test",
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body),
    )

    stream = router.stream_chat(MODEL, MESSAGES, policy=policy)
    async for event in stream:
        if isinstance(event, Delta):
            break
    await stream.aclose()

    assert body.closed
    result = stream.result
    assert result.stopped is True
    assert result.status == "cancelled"
    assert result.text == "Partial"
    assert result.endpoint == "alpha"
    assert result.usage.estimated is True
    assert result.usage.completion_tokens == tokens.count_text("Partial", "gpt-4o-mini")


async def test_cancelling_the_consumer_task_closes_the_upstream(
    upstreams, endpoints, policy
):
    body = Body(chunk("Partial"), hang=True)
    upstreams.script(
        "alpha.test",
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body),
    )
    got_text = asyncio.Event()
    stream = router.stream_chat(MODEL, MESSAGES, policy=policy)

    async def consume() -> None:
        async for event in stream:
            if isinstance(event, Delta):
                got_text.set()

    task = asyncio.create_task(consume())
    await got_text.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert body.closed
    assert stream.result.stopped is True


# --- Circuit breaker ------------------------------------------------------------


async def test_one_failed_request_counts_once_however_often_it_retried(
    upstreams, endpoints, policy
):
    await Endpoint.objects.filter(name="alpha").aupdate(retries_before_failover=2)
    upstreams.script("alpha.test", status(503), status(503), status(503))
    upstreams.script("beta.test", answer("one"))

    with time_machine.travel(NOW, tick=False):
        await run(policy=policy)

    alpha = await Endpoint.objects.aget(name="alpha")
    assert upstreams.count("alpha.test") == 3
    assert (alpha.consecutive_failures, alpha.disabled_until) == (1, None)


async def test_failed_requests_open_the_circuit_and_later_requests_skip_it(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", *[status(503)] * 9)
    upstreams.script("beta.test", *[answer(str(n)) for n in range(4)])

    with time_machine.travel(NOW, tick=False):
        for _ in range(3):
            await run(policy=policy)
        events = await run(policy=policy)

    alpha = await Endpoint.objects.aget(name="alpha")
    assert alpha.disabled_until == NOW + timedelta(seconds=60)
    # One attempt each (beta can answer); the third request's failure opens
    # the circuit; the fourth skips alpha.
    assert upstreams.count("alpha.test") == 3
    result = events[-1].result
    assert result.endpoint == "beta"
    assert result.hops[0].reason == "circuit_open"
    assert isinstance(events[0], Fallback)


async def test_an_open_circuit_everywhere_says_when_it_reopens(
    upstreams, endpoints, policy
):
    with time_machine.travel(NOW, tick=False):
        await Endpoint.objects.filter(name="alpha").aupdate(
            disabled_until=NOW + timedelta(seconds=40)
        )
        await Endpoint.objects.filter(name="beta").aupdate(
            disabled_until=NOW + timedelta(seconds=25)
        )
        result = (await run(policy=policy))[-1].result

    assert isinstance(result.error, AllEndpointsUnavailable)
    assert result.error.retry_after == 25.0
    assert result.attempts == 0


async def test_a_half_open_endpoint_gets_one_trial_that_closes_it(
    upstreams, endpoints, policy
):
    await Endpoint.objects.filter(name="alpha").aupdate(
        consecutive_failures=3, disabled_until=NOW - timedelta(seconds=1)
    )
    upstreams.script("alpha.test", answer("back"))

    with time_machine.travel(NOW, tick=False):
        result = (await run(policy=policy))[-1].result

    alpha = await Endpoint.objects.aget(name="alpha")
    assert result.endpoint == "alpha"
    assert (alpha.consecutive_failures, alpha.disabled_until) == (0, None)


async def test_a_failed_trial_is_not_retried_and_reopens(
    upstreams, endpoints, policy, sleeps
):
    await Endpoint.objects.filter(name="alpha").aupdate(
        consecutive_failures=3, disabled_until=NOW - timedelta(seconds=1)
    )
    upstreams.script("alpha.test", status(503))
    upstreams.script("beta.test", answer("ok"))

    with time_machine.travel(NOW, tick=False):
        result = (await run(policy=policy))[-1].result

    alpha = await Endpoint.objects.aget(name="alpha")
    assert result.endpoint == "beta"
    assert upstreams.count("alpha.test") == 1
    assert sleeps == []
    assert alpha.disabled_until == NOW + timedelta(seconds=60)


async def test_a_success_after_failures_clears_the_count(upstreams, endpoints, policy):
    await Endpoint.objects.filter(name="alpha").aupdate(consecutive_failures=2)
    upstreams.script("alpha.test", answer("ok"))

    await run(policy=policy)

    alpha = await Endpoint.objects.aget(name="alpha")
    assert alpha.consecutive_failures == 0


# --- Degraded mode ------------------------------------------------------------


async def test_when_everything_fails_the_last_good_answer_is_served_flagged(
    upstreams, endpoints, policy
):
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script("alpha.test", answer("Remembered", " answer"), status(503))
    upstreams.script("beta.test", status(503))
    await run(policy=policy)

    events = await run(policy=policy)

    assert kinds(events) == [
        "Fallback",
        "Status",
        "Fallback",
        "Started",
        "Delta",
        "Finished",
    ]
    assert events[3].cached is True
    result = events[-1].result
    assert result.cached is True
    assert result.status == "cached"
    assert result.error is None
    assert result.text == "Remembered answer"
    assert result.usage.total_tokens == 0
    assert [h.reason for h in result.hops] == ["server_error", "server_error"]


async def test_the_cache_is_keyed_by_the_exact_messages(upstreams, endpoints, policy):
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script("alpha.test", answer("Remembered"))
    await run(policy=policy)
    other = [*MESSAGES[:1], {"role": "user", "content": "Say hello!"}]

    result = (await run(other, policy=policy))[-1].result

    assert result.cached is False
    assert isinstance(result.error, AllEndpointsUnavailable)


async def test_the_cache_is_separated_by_scope(upstreams, endpoints, policy):
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script("alpha.test", answer("Alice's answer"))
    await run(policy=policy, cache_scope="user:1")

    result = (await run(policy=policy, cache_scope="user:2"))[-1].result

    assert result.cached is False


# --- Plain completions --------------------------------------------------------


async def test_complete_chat_returns_the_whole_answer_and_raw_body(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", plain("Hello there"))

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert result.text == "Hello there"
    assert result.usage == router.Usage(20, 4, False)
    assert result.raw["id"] == "chatcmpl-9"
    assert upstreams.requests["alpha.test"][0]["stream"] is False


async def test_complete_chat_fails_over_and_reports_hops(
    upstreams, endpoints, policy, sleeps
):
    upstreams.script("alpha.test", status(500), status(500), status(500))
    upstreams.script("beta.test", plain("from beta"))

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert result.endpoint == "beta"
    assert result.attempts == 2
    assert sleeps == []
    assert [(h.endpoint, h.to_endpoint) for h in result.hops] == [("alpha", "beta")]


async def test_complete_chat_serves_the_cache_when_all_fail(
    upstreams, endpoints, policy
):
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script("alpha.test", plain("kept"), status(503))
    upstreams.script("beta.test", status(503))
    await router.complete_chat(MODEL, MESSAGES, policy=policy)

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert (result.cached, result.text, result.error) == (True, "kept", None)


async def test_complete_chat_does_not_fail_over_a_bad_request(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", status(422))

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert isinstance(result.error, APIRequestError)
    assert upstreams.count("beta.test") == 0


async def test_complete_chat_of_an_unknown_model(upstreams, endpoints, policy):
    result = await router.complete_chat("nope", MESSAGES, policy=policy)

    assert isinstance(result.error, ModelNotFound)


# --- Stream usage support -------------------------------------------------------


async def test_an_endpoint_rejecting_stream_options_is_marked_in_the_database(
    upstreams, endpoints, policy
):
    upstreams.script(
        "alpha.test",
        httpx.Response(
            400, json={"error": {"message": "Unknown field: stream_options"}}
        ),
        answer("ok", usage=None),
    )

    result = (await run(policy=policy))[-1].result

    alpha = await Endpoint.objects.aget(name="alpha")
    assert result.text == "ok"
    assert alpha.supports_stream_usage is False


async def test_errors_in_results_never_carry_the_api_key(upstreams, endpoints, policy):
    alpha = endpoints[0]
    alpha.api_key = "sk-very-secret-key-123456"
    await alpha.asave()
    await Endpoint.objects.aupdate(max_retries=1)
    upstreams.script(
        "alpha.test",
        httpx.Response(
            401, json={"error": {"message": "bad key sk-very-secret-key-123456"}}
        ),
    )
    upstreams.script("beta.test", status(503))

    result = (await run(policy=policy))[-1].result

    dumped = (
        repr(result)
        + str(result.error)
        + json.dumps([h.to_dict() for h in result.hops])
    )
    assert "sk-very-secret-key-123456" not in dumped
    assert isinstance(result.error, AllEndpointsUnavailable)
    assert result.hops[0].error_type == APIEndpointError.__name__


# --- Bounds -------------------------------------------------------------------


async def test_no_retry_or_route_starts_after_the_request_deadline(
    upstreams, endpoints, settings
):
    settings.GATEWAY_REQUEST_MAX_SECONDS = 0.3
    await Endpoint.objects.filter(name="alpha").aupdate(
        max_retries=5, retries_before_failover=4
    )
    upstreams.script("alpha.test", *[status(503)] * 5)
    upstreams.script("beta.test", answer("Too late"))
    policy = RetryPolicy(max_backoff=30, jitter=0, sleep=asyncio.sleep)

    started = asyncio.get_running_loop().time()
    result = (await run(policy=policy))[-1].result

    assert asyncio.get_running_loop().time() - started < 1.0
    assert isinstance(result.error, client.APIDeadlineError)
    assert "0.3-second limit" in result.error.message
    assert upstreams.count("beta.test") == 0
    assert result.text == ""


OURS = object()


@pytest.mark.parametrize(
    ("usage", "prompt", "completion"),
    [
        ({"prompt_tokens": 2**40, "completion_tokens": 2}, OURS, 2),
        ({"prompt_tokens": 11, "completion_tokens": 2**40}, 11, OURS),
        ({"prompt_tokens": 11.0, "completion_tokens": 2.0}, OURS, OURS),
        ({"prompt_tokens": "11", "completion_tokens": "2"}, OURS, OURS),
        ({"prompt_tokens": -1, "completion_tokens": -2}, OURS, OURS),
        ({"prompt_tokens": True, "completion_tokens": True}, OURS, OURS),
        ({"prompt_tokens": 11}, 11, OURS),
        ([11, 2], OURS, OURS),
    ],
    ids=[
        "huge-prompt",
        "huge-completion",
        "float",
        "str",
        "negative",
        "bool",
        "missing",
        "list",
    ],
)
async def test_unbelievable_upstream_usage_is_counted_here_and_flagged(
    upstreams, endpoints, policy, usage, prompt, completion
):
    data = {"choices": [], "usage": usage}
    upstreams.script(
        "alpha.test",
        httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=Body(
                chunk("Hello"),
                chunk(finish="stop"),
                b"data: " + json.dumps(data).encode() + b"\n\n",
                b"data: [DONE]\n\n",
            ),
        ),
    )

    result = (await run(policy=policy))[-1].result

    our_prompt = tokens.count_messages(MESSAGES, "gpt-4o-mini").tokens
    our_completion = tokens.count_text("Hello", "gpt-4o-mini")
    assert result.usage == router.Usage(
        our_prompt if prompt is OURS else prompt,
        our_completion if completion is OURS else completion,
        estimated=True,
    )


async def test_a_stream_past_max_tokens_is_cut_and_its_upstream_closed(
    upstreams, endpoints, policy
):
    body = Body(*[chunk(" word") for _ in range(500)], hang=True)
    upstreams.script(
        "alpha.test",
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body),
    )

    events = await run(policy=policy, params={"max_tokens": 20})

    result = events[-1].result
    assert result.ok
    assert (result.finish_reason, result.limit_reason) == ("length", "max_tokens")
    # 20 asked, plus the margin for estimates (20 + 5 + 16), plus at most the
    # last few chunks before a count (one count per 16 characters near the end).
    assert 41 <= tokens.count_text(result.text, "gpt-4o-mini") <= 41 + 4
    assert result.text == text_of(events)
    assert body.closed
    assert upstreams.count("beta.test") == 0


async def test_a_plain_answer_past_max_tokens_is_cut(upstreams, endpoints, policy):
    upstreams.script("alpha.test", plain(" word" * 1000))

    result = await router.complete_chat(
        MODEL, MESSAGES, params={"max_tokens": 20}, policy=policy
    )

    assert (result.finish_reason, result.limit_reason) == ("length", "max_tokens")
    assert tokens.count_text(result.text, "gpt-4o-mini") == 41


# --- Failover policy ----------------------------------------------------------


class Late(httpx.AsyncByteStream):
    """A body whose first piece comes after `delay` seconds; records closing."""

    def __init__(self, delay: float, *pieces: bytes) -> None:
        self.delay = delay
        self.pieces = pieces
        self.closed = False
        self.reading = asyncio.Event()

    async def __aiter__(self):
        self.reading.set()
        await asyncio.sleep(self.delay)
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        self.closed = True


def late_answer(delay: float, *words: str) -> tuple[httpx.Response, Late]:
    pieces = [chunk(w) for w in words] + [chunk(finish="stop"), b"data: [DONE]\n\n"]
    body = Late(delay, *pieces)
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=body
    )
    return response, body


async def test_retries_before_failover_are_spent_before_the_next_route(
    upstreams, endpoints, policy, sleeps
):
    await Endpoint.objects.filter(name="alpha").aupdate(retries_before_failover=1)
    upstreams.script("alpha.test", status(503), status(503))
    upstreams.script("beta.test", answer("From beta"))

    result = (await run(policy=policy))[-1].result

    assert result.endpoint == "beta"
    assert upstreams.count("alpha.test") == 2
    assert sleeps == [2.0]
    assert result.hops[0].attempts == 2


async def test_a_429_never_counts_against_the_breaker(upstreams, endpoints, policy):
    await Endpoint.objects.filter(name="alpha").aupdate(failure_threshold=1)
    upstreams.script("alpha.test", status(429))
    upstreams.script("beta.test", answer("From beta"))

    result = (await run(policy=policy))[-1].result

    alpha = await Endpoint.objects.aget(name="alpha")
    assert result.endpoint == "beta"
    # Without a Retry-After there is nothing to rest for, and nothing opened.
    assert (alpha.consecutive_failures, alpha.disabled_until) == (0, None)
    assert alpha.resting_until is None


async def test_when_every_route_rests_the_soonest_rest_is_waited_out(
    upstreams, endpoints, policy, sleeps
):
    with time_machine.travel(NOW, tick=False):
        await Endpoint.objects.filter(name="alpha").aupdate(
            resting_until=NOW + timedelta(seconds=20)
        )
        await Endpoint.objects.filter(name="beta").aupdate(
            resting_until=NOW + timedelta(seconds=8)
        )
        upstreams.script("beta.test", answer("Rested"))
        events = await run(policy=policy)

    result = events[-1].result
    assert result.endpoint == "beta"
    assert sleeps == [8.0]
    assert upstreams.count("alpha.test") == 0
    statuses = [e for e in events if isinstance(e, router.Status)]
    assert [s.text for s in statuses] == ["waiting for beta's rate limit (8 s)…"]
    assert [(a.endpoint, a.outcome, a.reason) for a in result.trail] == [
        ("alpha", "skipped", "resting"),
        ("beta", "skipped", "resting"),
        ("beta", "ok", ""),
    ]


async def test_a_rest_beyond_the_cap_says_when_to_retry(
    upstreams, endpoints, policy, sleeps
):
    with time_machine.travel(NOW, tick=False):
        await Endpoint.objects.aupdate(resting_until=NOW + timedelta(seconds=300))
        result = (await run(policy=policy))[-1].result

    assert isinstance(result.error, AllEndpointsUnavailable)
    assert result.error.retry_after == 300.0
    assert sleeps == []
    assert result.attempts == 0


async def test_a_429_on_a_half_open_trial_closes_the_circuit(
    upstreams, endpoints, policy
):
    await Endpoint.objects.filter(name="alpha").aupdate(
        consecutive_failures=3, disabled_until=NOW - timedelta(seconds=1)
    )
    upstreams.script("alpha.test", status(429, **{"retry-after": "30"}))
    upstreams.script("beta.test", answer("ok"))

    with time_machine.travel(NOW, tick=False):
        result = (await run(policy=policy))[-1].result

    alpha = await Endpoint.objects.aget(name="alpha")
    assert result.endpoint == "beta"
    # It answered, so it is up; it is only busy for 30 s.
    assert (alpha.consecutive_failures, alpha.disabled_until) == (0, None)
    assert alpha.resting_until == NOW + timedelta(seconds=30)


async def test_a_slow_first_token_is_hedged_and_the_faster_route_wins(
    upstreams, endpoints, policy
):
    await ModelRoute.objects.filter(endpoint__name="alpha").aupdate(hedge_after_ms=50)
    slow, slow_body = late_answer(30, "too late")
    upstreams.script("alpha.test", slow)
    upstreams.script("beta.test", answer("From", " beta"))

    events = await run(policy=policy)

    result = events[-1].result
    assert result.text == "From beta"
    assert result.endpoint == "beta"
    assert slow_body.closed
    (hedge,) = [e for e in events if isinstance(e, router.Status)]
    assert (hedge.kind, hedge.text) == ("hedge", "alpha is slow, also trying beta…")
    # Both attempts are on the record; the lost one with what it was sent.
    lost, won = result.trail
    assert (lost.endpoint, lost.outcome, won.endpoint, won.outcome) == (
        "alpha",
        "hedge_lost",
        "beta",
        "ok",
    )
    assert lost.prompt_tokens == tokens.count_messages(MESSAGES, "gpt-4o-mini").tokens
    assert [(h.endpoint, h.reason, h.to_endpoint) for h in result.hops] == [
        ("alpha", "hedge_lost", "beta")
    ]


async def test_a_hedged_route_that_answers_first_keeps_the_other_in_line(
    upstreams, endpoints, policy
):
    await ModelRoute.objects.filter(endpoint__name="alpha").aupdate(hedge_after_ms=20)
    first, _ = late_answer(0.3, "Alpha", " wins")
    hung, hung_body = late_answer(30, "never")
    upstreams.script("alpha.test", first)
    upstreams.script("beta.test", hung)

    events = await run(policy=policy)

    result = events[-1].result
    assert result.text == "Alpha wins"
    assert result.endpoint == "alpha"
    assert hung_body.closed
    assert result.hops == []
    assert [(a.endpoint, a.outcome) for a in result.trail] == [
        ("alpha", "ok"),
        ("beta", "hedge_lost"),
    ]


async def test_a_plain_request_hedges_too(upstreams, endpoints, policy):
    await ModelRoute.objects.filter(endpoint__name="alpha").aupdate(hedge_after_ms=50)
    body = Late(30, b"{}")
    upstreams.script(
        "alpha.test",
        httpx.Response(200, headers={"content-type": "application/json"}, stream=body),
    )
    upstreams.script("beta.test", plain("from beta"))

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert (result.endpoint, result.text) == ("beta", "from beta")
    assert [(a.endpoint, a.outcome) for a in result.trail] == [
        ("alpha", "hedge_lost"),
        ("beta", "ok"),
    ]


async def test_a_cancelled_plain_request_keeps_its_trail(upstreams, endpoints, policy):
    body = Late(30, b"{}")
    upstreams.script(
        "alpha.test",
        status(503),
    )
    upstreams.script(
        "beta.test",
        httpx.Response(200, headers={"content-type": "application/json"}, stream=body),
    )
    call = router.plain_chat(MODEL, MESSAGES, policy=policy)
    task = asyncio.create_task(call.run())
    await body.reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    result = call.result
    assert result.stopped is True
    assert result.attempts == 2
    assert [(a.endpoint, a.outcome) for a in result.trail] == [
        ("alpha", "failed"),
        ("beta", "cancelled"),
    ]
    assert [h.endpoint for h in result.hops] == ["alpha"]
    assert result.endpoint == "beta"


async def test_a_failed_request_names_the_endpoint_that_failed_last(
    upstreams, endpoints, policy
):
    upstreams.script("alpha.test", status(400))

    result = (await run(policy=policy))[-1].result

    assert (result.endpoint, result.endpoint_id) == ("alpha", endpoints[0].id)
    ((attempt),) = result.trail
    assert (attempt.outcome, attempt.status_code) == ("failed", 400)
