"""The circuit breaker per endpoint, shared by every process through its Endpoint row.

States, read from the snapshot loaded with the routes (no query of its own):

- closed: ``disabled_until`` is empty; requests flow;
- open: ``disabled_until`` is in the future; the endpoint is skipped;
- half-open: ``disabled_until`` has passed; exactly one request in the whole
  deployment may try it.  It claims the trial with a compare-and-set that moves
  ``disabled_until`` forward by a lease only if it still holds the value this
  process saw, so of several processes racing, one wins and the others skip.
  A success closes the circuit, a failure opens it for a new cooldown.

Every write is a conditional UPDATE (compare-and-set), never read-modify-write,
so the monitor, the admin and all web processes see one state.  Success costs
no write unless the snapshot showed failures.  Only transient failures count:
a request that is itself wrong says nothing about the endpoint.

Opening (or re-opening) also brings the endpoint's next health probe forward
to the end of the cooldown, in the same UPDATE, so whichever monitor is active
tries the endpoint then and a recovered one is back without a live request
paying for the trial (``monitoring.probes``).

Opening and closing also move ``status`` to "disconnected" and back (the
latter only from "disconnected", so a monitor's "slow" stands) and send
`gateway.signals.endpoint_status_changed` once per transition.
"""

from __future__ import annotations

import enum
import logging
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.db import transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.utils import timezone

from gateway.client import EndpointConfig
from gateway.models import Endpoint, EndpointStatus
from gateway.signals import endpoint_status_changed

logger = logging.getLogger("gateway.breaker")

# Added to the endpoint's own connect + read timeout to size a trial's lease.
TRIAL_LEASE_MARGIN = 5.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def state(config: EndpointConfig, now: datetime | None = None) -> BreakerState:
    """The breaker state of an endpoint snapshot at `now`."""
    if config.disabled_until is None:
        return BreakerState.CLOSED
    if config.disabled_until > (now or timezone.now()):
        return BreakerState.OPEN
    return BreakerState.HALF_OPEN


def seconds_until_half_open(
    config: EndpointConfig, now: datetime | None = None
) -> float:
    """How long an open circuit stays open (0 when it is not open)."""
    if config.disabled_until is None:
        return 0.0
    remaining = config.disabled_until - (now or timezone.now())
    return max(0.0, remaining.total_seconds())


def trial_lease(config: EndpointConfig) -> timedelta:
    """How long a half-open trial keeps other processes away.

    A streamed trial is decided by its first chunk, so it needs at most the
    connect timeout plus the first-token timeout.  (A plain trial may take
    longer; past the lease, one more request may try the endpoint too.)
    """
    return timedelta(
        seconds=config.connect_timeout + config.first_token_timeout + TRIAL_LEASE_MARGIN
    )


async def claim_trial(
    config: EndpointConfig, now: datetime | None = None
) -> datetime | None:
    """Claim the one half-open trial; return its lease, or None if taken."""
    if config.id is None or config.disabled_until is None:
        return None
    lease = (now or timezone.now()) + trial_lease(config)
    claimed = await Endpoint.objects.filter(
        id=config.id, disabled_until=config.disabled_until
    ).aupdate(disabled_until=lease)
    return lease if claimed == 1 else None


async def record_success(endpoint_id: int, now: datetime | None = None) -> bool:
    """Close the circuit and clear the failure count; True if it was open."""
    now = now or timezone.now()
    closed = await Endpoint.objects.filter(
        id=endpoint_id, disabled_until__isnull=False
    ).aupdate(consecutive_failures=0, disabled_until=None)
    if closed:
        logger.info("circuit closed for endpoint %s", endpoint_id)
        await _set_status(
            endpoint_id,
            EndpointStatus.CONNECTED,
            "breaker_closed",
            now,
            only_from=EndpointStatus.DISCONNECTED,
        )
        return True
    await Endpoint.objects.filter(id=endpoint_id, consecutive_failures__gt=0).aupdate(
        consecutive_failures=0
    )
    return False


