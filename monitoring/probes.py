"""Health probes: claim due endpoints, probe them concurrently, record the outcome.

A round is three steps, each usable on its own in tests:

1. `claim_due` (sync): endpoints whose next probe is due, each claimed with a
   compare-and-set on `next_probe_at`, so two monitors never probe one twice;
2. `probe_all` (async): every claimed endpoint through `gateway.client`, at
   most MONITOR_CONCURRENCY at once, each under its own timeout;
3. `record` (sync): ProbeResult rows in bulk, the health fields of every
   endpoint, and a compare-and-set on `status` for each transition, announced
   once with `endpoint_status_changed` after commit. One transaction for the
   round while that works; if it fails, each result is inserted in a
   savepoint of its own, so one row the database refuses never costs the
   other endpoints their results, status changes and alerts.

Endpoints the circuit breaker disabled are re-enabled when they probe healthy.
Opening a circuit brings the endpoint's next probe forward to the end of its
cooldown (`gateway.breaker`), and a failed probe of an open circuit keeps it
there, so a recovered endpoint is back within a loop's sleep of the cooldown.
A probe that finds the cooldown over claims the half-open trial first, so live
requests skip the endpoint meanwhile instead of paying for the trial; if the
probe fails, the circuit re-opens for another cooldown, which is also when
the next probe comes.
Every text a probe stores comes from an upstream that may be hostile: it is
stripped of control characters, redacted and cut (`storable_text`) first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import Case, Count, DateTimeField, F, Q, Sum, Value, When
from django.db.models.functions import TruncHour
from django.utils import timezone

from gateway import breaker, sanitize
from gateway.client import (
    APIClientError,
    ClientPools,
    EndpointConfig,
    PoolLimits,
    create_completion,
    health_check,
)
from gateway.models import Endpoint, EndpointStatus, ModelRoute, ProbeMode, RouteKind
from gateway.signals import endpoint_status_changed
from monitoring import conf
from monitoring.conf import Thresholds
from monitoring.models import UP_STATUSES, ProbeResult, ProbeRollup

logger = logging.getLogger(__name__)

ERROR_CHARS = 500  # ProbeResult.error's max_length
# Claimed per round; a bigger backlog is worked through in the rounds after.
CLAIM_LIMIT = 5000
CLAIM_CHUNK = 500
PROBE_PROMPT = [{"role": "user", "content": "ping"}]
# The soonest a failed probe of an open circuit is followed by the next one.
REPROBE_GAP = timedelta(seconds=5)


# --- Text from upstreams ------------------------------------------------------------


def storable_text(text: object, limit: int, *, secrets: Iterable[str] = ()) -> str:
    """Text from an upstream made safe to store, log and show, at most `limit` long.

    The gateway's cleaner (gateway.sanitize.clean_text: controls and invisible
    formatting dropped, secrets redacted before the cut), with a lone
    surrogate shown as "?" so the stored error still says something was there.
    """
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    return sanitize.clean_text(text, secrets=secrets, limit=limit)


def storable_status(value: object) -> int | None:
    """An HTTP status code to store, or None when it is not a plausible one."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


# --- Classification -------------------------------------------------------------


def classify(ok: bool, latency_ms: float | None, thresholds: Thresholds) -> str:
    """The status one probe shows: connected, slow or disconnected."""
    if not ok or latency_ms is None or latency_ms > thresholds.down_ms:
        return EndpointStatus.DISCONNECTED
    if latency_ms < thresholds.slow_ms:
        return EndpointStatus.CONNECTED
    return EndpointStatus.SLOW


def next_health(
    current: str, failures: int, probe_status: str, thresholds: Thresholds
) -> tuple[str, int]:
    """An endpoint's status and failed probes in a row after one more probe.

    A healthy probe sets the status at once. A failed one is counted, and the
    endpoint is marked disconnected only after `down_after` of them in a row,
    so one blip does not flap it; an endpoint that was never up (unknown) has
    nothing to flap from and is marked disconnected on its first failure.
    """
    if probe_status in UP_STATUSES:
        return probe_status, 0
    failures += 1
    if current == EndpointStatus.UNKNOWN or failures >= thresholds.down_after:
        return EndpointStatus.DISCONNECTED, failures
    return current, failures


# --- Claiming ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One claimed endpoint: the row as claimed and what to probe it with."""

    endpoint: Endpoint
    next_probe_at: datetime
    config: EndpointConfig | None
    config_error: str = ""
    completion_model: str = ""

    @property
    def id(self) -> int:
        return self.endpoint.pk


