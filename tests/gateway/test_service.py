"""The request pipeline: limits, budgets, router, and exactly one usage record."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async

from gateway import accounting, client, service
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetScope,
    UsageRecord,
    UsageRollup,
)
from gateway.service import Caller, Delta, Done, Fallback, Rejected, Started
from gateway.tokens import count_messages
from tests.gateway.usage_support import (
    FakeUpstream,
    close_thread_connections,
    forget_process_state,
    make_route,
)

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    yield
    forget_process_state()
    close_thread_connections()


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    with client.pools.use_transport(fake.transport()):
        yield fake


@pytest.fixture
def primary(db):
    return make_route("primary", priority=10)


@pytest.fixture
def backup(db):
    return make_route("backup", priority=20, prices=None)


async def collect(caller, model="chat-model", messages=MESSAGES, params=None):
    events = []
    async with contextlib.aclosing(
        service.stream_chat(caller, model, messages, params)
    ) as stream:
        async for event in stream:
            events.append(event)
    return events


async def records():
    """Every usage record, once the writer has stored what is queued."""
    await accounting.flush()
    return await sync_to_async(list)(UsageRecord.objects.order_by("created_at", "id"))


async def counter(budget):
    await accounting.flush()
    return await BudgetCounter.objects.aget(budget=budget)


@sync_to_async
def user_budget(user, limit):
    return Budget.objects.create(scope=BudgetScope.USER, user=user, token_limit=limit)


# --- Answers ------------------------------------------------------------------


async def test_a_streamed_answer_leaves_one_ok_record_with_upstream_usage(
    owner, primary, upstream
):
    events = await collect(Caller(owner.pk))

    assert isinstance(events[0], Started)
    assert (
        "".join(e.text for e in events if isinstance(e, Delta))
        == "Hello there, how can I help?"
    )
    done = events[-1]
    assert isinstance(done, Done)
    (record,) = await records()
    assert await done.recorded() == record.pk
    assert (record.status, record.source, record.user_id) == ("ok", "chat", owner.pk)
    assert (record.prompt_tokens, record.completion_tokens) == (11, 8)
    assert record.tokens_estimated is False
    assert (record.endpoint_name, record.upstream_model) == ("primary", "gpt-4o-mini")
    assert record.attempts == 1
    assert record.fallback_hops == []
    # (11 * 0.15 + 8 * 0.60) / 1000
    assert record.cost == Decimal("0.006450") == done.cost
    assert record.latency_ms >= record.ttft_ms > 0
    assert done.usage() == {
        "prompt_tokens": 11,
        "completion_tokens": 8,
        "total_tokens": 19,
        "estimated": False,
    }


async def test_without_upstream_usage_tokens_are_estimated_and_flagged(
    owner, primary, upstream
):
    upstream.behaviour("primary.test").usage = None

    done = (await collect(Caller(owner.pk)))[-1]

    (record,) = await records()
    assert record.tokens_estimated is True
    # gpt-4o-mini is counted with o200k_base: the prompt as OpenAI bills it and
    # the eight words of the answer as eight tokens.
    assert (record.prompt_tokens, record.completion_tokens) == (done.prompt_tokens, 8)
    assert record.prompt_tokens == done.context.tokens
    assert done.usage()["estimated"] is True


async def test_a_plain_request_leaves_one_ok_record(owner, primary, upstream):
    done = await service.complete_chat(
        Caller(owner.pk, source="api"), "chat-model", MESSAGES
    )

    assert done.text == "Hello there, how can I help?"
    assert done.raw["choices"][0]["message"]["content"] == done.text
    (record,) = await records()
    assert (record.pk, record.status, record.source) == (
        await done.recorded(),
        "ok",
        "api",
    )
    assert (record.prompt_tokens, record.completion_tokens) == (11, 8)
    assert record.ttft_ms is None


async def test_the_reservation_caps_what_upstream_may_produce(owner, primary, upstream):
    await collect(Caller(owner.pk))
    await collect(Caller(owner.pk), params={"max_tokens": 30})
    await collect(Caller(owner.pk), params={"max_tokens": 5000})

    sent = [body["max_tokens"] for body in upstream.requests_to("primary.test")]
    assert sent == [100, 30, 100]


async def test_a_fallback_is_recorded_with_the_endpoint_that_answered(
    owner, primary, backup, upstream
):
    upstream.behaviour("primary.test").status = 503

    events = await collect(Caller(owner.pk))

    (hop,) = [e.hop for e in events if isinstance(e, Fallback)]
    assert (hop.endpoint, hop.to_endpoint) == ("primary", "backup")
    done = events[-1]
    assert (done.status, done.endpoint) == ("ok", "backup")
    (record,) = await records()
    assert record.endpoint_name == "backup"
    assert [(h["endpoint"], h["error_type"]) for h in record.fallback_hops] == [
        ("primary", "APIServerError")
    ]
    assert record.attempts == 2
    # The backup route has no prices.
    assert record.cost is None


async def test_a_mid_stream_failover_settles_both_segments(
    owner, primary, backup, upstream
):
    budget = await user_budget(owner, 100_000)
    upstream.behaviour("primary.test").drop_after = 3
    upstream.behaviour("primary.test").usage = None

    events = await collect(Caller(owner.pk))

    done = events[-1]
    assert done.status == "ok"
    assert done.text.startswith("Hello there,")
    (record,) = await records()
    assert record.fallback_hops[0]["mid_stream"] is True
    assert record.tokens_estimated is True
    used = await counter(budget)
    assert (used.used_tokens, used.reserved_tokens) == (done.total_tokens, 0)
    # The backup was asked to continue with the partial answer as context.
    continued = upstream.requests_to("backup.test")[0]["messages"]
    assert continued[-2] == {"role": "assistant", "content": "Hello there,"}


# --- Every outcome leaves exactly one record ----------------------------------


async def test_a_rate_limited_request_is_rejected_with_a_record(
    owner, primary, upstream, settings
):
    settings.RATE_LIMIT_RPM = 1
    forget_process_state()

    with time_machine.travel("2026-03-04 12:00:00+00:00", tick=False):
        await collect(Caller(owner.pk))
        with pytest.raises(Rejected) as refused:
            await collect(Caller(owner.pk))

    assert refused.value.code == "rate_limited"
    assert refused.value.http_status == 429
    assert refused.value.retry_after == pytest.approx(60)
    assert refused.value.message == (
        "Your limit of 1 request per minute is used up; it resets in 60 s."
    )
    first, second = await records()
    assert (first.status, second.status) == ("ok", "rejected")
    assert second.pk == await refused.value.recorded()
    assert second.error_type == "rate_limited"
    assert (second.prompt_tokens, second.completion_tokens) == (0, 0)
    assert len(upstream.requests) == 1


async def test_an_exhausted_budget_refuses_with_the_reset_time(
    owner, primary, upstream
):
    behaviour = upstream.behaviour("primary.test")
    behaviour.usage_from_request = 40
    # After the first request (100 tokens), 10 left: not even a prompt fits.
    budget = await user_budget(owner, 110)

    with time_machine.travel("2026-03-04 21:30:00+00:00", tick=False):
        await collect(Caller(owner.pk), params={"max_tokens": 60})
        with pytest.raises(Rejected) as refused:
            await collect(Caller(owner.pk), params={"max_tokens": 60})

    assert refused.value.code == "budget_exhausted"
    assert refused.value.message.endswith("it resets at 00:00 UTC.")
    assert refused.value.retry_after == 2.5 * 3600
    ok, rejected = await records()
    assert (ok.status, rejected.status) == ("ok", "rejected")
    used = await counter(budget)
    assert (used.used_tokens, used.reserved_tokens) == (100, 0)
    assert len(upstream.requests) == 1


async def test_an_unknown_model_is_rejected_with_a_record(owner, primary, upstream):
    with pytest.raises(Rejected) as refused:
        await collect(Caller(owner.pk), model="no-such-model")

    assert (refused.value.code, refused.value.http_status) == ("model_not_found", 404)
    (record,) = await records()
    assert (record.status, record.model_name) == ("rejected", "no-such-model")


async def test_a_conversation_too_large_for_every_route_is_rejected(
    owner, db, upstream
):
    await sync_to_async(make_route)("tiny", context_window=300, max_output_tokens=200)
    huge = [{"role": "user", "content": "word " * 2000}]

    with pytest.raises(Rejected) as refused:
        await collect(Caller(owner.pk), messages=huge)

    assert refused.value.code == "context_too_large"
    (record,) = await records()
    assert record.status == "rejected"
    assert upstream.requests == []


async def test_when_every_endpoint_fails_the_error_says_when_to_retry(
    owner, primary, backup, upstream
):
    budget = await user_budget(owner, 10_000)
    for host in ("primary.test", "backup.test"):
        upstream.behaviour(host).status = 503

    with pytest.raises(Rejected) as refused:
        await collect(Caller(owner.pk))

    assert refused.value.code == "all_endpoints_unavailable"
    assert refused.value.http_status == 503
    assert refused.value.retry_after > 0
    (record,) = await records()
    assert (record.status, record.error_type) == ("error", "AllEndpointsUnavailable")
    assert [h["endpoint"] for h in record.fallback_hops] == ["primary", "backup"]
    released = await counter(budget)
    assert (released.used_tokens, released.reserved_tokens) == (0, 0)


async def test_a_request_the_upstream_calls_wrong_is_not_retried(
    owner, primary, backup, upstream
):
    upstream.behaviour("primary.test").status = 400

    with pytest.raises(Rejected) as refused:
        await collect(Caller(owner.pk))

    assert refused.value.code == "invalid_request"
    assert upstream.requests_to("backup.test") == []
    (record,) = await records()
    assert record.status == "error"


async def test_a_cached_answer_is_recorded_as_cached(owner, primary, upstream):
    await collect(Caller(owner.pk))
    upstream.behaviour("primary.test").status = 503

    events = await collect(Caller(owner.pk))

    done = events[-1]
    assert (done.status, done.cached) == ("cached", True)
    assert done.text == "Hello there, how can I help?"
    first, second = await records()
    assert (first.status, second.status) == ("ok", "cached")
    assert (second.prompt_tokens, second.completion_tokens) == (0, 0)


async def test_stopping_half_way_closes_upstream_and_records_what_was_generated(
    owner, primary, upstream
):
    budget = await user_budget(owner, 10_000)
    upstream.behaviour("primary.test").pause_after = 4
    seen = []

    async def chat():
        async with contextlib.aclosing(
            service.stream_chat(Caller(owner.pk), "chat-model", MESSAGES)
        ) as stream:
            async for event in stream:
                if isinstance(event, Delta):
                    seen.append(event.text)

    task = asyncio.create_task(chat())
    await asyncio.wait_for(upstream.paused.wait(), 5)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert "".join(seen) == "Hello there, how"
    assert upstream.open_streams == 0
    (record,) = await records()
    assert record.status == "cancelled"
    assert record.tokens_estimated is True
    assert record.completion_tokens == 4
    assert record.prompt_tokens > 0
    used = await counter(budget)
    assert (used.used_tokens, used.reserved_tokens) == (record.total_tokens, 0)


async def test_closing_the_stream_early_records_it_once_as_cancelled(
    owner, primary, upstream
):
    async with contextlib.aclosing(
        service.stream_chat(Caller(owner.pk), "chat-model", MESSAGES)
    ) as stream:
        async for event in stream:
            if isinstance(event, Delta):
                break

    (record,) = await records()
    assert record.status == "cancelled"
    assert record.completion_tokens == 1
    assert upstream.open_streams == 0


async def test_closing_after_done_writes_nothing_more(owner, primary, upstream):
    async with contextlib.aclosing(
        service.stream_chat(Caller(owner.pk), "chat-model", MESSAGES)
    ) as stream:
        async for event in stream:
            if isinstance(event, Done):
                break

    assert [r.status for r in await records()] == ["ok"]


async def test_a_cancelled_plain_request_is_recorded_and_releases_its_budget(
    owner, primary
):
    budget = await user_budget(owner, 10_000)
    arrived = asyncio.Event()

    async def never_answers(request):
        arrived.set()
        await asyncio.Event().wait()

    with client.pools.use_transport(httpx.MockTransport(never_answers)):
        task = asyncio.create_task(
            service.complete_chat(Caller(owner.pk), "chat-model", MESSAGES)
        )
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    (record,) = await records()
    assert record.status == "cancelled"
    released = await counter(budget)
    assert (released.used_tokens, released.reserved_tokens) == (0, 0)


# --- Endpoints and keys -------------------------------------------------------


async def test_an_endpoint_over_its_own_rpm_is_skipped_not_failed(owner, db, upstream):
    await sync_to_async(make_route)("primary", priority=10, rpm_limit=1)
    await sync_to_async(make_route)("backup", priority=20)

    first = (await collect(Caller(owner.pk)))[-1]
    second = await collect(Caller(owner.pk))

    assert first.endpoint == "primary"
    assert second[-1].endpoint == "backup"
    (hop,) = [e.hop for e in second if isinstance(e, Fallback)]
    assert hop.reason == "rate_limited_locally"


async def test_every_endpoint_at_its_rate_limit_says_whose_and_when_it_resets(
    owner, db, upstream
):
    await sync_to_async(make_route)("primary", priority=10, rpm_limit=1)
    await sync_to_async(make_route)("backup", priority=20, rpm_limit=2)

    with time_machine.travel("2026-03-04 12:00:00+00:00", tick=False) as clock:
        for _ in range(3):
            await collect(Caller(owner.pk))
        clock.shift(10)
        with pytest.raises(Rejected) as refused:
            # A question never answered: no degraded-mode answer to fall back on.
            await collect(Caller(owner.pk), messages=[{"role": "user", "content": "?"}])

    assert refused.value.code == "rate_limited"
    assert refused.value.http_status == 429
    # backup's second slot of two per minute opens first: 30 s after 12:00:00.
    assert refused.value.retry_after == pytest.approx(20)
    assert refused.value.message == (
        "Every endpoint for 'chat-model' is at its rate limit: primary's limit of "
        "1 request per minute is used up; it resets in 50 s; backup's limit of "
        "2 requests per minute is used up; it resets in 20 s."
    )
    record = (await records())[-1]
    assert (record.status, record.error_type) == ("rejected", "rate_limited")
    assert len(upstream.requests) == 3


async def test_an_endpoint_budget_is_charged_only_for_what_it_served(
    owner, db, upstream
):
    route = await sync_to_async(make_route)("primary", priority=10)
    await sync_to_async(make_route)("backup", priority=20)
    prompt = count_messages(MESSAGES, "gpt-4o-mini").tokens
    # Room for one request's reservation (prompt + 100 output), not for two.
    budget = await sync_to_async(Budget.objects.create)(
        scope=BudgetScope.ENDPOINT, endpoint=route.endpoint, token_limit=prompt + 110
    )

    first = (await collect(Caller(owner.pk)))[-1]
    second = (await collect(Caller(owner.pk)))[-1]

    assert (first.endpoint, second.endpoint) == ("primary", "backup")
    charged = await counter(budget)
    assert (charged.used_tokens, charged.reserved_tokens) == (19, 0)


async def test_an_api_key_request_records_the_key_and_its_budget(
    owner, primary, upstream
):
    key, _ = await sync_to_async(ApiKey.generate)(owner, "script")
    budget = await sync_to_async(Budget.objects.create)(
        scope=BudgetScope.API_KEY, api_key=key, token_limit=1000
    )

    done = await service.complete_chat(
        Caller(owner.pk, api_key_id=key.pk, source="api"), "chat-model", MESSAGES
    )

    (record,) = await records()
    assert (record.api_key_id, record.source) == (key.pk, "api")
    assert done.budget_remaining == 1000 - 19
    assert (await counter(budget)).used_tokens == 19


async def test_the_rollups_count_every_outcome(owner, primary, upstream, settings):
    await collect(Caller(owner.pk))
    with contextlib.suppress(Rejected):
        await collect(Caller(owner.pk), model="no-such-model")
    upstream.behaviour("primary.test").status = 400
    with contextlib.suppress(Rejected):
        await collect(Caller(owner.pk))

    await accounting.flush()
    rollups = await sync_to_async(list)(UsageRollup.objects.order_by("model_name"))
    totals = {
        (r.model_name, r.endpoint_name): (r.requests, r.errors, r.rejected)
        for r in rollups
    }
    # A failed request names the endpoint that failed last; its trail says
    # which were tried.  A refused one tried none.
    assert totals == {
        ("chat-model", "primary"): (2, 1, 0),
        ("no-such-model", ""): (1, 0, 1),
    }


async def test_a_refusal_first_settles_what_this_process_still_holds(
    owner, primary, upstream, settings
):
    # Records wait to be written far longer than the test takes...
    settings.USAGE_WRITE_DELAY_MS = 60_000
    budget = await user_budget(owner, 200)
    params = {"max_tokens": 100}

    # ...so the first request (19 tokens used) still holds its whole
    # reservation, prompt + 100, when the second asks for as much again:
    # 2 x 118 do not fit in 200, but 19 + 118 do once the first has settled.
    first = (await collect(Caller(owner.pk), params=params))[-1]
    second = (await collect(Caller(owner.pk), params=params))[-1]

    assert (first.status, second.status) == ("ok", "ok")
    used = await counter(budget)
    assert (used.used_tokens, used.reserved_tokens) == (38, 0)
