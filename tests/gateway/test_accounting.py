"""Budgets: periods, reservations, settling, threshold events, exactly-once records."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine
from django.db import connection, transaction

from gateway import accounting
from gateway.accounting import BudgetExhausted, UsageEntry, usage
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetPeriod,
    BudgetScope,
    Endpoint,
    UsageRecord,
    UsageRollup,
)
from gateway.signals import budget_threshold_crossed

pytestmark = pytest.mark.django_db


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fresh_budget_cache():
    accounting.forget_budgets()
    yield
    accounting.forget_budgets()


@pytest.fixture
def events():
    """Every budget_threshold_crossed signal, as (level, budget id, used)."""
    seen = []

    def listen(sender, counter, level, used, limit, resets_at, **kwargs):
        seen.append((level, counter.budget_id, used, limit, resets_at))

    budget_threshold_crossed.connect(listen)
    yield seen
    budget_threshold_crossed.disconnect(listen)


def user_budget(user, limit, period=BudgetPeriod.DAILY, **fields):
    return Budget.objects.create(
        scope=BudgetScope.USER, user=user, token_limit=limit, period=period, **fields
    )


def counter_of(budget):
    return BudgetCounter.objects.get(budget=budget)


def settle(reservation, used, *, user=None, status="ok", **fields):
    """Write the one usage record of a request that used `used` tokens."""
    return accounting.record_usage(
        UsageEntry(
            model_name="sim-small",
            status=status,
            user_id=user.pk if user else None,
            prompt_tokens=used // 2,
            completion_tokens=used - used // 2,
            settlements=accounting.settlements_for(reservation, used),
            **fields,
        )
    )


# --- Periods ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("daily", "2026-03-04 23:59:59", "2026-03-04 00:00", "2026-03-05 00:00"),
        ("daily", "2026-03-05 00:00:00", "2026-03-05 00:00", "2026-03-06 00:00"),
        # 2026-03-04 is a Wednesday.
        ("weekly", "2026-03-04 12:00", "2026-03-02 00:00", "2026-03-09 00:00"),
        ("weekly", "2026-03-08 23:59:59", "2026-03-02 00:00", "2026-03-09 00:00"),
        ("monthly", "2026-12-31 23:00", "2026-12-01 00:00", "2027-01-01 00:00"),
        ("monthly", "2026-02-01 00:00", "2026-02-01 00:00", "2026-03-01 00:00"),
    ],
)
def test_periods_follow_the_utc_calendar(period, now, start, end):
    assert accounting.period_bounds(period, at(now)) == (at(start), at(end))


# --- Reserving ----------------------------------------------------------------


def test_a_reservation_that_fits_is_held_on_the_counter(owner):
    budget = user_budget(owner, 1000)

    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 300)

    counter = counter_of(budget)
    assert (counter.used_tokens, counter.reserved_tokens) == (0, 300)
    assert reservation.remaining == 700


def test_a_reservation_that_does_not_fit_is_refused_with_the_reset_time(owner):
    user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)

    with time_machine.travel(at("2026-03-04 15:20"), tick=False):
        accounting.reserve(budgets, 800)
        with pytest.raises(BudgetExhausted) as refused:
            accounting.reserve(budgets, 300)

    assert str(refused.value) == (
        "Budget exhausted: the daily budget of 1,000 tokens for your account has "
        "200 left and this request needs up to 300; it resets at 00:00 UTC."
    )
    assert refused.value.resets_at == at("2026-03-05 00:00")
    assert refused.value.retry_after == 8 * 3600 + 40 * 60


def test_a_weekly_refusal_names_the_day_it_resets(owner):
    user_budget(owner, 100, period=BudgetPeriod.WEEKLY)

    with (
        time_machine.travel(at("2026-03-04 15:20"), tick=False),
        pytest.raises(BudgetExhausted, match=r"resets at 00:00 UTC on Mon 09 Mar"),
    ):
        accounting.reserve(accounting.caller_budgets(owner.pk, None), 300)


def test_the_budgets_of_several_users_read_together_are_each_ones_own(
    owner, other_user, django_assert_num_queries
):
    mine = user_budget(owner, 10_000)
    shared = Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=500)
    theirs = user_budget(other_user, 2_000, period=BudgetPeriod.WEEKLY)
    users = (owner.pk, other_user.pk)

    with django_assert_num_queries(1):
        accounting.read_users_budgets(users)
        kept = [accounting.caller_budgets(u, None) for u in users]

    accounting.forget_budgets()
    assert kept == [accounting.caller_budgets(u, None) for u in users]
    assert [[ref.id for ref in refs] for refs in kept] == [
        [mine.id, shared.id],
        [shared.id, theirs.id],
    ]


def test_a_reservation_is_all_or_nothing_over_several_budgets(owner):
    mine = user_budget(owner, 10_000)
    Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=500)
    budgets = accounting.caller_budgets(owner.pk, None)

    with pytest.raises(BudgetExhausted, match="for everyone"):
        accounting.reserve(budgets, 600)

    assert not BudgetCounter.objects.filter(budget=mine, reserved_tokens__gt=0).exists()


def test_disabled_and_other_peoples_budgets_do_not_apply(owner, other_user):
    user_budget(other_user, 10)
    user_budget(owner, 10, enabled=False)

    assert accounting.caller_budgets(owner.pk, None) == ()
    assert accounting.reserve((), 10**9).holds == []


def test_an_api_key_budget_applies_to_that_key_only(owner):
    key, _ = ApiKey.generate(owner, "script")
    Budget.objects.create(scope=BudgetScope.API_KEY, api_key=key, token_limit=100)

    assert accounting.caller_budgets(owner.pk, None) == ()
    with pytest.raises(BudgetExhausted, match="for this API key"):
        accounting.reserve(accounting.caller_budgets(owner.pk, key.pk), 101)


def test_an_unlimited_budget_counts_usage_without_refusing(owner):
    budget = user_budget(owner, None)

    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 10**9)
    settle(reservation, 1234, user=owner)

    assert counter_of(budget).used_tokens == 1234
    assert reservation.remaining is None


# --- Settling -----------------------------------------------------------------


def test_settling_releases_the_reservation_and_counts_the_real_tokens(owner):
    budget = user_budget(owner, 1000)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 600)

    written = settle(reservation, 150, user=owner)

    counter = counter_of(budget)
    assert (counter.used_tokens, counter.reserved_tokens) == (150, 0)
    assert written.budget_remaining == 850


def test_released_tokens_can_be_reserved_again(owner):
    user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)
    reservation = accounting.reserve(budgets, 900)

    accounting.release(reservation)

    assert accounting.reserve(budgets, 1000).remaining == 0


def test_the_day_resets_at_midnight_utc_and_not_24_hours_after_first_use(owner):
    budget = user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)

    with time_machine.travel(at("2026-03-04 23:59:30"), tick=False) as clock:
        settle(accounting.reserve(budgets, 1000), 1000, user=owner)
        with pytest.raises(BudgetExhausted):
            accounting.reserve(budgets, 1)
        clock.move_to(at("2026-03-04 23:59:59.999"))
        with pytest.raises(BudgetExhausted):
            accounting.reserve(budgets, 1)
        clock.move_to(at("2026-03-05 00:00:00"))
        fresh = accounting.reserve(budgets, 1000)

    assert fresh.remaining == 0
    counters = {
        c.period_start: c.used_tokens + c.reserved_tokens for c in budget.counters.all()
    }
    assert counters == {at("2026-03-04"): 1000, at("2026-03-05"): 1000}


def test_a_request_that_spans_midnight_settles_on_the_day_it_reserved(owner):
    budget = user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)

    with time_machine.travel(at("2026-03-04 23:59:58"), tick=False) as clock:
        reservation = accounting.reserve(budgets, 500)
        clock.move_to(at("2026-03-05 00:00:03"))
        settle(reservation, 400, user=owner)
        accounting.reserve(budgets, 1000)

    by_day = {c.period_start.date().day: c for c in budget.counters.all()}
    assert (by_day[4].used_tokens, by_day[4].reserved_tokens) == (400, 0)
    assert (by_day[5].used_tokens, by_day[5].reserved_tokens) == (0, 1000)


# --- Threshold events ---------------------------------------------------------


def test_crossing_the_warning_threshold_sends_one_event(
    owner, events, django_capture_on_commit_callbacks
):
    budget = user_budget(owner, 1000, warning_percent=80)
    budgets = accounting.caller_budgets(owner.pk, None)

    with django_capture_on_commit_callbacks(execute=True):
        settle(accounting.reserve(budgets, 100), 700, user=owner)
        assert events == []
        settle(accounting.reserve(budgets, 100), 100, user=owner)
        settle(accounting.reserve(budgets, 100), 50, user=owner)

    assert [(level, used) for level, _, used, *_ in events] == [("warning", 800)]
    assert counter_of(budget).warned_at is not None


def test_exhaustion_sends_one_event_however_many_are_refused(
    owner, events, django_capture_on_commit_callbacks
):
    user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)

    with (
        time_machine.travel(at("2026-03-04 12:00"), tick=False),
        django_capture_on_commit_callbacks(execute=True),
    ):
        settle(accounting.reserve(budgets, 1000), 1000, user=owner)
        for _ in range(3):
            with pytest.raises(BudgetExhausted):
                accounting.reserve(budgets, 10)

    assert [(level, used, limit) for level, _, used, limit, _ in events] == [
        ("warning", 1000, 1000),
        ("exhausted", 1000, 1000),
    ]
    assert events[-1][-1] == at("2026-03-05 00:00")


def test_a_refusal_on_settled_usage_alone_counts_as_exhaustion(
    owner, events, django_capture_on_commit_callbacks
):
    budget = user_budget(owner, 1000, warning_percent=100)
    budgets = accounting.caller_budgets(owner.pk, None)

    with django_capture_on_commit_callbacks(execute=True):
        settle(accounting.reserve(budgets, 900), 900, user=owner)
        held = accounting.reserve(budgets, 100)
        # Refused because of a reservation still running: not exhausted yet.
        with pytest.raises(BudgetExhausted):
            accounting.reserve(budgets, 50)
        assert events == []
        accounting.release(held)
        with pytest.raises(BudgetExhausted):
            accounting.reserve(budgets, 200)

    assert [level for level, *_ in events] == ["exhausted"]
    assert counter_of(budget).exhausted_at is not None


def test_a_new_period_warns_again(owner, events, django_capture_on_commit_callbacks):
    user_budget(owner, 100)
    budgets = accounting.caller_budgets(owner.pk, None)

    with django_capture_on_commit_callbacks(execute=True):
        with time_machine.travel(at("2026-03-04 12:00"), tick=False):
            settle(accounting.reserve(budgets, 90), 90, user=owner)
        with time_machine.travel(at("2026-03-05 12:00"), tick=False):
            settle(accounting.reserve(budgets, 90), 90, user=owner)

    assert [level for level, *_ in events] == ["warning", "warning"]


# --- Usage records exactly once -----------------------------------------------


def test_writing_the_same_request_twice_leaves_one_record_and_one_settlement(owner):
    budget = user_budget(owner, 1000)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 500)
    entry = UsageEntry(
        model_name="sim-small",
        status="ok",
        user_id=owner.pk,
        prompt_tokens=100,
        completion_tokens=50,
        settlements=accounting.settlements_for(reservation, 150),
    )

    first = accounting.record_usage(entry)
    second = accounting.record_usage(entry)

    assert first.record_id == second.record_id
    assert UsageRecord.objects.filter(request_id=entry.request_id).count() == 1
    assert counter_of(budget).used_tokens == 150
    assert UsageRollup.objects.get().requests == 1


@pytest.mark.django_db(transaction=True)
def test_a_record_survives_its_user_being_deleted_mid_request(owner):
    endpoint = Endpoint.objects.create(name="gone", base_url="https://gone.test/v1")
    entry = UsageEntry(
        model_name="sim-small",
        status="ok",
        user_id=owner.pk,
        endpoint_id=endpoint.pk,
        endpoint_name="gone",
    )
    owner.delete()
    endpoint.delete()

    accounting.record_usage(entry)

    record = UsageRecord.objects.get(request_id=entry.request_id)
    assert (record.user_id, record.endpoint_id, record.endpoint_name) == (
        None,
        None,
        "gone",
    )


@pytest.mark.django_db(transaction=True)
def test_a_batch_waiting_for_the_writer_is_written_when_its_loop_shuts_down(owner):
    release = threading.Event()
    entry = UsageEntry(model_name="sim-small", status="ok", user_id=owner.pk)

    async def shut_down_while_queued():
        # The writer thread is busy, so the batch waits in its queue.
        busy = usage._writer_thread().submit(release.wait, 10)
        usage.submit_usage(entry)
        usage.hurry()
        writer = usage._group_commits[asyncio.get_running_loop()]
        # Hurried, the group commit hands its batch to the writer at once.
        await asyncio.sleep(0.1)
        assert not writer.queue
        writer.task.cancel()
        threading.Timer(0.1, release.set).start()
        with contextlib.suppress(asyncio.CancelledError):
            await writer.task
        assert busy.done()

    asyncio.run(shut_down_while_queued())

    assert UsageRecord.objects.filter(request_id=entry.request_id).count() == 1


class _AtomicLeftOpen:
    """A block entered on the writer's connection and never left."""

    def __init__(self) -> None:
        self.block = transaction.atomic()

    def open(self) -> None:
        self.block.__enter__()

    def close(self) -> None:
        if connection.in_atomic_block:
            self.block.__exit__(None, None, None)


