"""The monitor process: one active at a time, handover, clean stop, no crash loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from gateway import accounting, client, router
from gateway.models import (
    Budget,
    BudgetCounter,
    BudgetHold,
    BudgetScope,
    Endpoint,
    ModelRoute,
    UsageRecord,
)
from gateway.simulator import Behaviour
from monitoring import probes
from monitoring.lease import Lease
from monitoring.models import MonitorLease, ProbeResult
from monitoring.worker import Monitor

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_only_one_of_two_monitors_holds_the_lease_until_it_expires(settings):
    settings.MONITOR_LEASE_SECONDS = 30
    first, second = Monitor(holder="host-a:1"), Monitor(holder="host-b:2")

    with time_machine.travel(T0, tick=False) as clock:
        assert async_to_sync(first.lease_step)() is True
        assert async_to_sync(second.lease_step)() is False

        # The holder renews as it loops, so the standby keeps waiting.
        clock.shift(20)
        assert async_to_sync(first.lease_step)() is True
        clock.shift(20)
        assert async_to_sync(second.lease_step)() is False
        assert MonitorLease.objects.get().expires_at == T0 + timedelta(seconds=50)

        # The holder dies: once its lease runs out, the standby takes over...
        clock.shift(31)
        assert async_to_sync(second.lease_step)() is True
        # ...and the old holder, if it comes back, stands by.
        assert async_to_sync(first.lease_step)() is False

    lease = MonitorLease.objects.get()
    assert lease.holder == "host-b:2"
    assert lease.acquired_at == T0 + timedelta(seconds=71)


@pytest.mark.django_db
def test_a_released_lease_is_taken_at_once():
    first, second = Lease("a", ttl=30), Lease("b", ttl=30)
    assert first.acquire() and not second.acquire()

    first.release()

    assert second.acquire()
    assert second.current_holder() == "b"


@pytest.mark.django_db
def test_a_standby_monitor_does_not_probe(make_endpoint, fast_monitor):
    make_endpoint()
    Lease("someone-else", ttl=30).acquire()

    assert async_to_sync(Monitor().run_once)() is False

    assert ProbeResult.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_two_running_monitors_probe_each_endpoint_once_and_hand_over(
    make_endpoint, fast_monitor
):
    fast_monitor.MONITOR_IDLE_SECONDS = 0.05
    fast_monitor.MONITOR_LEASE_SECONDS = 5
    for _ in range(5):
        make_endpoint()

    async def scenario() -> tuple[Monitor, Monitor, int, int]:
        a, b = Monitor(holder="a"), Monitor(holder="b")
        tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
        count = sync_to_async(ProbeResult.objects.count)
        await wait_for(lambda: count(), 5)
        await asyncio.sleep(0.3)  # long enough for a second claim, were it possible
        first_round = await count()
        active, standby = (a, b) if a.active else (b, a)
        assert not standby.active and standby.rounds == 0

        active.stop()  # a clean stop gives the lease up at once
        await tasks[[a, b].index(active)]
        await sync_to_async(Endpoint.objects.update)(next_probe_at=None)
        await wait_for(lambda: count(), 10)
        assert standby.active and standby.rounds >= 1
        standby.stop()
        await asyncio.gather(*tasks)
        return active, standby, first_round, await count()

    _, _, first_round, total = async_to_sync(scenario)()

    assert first_round == 5
    assert total == 10
    assert MonitorLease.objects.get().holder == ""


async def wait_for(counter, expected: int, within: float = 10.0) -> None:
    """Poll until `counter()` reaches `expected`, failing after `within` seconds."""
    async with asyncio.timeout(within):
        # Rows written by another task's thread: there is no event to wait on.
        while await counter() < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.mark.django_db(transaction=True)
def test_a_failing_step_is_logged_and_the_loop_goes_on(
    make_endpoint, fast_monitor, monkeypatch, caplog
):
    fast_monitor.MONITOR_IDLE_SECONDS = 0.02
    make_endpoint()
    real_round = probes.run_round
    calls = []

    async def flaky_round(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return await real_round(**kwargs)

    monkeypatch.setattr(probes, "run_round", flaky_round)

    async def scenario() -> None:
        monitor = Monitor()
        task = asyncio.create_task(monitor.run())
        await wait_for(sync_to_async(ProbeResult.objects.count), 1)
        monitor.stop()
        await task

    async_to_sync(scenario)()

    assert "Monitor loop failed; trying again shortly" in caplog.text
    assert "database went away" in caplog.text
    assert ProbeResult.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_monitor_once_probes_every_endpoint_and_gives_the_lease_back(
    make_endpoint, fast_monitor, capsys
):
    for _ in range(3):
        make_endpoint()

    call_command("monitor", "--once")

    assert ProbeResult.objects.count() == 3
    assert "Probed in 1 round(s)." in capsys.readouterr().out
    assert MonitorLease.objects.get().holder == ""

    # Nothing is due any more; --all probes them anyway.
    call_command("monitor", "--once")
    assert ProbeResult.objects.count() == 3
    call_command("monitor", "--once", "--all")
    assert ProbeResult.objects.count() == 6


@pytest.mark.django_db(transaction=True)
def test_monitor_once_refuses_while_another_monitor_is_active(fast_monitor):
    Lease("host-z:9:abc", ttl=30).acquire()

    with pytest.raises(CommandError, match="host-z:9:abc"):
        call_command("monitor", "--once")


@pytest.mark.skipif(
    not django_settings.DATABASE_ENGINE.endswith("sqlite3"),
    reason="the subprocess gets its own SQLite database",
)
def test_the_monitor_command_stops_cleanly_on_sigterm(tmp_path):
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path),
        "MONITOR_IDLE_SECONDS": "0.1",
        "DJANGO_SETTINGS_MODULE": "llmsite.settings",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DATABASE_URL", None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(
        [*manage, "migrate", "--noinput"], env=env, check=True, capture_output=True
    )
    process = subprocess.Popen(
        [*manage, "monitor"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert "is running" in line
        time.sleep(0.5)  # into its loop, holding the lease
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "finishing" in output
    assert "Traceback" not in output


# --- Sweeping abandoned reservations ----------------------------------------------


def _abandoned_reservation(owner, tokens: int = 100):
    """A reservation whose web process died: its hold is past its expiry."""
    budget, _ = Budget.objects.get_or_create(
        scope=BudgetScope.GLOBAL, defaults={"token_limit": 10_000}
    )
    accounting.forget_budgets()
    request = accounting.HoldRequest(uuid.uuid4(), user_id=owner.pk, model_name="m")
    accounting.reserve(accounting.caller_budgets(owner.pk, None), tokens, None, request)
    BudgetHold.objects.filter(request_id=request.request_id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    return budget, request.request_id


@pytest.mark.django_db(transaction=True)
def test_the_sweep_step_releases_abandoned_reservations_once_per_interval(
    owner, settings
):
    settings.GATEWAY_SWEEP_SECONDS = 30
    budget, first = _abandoned_reservation(owner)
    monitor = Monitor()

    assert async_to_sync(monitor.sweep_step)() is True
    _, second = _abandoned_reservation(owner)
    # Within the interval the step waits, unless forced.
    assert async_to_sync(monitor.sweep_step)() is False
    assert async_to_sync(monitor.sweep_step)(force=True) is True
    assert async_to_sync(monitor.sweep_step)(force=True) is False

    assert set(UsageRecord.objects.values_list("request_id", "error_type")) == {
        (first, "interrupted"),
        (second, "interrupted"),
    }
    assert BudgetCounter.objects.get(budget=budget).reserved_tokens == 0


@pytest.mark.django_db(transaction=True)
def test_the_running_monitor_sweeps_what_a_killed_process_held(owner, fast_monitor):
    fast_monitor.MONITOR_IDLE_SECONDS = 0.02
    fast_monitor.GATEWAY_SWEEP_SECONDS = 0.05
    budget, request_id = _abandoned_reservation(owner)

    async def scenario() -> None:
        monitor = Monitor()
        task = asyncio.create_task(monitor.run())
        await wait_for(
            sync_to_async(UsageRecord.objects.filter(request_id=request_id).count), 1
        )
        monitor.stop()
        await task

    async_to_sync(scenario)()

    assert BudgetCounter.objects.get(budget=budget).reserved_tokens == 0
    assert BudgetHold.objects.count() == 0


# --- Recovery after the breaker opened ----------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_opened_circuit_is_closed_by_a_probe_soon_after_its_cooldown(
    upstream, make_endpoint, fast_monitor
):
    cooldown = 2
    endpoint = make_endpoint(
        failure_threshold=1,
        cooldown_seconds=cooldown,
        max_retries=1,
        timeout=5,
        # The next scheduled probe is far off: only the breaker brings it in.
        next_probe_at=timezone.now() + timedelta(seconds=300),
    )
    ModelRoute.objects.create(
        model_name="house-model", endpoint=endpoint, upstream_model="sim-small"
    )
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="e/1")
    row = sync_to_async(lambda: Endpoint.objects.get(pk=endpoint.pk))

    async def scenario() -> tuple[Endpoint, Endpoint]:
        router.forget_routes()
        messages = [{"role": "user", "content": "hello"}]
        async with router.stream_chat("house-model", messages) as stream:
            assert [e async for e in stream][-1].result.error is not None
        opened = await row()
        upstream.set_behaviour(Behaviour(), prefix="e/1")
        monitor = Monitor()
        task = asyncio.create_task(monitor.run())
        try:
            within = (opened.disabled_until - timezone.now()).total_seconds() + 5
            async with asyncio.timeout(within):
                # Written by the monitor's thread: there is no event to wait on.
                while (await row()).disabled_until is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            monitor.stop()
            await task
            await client.aclose_all()
            router.forget_routes()
        return opened, await row()

    opened, closed = async_to_sync(scenario)()

    assert opened.disabled_until is not None
    assert opened.next_probe_at == opened.disabled_until
    assert (closed.consecutive_failures, closed.status) == (0, "connected")
    # The one live request found it down; the probe alone brought it back,
    # and the probe used up no one's budget or rate limit.
    paths = [r.path for r in upstream.requests]
    assert paths[0] == "/e/1/v1/chat/completions"
    assert set(paths[1:]) == {"/e/1/v1/models"}
    assert ProbeResult.objects.filter(status="connected").exists()
    assert UsageRecord.objects.count() == 0
    assert BudgetHold.objects.count() == 0
