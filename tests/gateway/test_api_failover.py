"""What /v1 tells a program about failover, cache and errors, and what records keep.

The `llmsite` object rides in the data (SDKs keep unknown fields; they drop
headers and SSE comments), and every record names each endpoint tried, in
order, with the outcome and time of each attempt.  The timing tests are the
failover issue's "done when" figures, with its margins.
"""

# The fixtures are shared with test_api, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway import client
from gateway.models import ApiKey, Endpoint, ModelRoute, UsageRecord
from gateway.simulator import Behaviour, SimulatedUpstream
from llmsite.lean import django_http_application
from tests.gateway.test_api import (  # noqa: F401 - fixtures
    MESSAGES,
    MODEL,
    _isolated,
    add_route,
    alice,
    alice_key,
    asgi_scope,
    backup,
    live_asgi_url,
    post,
    primary,
    read_events,
    records,
    wait_for_records,
)

pytestmark = pytest.mark.django_db(transaction=True)

# What a failover may add to the fallback's own time to its first token.
MARGIN = 0.2
# Timed trials a failover gets before it counts as too slow.
TRIALS = 3
# Three tokens of eight, then the connection drops.
DROPS_MID_ANSWER = Behaviour(completion_tokens=8, fault="drop", fault_after_tokens=3)


@pytest.fixture
async def two_routes(primary, backup):
    yield (
        await add_route("primary", primary, 1, first_token_timeout=0.5),
        await add_route("backup", backup, 2),
    )
    await client.aclose_all()


@pytest.fixture
async def one_route(primary):
    yield await add_route("primary", primary, 1)
    await client.aclose_all()


async def stream(alice) -> tuple:
    """A streamed request of MESSAGES: the response and its data events."""
    response = await post(alice, {"model": MODEL, "messages": MESSAGES, "stream": True})
    return response, await read_events(response)


def llmsite_chunks(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and "llmsite" in e]