class _AutocommitLeftOff:
    """What Django leaves when an atomic block's last step fails after COMMIT."""

    def open(self) -> None:
        connection.set_autocommit(False)

    def close(self) -> None:
        if connection.connection is not None and not connection.autocommit:
            connection.commit()
            connection.set_autocommit(True)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stray", [_AtomicLeftOpen, _AutocommitLeftOff])
def test_a_transaction_left_open_on_the_writer_does_not_swallow_records(
    owner, caplog, stray
):
    left = stray()
    usage._writer_thread().submit(left.open).result()
    entry = UsageEntry(model_name="sim-small", status="ok", user_id=owner.pk)
    try:
        asyncio.run(accounting.arecord_usage(entry))
        # Seen from another connection: committed, not inside the stray one.
        stored = UsageRecord.objects.filter(request_id=entry.request_id).count()
    finally:
        # Without the writer's check the transaction is still open: end it so
        # that the test fails on its assertion instead of blocking teardown.
        usage._writer_thread().submit(left.close).result()

    assert stored == 1
    assert "left in a transaction" in caplog.text


def test_a_batch_with_one_bad_entry_still_writes_the_others(owner):
    duplicate = uuid.uuid4()
    accounting.record_usage(
        UsageEntry(model_name="m", status="ok", request_id=duplicate)
    )
    entries = [
        UsageEntry(model_name="m", status="ok", user_id=owner.pk),
        UsageEntry(model_name="m", status="ok", request_id=duplicate),
        UsageEntry(model_name="m", status="error", user_id=owner.pk),
    ]

    results = accounting._write_batch(entries)

    assert all(isinstance(r, accounting.Written) for r in results)
    assert UsageRecord.objects.count() == 3
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == 3


