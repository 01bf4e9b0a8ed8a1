"""Hold rows and the sweeper: a killed process's reservations are released once."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from gateway import accounting
from gateway.accounting import HoldRequest, UsageEntry
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetHold,
    BudgetScope,
    UsageRecord,
)
from gateway.signals import requests_abandoned
from tests.gateway.usage_support import close_thread_connections, forget_process_state

pytestmark = pytest.mark.django_db(transaction=True)

# Past any hold's expiry: GATEWAY_REQUEST_MAX_SECONDS (600) plus the margin.
LATER = timedelta(hours=1)


@pytest.fixture(autouse=True)
def _isolated():
    forget_process_state()
    yield
    forget_process_state()
    close_thread_connections()


@pytest.fixture
def budget(owner):
    return Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=10_000)


@pytest.fixture
def abandoned(signal_catcher):
    """Every request_ids list sent by requests_abandoned."""
    return signal_catcher


@pytest.fixture
def signal_catcher():
    sent: list[list[uuid.UUID]] = []

    def receiver(sender, request_ids, **kwargs):
        sent.append(list(request_ids))

    requests_abandoned.connect(receiver, dispatch_uid="test_sweeper")
    yield sent
    requests_abandoned.disconnect(dispatch_uid="test_sweeper")


def request_for(owner, prompt: int = 40, **fields) -> HoldRequest:
    return HoldRequest(
        request_id=uuid.uuid4(),
        user_id=owner.pk,
        model_name="chat-model",
        source="chat",
        prompt_tokens=prompt,
        **fields,
    )


def reserve(owner, tokens: int, request: HoldRequest | None):
    return accounting.reserve(
        accounting.caller_budgets(owner.pk, None), tokens, request=request
    )


def counter(budget) -> BudgetCounter:
    return BudgetCounter.objects.get(budget=budget)


def entry_for(owner, request: HoldRequest, reservation, used: int) -> UsageEntry:
    return UsageEntry(
        model_name="chat-model",
        status="ok",
        request_id=request.request_id,
        user_id=owner.pk,
        prompt_tokens=used,
        settlements=accounting.settlements_for(reservation, used),
    )


# --- Holds ----------------------------------------------------------------------


def test_a_reservation_writes_its_hold_with_what_the_sweeper_needs(owner, budget):
    request = request_for(owner, conversation_id=uuid.uuid4())

    reserve(owner, 100, request)

    hold = BudgetHold.objects.get()
    assert (hold.request_id, hold.tokens, hold.counter_id) == (
        request.request_id,
        100,
        counter(budget).pk,
    )
    assert (hold.user_id, hold.model_name, hold.source, hold.prompt_tokens) == (
        owner.pk,
        "chat-model",
        "chat",
        40,
    )
    assert hold.conversation_id == request.conversation_id
    assert hold.owner
    max_seconds = 600 + accounting.budgets.HOLD_MARGIN_SECONDS
    assert hold.expires_at - hold.created_at == timedelta(seconds=max_seconds)


def test_every_budget_of_a_request_gets_a_hold_in_one_transaction(owner, budget):
    key = ApiKey.objects.create(user=owner, name="k", prefix="p", key_hash="h" * 64)
    Budget.objects.create(scope=BudgetScope.API_KEY, api_key=key, token_limit=50)
    request = request_for(owner)

    # The key's budget refuses: neither counter keeps a hold or a reservation.
    with pytest.raises(accounting.BudgetExhausted):
        accounting.reserve(
            accounting.caller_budgets(owner.pk, key.pk), 100, request=request
        )

    assert BudgetHold.objects.count() == 0
    assert (
        sum(
            BudgetCounter.objects.filter(budget=budget).values_list(
                "reserved_tokens", flat=True
            )
        )
        == 0
    )


def test_requests_without_budgets_write_no_hold(owner):
    reservation = reserve(owner, 100, request_for(owner))

    assert reservation.holds == []
    assert BudgetHold.objects.count() == 0


def test_settling_deletes_the_hold_in_the_same_write(owner, budget):
    request = request_for(owner)
    reservation = reserve(owner, 100, request)

    accounting.write_usage([entry_for(owner, request, reservation, 30)])

    assert BudgetHold.objects.count() == 0
    assert (counter(budget).used_tokens, counter(budget).reserved_tokens) == (30, 0)


def test_settling_a_held_reservation_costs_one_statement_more(
    owner, budget, django_assert_num_queries
):
    request = request_for(owner)
    reservation = reserve(owner, 100, request)

    # SAVEPOINT, DELETE holds, INSERT record, UPDATE counter, upsert rollup,
    # RELEASE: the DELETE is once per batch, however many requests it settles.
    with django_assert_num_queries(6):
        accounting.write_usage([entry_for(owner, request, reservation, 30)])


def test_holds_expire_after_the_whole_request_cap(owner, budget, settings):
    settings.GATEWAY_REQUEST_MAX_SECONDS = 30
    reserve(owner, 100, request_for(owner))

    hold = BudgetHold.objects.get()
    assert hold.expires_at - hold.created_at == timedelta(
        seconds=30 + accounting.budgets.HOLD_MARGIN_SECONDS
    )
    assert accounting.sweep_abandoned(hold.created_at + timedelta(seconds=89)) == 0
    assert accounting.sweep_abandoned(hold.created_at + timedelta(seconds=90)) == 1


def test_a_released_reservation_drops_its_hold(owner, budget):
    reservation = reserve(owner, 100, request_for(owner))

    accounting.release(reservation)

    assert BudgetHold.objects.count() == 0
    assert counter(budget).reserved_tokens == 0


# --- Sweeping -------------------------------------------------------------------


def test_an_abandoned_request_is_released_recorded_and_announced(
    owner, budget, abandoned
):
    request = request_for(owner, prompt=40)
    reserve(owner, 100, request)
    live = request_for(owner)
    reserve(owner, 70, live)
    # The live request reserved later; both expire after the cap.
    BudgetHold.objects.filter(request_id=live.request_id).update(
        expires_at=timezone.now() + 2 * LATER
    )

    assert accounting.sweep_abandoned(timezone.now()) == 0
    assert accounting.sweep_abandoned(timezone.now() + LATER) == 1

    assert (counter(budget).used_tokens, counter(budget).reserved_tokens) == (40, 70)
    record = UsageRecord.objects.get()
    assert record.request_id == request.request_id
    assert (record.status, record.error_type, record.tokens_estimated) == (
        "error",
        "interrupted",
        True,
    )
    assert (record.user_id, record.model_name, record.prompt_tokens) == (
        owner.pk,
        "chat-model",
        40,
    )
    assert abandoned == [[request.request_id]]
    assert list(BudgetHold.objects.values_list("request_id", flat=True)) == [
        live.request_id
    ]
    # A second sweep finds nothing more to do.
    assert accounting.sweep_abandoned(timezone.now() + LATER) == 0
    assert abandoned == [[request.request_id]]


def test_a_late_record_after_the_sweep_releases_nothing_twice(owner, budget):
    request = request_for(owner, prompt=40)
    reservation = reserve(owner, 100, request)
    live = request_for(owner)
    reserve(owner, 70, live)
    BudgetHold.objects.filter(request_id=live.request_id).update(
        expires_at=timezone.now() + 2 * LATER
    )
    assert accounting.sweep_abandoned(timezone.now() + LATER) == 1

    # The request's own process was alive after all, and now writes.
    written = accounting.record_usage(entry_for(owner, request, reservation, 30))
    accounting.release(reservation)

    record = UsageRecord.objects.get(request_id=request.request_id)
    assert written.record_id == record.pk
    assert record.error_type == "interrupted"
    # Only the second request's 70 tokens are still reserved.
    assert (counter(budget).used_tokens, counter(budget).reserved_tokens) == (40, 70)


def test_a_request_whose_record_exists_is_only_released(owner, budget, abandoned):
    request = request_for(owner, prompt=40)
    reserve(owner, 100, request)
    # Its record is stored but the hold was left (a writer without holds).
    UsageRecord.objects.create(
        request_id=request.request_id, model_name="chat-model", status="ok"
    )

    assert accounting.sweep_abandoned(timezone.now() + LATER) == 1

    assert UsageRecord.objects.count() == 1
    assert counter(budget).reserved_tokens == 0
    assert abandoned == [[request.request_id]]


def test_the_sweeper_releases_a_request_of_a_deleted_user(owner, budget):
    reserve(owner, 100, request_for(owner))
    owner_id = owner.pk
    # The user's budget goes with the user; a global budget stays.
    glob = Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=10_000)
    forget_process_state()
    reserve(owner, 60, request_for(owner))
    owner.delete()

    assert accounting.sweep_abandoned(timezone.now() + LATER) == 1

    record = UsageRecord.objects.get()
    assert (record.user_id, record.error_type) == (None, "interrupted")
    assert counter(glob).reserved_tokens == 0
    assert not Budget.objects.filter(user_id=owner_id).exists()


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="needs PostgreSQL: SQLite serialises writers, so nothing races",
)
def test_two_sweepers_racing_release_each_request_exactly_once(owner, budget):
    requests = [request_for(owner, prompt=10) for _ in range(20)]
    for request in requests:
        reserve(owner, 100, request)
    reserve(owner, 70, request_for(owner))
    BudgetHold.objects.filter(tokens=70).update(expires_at=timezone.now() + 2 * LATER)
    start = threading.Barrier(2)
    swept: list[int] = []

    def sweeper() -> None:
        try:
            start.wait()
            swept.append(accounting.sweep_abandoned(timezone.now() + LATER))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(swept) == 20
    assert UsageRecord.objects.count() == 20
    assert (counter(budget).used_tokens, counter(budget).reserved_tokens) == (200, 70)
    assert BudgetHold.objects.count() == 1


# --- Dead processes of this machine -------------------------------------------


def finished_process_owner() -> str:
    """The owner name of a process of this machine that has exited."""
    import subprocess
    import sys

    from gateway.accounting import owners

    # The module alone, by path: the child needs no Django to name itself.
    code = (
        "import importlib.util as u; "
        f"s = u.spec_from_file_location('owners', {owners.__file__!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.owner_id())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    owner = done.stdout.strip()
    assert owner.startswith(owners.machine() + ":")
    return owner


def test_a_hold_of_a_dead_local_process_is_swept_before_its_expiry(
    owner, budget, abandoned
):
    request = request_for(owner)
    reserve(owner, 300, request)
    BudgetHold.objects.update(owner=finished_process_owner())

    assert accounting.sweep_abandoned(timezone.now()) == 1

    assert counter(budget).reserved_tokens == 0
    record = UsageRecord.objects.get(request_id=request.request_id)
    assert record.error_type == "interrupted"
    assert abandoned == [[request.request_id]]


def test_a_hold_of_a_live_process_waits_for_its_expiry(owner, budget):
    request = request_for(owner)
    reserve(owner, 300, request)

    assert accounting.sweep_abandoned(timezone.now()) == 0

    assert counter(budget).reserved_tokens == 300
    assert BudgetHold.objects.filter(request_id=request.request_id).exists()


def test_only_processes_of_this_machine_are_judged_dead():
    from gateway.accounting import owners

    dead = finished_process_owner()
    pid = dead.rsplit(":", 2)[1]

    assert owners.is_dead_here(dead)
    assert not owners.is_dead_here(owners.owner_id())
    # The same pid on another machine, or a name that is not ours, says nothing.
    assert not owners.is_dead_here(f"elsewhere/4026531836:{pid}:123")
    assert not owners.is_dead_here("web-1:1234")
    assert not owners.is_dead_here("")
    # Our own pid with another start time is an earlier process, now gone.
    mine = owners.owner_id().rsplit(":", 1)[0]
    assert owners.is_dead_here(mine + ":1")