async def record_failure(
    endpoint_id: int,
    *,
    threshold: int,
    cooldown_seconds: float,
    trial_until: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """Count one transient failure; True if this call opened the circuit.

    `trial_until` is the lease a failed half-open trial holds: the circuit
    re-opens for a full cooldown whatever the failure count.
    """
    now = now or timezone.now()
    until = now + timedelta(seconds=cooldown_seconds)
    if trial_until is not None:
        opened = await Endpoint.objects.filter(
            id=endpoint_id, disabled_until=trial_until
        ).aupdate(
            consecutive_failures=F("consecutive_failures") + 1,
            disabled_until=until,
            next_probe_at=probe_by(until),
        )
    else:
        await Endpoint.objects.filter(id=endpoint_id).aupdate(
            consecutive_failures=F("consecutive_failures") + 1
        )
        # Only a closed (or expired) circuit opens: in-flight requests failing
        # after another process opened it must not stretch its cooldown.
        opened = await (
            Endpoint.objects.filter(
                id=endpoint_id, consecutive_failures__gte=max(1, threshold)
            )
            .filter(Q(disabled_until__isnull=True) | Q(disabled_until__lte=now))
            .aupdate(disabled_until=until, next_probe_at=probe_by(until))
        )
    if not opened:
        return False
    logger.warning(
        "circuit opened for endpoint %s until %s", endpoint_id, until.isoformat()
    )
    await _set_status(endpoint_id, EndpointStatus.DISCONNECTED, "breaker_open", now)
    return True


def probe_by(moment: datetime) -> Case:
    """``next_probe_at`` moved to `moment` unless a probe is due sooner already.

    An expression for an UPDATE, so the row's own value is compared, not a
    snapshot's; an empty one means due now and stays so.
    """
    return Case(
        When(
            Q(next_probe_at__isnull=True) | Q(next_probe_at__lte=moment),
            then=F("next_probe_at"),
        ),
        default=Value(moment),
        output_field=DateTimeField(),
    )


async def reenable(
    endpoint_id: int,
    *,
    status: str = EndpointStatus.CONNECTED,
    now: datetime | None = None,
) -> bool:
    """Close the circuit after a healthy probe; True if it was open or failing."""
    now = now or timezone.now()
    changed = await (
        Endpoint.objects.filter(id=endpoint_id)
        .filter(Q(disabled_until__isnull=False) | Q(consecutive_failures__gt=0))
        .aupdate(consecutive_failures=0, disabled_until=None)
    )
    if changed:
        logger.info("endpoint %s re-enabled", endpoint_id)
        await _set_status(
            endpoint_id,
            status,
            "reenabled",
            now,
            only_from=EndpointStatus.DISCONNECTED,
        )
    return bool(changed)


async def _set_status(
    endpoint_id: int,
    status: str,
    reason: str,
    now: datetime,
    *,
    only_from: str | None = None,
) -> None:
    """Move the status with a compare-and-set and announce it once."""
    endpoint = await Endpoint.objects.filter(id=endpoint_id).afirst()
    if endpoint is None:
        return
    old = endpoint.status
    if old == status or (only_from is not None and old != only_from):
        return
    moved = await Endpoint.objects.filter(id=endpoint_id, status=old).aupdate(
        status=status, status_changed_at=now
    )
    if not moved:
        return
    endpoint.status = status
    endpoint.status_changed_at = now
    await sync_to_async(_announce)(endpoint, old, status, reason)


def _announce(endpoint: Endpoint, old: str, new: str, reason: str) -> None:
    # Receivers may use the ORM, so they run in the sync world after commit.
    transaction.on_commit(
        lambda: endpoint_status_changed.send(
            sender=Endpoint,
            endpoint=endpoint,
            old_status=old,
            new_status=new,
            reason=reason,
        )
    )