def test_a_deleted_budget_does_not_stop_a_record_from_being_written(owner):
    budget = user_budget(owner, 1000)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 500)
    budget.delete()

    written = settle(reservation, 100, user=owner)

    assert UsageRecord.objects.filter(pk=written.record_id).exists()


def test_a_cost_is_stored_to_the_millionth(owner):
    written = accounting.record_usage(
        UsageEntry(model_name="m", status="ok", cost=Decimal("0.0001234"))
    )

    assert UsageRecord.objects.get(pk=written.record_id).cost == Decimal("0.000123")
    assert UsageRollup.objects.get().cost == Decimal("0.000123")


def test_every_value_is_made_storable_before_it_is_written(owner):
    budget = user_budget(owner, 10**12)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 500)
    deep: list = []
    for _ in range(50):
        deep = [deep]
    entry = UsageEntry(
        model_name="m\x00odel\ud800" + "x" * 300,
        status="bogus",
        user_id=owner.pk,
        endpoint_name="e\x00p\x1b[31m",
        upstream_model="u\x00",
        prompt_tokens=2**40,
        completion_tokens=-7,
        latency_ms=float("nan"),
        ttft_ms=float("inf"),
        error_type="E\x00" * 100,
        error_message="bad\x00 body " * 100,
        attempts=10**9,
        fallback_hops=[{"message": "m\x00", "deep": deep, "n": 2**80}] * 100,
        cost=Decimal("1e20"),
        settlements=accounting.settlements_for(reservation, 2**60),
    )

    written = accounting.record_usage(entry)

    record = UsageRecord.objects.get(pk=written.record_id)
    assert record.model_name == "model?" + "x" * 194
    assert (record.status, record.endpoint_name, record.upstream_model) == (
        "error",
        "ep[31m",
        "u",
    )
    assert (record.prompt_tokens, record.completion_tokens) == (2**31 - 1, 0)
    assert (record.latency_ms, record.ttft_ms, record.attempts) == (None, None, 32767)
    assert record.error_type == "E" * 64
    assert len(record.error_message) == 500 and "\x00" not in record.error_message
    assert 0 < len(record.fallback_hops) <= 32
    assert record.fallback_hops[0]["message"] == "m"
    assert record.fallback_hops[0]["n"] == 2**53
    assert record.cost == Decimal("99999999.999999")
    # The budget counts no more than the record states.
    counter = counter_of(budget)
    assert (counter.used_tokens, counter.reserved_tokens) == (2 * (2**31 - 1), 0)