def content(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


def hop(reason: str, status_code: int | None, *, mid_stream: bool = False) -> dict:
    return {
        "from": "primary",
        "to": "backup",
        "reason": reason,
        "status_code": status_code,
        "mid_stream": mid_stream,
    }


def steps(record: UsageRecord) -> list[tuple]:
    """The trail as (endpoint, outcome, status_code), checking its times."""
    starts = [step["started_ms"] for step in record.trail]
    assert starts == sorted(starts)
    assert all(step["duration_ms"] >= 0 for step in record.trail)
    return [
        (step["endpoint"], step["outcome"], step.get("status_code"))
        for step in record.trail
    ]


# --- The llmsite object ---------------------------------------------------------------


async def test_a_plain_answer_after_a_failover_says_so_in_its_body(
    two_routes, primary, alice
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 200
    assert response.json()["llmsite"] == {
        "endpoint": "backup",
        "fallbacks": [hop("server_error", 503)],
        "cached": False,
        "attempts": 2,
    }
    assert response["X-LLMSite-Fallbacks"] == "1"


async def test_a_stream_names_its_endpoint_first_and_sums_up_at_the_end(
    two_routes, primary, alice
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    _, events = await stream(alice)

    first, *_, final = llmsite_chunks(events)
    assert first is events[0]
    assert first["llmsite"] == {
        "endpoint": "backup",
        "fallbacks": [hop("server_error", 503)],
        "cached": False,
    }
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["llmsite"] == {**first["llmsite"], "attempts": 2}


async def test_a_mid_stream_failover_is_a_chunk_of_its_own_then_in_the_summary(
    two_routes, primary, alice
):
    primary.set_behaviour(DROPS_MID_ANSWER)

    response, events = await stream(alice)

    assert response["X-LLMSite-Endpoint"] == "primary"
    marked = llmsite_chunks(events)
    assert marked[0]["llmsite"]["endpoint"] == "primary"
    (switch,) = [e for e in marked if "fallback" in e["llmsite"]]
    assert switch["llmsite"] == {
        "endpoint": "backup",
        "fallback": hop("connection_error", None, mid_stream=True),
    }
    # Said at the moment it happened: after the primary's text, before the rest.
    at = events.index(switch)
    assert content(events[:at]) and content(events[at:])
    assert switch["choices"][0]["delta"] == {}
    statuses = [e["llmsite"]["status"] for e in marked if "status" in e["llmsite"]]
    assert any(
        s["kind"] == "failover" and s["to_endpoint"] == "backup" for s in statuses
    )
    final = marked[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["llmsite"]["endpoint"] == "backup"
    assert final["llmsite"]["fallbacks"] == [switch["llmsite"]["fallback"]]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_cached_answer_says_so_and_counts_no_tokens(
    one_route, primary, alice, stream
):
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream}
    fresh = await post(alice, body)
    if stream:
        await read_events(fresh)
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await post(alice, {**body, "stream_options": {"include_usage": True}})

    assert response.status_code == 200
    assert response["X-LLMSite-Cached"] == "true"
    if stream:
        events = await read_events(response)
        first, *_, final = llmsite_chunks(events)
        assert first["llmsite"]["cached"] is True
        summary = final["llmsite"]
        usage = events[-2]["usage"]
    else:
        assert int(response["X-LLMSite-Cached-Age"]) >= 0
        summary = response.json()["llmsite"]
        usage = response.json()["usage"]
    assert summary["cached"] is True
    assert summary["endpoint"] is None
    assert 0 <= summary["cached_age_s"] < 60
    assert usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def test_a_stream_that_fails_still_sends_the_usage_it_asked_for(
    one_route, primary, alice
):
    primary.set_behaviour(DROPS_MID_ANSWER)

    response = await post(
        alice,
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = await read_events(response)

    *_, usage_chunk, error, done = events
    assert done == "[DONE]"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert error["error"]["type"] == "server_error"
    assert error["error"]["llmsite"]["endpoint"] == "primary"
    (record,) = await records()
    assert record.completion_tokens == usage["completion_tokens"]


async def test_a_stream_that_fails_without_asking_for_usage_gets_none(
    one_route, primary, alice
):
    primary.set_behaviour(DROPS_MID_ANSWER)

    _, events = await stream(alice)

    assert not [e for e in events if isinstance(e, dict) and "usage" in e]
    assert "error" in events[-2]


def test_the_official_sdk_keeps_the_llmsite_object(owner, live_asgi_url):
    openai = pytest.importorskip("openai")
    _, raw = ApiKey.generate(owner, "sdk")
    with (
        SimulatedUpstream(
            behaviour=Behaviour(completion_tokens=8)
        ).run_in_thread() as first,
        SimulatedUpstream(
            behaviour=Behaviour(completion_tokens=8)
        ).run_in_thread() as second,
    ):
        for name, server, priority in (("primary", first, 1), ("backup", second, 2)):
            endpoint = Endpoint.objects.create(
                name=name,
                base_url=server.base_url,
                priority=priority,
                timeout=5,
                max_retries=1,
            )
            ModelRoute.objects.create(
                model_name=MODEL, endpoint=endpoint, upstream_model="sim-small"
            )
        first.set_behaviour(DROPS_MID_ANSWER)
        sdk = openai.OpenAI(base_url=live_asgi_url, api_key=raw, max_retries=0)

        chunks = list(
            sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        first.set_behaviour(Behaviour(completion_tokens=8))
        plain = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        for server in (first, second):
            server.set_behaviour(DROPS_MID_ANSWER)
        before_error = []
        with pytest.raises(openai.APIError) as failed:
            for chunk in sdk.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            ):
                before_error.append(chunk)

    marked = [c.model_extra["llmsite"] for c in chunks if "llmsite" in c.model_extra]
    assert marked[0]["endpoint"] == "primary"
    assert {"endpoint": "backup"}.items() <= next(
        m for m in marked if "fallback" in m
    ).items()
    assert marked[-1]["fallbacks"][0]["mid_stream"] is True
    assert chunks[-1].usage.completion_tokens > 0
    assert plain.model_extra["llmsite"]["endpoint"] == "primary"
    assert plain.model_extra["llmsite"]["fallbacks"] == []
    # The failed stream: the usage chunk arrived, then the error with the trail.
    assert before_error[-1].choices == []
    assert before_error[-1].usage.completion_tokens > 0
    assert failed.value.body["llmsite"]["endpoint"] == "backup"
    wait_for_records(3)


# --- The trail on every record ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_an_upstream_400_records_the_endpoint_that_refused(
    two_routes, primary, backup, alice, stream
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=400))

    response = await post(
        alice, {"model": MODEL, "messages": MESSAGES, "stream": stream}
    )

    assert response.status_code == 400
    (record,) = await records()
    assert (record.status, record.endpoint_name) == ("error", "primary")
    # A request the upstream calls wrong is wrong everywhere: no failover.
    assert steps(record) == [("primary", "failed", 400)]
    assert backup.stats.chat_requests == 0


async def test_a_plain_request_whose_client_leaves_records_what_was_tried(
    two_routes, primary, backup, alice_key
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))
    backup.set_behaviour(Behaviour(latency=30))
    body = json.dumps({"model": MODEL, "messages": MESSAGES})
    scope = asgi_scope(alice_key[1])
    requests = iter([{"type": "http.request", "body": body.encode()}])

    async def receive() -> dict:
        message = next(requests, None)
        if message is not None:
            return message
        # Leave once the backup has read the request (the simulator's count).
        while backup.stats.chat_requests == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    await asyncio.wait_for(django_http_application()(scope, receive, send), timeout=10)

    await backup.wait_for_disconnects(1)
    (record,) = await records()
    assert record.status == "cancelled"
    assert record.attempts == 2
    assert record.endpoint_name == "backup"
    assert steps(record) == [("primary", "failed", 503), ("backup", "cancelled", None)]


async def test_a_rejected_request_has_an_empty_trail(
    one_route, primary, alice, settings
):
    settings.RATE_LIMIT_RPM = 1
    await post(alice, {"model": MODEL, "messages": MESSAGES})

    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 429
    rejected = [r for r in await records() if r.status == "rejected"]
    assert [(r.trail, r.endpoint_name, r.attempts) for r in rejected] == [([], "", 0)]
    assert primary.stats.chat_requests == 1


# --- How fast a failover answers ------------------------------------------------------


@pytest.fixture
async def warm_routes(two_routes, alice):
    """The two routes, each endpoint having answered once on a model of its own.

    The figures are then those of the failover, not of a process's first
    request (the token encoder loading, each endpoint's first connection).
    """
    for endpoint in two_routes:
        name = f"warm-{endpoint.name}"
        await ModelRoute.objects.acreate(
            model_name=name, endpoint=endpoint, upstream_model="sim-small"
        )
        await read_events(
            await post(alice, {"model": name, "messages": MESSAGES, "stream": True})
        )
    return two_routes


async def first_token_after(alice, body: dict) -> float:
    """Seconds from sending a streamed request to its first answer text."""
    started = time.monotonic()
    response = await post(alice, {**body, "stream": True})
    assert response.status_code == 200
    async for part in response.streaming_content:
        for line in part.decode().splitlines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            if choices and choices[0]["delta"].get("content"):
                elapsed = time.monotonic() - started
                # Read to the end, so the request finishes and records.
                async for _ in response.streaming_content:
                    pass
                return elapsed
    raise AssertionError("no answer text")


async def backup_alone(alice, backup_endpoint) -> float:
    """The backup's own time to first text through the gateway, warm.

    The margin is for what a failover adds, not for the gateway's own work,
    which a loaded machine (or PostgreSQL) makes slower.
    """
    body = {"model": f"warm-{backup_endpoint.name}", "messages": MESSAGES}
    return await first_token_after(alice, body)


async def fails_over_within(
    alice, backup_endpoint, wait: float
) -> list[tuple[float, float]]:
    """Check a failover's first text comes within `wait` + the backup's + MARGIN.

    The machine is shared: a trial slowed by other jobs (each one measures the
    backup alone first) is run again, up to TRIALS in all; a failover that
    really costs more misses in every one.  Returns the (failover, backup
    alone) timings of the trials run.
    """
    timings = []
    for _ in range(TRIALS):
        alone = await backup_alone(alice, backup_endpoint)
        body = {"model": MODEL, "messages": MESSAGES}
        timings.append((await first_token_after(alice, body), alone))
        if timings[-1][0] < wait + alone + MARGIN:
            return timings
    raise AssertionError(f"slower than {wait} s + the backup + {MARGIN} s: {timings}")


async def answered() -> list[UsageRecord]:
    """The records of the measured requests, without the warm-up's."""
    return [record for record in await records() if record.model_name == MODEL]


async def test_a_503_fails_over_within_the_fallbacks_own_latency(
    warm_routes, primary, backup, alice
):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))
    backup.set_behaviour(Behaviour(latency=0.3))

    timings = await fails_over_within(alice, warm_routes[1], 0)

    assert all(alone >= 0.3 for _, alone in timings)
    for record in await answered():
        assert steps(record) == [("primary", "failed", 503), ("backup", "ok", None)]