def _due(now: datetime) -> Q:
    return Q(next_probe_at__isnull=True) | Q(next_probe_at__lte=now)


def due_endpoints(now: datetime, *, force: bool = False) -> Any:
    """Enabled endpoints whose next probe is due at `now` (all of them if forced)."""
    queryset = Endpoint.objects.filter(enabled=True)
    if not force:
        queryset = queryset.filter(_due(now))
    return queryset.order_by(F("next_probe_at").asc(nulls_first=True), "id")


def claim_due(
    now: datetime | None = None, *, force: bool = False, limit: int = CLAIM_LIMIT
) -> list[Target]:
    """Claim due endpoints for this round; rows another monitor took are skipped.

    A compare-and-set in bulk: one UPDATE per chunk and probe interval moves
    `next_probe_at` only where the row is still due, and the rows that then
    hold this round's own timestamp are the ones it won.
    """
    now = now or timezone.now()
    groups: dict[int, list[Endpoint]] = defaultdict(list)
    for endpoint in due_endpoints(now, force=force)[:limit]:
        groups[max(1, endpoint.probe_interval)].append(endpoint)
    claimed: list[Target] = []
    with transaction.atomic():
        for interval, endpoints in groups.items():
            next_at = now + timedelta(seconds=interval)
            for start in range(0, len(endpoints), CLAIM_CHUNK):
                chunk = endpoints[start : start + CLAIM_CHUNK]
                rows = Endpoint.objects.filter(pk__in=[e.pk for e in chunk])
                still_due = rows if force else rows.filter(_due(now))
                still_due.update(next_probe_at=next_at)
                won = set(
                    rows.filter(next_probe_at=next_at).values_list("pk", flat=True)
                )
                claimed += [_target(e, next_at) for e in chunk if e.pk in won]
    return _with_completion_models(claimed)


def _target(endpoint: Endpoint, next_at: datetime) -> Target:
    try:
        config = EndpointConfig.from_model(endpoint)
    except Exception as exc:
        # Settings the client cannot use (headers saved as a list by a
        # hand-edited import, say): this probe fails visibly, not the round.
        logger.warning("Cannot probe endpoint %s: %s", endpoint.pk, type(exc).__name__)
        return Target(
            endpoint, next_at, None, f"cannot load its settings ({type(exc).__name__})"
        )
    return Target(endpoint, next_at, config)


def _with_completion_models(targets: list[Target]) -> list[Target]:
    """Fill in the model of completion probes that name none: the first route's."""
    need = [
        t.id
        for t in targets
        if t.endpoint.probe_mode == ProbeMode.COMPLETION and t.config is not None
    ]
    if not need:
        return targets
    first_route: dict[int, str] = {}
    routes = (
        # A completion probe needs a chat model.
        ModelRoute.objects.filter(
            endpoint_id__in=need, enabled=True, kind=RouteKind.CHAT
        )
        .order_by("endpoint_id", "priority", "id")
        .values_list("endpoint_id", "upstream_model")
    )
    for endpoint_id, model in routes:
        first_route.setdefault(endpoint_id, model)
    return [
        replace(
            t,
            completion_model=t.endpoint.probe_model or first_route.get(t.id, ""),
        )
        if t.id in need
        else t
        for t in targets
    ]


# --- Probing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one probe found."""

    target: Target
    checked_at: datetime
    ok: bool
    latency_ms: float | None
    http_status: int | None = None
    error: str = ""
    status: str = EndpointStatus.DISCONNECTED

    def __post_init__(self) -> None:
        # Whatever built it, an outcome only carries what may be stored.
        object.__setattr__(self, "error", storable_text(self.error, ERROR_CHARS))
        object.__setattr__(self, "http_status", storable_status(self.http_status))