def test_an_entry_that_still_cannot_be_written_is_stored_in_minimal_form(owner):
    budget = user_budget(owner, 10_000)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 300)

    class Unforeseen(UsageEntry):
        """A value the sanitising did not foresee makes every write fail."""

        def row(self):
            raise ValueError("a column refused it")

    entry = Unforeseen(
        model_name="m",
        status="ok",
        user_id=owner.pk,
        prompt_tokens=10,
        settlements=accounting.settlements_for(reservation, 10),
    )
    other = UsageEntry(model_name="m", status="ok", user_id=owner.pk)

    results = accounting._write_batch([entry, other])

    assert all(isinstance(r, accounting.Written) for r in results)
    record = UsageRecord.objects.get(request_id=entry.request_id)
    assert (record.status, record.error_type) == (
        "error",
        "unstorable_record:ValueError",
    )
    # Counted as reserved: never less than the request could have used.
    assert (record.completion_tokens, record.tokens_estimated) == (300, True)
    counter = counter_of(budget)
    assert (counter.used_tokens, counter.reserved_tokens) == (300, 0)
    assert UsageRecord.objects.count() == 2


def test_the_same_request_twice_in_one_batch_is_recorded_once(owner):
    request_id = uuid.uuid4()
    entries = [
        UsageEntry(model_name="m", status="ok", request_id=request_id),
        UsageEntry(model_name="m", status="error", request_id=request_id),
    ]

    results = accounting._write_batch(entries)

    assert results[0].record_id == results[1].record_id
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


