"""The circuit breaker: shared state on the Endpoint row, compare-and-set writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from gateway import breaker
from gateway.breaker import BreakerState
from gateway.client import EndpointConfig
from gateway.models import Endpoint, EndpointStatus
from gateway.signals import endpoint_status_changed

pytestmark = pytest.mark.django_db(transaction=True)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture
def announcements():
    seen: list[dict] = []

    def receiver(sender, **kwargs):
        seen.append(
            {
                "endpoint": kwargs["endpoint"].name,
                "old": kwargs["old_status"],
                "new": kwargs["new_status"],
                "reason": kwargs["reason"],
            }
        )

    endpoint_status_changed.connect(receiver)
    yield seen
    endpoint_status_changed.disconnect(receiver)


async def make_endpoint(**fields) -> Endpoint:
    values = {
        "name": "flaky",
        "base_url": "http://127.0.0.1:9/v1",
        "failure_threshold": 3,
        "cooldown_seconds": 60,
        "timeout": 20,
        "connect_timeout": 5,
        "first_token_timeout": 12,
        "status": EndpointStatus.CONNECTED,
    }
    values.update(fields)
    return await Endpoint.objects.acreate(**values)


async def snapshot(endpoint: Endpoint) -> EndpointConfig:
    return EndpointConfig.from_model(await Endpoint.objects.aget(pk=endpoint.pk))


async def fail(endpoint: Endpoint, **kwargs) -> bool:
    return await breaker.record_failure(
        endpoint.pk,
        threshold=endpoint.failure_threshold,
        cooldown_seconds=endpoint.cooldown_seconds,
        **kwargs,
    )


def test_the_state_comes_from_the_snapshot_alone(frozen):
    closed = EndpointConfig(id=1, name="a", base_url="http://a/v1")
    open_ = EndpointConfig(
        id=1, name="a", base_url="http://a/v1", disabled_until=NOW + timedelta(1)
    )
    half = EndpointConfig(
        id=1, name="a", base_url="http://a/v1", disabled_until=NOW - timedelta(1)
    )

    assert breaker.state(closed) is BreakerState.CLOSED
    assert breaker.state(open_) is BreakerState.OPEN
    assert breaker.state(half) is BreakerState.HALF_OPEN


async def test_it_opens_after_the_threshold_of_consecutive_failures(
    frozen, announcements
):
    endpoint = await make_endpoint()

    results = [await fail(endpoint) for _ in range(3)]

    await endpoint.arefresh_from_db()
    assert results == [False, False, True]
    assert endpoint.consecutive_failures == 3
    assert endpoint.disabled_until == NOW + timedelta(seconds=60)
    assert endpoint.status == EndpointStatus.DISCONNECTED
    assert announcements == [
        {
            "endpoint": "flaky",
            "old": "connected",
            "new": "disconnected",
            "reason": "breaker_open",
        }
    ]


async def test_late_failures_do_not_stretch_an_open_circuit(frozen, announcements):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)
    frozen.shift(30)

    opened_again = await fail(endpoint)

    await endpoint.arefresh_from_db()
    assert opened_again is False
    assert endpoint.disabled_until == NOW + timedelta(seconds=60)
    assert len(announcements) == 1


async def test_exactly_one_request_gets_the_half_open_trial(frozen):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)
    frozen.shift(61)
    # Two web processes loaded the same snapshot.
    seen_by_one = await snapshot(endpoint)
    seen_by_two = await snapshot(endpoint)
    assert breaker.state(seen_by_one) is BreakerState.HALF_OPEN

    first = await breaker.claim_trial(seen_by_one)
    second = await breaker.claim_trial(seen_by_two)

    assert first is not None
    assert second is None
    await endpoint.arefresh_from_db()
    assert endpoint.disabled_until == first
    # The lease covers a connect and a first-token timeout, plus a margin.
    assert first - (NOW + timedelta(seconds=61)) == timedelta(seconds=5 + 12 + 5)


async def test_a_successful_trial_closes_the_circuit(frozen, announcements):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)
    frozen.shift(61)
    lease = await breaker.claim_trial(await snapshot(endpoint))
    assert lease is not None

    was_open = await breaker.record_success(endpoint.pk)

    await endpoint.arefresh_from_db()
    assert was_open is True
    assert (endpoint.consecutive_failures, endpoint.disabled_until) == (0, None)
    assert endpoint.status == EndpointStatus.CONNECTED
    assert [a["reason"] for a in announcements] == ["breaker_open", "breaker_closed"]


async def test_a_failed_trial_reopens_for_a_full_cooldown(frozen):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)
    frozen.shift(61)
    lease = await breaker.claim_trial(await snapshot(endpoint))

    reopened = await fail(endpoint, trial_until=lease)

    await endpoint.arefresh_from_db()
    assert reopened is True
    assert endpoint.disabled_until == NOW + timedelta(seconds=61 + 60)
    assert endpoint.consecutive_failures == 4


async def test_opening_brings_the_next_probe_forward_to_the_end_of_the_cooldown(
    frozen,
):
    endpoint = await make_endpoint(next_probe_at=NOW + timedelta(seconds=300))
    for _ in range(2):
        await fail(endpoint)
    await endpoint.arefresh_from_db()
    # Counting failures alone moves nothing.
    assert endpoint.next_probe_at == NOW + timedelta(seconds=300)

    await fail(endpoint)

    await endpoint.arefresh_from_db()
    assert endpoint.disabled_until == NOW + timedelta(seconds=60)
    assert endpoint.next_probe_at == endpoint.disabled_until


@pytest.mark.parametrize("scheduled", [None, NOW, NOW + timedelta(seconds=10)])
async def test_opening_keeps_a_probe_that_is_due_sooner(frozen, scheduled):
    endpoint = await make_endpoint(next_probe_at=scheduled)

    for _ in range(3):
        await fail(endpoint)

    await endpoint.arefresh_from_db()
    assert endpoint.disabled_until == NOW + timedelta(seconds=60)
    assert endpoint.next_probe_at == scheduled


async def test_a_failed_trial_brings_the_next_probe_to_the_new_cooldowns_end(frozen):
    endpoint = await make_endpoint(next_probe_at=NOW + timedelta(seconds=900))
    for _ in range(3):
        await fail(endpoint)
    frozen.shift(61)
    # The probe at the end of the cooldown was claimed for the usual interval.
    await Endpoint.objects.filter(pk=endpoint.pk).aupdate(
        next_probe_at=NOW + timedelta(seconds=61 + 300)
    )
    lease = await breaker.claim_trial(await snapshot(endpoint))

    await fail(endpoint, trial_until=lease)

    await endpoint.arefresh_from_db()
    assert endpoint.disabled_until == NOW + timedelta(seconds=61 + 60)
    assert endpoint.next_probe_at == endpoint.disabled_until


async def test_a_success_resets_the_count_so_failures_must_be_consecutive(frozen):
    endpoint = await make_endpoint()
    await fail(endpoint)
    await fail(endpoint)

    await breaker.record_success(endpoint.pk)
    opened = await fail(endpoint)

    await endpoint.arefresh_from_db()
    assert opened is False
    assert endpoint.consecutive_failures == 1
    assert endpoint.disabled_until is None


async def test_closing_keeps_a_status_the_monitor_set(frozen, announcements):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)
    await Endpoint.objects.filter(pk=endpoint.pk).aupdate(status=EndpointStatus.SLOW)

    await breaker.record_success(endpoint.pk)

    await endpoint.arefresh_from_db()
    assert endpoint.status == EndpointStatus.SLOW
    assert endpoint.disabled_until is None
    assert [a["reason"] for a in announcements] == ["breaker_open"]


async def test_the_monitor_reenables_an_endpoint_that_probes_healthy(
    frozen, announcements
):
    endpoint = await make_endpoint()
    for _ in range(3):
        await fail(endpoint)

    changed = await breaker.reenable(endpoint.pk, status=EndpointStatus.SLOW)
    unchanged = await breaker.reenable(endpoint.pk)

    await endpoint.arefresh_from_db()
    assert (changed, unchanged) == (True, False)
    assert endpoint.disabled_until is None
    assert endpoint.consecutive_failures == 0
    assert endpoint.status == EndpointStatus.SLOW
    assert announcements[-1]["reason"] == "reenabled"