class _SharedTransport(httpx.AsyncBaseTransport):
    """Connection pools and one TLS context shared by every endpoint of a round.

    An httpx client builds its own TLS context, about 17 ms each: for a
    thousand endpoints that alone would take longer than a round may. And one
    pool's bookkeeping grows with its connections times its waiting requests
    (encode/httpx#3215), so requests go round-robin over small pools. The
    per-endpoint clients close their transport when retired, so closing is
    left to the round that owns this one.
    """

    CONNECTIONS_PER_POOL = 8

    def __init__(self, concurrency: int) -> None:
        tls = httpx.create_ssl_context()
        shards = max(1, -(-concurrency // self.CONNECTIONS_PER_POOL))
        size = -(-concurrency // shards)
        self._pools = [
            # HTTP/1.1: a probe is one request per endpoint, so HTTP/2 would
            # have nothing to multiplex.
            httpx.AsyncHTTPTransport(
                verify=tls,
                limits=httpx.Limits(
                    max_connections=size, max_keepalive_connections=size
                ),
            )
            for _ in range(shards)
        ]
        self._next = itertools.cycle(self._pools).__next__

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._next().handle_async_request(request)

    async def aclose(self) -> None:
        """Kept open: the round closes the real pools with `close()`."""

    async def close(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def _error_text(target: Target, exc: BaseException) -> str:
    text = exc.message if isinstance(exc, APIClientError) else str(exc)
    secrets = target.config.secrets if target.config is not None else ()
    return storable_text(text, ERROR_CHARS, secrets=secrets)


async def probe(
    target: Target,
    *,
    thresholds: Thresholds,
    seconds: float,
    client_pools: ClientPools | None = None,
) -> Outcome:
    """Probe one endpoint; never raises, whatever the endpoint does."""
    checked_at = timezone.now()
    if target.config is None:
        return Outcome(target, checked_at, False, None, error=target.config_error)
    started = time.perf_counter()
    ok, status_code, error = False, None, ""
    try:
        async with asyncio.timeout(seconds):
            if target.endpoint.probe_mode == ProbeMode.COMPLETION and (
                target.completion_model
            ):
                await create_completion(
                    target.config,
                    {
                        "model": target.completion_model,
                        "messages": PROBE_PROMPT,
                        "max_tokens": 1,
                    },
                    client_pools=client_pools,
                )
                ok, status_code = True, 200
            else:
                result = await health_check(target.config, client_pools=client_pools)
                ok = result.ok
                if result.error is not None:
                    status_code = result.error.status_code
                    error = _error_text(target, result.error)
                else:
                    status_code = 200
    except TimeoutError:
        error = f"no answer within {seconds:g} s"
    except APIClientError as exc:
        status_code, error = exc.status_code, _error_text(target, exc)
    except Exception as exc:
        # A bug must cost one probe, not the round. Logged with its traceback
        # but only a redacted message: the exception may quote the upstream.
        logger.error(
            "Probe of endpoint %s failed unexpectedly: %s: %s\n%s",
            target.id,
            type(exc).__name__,
            _error_text(target, exc),
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
        error = (
            f"the probe failed unexpectedly ({type(exc).__name__}; "
            "see the monitor's log)"
        )
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if ok and latency_ms > thresholds.down_ms:
        error = f"answered in {latency_ms:.0f} ms, over {thresholds.down_ms:g} ms"
    return Outcome(
        target,
        checked_at,
        ok,
        latency_ms,
        http_status=status_code,
        error=error,
        status=classify(ok, latency_ms, thresholds),
    )


async def probe_all(
    targets: list[Target],
    *,
    thresholds: Thresholds | None = None,
    concurrency: int | None = None,
    probe_timeout: float | None = None,
) -> list[Outcome]:
    """Probe every target, at most `concurrency` at once, each time-limited."""
    if not targets:
        return []
    thresholds = thresholds or Thresholds.from_settings()
    concurrency = max(1, int(concurrency or conf.get("MONITOR_CONCURRENCY")))
    limit = float(probe_timeout or conf.get("MONITOR_PROBE_TIMEOUT"))
    seats = asyncio.Semaphore(concurrency)
    transport = _SharedTransport(concurrency)
    client_pools = ClientPools(
        PoolLimits(clients=1, max_connections=1, max_keepalive=1)
    )
    client_pools.transport = transport

    async def one(target: Target) -> Outcome:
        async with seats:
            return await probe(
                target,
                thresholds=thresholds,
                seconds=min(limit, target.endpoint.timeout),
                client_pools=client_pools,
            )

    try:
        return await asyncio.gather(*(one(t) for t in targets))
    finally:
        await client_pools.aclose_all()
        await transport.close()


# --- Recording --------------------------------------------------------------------


@dataclass
class RecordReport:
    """What `record` wrote."""

    results: int = 0
    transitions: list[tuple[int, str, str]] = field(default_factory=list)
    # Healthy endpoints that the breaker had disabled or was counting against.
    to_reenable: list[tuple[int, str]] = field(default_factory=list)

    def merge(self, other: RecordReport) -> None:
        """Add what another (committed) write did."""
        self.results += other.results
        self.transitions += other.transitions
        self.to_reenable += other.to_reenable


def record(
    outcomes: list[Outcome], *, thresholds: Thresholds | None = None
) -> RecordReport:
    """Write probe results and endpoint health; one bad row never blocks the rest.

    The round is written in one transaction with one bulk insert, the cheap
    way. If the database refuses any of it, the round is written again with
    each result inserted in a savepoint of its own: a result that cannot be
    stored becomes a failed probe of its endpoint, and the others go in as
    usual. If even that fails (a constraint checked at commit, a broken
    health row), each endpoint gets a transaction of its own.
    """
    thresholds = thresholds or Thresholds.from_settings()
    try:
        return _record(outcomes, thresholds)
    except Exception as exc:
        # Only the class: a database error may quote the row's values.
        logger.warning(
            "Recording %d probe result(s) at once failed (%s); "
            "inserting each on its own",
            len(outcomes),
            type(exc).__name__,
        )
    try:
        return _record(outcomes, thresholds, one_by_one=True)
    except Exception as exc:
        logger.warning(
            "Recording probe results one by one failed (%s); "
            "one transaction per endpoint",
            type(exc).__name__,
        )
    report = RecordReport()
    for outcome in outcomes:
        try:
            report.merge(_record([outcome], thresholds, one_by_one=True))
        except (InterfaceError, OperationalError):
            # The connection or the server is failing, not this endpoint's
            # rows: the monitor's loop logs it and tries a later round.
            raise
        except Exception as exc:
            logger.error(
                "Could not record the probe of endpoint %s (%s); skipped this round",
                outcome.target.id,
                type(exc).__name__,
            )
    return report


def _record(
    outcomes: list[Outcome], thresholds: Thresholds, *, one_by_one: bool = False
) -> RecordReport:
    """Write these outcomes in one transaction; the report only if it committed."""
    report = RecordReport()
    recheck = timedelta(seconds=float(conf.get("MONITOR_RECHECK_SECONDS")))
    with transaction.atomic():
        existing = set(
            Endpoint.objects.filter(pk__in=[o.target.id for o in outcomes]).values_list(
                "pk", flat=True
            )
        )
        outcomes = [o for o in outcomes if o.target.id in existing]
        if one_by_one:
            stored = (_insert_alone(o) for o in outcomes)
            outcomes = [o for o in stored if o is not None]
        else:
            ProbeResult.objects.bulk_create(
                [_result_row(o) for o in outcomes], batch_size=500
            )
        report.results = len(outcomes)
        if outcomes:
            refresh_rollups(
                [o.target.id for o in outcomes], min(o.checked_at for o in outcomes)
            )
        for outcome in outcomes:
            _apply(outcome, thresholds, report, recheck)
            endpoint = outcome.target.endpoint
            if outcome.status in UP_STATUSES and (
                endpoint.disabled_until is not None or endpoint.consecutive_failures
            ):
                report.to_reenable.append((endpoint.pk, outcome.status))
    return report


def _result_row(outcome: Outcome) -> ProbeResult:
    return ProbeResult(
        endpoint_id=outcome.target.id,
        checked_at=outcome.checked_at,
        status=outcome.status,
        latency_ms=outcome.latency_ms,
        http_status=outcome.http_status,
        error=outcome.error,
    )


def _insert_alone(outcome: Outcome) -> Outcome | None:
    """Insert one result in a savepoint; the outcome as stored, None if not at all.

    A result the database refuses is stored as a failed probe of its
    endpoint instead, so the failure shows where the endpoint's results do.
    """
    try:
        with transaction.atomic():
            _result_row(outcome).save(force_insert=True)
        return outcome
    except Exception as exc:
        problem = type(exc).__name__
        logger.warning(
            "Could not store the probe result of endpoint %s (%s); "
            "storing a failed probe",
            outcome.target.id,
            problem,
        )
    failed = replace(
        outcome,
        ok=False,
        http_status=None,
        status=EndpointStatus.DISCONNECTED,
        error=f"its result could not be stored ({problem}; see the monitor's log)",
    )
    try:
        with transaction.atomic():
            _result_row(failed).save(force_insert=True)
        return failed
    except Exception as exc:
        logger.error(
            "Could not store any probe result of endpoint %s (%s)",
            outcome.target.id,
            type(exc).__name__,
        )
        return None


def _health_fields(
    outcome: Outcome, failures: int, status: str, recheck: timedelta
) -> dict[str, Any]:
    next_at = outcome.target.next_probe_at
    if failures and status != EndpointStatus.DISCONNECTED:
        # Failing but not yet down: look again soon to confirm or clear it.
        next_at = min(next_at, outcome.checked_at + recheck)
    return {
        "probe_failures": failures,
        "last_checked_at": outcome.checked_at,
        "last_latency_ms": outcome.latency_ms,
        "next_probe_at": next_at,
    }


def _not_after_cooldown(next_at: datetime, now: datetime) -> Case:
    """`next_at`, or the end of the row's open circuit if that comes sooner.

    Read from the row, not the claimed snapshot: a circuit opened by a web
    process while this probe ran has moved the probe forward, and this write
    must not push it back to the probe interval. Never sooner than
    REPROBE_GAP, so an endpoint with (almost) no cooldown is not probed in a
    tight loop.
    """
    floor = min(next_at, now + REPROBE_GAP)
    is_open = Q(disabled_until__gt=now)
    return Case(
        When(is_open & Q(disabled_until__lt=floor), then=Value(floor)),
        When(is_open & Q(disabled_until__lt=next_at), then=F("disabled_until")),
        default=Value(next_at),
        output_field=DateTimeField(),
    )


def _apply(
    outcome: Outcome, thresholds: Thresholds, report: RecordReport, recheck: timedelta
) -> None:
    """Write one endpoint's health with a compare-and-set on its status.

    The breaker may move the status between the claim and this write: then
    the outcome is applied again to the status it left, so the freshest
    evidence wins and a transition is announced exactly once.
    """
    endpoint = outcome.target.endpoint
    old = endpoint.status
    for _ in range(3):
        new, failures = next_health(
            old, endpoint.probe_failures, outcome.status, thresholds
        )
        fields = _health_fields(outcome, failures, new, recheck)
        written = dict(fields)
        if outcome.status not in UP_STATUSES:
            # A healthy probe closes the circuit (`reenable_healthy`).
            written["next_probe_at"] = _not_after_cooldown(
                fields["next_probe_at"], outcome.checked_at
            )
        rows = Endpoint.objects.filter(pk=endpoint.pk, status=old)
        if new == old:
            if rows.update(**written):
                return
        elif rows.update(status=new, status_changed_at=outcome.checked_at, **written):
            break
        current = Endpoint.objects.filter(pk=endpoint.pk).values_list(
            "status", flat=True
        )
        if not current:
            return
        old = current[0]
    else:
        logger.warning("Endpoint %s kept changing status; skipped", endpoint.pk)
        return
    announced = Endpoint(
        **{
            f.attname: getattr(endpoint, f.attname)
            for f in Endpoint._meta.concrete_fields
        }
    )
    announced.status = new
    announced.status_changed_at = outcome.checked_at
    for name, value in fields.items():
        setattr(announced, name, value)
    report.transitions.append((endpoint.pk, old, new))
    logger.info("Endpoint %s: %s → %s", endpoint.pk, old, new)
    # Robust: a receiver that raises after the commit must not look like a
    # failed write, which would record the round a second time.
    transaction.on_commit(
        lambda: endpoint_status_changed.send(
            sender=Endpoint,
            endpoint=announced,
            old_status=old,
            new_status=new,
            reason="probe",
            error=outcome.error,
        ),
        robust=True,
    )


async def claim_trials(
    targets: list[Target], now: datetime | None = None
) -> dict[int, datetime]:
    """Claim the half-open trial of each target whose cooldown is over.

    The probe then is the deployment's one trial of the endpoint: live
    requests skip it while the probe runs rather than paying for a trial
    themselves. A trial a live request claimed first is left to it. Returns
    the lease of each trial claimed, by endpoint id.
    """
    now = now or timezone.now()
    leases: dict[int, datetime] = {}
    for target in targets:
        config = target.config
        if config is None or (
            breaker.state(config, now) is not breaker.BreakerState.HALF_OPEN
        ):
            continue
        lease = await breaker.claim_trial(config, now)
        if lease is not None:
            leases[target.id] = lease
    return leases


async def reopen_failed_trials(
    outcomes: list[Outcome], leases: dict[int, datetime]
) -> int:
    """Re-open for another cooldown each circuit whose trial probe failed.

    Run before `record`, so the health write sees the new cooldown and keeps
    the next probe at its end: a dead endpoint is probed once per cooldown,
    not once per loop. Returns how many circuits it re-opened.
    """
    reopened = 0
    for outcome in outcomes:
        lease = leases.get(outcome.target.id)
        if lease is None or outcome.status in UP_STATUSES:
            continue
        endpoint = outcome.target.endpoint
        try:
            if await breaker.record_failure(
                endpoint.pk,
                threshold=endpoint.failure_threshold,
                cooldown_seconds=endpoint.cooldown_seconds,
                trial_until=lease,
            ):
                reopened += 1
        except Exception:
            # The lease runs out on its own and the circuit is half-open again.
            logger.exception(
                "Could not re-open the circuit of endpoint %s", endpoint.pk
            )
    return reopened


async def reenable_healthy(report: RecordReport) -> int:
    """Close the breaker of endpoints that probed healthy; how many it closed."""
    closed = 0
    for endpoint_id, status in report.to_reenable:
        try:
            if await breaker.reenable(endpoint_id, status=status):
                closed += 1
        except Exception:
            logger.exception("Could not re-enable endpoint %s", endpoint_id)
    return closed


# --- One round ----------------------------------------------------------------------


@dataclass
class RoundReport:
    """What one probe round did."""

    probed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    transitions: list[tuple[int, str, str]] = field(default_factory=list)
    reenabled: int = 0
    reopened: int = 0
    seconds: float = 0.0


async def run_round(*, force: bool = False) -> RoundReport:
    """Claim due endpoints, probe them and record the outcome."""
    started = time.perf_counter()
    thresholds = Thresholds.from_settings()
    targets = await sync_to_async(claim_due)(force=force)
    report = RoundReport(probed=len(targets))
    if targets:
        leases = await claim_trials(targets)
        outcomes = await probe_all(targets, thresholds=thresholds)
        report.reopened = await reopen_failed_trials(outcomes, leases)
        recorded = await sync_to_async(record)(outcomes, thresholds=thresholds)
        report.transitions = recorded.transitions
        report.reenabled = await reenable_healthy(recorded)
        for outcome in outcomes:
            count = report.by_status.get(outcome.status, 0)
            report.by_status[outcome.status] = count + 1
    report.seconds = time.perf_counter() - started
    return report


ROLLUP_FIELDS = ("probes", "up", "slow", "latency_sum_ms", "latency_count")


def refresh_rollups(endpoint_ids: list[int], since: datetime) -> int:
    """Recount the hourly rollups of these endpoints from `since`'s hour on.

    Recounted from ProbeResult rather than incremented, so writing the same
    hour twice (two rounds in one hour, a retried transaction) stays exact.
    """
    hour = since.replace(minute=0, second=0, microsecond=0)
    up = Q(status__in=UP_STATUSES)
    written = 0
    for start in range(0, len(endpoint_ids), CLAIM_CHUNK):
        rows = (
            ProbeResult.objects.filter(
                endpoint_id__in=endpoint_ids[start : start + CLAIM_CHUNK],
                checked_at__gte=hour,
            )
            .annotate(at=TruncHour("checked_at"))
            .values("endpoint_id", "at")
            .annotate(
                probes=Count("id"),
                up=Count("id", filter=up),
                slow=Count("id", filter=Q(status=EndpointStatus.SLOW)),
                latency_sum=Sum("latency_ms", filter=up),
                latency_count=Count("latency_ms", filter=up),
            )
            .order_by()
        )
        rollups = [
            ProbeRollup(
                endpoint_id=row["endpoint_id"],
                hour=row["at"],
                probes=row["probes"],
                up=row["up"],
                slow=row["slow"],
                latency_sum_ms=row["latency_sum"] or 0.0,
                latency_count=row["latency_count"],
            )
            for row in rows
        ]
        ProbeRollup.objects.bulk_create(
            rollups,
            update_conflicts=True,
            unique_fields=["endpoint", "hour"],
            update_fields=ROLLUP_FIELDS,
            batch_size=500,
        )
        written += len(rollups)
    return written


def prune(now: datetime | None = None, *, batch: int = 10_000) -> int:
    """Delete probe history older than MONITOR_RETENTION_DAYS; how many results."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=int(conf.get("MONITOR_RETENTION_DAYS")))
    deleted = 0
    # Batches keep each DELETE (and its lock) short on a big table.
    while True:
        ids = list(
            ProbeResult.objects.filter(checked_at__lt=cutoff)
            .order_by()
            .values_list("id", flat=True)[:batch]
        )
        if ids:
            deleted += ProbeResult.objects.filter(id__in=ids).delete()[0]
        if len(ids) < batch:
            break
    # An hour's rollup goes once all of that hour is past the retention.
    ProbeRollup.objects.filter(hour__lte=cutoff - timedelta(hours=1)).delete()
    return deleted