# --- Reading ------------------------------------------------------------------


def test_budget_status_shows_what_is_left_and_when_it_resets(owner):
    user_budget(owner, 1000)
    Budget.objects.create(
        scope=BudgetScope.GLOBAL, token_limit=None, period=BudgetPeriod.MONTHLY
    )

    with time_machine.travel(at("2026-03-04 12:00"), tick=False):
        budgets = accounting.caller_budgets(owner.pk, None)
        settle(accounting.reserve(budgets, 300), 250, user=owner)
        accounting.reserve(budgets, 100)
        states = {s.scope: s.to_dict() for s in accounting.budget_status(owner.pk)}

    assert states["user"] == {
        "scope": "user",
        "holder": "your account",
        "period": "daily",
        "limit": 1000,
        "used": 250,
        "reserved": 100,
        "remaining": 650,
        "percent_used": 25.0,
        "resets_at": "2026-03-05T00:00:00+00:00",
    }
    assert states["global"]["remaining"] is None
    assert states["global"]["used"] == 250
    assert states["global"]["resets_at"] == "2026-04-01T00:00:00+00:00"


def test_tokens_used_today_count_from_midnight_utc(owner, other_user):
    with time_machine.travel(at("2026-03-04 23:30"), tick=False):
        settle(None, 1000, user=owner)
    with time_machine.travel(at("2026-03-05 08:00"), tick=False):
        settle(None, 300, user=owner)
        settle(None, 40, user=owner, status="error")
        settle(None, 999, user=other_user)
        used = accounting.tokens_used_today(owner.pk)

    assert used == 340


def test_reserving_on_one_budget_is_one_statement(owner, django_assert_num_queries):
    user_budget(owner, 1000)
    budgets = accounting.caller_budgets(owner.pk, None)
    accounting.reserve(budgets, 1)

    with django_assert_num_queries(1):
        accounting.reserve(budgets, 1)


def test_reserving_on_two_budgets_is_one_transaction(owner, django_assert_num_queries):
    user_budget(owner, 1000)
    Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=10_000)
    budgets = accounting.caller_budgets(owner.pk, None)
    accounting.reserve(budgets, 1)

    # SAVEPOINT and RELEASE (the test runs in a transaction) and two UPDATEs.
    with django_assert_num_queries(4):
        accounting.reserve(budgets, 1)


def test_writing_a_record_costs_a_few_statements(owner, django_assert_num_queries):
    user_budget(owner, 1000)
    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 10)
    entry = UsageEntry(
        model_name="m",
        status="ok",
        user_id=owner.pk,
        settlements=accounting.settlements_for(reservation, 5),
    )

    # SAVEPOINT, INSERT record, UPDATE counter, upsert rollup, RELEASE.
    with django_assert_num_queries(5):
        accounting.write_usage([entry])
    assert connection.vendor in {"sqlite", "postgresql"}
