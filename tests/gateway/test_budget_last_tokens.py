"""Budgets spent to the last token: less output rather than a refusal, never more."""

from __future__ import annotations

import contextlib

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from gateway import accounting, client, service
from gateway.accounting import BudgetExhausted, budget_ref, period_bounds
from gateway.context import fit_context
from gateway.models import Budget, BudgetCounter, BudgetScope, UsageRecord
from gateway.service import Caller, Delta, Done, Rejected
from tests.gateway.usage_support import (
    FakeUpstream,
    close_thread_connections,
    forget_process_state,
    make_route,
)

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Tell me about tea."}]
OUTPUT = 100


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    settings.GATEWAY_BUDGET_MIN_OUTPUT_TOKENS = 16
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
def prompt(db):
    """The prompt's tokens as the gateway counts them on the route."""
    route = make_route("primary", max_output_tokens=OUTPUT)
    _, status = fit_context(
        MESSAGES,
        model=route.upstream_model,
        context_window=route.context_window,
        max_output_tokens=OUTPUT,
    )
    return status.tokens


async def collect(caller, params=None):
    events = []
    async with contextlib.aclosing(
        service.stream_chat(caller, "chat-model", MESSAGES, params)
    ) as stream:
        async for event in stream:
            events.append(event)
    return events


async def counter(budget):
    await accounting.flush()
    return await BudgetCounter.objects.aget(budget=budget)


@sync_to_async
def user_budget(user, limit, **fields):
    return Budget.objects.create(
        scope=BudgetScope.USER, user=user, token_limit=limit, **fields
    )


async def test_a_budget_short_of_the_whole_output_lowers_max_tokens_to_what_is_left(
    owner, prompt, upstream
):
    # Upstream reports our prompt count and its max_tokens as the completion.
    upstream.behaviour("primary.test").usage_from_request = prompt
    budget = await user_budget(owner, prompt + 40)

    events = await collect(Caller(owner.pk))

    done = events[-1]
    assert isinstance(done, Done)
    (body,) = upstream.requests_to("primary.test")
    assert body["max_tokens"] == 40
    used = await counter(budget)
    assert (used.used_tokens, used.reserved_tokens) == (prompt + 40, 0)
    assert done.budget_remaining == 0


async def test_a_budget_without_room_for_the_prompt_and_a_little_answer_refuses(
    owner, prompt, upstream
):
    budget = await user_budget(owner, prompt + 15)

    with pytest.raises(Rejected) as refused:
        await collect(Caller(owner.pk))

    assert refused.value.code == "budget_exhausted"
    assert f"has {prompt + 15:,} left" in refused.value.message
    assert f"needs at least {prompt + 16:,}" in refused.value.message
    assert upstream.requests == []
    await accounting.flush()
    held = BudgetCounter.objects.filter(budget=budget, reserved_tokens__gt=0)
    assert not await held.aexists()


async def test_the_floor_is_a_setting(owner, prompt, upstream, settings):
    settings.GATEWAY_BUDGET_MIN_OUTPUT_TOKENS = 4
    upstream.behaviour("primary.test").usage_from_request = prompt
    await user_budget(owner, prompt + 5)

    events = await collect(Caller(owner.pk))

    assert isinstance(events[-1], Done)
    assert upstream.requests_to("primary.test")[0]["max_tokens"] == 5


async def test_an_upstream_that_ignores_max_tokens_is_cut_at_the_budget(
    owner, prompt, upstream
):
    behaviour = upstream.behaviour("primary.test")
    # No usage: the gateway counts the answer, which goes on far past 30 tokens.
    behaviour.usage = None
    behaviour.words = ["word "] * 400
    budget = await user_budget(owner, prompt + 30)

    events = await collect(Caller(owner.pk))

    done = events[-1]
    assert isinstance(done, Done)
    assert done.finish_reason == "length"
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert 0 < text.count("word") <= 30
    used = await counter(budget)
    assert used.used_tokens <= budget.token_limit
    assert used.reserved_tokens == 0
    record = await UsageRecord.objects.aget()
    assert record.error_type == "output_limit"
    assert "budget" in record.error_message
    assert record.completion_tokens <= 30