async def test_a_hung_endpoint_costs_at_most_its_first_token_timeout(
    warm_routes, primary, alice
):
    primary_endpoint, backup_endpoint = warm_routes
    assert primary_endpoint.first_token_timeout == 0.5
    primary.set_behaviour(Behaviour(fault="stall", fault_after_tokens=0))

    await fails_over_within(alice, backup_endpoint, 0.5)

    for record in await answered():
        assert steps(record) == [("primary", "failed", None), ("backup", "ok", None)]
        assert record.trail[0]["reason"] == "timeout"


async def test_a_long_retry_after_fails_over_at_once_and_rests_the_endpoint(
    warm_routes, primary, alice
):
    primary_endpoint, backup_endpoint = warm_routes
    primary.set_behaviour(Behaviour(fault="status", fault_status=429, retry_after=60))
    asked_before = primary.stats.chat_requests
    alone = await backup_alone(alice, backup_endpoint)

    elapsed = await first_token_after(alice, {"model": MODEL, "messages": MESSAGES})
    again = await first_token_after(alice, {"model": MODEL, "messages": MESSAGES})

    assert elapsed < alone + MARGIN and again < alone + MARGIN
    await primary_endpoint.arefresh_from_db()
    assert primary_endpoint.resting_until > timezone.now() + timedelta(seconds=50)
    # Resting: the second request did not ask it again.
    assert primary.stats.chat_requests == asked_before + 1
    first, second = await answered()
    assert steps(first) == [("primary", "failed", 429), ("backup", "ok", None)]
    assert steps(second)[0][:2] == ("primary", "skipped")
    assert second.trail[0]["reason"] == "resting"
