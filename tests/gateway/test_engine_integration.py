"""The engine against two real simulated upstreams over sockets.

The primary fails in each injected way; the answer still arrives complete from
the fallback, and the hop says where and why.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from gateway import client, router
from gateway.models import Endpoint, ModelRoute
from gateway.router import Delta, Fallback, RetryPolicy, Started
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "house-model"
MESSAGES = [{"role": "user", "content": "Tell me something."}]
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TOKENS = generated_tokens(24)
FULL_ANSWER = "".join(TOKENS)


@pytest.fixture
async def primary():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=24)) as server:
        yield server


@pytest.fixture
async def fallback():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=24)) as server:
        yield server


@pytest.fixture
async def endpoints(primary, fallback):
    first = await Endpoint.objects.acreate(
        name="primary", base_url=primary.base_url, priority=1, timeout=5
    )
    second = await Endpoint.objects.acreate(
        name="fallback", base_url=fallback.base_url, priority=2, timeout=5
    )
    for priority, endpoint in enumerate((first, second)):
        await ModelRoute.objects.acreate(
            model_name=MODEL,
            endpoint=endpoint,
            upstream_model="sim-small",
            priority=priority,
        )
    yield first, second
    await client.aclose_all()


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


async def run(policy: RetryPolicy) -> list:
    async with router.stream_chat(MODEL, MESSAGES, policy=policy) as stream:
        return [event async for event in stream]


async def test_a_healthy_primary_answers_alone(primary, fallback, endpoints, policy):
    events = await run(policy)

    result = events[-1].result
    assert result.text == FULL_ANSWER
    assert result.endpoint == "primary"
    assert result.usage.estimated is False
    assert result.usage.completion_tokens == len(TOKENS)
    assert fallback.stats.chat_requests == 0


async def test_a_503_primary_fails_over_at_once(
    primary, fallback, endpoints, policy, sleeps
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    events = await run(policy)

    result = events[-1].result
    assert result.text == FULL_ANSWER
    assert result.endpoint == "fallback"
    # Another route can answer: no retry and no backoff on the primary.
    assert primary.stats.chat_requests == 1
    assert sleeps == []
    hop = result.hops[0]
    assert (hop.endpoint, hop.reason, hop.status_code, hop.to_endpoint) == (
        "primary",
        "server_error",
        503,
        "fallback",
    )
    assert isinstance(events[0], Fallback)
    assert isinstance(events[1], router.Status)
    assert events[1].text == "primary failed (HTTP 503), trying fallback…"


async def test_every_route_down_spends_the_retries_on_the_last(
    primary, fallback, endpoints, policy, sleeps
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))
    fallback.set_behaviour(Behaviour(fault="status", fault_status=502))

    events = await run(policy)

    result = events[-1].result
    assert isinstance(result.error, router.AllEndpointsUnavailable)
    assert (primary.stats.chat_requests, fallback.stats.chat_requests) == (1, 3)
    assert sleeps == [2.0, 4.0]
    statuses = [e.text for e in events if isinstance(e, router.Status)]
    assert statuses == [
        "primary failed (HTTP 503), trying fallback…",
        "fallback failed (HTTP 502), retrying in 2 s…",
        "fallback failed (HTTP 502), retrying in 4 s…",
    ]
    assert [(a.endpoint, a.status_code) for a in result.trail] == [
        ("primary", 503),
        ("fallback", 502),
        ("fallback", 502),
        ("fallback", 502),
    ]
    assert result.endpoint == "fallback"


async def test_a_429_shorter_than_the_next_route_is_waited_out(
    primary, fallback, endpoints, policy, sleeps
):
    primary.script(Behaviour(fault="status", fault_status=429, retry_after=0.5))

    result = (await run(policy))[-1].result

    assert result.endpoint == "primary"
    assert result.text == FULL_ANSWER
    assert sleeps == [0.5]
    assert result.hops == []


async def test_a_429_with_a_long_retry_after_fails_over_and_rests_the_endpoint(
    primary, fallback, endpoints, policy, sleeps
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=429, retry_after=60))

    with time_machine.travel(NOW, tick=False):
        first = (await run(policy))[-1].result
        second = (await run(policy))[-1].result

    assert (first.endpoint, first.text) == ("fallback", FULL_ANSWER)
    assert first.hops[0].reason == "rate_limited"
    assert sleeps == []
    # The second request skipped the resting primary without calling it.
    assert primary.stats.chat_requests == 1
    assert second.hops[0].reason == "resting"
    assert second.trail[0].to_dict()["outcome"] == "skipped"
    row = await Endpoint.objects.aget(name="primary")
    assert row.resting_until == NOW + timedelta(seconds=60)
    # Busy is not down: the breaker and the status are untouched.
    assert (row.consecutive_failures, row.disabled_until) == (0, None)
    assert row.status != "disconnected"

    with time_machine.travel(NOW + timedelta(seconds=61), tick=False):
        primary.set_behaviour(Behaviour())
        third = (await run(policy))[-1].result

    assert third.endpoint == "primary"


@pytest.mark.parametrize(
    ("fault", "after", "reason"),
    [
        ("drop", 5, "connection_error"),
        ("malformed", 3, "malformed_response"),
        ("stall", 4, "timeout"),
    ],
)
async def test_a_primary_dying_mid_stream_is_continued_by_the_fallback(
    primary, fallback, endpoints, policy, sleeps, fault, after, reason
):
    await Endpoint.objects.filter(name="primary").aupdate(timeout=0.3)
    primary.set_behaviour(
        Behaviour(completion_tokens=24, fault=fault, fault_after_tokens=after)
    )

    events = await run(policy)

    partial = "".join(TOKENS[:after])
    result = events[-1].result
    # One answer: what the primary sent, then the fallback's continuation.
    assert result.text == partial + FULL_ANSWER
    assert "".join(e.text for e in events if isinstance(e, Delta)) == result.text
    assert result.endpoint == "fallback"
    assert result.finish_reason == "stop"
    assert result.error is None
    hops = [e.hop for e in events if isinstance(e, Fallback)]
    assert len(hops) == 1
    assert (hops[0].endpoint, hops[0].reason, hops[0].mid_stream) == (
        "primary",
        reason,
        True,
    )
    assert [e.endpoint for e in events if isinstance(e, Started)] == [
        "primary",
        "fallback",
    ]
    assert sleeps == []
    continued = fallback.requests[-1].json["messages"]
    assert continued[-2] == {"role": "assistant", "content": partial}
    assert continued[-1]["content"] == router.CONTINUE_INSTRUCTION


async def test_a_primary_stalling_before_its_first_token_times_out_and_fails_over(
    primary, fallback, endpoints, policy
):
    await Endpoint.objects.filter(name="primary").aupdate(first_token_timeout=0.3)
    primary.set_behaviour(Behaviour(fault="stall", fault_after_tokens=0))

    result = (await run(policy))[-1].result

    assert result.endpoint == "fallback"
    assert result.text == FULL_ANSWER
    assert result.hops[0].reason == "timeout"
    assert result.hops[0].message == "no first token within 0.3 s"
    assert result.hops[0].mid_stream is False
    assert primary.stats.chat_requests == 1


async def test_a_closed_circuit_opens_and_spares_the_primary(
    primary, fallback, endpoints, policy
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=500))

    for _ in range(3):
        await run(policy)
    fourth = (await run(policy))[-1].result

    # The default threshold is three failed requests, one attempt each (the
    # fallback can answer); the fourth request skips the primary.
    assert primary.stats.chat_requests == 3
    assert fourth.endpoint == "fallback"
    assert fourth.hops[0].reason == "circuit_open"
    primary_row = await Endpoint.objects.aget(name="primary")
    assert primary_row.disabled_until is not None
    assert primary_row.status == "disconnected"


async def test_an_endpoint_rejecting_stream_options_still_answers(
    primary, fallback, endpoints, policy
):
    primary.set_behaviour(
        Behaviour(completion_tokens=24, fault="reject_stream_options")
    )

    result = (await run(policy))[-1].result

    assert result.endpoint == "primary"
    assert result.text == FULL_ANSWER
    assert result.usage.estimated is True
    assert primary.stats.chat_requests == 2
    row = await Endpoint.objects.aget(name="primary")
    assert row.supports_stream_usage is False


async def test_a_client_disconnect_ends_the_upstream_request(
    primary, fallback, endpoints, policy
):
    primary.set_behaviour(Behaviour(completion_tokens=500, tokens_per_second=50))

    stream = router.stream_chat(MODEL, MESSAGES, policy=policy)
    deltas = 0
    async for event in stream:
        if isinstance(event, Delta):
            deltas += 1
            if deltas == 2:
                break
    await stream.aclose()

    await primary.wait_for_disconnects(1)
    assert primary.stats.open_streams == 0
    assert primary.stats.streams_completed == 0
    assert stream.result.stopped is True
    assert stream.result.text == "".join(generated_tokens(500)[:2])


async def test_a_plain_request_fails_over_too(primary, fallback, endpoints, policy):
    await Endpoint.objects.filter(name="primary").aupdate(max_retries=1)
    primary.set_behaviour(Behaviour(fault="malformed"))

    result = await router.complete_chat(MODEL, MESSAGES, policy=policy)

    assert result.endpoint == "fallback"
    assert result.text == FULL_ANSWER
    assert result.usage.estimated is False
    assert result.hops[0].reason == "malformed_response"


async def test_everything_down_serves_the_last_answer_flagged_cached(
    primary, fallback, endpoints, policy
):
    await Endpoint.objects.aupdate(max_retries=1)
    await run(policy)
    primary.set_behaviour(Behaviour(fault="drop", fault_after_tokens=0))
    fallback.set_behaviour(Behaviour(fault="status", fault_status=502))

    events = await run(policy)

    result = events[-1].result
    assert result.cached is True
    assert result.text == FULL_ANSWER
    assert [e.cached for e in events if isinstance(e, Started)] == [True]
    assert [h.endpoint for h in result.hops] == ["primary", "fallback"]


async def test_everything_hung_ends_within_the_timeouts_of_the_attempts(
    primary, fallback, endpoints
):
    # Each attempt costs its first-token timeout; the last route gets the
    # retries (three attempts, 0.1 s and 0.2 s apart here).
    await Endpoint.objects.aupdate(first_token_timeout=0.3, backoff_multiplier=0.1)
    router.forget_routes()
    primary.set_behaviour(Behaviour(fault="stall", fault_after_tokens=0))
    fallback.set_behaviour(Behaviour(fault="stall", fault_after_tokens=0))
    policy = RetryPolicy(jitter=0)
    loop = asyncio.get_running_loop()

    started = loop.time()
    events = await run(policy)
    took = loop.time() - started

    result = events[-1].result
    assert isinstance(result.error, router.AllEndpointsUnavailable)
    assert took <= 0.3 + 3 * 0.3 + 0.1 + 0.2 + 0.2, took
    assert (primary.stats.chat_requests, fallback.stats.chat_requests) == (1, 3)
    assert [e.kind for e in events if isinstance(e, router.Status)] == [
        "failover",
        "retry",
        "retry",
    ]