async def test_a_roomy_budget_keeps_the_route_output_and_the_slack(
    owner, prompt, upstream
):
    behaviour = upstream.behaviour("primary.test")
    behaviour.usage = None
    behaviour.words = ["word "] * 400
    await user_budget(owner, 100_000)

    events = await collect(Caller(owner.pk))

    assert upstream.requests_to("primary.test")[0]["max_tokens"] == OUTPUT
    assert events[-1].finish_reason == "length"
    await accounting.flush()
    record = await UsageRecord.objects.aget()
    # Cut past max_tokens and its slack, not at the budget.
    assert record.completion_tokens > OUTPUT
    assert "max_tokens" in record.error_message


def test_reserve_with_a_minimum_takes_the_room_of_the_tightest_budget(owner):
    small = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=70)
    large = Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=90)
    refs = [budget_ref(small), budget_ref(large)]

    first = accounting.reserve(refs, 50, minimum=10)
    second = accounting.reserve(refs, 50, minimum=10)

    assert (first.tokens, second.tokens) == (50, 20)
    assert [h.tokens for h in second.holds] == [20, 20]
    with pytest.raises(BudgetExhausted) as refused:
        accounting.reserve(refs, 50, minimum=10)
    assert refused.value.needed == 10
    assert "needs at least 10" in str(refused.value)
    reserved = dict(BudgetCounter.objects.values_list("budget_id", "reserved_tokens"))
    assert reserved == {small.pk: 70, large.pk: 70}


def test_reserve_without_a_minimum_is_all_or_nothing(owner):
    budget = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=70)

    accounting.reserve([budget_ref(budget)], 50)
    with pytest.raises(BudgetExhausted) as refused:
        accounting.reserve([budget_ref(budget)], 50)

    assert "needs up to 50" in str(refused.value)
    assert BudgetCounter.objects.get().reserved_tokens == 50


def spent_budget(owner, now):
    """A daily budget of 100 with all 100 used this period: warned and exhausted."""
    budget = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=100)
    BudgetCounter.objects.create(
        budget=budget,
        period_start=period_bounds(budget.period, now)[0],
        used_tokens=100,
        warned_at=now,
        exhausted_at=now,
    )
    return budget


def test_raising_the_limit_clears_the_exhausted_and_warned_marks(owner):
    budget = spent_budget(owner, timezone.now())

    budget.token_limit = 110
    budget.save()
    state = BudgetCounter.objects.get()
    assert state.exhausted_at is None
    assert state.warned_at is not None  # 100 is still past 80 % of 110

    budget.token_limit = 1000
    budget.save()
    assert BudgetCounter.objects.get().warned_at is None


def test_lowering_the_limit_leaves_the_marks(owner):
    now = timezone.now()
    budget = spent_budget(owner, now)

    budget.token_limit = 90
    budget.save()

    assert BudgetCounter.objects.get().exhausted_at == now


async def test_a_budget_created_mid_period_counts_what_was_used_already(
    owner, prompt, upstream
):
    await collect(Caller(owner.pk))
    await accounting.flush()
    record = await UsageRecord.objects.aget()
    spent = record.prompt_tokens + record.completion_tokens
    assert spent > 0

    budget = await user_budget(owner, 1000)
    everyone = await sync_to_async(Budget.objects.create)(
        scope=BudgetScope.GLOBAL, token_limit=1000
    )

    assert (await counter(budget)).used_tokens == spent
    assert (await counter(everyone)).used_tokens == spent


async def test_a_budget_created_for_someone_else_starts_at_zero(
    owner, other_user, prompt, upstream
):
    await collect(Caller(owner.pk))
    await accounting.flush()

    await user_budget(other_user, 1000)

    assert not await BudgetCounter.objects.aexists()


def test_a_whole_only_try_does_not_mark_a_budget_with_room_exhausted(owner):
    budget = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=70)
    refs = [budget_ref(budget)]

    with pytest.raises(BudgetExhausted):
        accounting.reserve(refs, 100, minimum=30, shrink=False)
    assert BudgetCounter.objects.get().exhausted_at is None

    with pytest.raises(BudgetExhausted):
        accounting.reserve(refs, 100)
    assert BudgetCounter.objects.get().exhausted_at is not None
