"""Budgets and usage records: reserve before the call, write exactly once after.

Budgets. A request reserves its maximum (prompt tokens + max output tokens)
on every budget that applies to it, before anything is sent upstream, with one
conditional UPDATE per budget (`used + reserved + n <= limit`) in a single
transaction: all of them or none. The row lock that UPDATE takes is what makes
concurrent requests queue on PostgreSQL and SQLite alike, so a budget cannot be
overspent however many race. Counters belong to calendar periods (midnight UTC,
Monday, the 1st), so a reset is a new row, never a write that can race.

Usage. At the end, one `UsageEntry` per request becomes one UsageRecord, the
release of its reservations down to the real count, and its share of the
hourly UsageRollup, all in one transaction; `request_id` is unique, so nothing
can be counted twice, and a batch that fails is retried entry by entry with
that check. Async callers hand their entry to a per-process group commit: it
gathers entries for USAGE_WRITE_DELAY_MS (50 ms) and writes them in one
transaction on a writer thread of its own. The request does not wait for it:
measured on SQLite, one write per request (a thread hop and a commit) cost as
much as the rest of the gateway together, while one write per few dozen
requests costs a few tens of microseconds each (bench/accounting_overhead.py).
What that trades away: a process killed without warning loses the entries of
its last ~50 ms (a clean shutdown writes them), and a request's reservation is
released up to that much later, which can only refuse, never overspend (and
a refusal first settles this process's queue and looks again).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import hashlib
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import Count, F, Func, IntegerField, Q, Sum
from django.db.models.functions import Coalesce, TruncHour
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from gateway.limits import LocalTTLCache
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetPeriod,
    BudgetScope,
    Endpoint,
    UsageRecord,
    UsageRollup,
    UsageStatus,
)
from gateway.signals import budget_threshold_crossed

logger = logging.getLogger("gateway.accounting")

# Entries per write transaction; more wait for the next one.
MAX_BATCH = 500


# --- Periods ------------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The calendar period (UTC) that contains `now`: its start and the next one's."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.DAILY:
        return day, day + timedelta(days=1)
    if period == BudgetPeriod.WEEKLY:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == BudgetPeriod.MONTHLY:
        start = day.replace(day=1)
        following = (start + timedelta(days=32)).replace(day=1)
        return start, following
    raise ValueError(f"unknown budget period {period!r}")


def format_reset(resets_at: datetime, now: datetime) -> str:
    """'00:00 UTC', with the date when the reset is not within a day."""
    text = f"{resets_at:%H:%M} UTC"
    if resets_at - now > timedelta(days=1):
        text += f" on {resets_at:%a %d %b}"
    return text


# --- Which budgets apply ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """A snapshot of one enabled Budget, enough to reserve and settle against it."""

    id: int
    scope: str
    period: str
    token_limit: int | None
    warning_percent: int
    endpoint_id: int | None = None
    endpoint_name: str = ""

    @property
    def holder(self) -> str:
        """Whose budget this is, as a refused caller reads it."""
        return {
            BudgetScope.GLOBAL: "everyone",
            BudgetScope.USER: "your account",
            BudgetScope.API_KEY: "this API key",
        }.get(self.scope, f"endpoint {self.endpoint_name}")

    @property
    def warning_tokens(self) -> int | None:
        if self.token_limit is None:
            return None
        return math.ceil(self.token_limit * self.warning_percent / 100)


_REF_FIELDS = (
    "id",
    "scope",
    "period",
    "token_limit",
    "warning_percent",
    "endpoint_id",
    "endpoint__name",
)
_caller_budgets: LocalTTLCache[tuple[BudgetRef, ...]] = LocalTTLCache()
_endpoint_budgets: LocalTTLCache[tuple[BudgetRef, ...]] = LocalTTLCache()


def _refs(queryset: Any) -> tuple[BudgetRef, ...]:
    return tuple(
        BudgetRef(*row[:-1], endpoint_name=row[-1] or "")
        for row in queryset.values_list(*_REF_FIELDS).order_by("id")
    )


def caller_budgets(
    user_id: int | None, api_key_id: int | None
) -> tuple[BudgetRef, ...]:
    """The global, user and API key budgets of a caller (cached briefly per process)."""
    key = (user_id, api_key_id)
    cached = _caller_budgets.get(key)
    if cached is not None:
        return cached
    scopes = Q(scope=BudgetScope.GLOBAL)
    if user_id is not None:
        scopes |= Q(scope=BudgetScope.USER, user_id=user_id)
    if api_key_id is not None:
        scopes |= Q(scope=BudgetScope.API_KEY, api_key_id=api_key_id)
    refs = _refs(Budget.objects.filter(scopes, enabled=True))
    _caller_budgets.set(key, refs)
    return refs


def endpoint_budgets(endpoint_id: int | None) -> tuple[BudgetRef, ...]:
    """The budgets of one endpoint (cached briefly per process)."""
    if endpoint_id is None:
        return ()
    cached = _endpoint_budgets.get(endpoint_id)
    if cached is not None:
        return cached
    refs = _refs(
        Budget.objects.filter(
            scope=BudgetScope.ENDPOINT, endpoint_id=endpoint_id, enabled=True
        )
    )
    _endpoint_budgets.set(endpoint_id, refs)
    return refs


async def acaller_budgets(
    user_id: int | None, api_key_id: int | None
) -> tuple[BudgetRef, ...]:
    """`caller_budgets` from async code; no thread hop while the entry is cached."""
    cached = _caller_budgets.get((user_id, api_key_id))
    if cached is not None:
        return cached
    return await sync_to_async(caller_budgets)(user_id, api_key_id)


async def aendpoint_budgets(endpoint_id: int | None) -> tuple[BudgetRef, ...]:
    """`endpoint_budgets` from async code; no thread hop while the entry is cached."""
    if endpoint_id is None:
        return ()
    cached = _endpoint_budgets.get(endpoint_id)
    if cached is not None:
        return cached
    return await sync_to_async(endpoint_budgets)(endpoint_id)


@receiver(post_save, sender=Budget)
@receiver(post_delete, sender=Budget)
def forget_budgets(**kwargs: Any) -> None:
    """Drop this process's cached budget lists (any Budget save does it)."""
    _caller_budgets.clear()
    _endpoint_budgets.clear()


# --- Reservations -------------------------------------------------------------


class BudgetExhausted(Exception):
    """A budget has no room for the request; `resets_at` is when it will."""

    code = "budget_exhausted"

    def __init__(
        self,
        budget: BudgetRef,
        *,
        needed: int,
        remaining: int,
        resets_at: datetime,
        now: datetime,
    ) -> None:
        self.budget = budget
        self.needed = needed
        self.remaining = max(0, remaining)
        self.resets_at = resets_at
        self.retry_after = max(0.0, (resets_at - now).total_seconds())
        period = budget.period if budget.period in BudgetPeriod.values else "token"
        super().__init__(
            f"Budget exhausted: the {period} budget of {budget.token_limit:,} tokens "
            f"for {budget.holder} has {self.remaining:,} left and this request "
            f"needs up to {needed:,}; it resets at {format_reset(resets_at, now)}."
        )


@dataclass(frozen=True, slots=True)
class Hold:
    """Tokens reserved on one budget's counter for one request."""

    budget: BudgetRef
    counter_id: int
    tokens: int
    resets_at: datetime
    # Left for other requests right after this reservation; None: unlimited.
    remaining: int | None


@dataclass(slots=True)
class Reservation:
    """Everything one request holds; settled (or released) by its usage entry."""

    tokens: int = 0
    holds: list[Hold] = field(default_factory=list)

    @property
    def remaining(self) -> int | None:
        """The tightest budget's room after this reservation; None: no limit."""
        left = [h.remaining for h in self.holds if h.remaining is not None]
        return min(left) if left else None

    def remaining_after(self, used: int) -> int | None:
        """The caller's tightest room once this request settles at `used` tokens.

        As seen when it reserved: requests settling meanwhile are not in it.
        """
        left = [
            max(0, hold.remaining + hold.tokens - used)
            for hold in self.holds
            if hold.remaining is not None and hold.budget.scope != BudgetScope.ENDPOINT
        ]
        return min(left) if left else None

    def add(self, other: Reservation) -> None:
        """Take over another reservation's holds (a top-up, another endpoint)."""
        self.tokens += other.tokens
        by_counter = {hold.counter_id: i for i, hold in enumerate(self.holds)}
        for hold in other.holds:
            index = by_counter.get(hold.counter_id)
            if index is None:
                by_counter[hold.counter_id] = len(self.holds)
                self.holds.append(hold)
            else:
                # One hold per counter, so that settling counts usage once.
                mine = self.holds[index]
                self.holds[index] = Hold(
                    mine.budget,
                    mine.counter_id,
                    mine.tokens + hold.tokens,
                    mine.resets_at,
                    hold.remaining,
                )


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


_COUNTER = BudgetCounter._meta.db_table


def _reserve_on(budget: BudgetRef, period_start: datetime, tokens: int) -> Any:
    """Add to one counter's reservation if it fits; its row, or None."""
    sql = (
        f"UPDATE {_q(_COUNTER)} SET reserved_tokens = reserved_tokens + %s "
        f"WHERE budget_id = %s AND period_start = %s"
    )
    params: list[Any] = [
        tokens,
        budget.id,
        connection.ops.adapt_datetimefield_value(period_start),
    ]
    if budget.token_limit is not None:
        sql += " AND used_tokens + reserved_tokens + %s <= %s"
        params += [tokens, budget.token_limit]
    sql += " RETURNING id, used_tokens, reserved_tokens"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _ensure_counter(budget: BudgetRef, period_start: datetime) -> None:
    # ON CONFLICT DO NOTHING: neither fails nor aborts the transaction when
    # another request created the row first.
    BudgetCounter.objects.bulk_create(
        [BudgetCounter(budget_id=budget.id, period_start=period_start)],
        ignore_conflicts=True,
    )


def reserve(
    budgets: Sequence[BudgetRef], tokens: int, now: datetime | None = None
) -> Reservation:
    """Reserve `tokens` on every budget, or on none and raise BudgetExhausted."""
    if not budgets:
        return Reservation(tokens)
    now = now or timezone.now()
    holds: list[Hold] = []
    refusal: tuple[BudgetRef, int, int, datetime] | None = None
    # One order for everyone, so two requests never wait on each other's rows.
    ordered = sorted(budgets, key=lambda b: b.id)
    # One budget needs no transaction: its conditional UPDATE is atomic on its
    # own, which saves the BEGIN and COMMIT round trips on PostgreSQL.
    with transaction.atomic() if len(ordered) > 1 else contextlib.nullcontext():
        for budget in ordered:
            start, resets_at = period_bounds(budget.period, now)
            row = _reserve_on(budget, start, tokens)
            if row is None:
                _ensure_counter(budget, start)
                row = _reserve_on(budget, start, tokens)
            if row is None:
                used, reserved = BudgetCounter.objects.values_list(
                    "used_tokens", "reserved_tokens"
                ).get(budget_id=budget.id, period_start=start)
                refusal = (budget, used, reserved, resets_at)
                if len(ordered) > 1:
                    transaction.set_rollback(True)
                break
            counter_id, used, reserved = row
            remaining = (
                None
                if budget.token_limit is None
                else budget.token_limit - used - reserved
            )
            holds.append(Hold(budget, counter_id, tokens, resets_at, remaining))
    if refusal is not None:
        budget, used, reserved, resets_at = refusal
        assert budget.token_limit is not None
        if used + tokens > budget.token_limit:
            # Refused on settled usage alone, not on requests still running.
            _mark_exhausted(budget, period_bounds(budget.period, now)[0], now)
        raise BudgetExhausted(
            budget,
            needed=tokens,
            remaining=budget.token_limit - used - reserved,
            resets_at=resets_at,
            now=now,
        )
    return Reservation(tokens, holds)


def _reserve_fresh(
    budgets: Sequence[BudgetRef], tokens: int, now: datetime | None
) -> Reservation:
    try:
        return reserve(budgets, tokens, now)
    except IntegrityError:
        # A budget deleted since this process cached it.
        forget_budgets()
        raise


async def areserve(
    budgets: Sequence[BudgetRef], tokens: int, now: datetime | None = None
) -> Reservation:
    """`reserve` from async code; no thread hop when no budget applies."""
    if not budgets:
        return Reservation(tokens)
    return await sync_to_async(_reserve_fresh)(budgets, tokens, now)


def release(reservation: Reservation) -> None:
    """Give back every token a reservation holds, without a usage record."""
    if reservation.holds:
        with transaction.atomic():
            _settle(settlements_for(reservation, 0, only_release=True), timezone.now())


# --- Settling and threshold events --------------------------------------------


@dataclass(frozen=True, slots=True)
class Settlement:
    """Release `reserved` tokens on a counter and count `used` ones instead."""

    counter_id: int
    budget: BudgetRef
    reserved: int
    used: int


def settlements_for(
    reservation: Reservation | None,
    used: int,
    *,
    endpoint_used: Mapping[int, int] | None = None,
    only_release: bool = False,
) -> list[Settlement]:
    """Settle every hold of a reservation: the caller's budgets at `used` tokens.

    Endpoint budgets count what each endpoint produced (`endpoint_used`, by
    endpoint id); endpoints that were tried and failed over are only released.
    """
    if reservation is None:
        return []
    by_endpoint = endpoint_used or {}

    def used_on(budget: BudgetRef) -> int:
        if only_release:
            return 0
        if budget.scope == BudgetScope.ENDPOINT:
            return by_endpoint.get(budget.endpoint_id or 0, 0)
        return used

    return [
        Settlement(hold.counter_id, hold.budget, hold.tokens, used_on(hold.budget))
        for hold in reservation.holds
    ]


def _send_threshold(counter_id: int, level: str, used: int, now: datetime) -> None:
    counter = BudgetCounter.objects.select_related("budget").get(pk=counter_id)
    budget = counter.budget
    _, resets_at = period_bounds(budget.period, now)
    logger.warning(
        "Budget %s %s: %s of %s tokens used; resets at %s",
        budget.pk,
        level,
        used,
        budget.token_limit,
        resets_at.isoformat(),
    )

    def send() -> None:
        budget_threshold_crossed.send(
            sender=Budget,
            counter=counter,
            level=level,
            used=used,
            limit=budget.token_limit,
            resets_at=resets_at,
        )

    transaction.on_commit(send)


def _mark_warned(counter_id: int, used: int, now: datetime) -> None:
    # Compare-and-set: of all the writers that see the crossing, one sends.
    if BudgetCounter.objects.filter(pk=counter_id, warned_at__isnull=True).update(
        warned_at=now
    ):
        _send_threshold(counter_id, "warning", used, now)


def _mark_exhausted_counter(counter_id: int, used: int, now: datetime) -> None:
    if BudgetCounter.objects.filter(pk=counter_id, exhausted_at__isnull=True).update(
        exhausted_at=now
    ):
        _send_threshold(counter_id, "exhausted", used, now)


def _mark_exhausted(budget: BudgetRef, period_start: datetime, now: datetime) -> None:
    with transaction.atomic():
        row = (
            BudgetCounter.objects.filter(
                budget_id=budget.id,
                period_start=period_start,
                exhausted_at__isnull=True,
            )
            .values_list("id", "used_tokens")
            .first()
        )
        if row is not None:
            _mark_exhausted_counter(row[0], row[1], now)


def _settle(settlements: Sequence[Settlement], now: datetime) -> dict[int, int | None]:
    """Apply settlements inside the caller's transaction; room left per counter."""
    per_counter: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    budgets: dict[int, BudgetRef] = {}
    for settlement in settlements:
        totals = per_counter[settlement.counter_id]
        totals[0] += settlement.reserved
        totals[1] += settlement.used
        budgets[settlement.counter_id] = settlement.budget
    remaining: dict[int, int | None] = {}
    # In the order reservations lock them (by budget), so that a settling
    # batch and a reservation never wait on each other's rows.
    for counter_id in sorted(per_counter, key=lambda c: (budgets[c].id, c)):
        released, used = per_counter[counter_id]
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {_q(_COUNTER)} SET used_tokens = used_tokens + %s, "
                "reserved_tokens = CASE WHEN reserved_tokens >= %s "
                "THEN reserved_tokens - %s ELSE 0 END "
                "WHERE id = %s RETURNING used_tokens, reserved_tokens, "
                "warned_at, exhausted_at",
                [used, released, released, counter_id],
            )
            row = cursor.fetchone()
        if row is None:
            # The budget was deleted while the request ran.
            continue
        # The timestamps themselves, not "IS NULL": SQLite 3.40 evaluates
        # that to 0 for a NULL column in RETURNING.
        total, reserved, warned_at, exhausted_at = row
        budget = budgets[counter_id]
        if budget.token_limit is None:
            remaining[counter_id] = None
            continue
        remaining[counter_id] = max(0, budget.token_limit - total - reserved)
        warning = budget.warning_tokens
        if warned_at is None and warning is not None and total >= warning:
            _mark_warned(counter_id, total, now)
        if exhausted_at is None and total >= budget.token_limit:
            _mark_exhausted_counter(counter_id, total, now)
    return remaining


# --- Usage records ------------------------------------------------------------


@dataclass(slots=True)
class UsageEntry:
    """What one request leaves behind: its record and the settling of its budgets."""

    model_name: str
    status: str
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=timezone.now)
    source: str = "chat"
    user_id: int | None = None
    api_key_id: int | None = None
    conversation_id: uuid.UUID | None = None
    endpoint_id: int | None = None
    endpoint_name: str = ""
    upstream_model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_type: str = ""
    error_message: str = ""
    attempts: int = 0
    fallback_hops: list[dict[str, Any]] = field(default_factory=list)
    cost: Decimal | None = None
    settlements: list[Settlement] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The UsageRecord's column values (by attname), fitted to the columns."""
        cost = None if self.cost is None else self.cost.quantize(Decimal("0.000001"))
        return {
            "request_id": self.request_id,
            "created_at": self.created_at,
            "source": self.source,
            "user_id": self.user_id,
            "api_key_id": self.api_key_id,
            "conversation_id": self.conversation_id,
            "model_name": self.model_name[:200],
            "endpoint_id": self.endpoint_id,
            "endpoint_name": self.endpoint_name[:100],
            "upstream_model": self.upstream_model[:200],
            "prompt_tokens": max(0, self.prompt_tokens),
            "completion_tokens": max(0, self.completion_tokens),
            "tokens_estimated": self.tokens_estimated,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "status": self.status,
            "error_type": self.error_type[:64],
            "error_message": self.error_message[:500],
            "attempts": min(max(0, self.attempts), 32767),
            "fallback_hops": self.fallback_hops,
            "cost": cost,
        }


@dataclass(frozen=True, slots=True)
class Written:
    """A usage record as stored, and the caller's tightest budget room after it."""

    record_id: int
    request_id: uuid.UUID
    budget_remaining: int | None


# --- Rollups ------------------------------------------------------------------

_ROLLUP_DIMENSIONS = (
    "bucket",
    "dimensions",
    "user_id",
    "api_key_id",
    "model_name",
    "endpoint_id",
    "endpoint_name",
)
_ROLLUP_COUNTERS = (
    "requests",
    "errors",
    "cancelled",
    "rejected",
    "cached",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_us_sum",
    "latency_count",
    "ttft_us_sum",
    "ttft_count",
)
_ROLLUP = UsageRollup._meta.db_table


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour that contains `moment`."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def dimensions_hash(
    user_id: int | None,
    api_key_id: int | None,
    model_name: str,
    endpoint_id: int | None,
    endpoint_name: str,
) -> str:
    """The identity of a rollup row within its hour."""
    text = f"{user_id or ''}|{api_key_id or ''}|{endpoint_id or ''}|{endpoint_name}|"
    return hashlib.sha1((text + model_name).encode(), usedforsecurity=False).hexdigest()


def micros(value: float | Decimal | None) -> int:
    """Millionths, truncated: the same arithmetic as `_Micros` does in SQL."""
    if value is None:
        return 0
    if isinstance(value, Decimal):
        return int((value * 1_000_000).to_integral_value())
    return int(value * 1000)


def _rollup_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, list[int]]:
    rollups: dict[tuple, list[int]] = {}
    for row in rows:
        dimensions = (
            row["user_id"],
            row["api_key_id"],
            row["model_name"],
            row["endpoint_id"],
            row["endpoint_name"],
        )
        key = (hour_of(row["created_at"]), dimensions_hash(*dimensions), *dimensions)
        counters = rollups.get(key)
        if counters is None:
            counters = rollups[key] = [0] * len(_ROLLUP_COUNTERS)
        status = row["status"]
        latency, ttft = row["latency_ms"], row["ttft_ms"]
        for index, value in enumerate(
            (
                1,
                status == UsageStatus.ERROR,
                status == UsageStatus.CANCELLED,
                status == UsageStatus.REJECTED,
                status == UsageStatus.CACHED,
                row["tokens_estimated"],
                row["prompt_tokens"],
                row["completion_tokens"],
                micros(row["cost"]),
                micros(latency),
                latency is not None,
                micros(ttft),
                ttft is not None,
            )
        ):
            counters[index] += int(value)
    return rollups


@lru_cache(maxsize=64)
def _rollup_sql(vendor: str, count: int) -> str:
    del vendor  # part of the cache key: quoting is the connection's
    q = connection.ops.quote_name
    columns = _ROLLUP_DIMENSIONS + _ROLLUP_COUNTERS
    table = q(_ROLLUP)
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    updates = ", ".join(
        f"{q(c)} = {table}.{q(c)} + excluded.{q(c)}" for c in _ROLLUP_COUNTERS
    )
    return (
        f"INSERT INTO {table} ({', '.join(q(c) for c in columns)}) "
        f"VALUES {', '.join([row] * count)} "
        f"ON CONFLICT (bucket, dimensions) DO UPDATE SET {updates}"
    )


def _add_to_rollups(rows: Iterable[Mapping[str, Any]]) -> None:
    """Add records to their hourly rollups: one upsert for the whole batch."""
    rollups = _rollup_rows(rows)
    if not rollups:
        return
    adapt = connection.ops.adapt_datetimefield_value
    params: list[Any] = []
    # Sorted, so that writers in several processes lock rows in one order.
    for key, counters in sorted(rollups.items(), key=lambda item: item[0][:2]):
        params.append(adapt(key[0]))
        params.extend(key[1:])
        params.extend(counters)
    with connection.cursor() as cursor:
        cursor.execute(_rollup_sql(connection.vendor, len(rollups)), params)


@lru_cache(maxsize=8)
def _insert_sql(vendor: str, count: int) -> str:
    del vendor  # part of the cache key: quoting is the connection's
    q = connection.ops.quote_name
    fields = _record_fields()
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return (
        f"INSERT INTO {q(UsageRecord._meta.db_table)} "
        f"({', '.join(q(f.column) for f in fields)}) "
        f"VALUES {', '.join([row] * count)} RETURNING {q(UsageRecord._meta.pk.column)}"
    )


@lru_cache(maxsize=1)
def _record_fields() -> tuple[Any, ...]:
    return tuple(f for f in UsageRecord._meta.concrete_fields if not f.primary_key)


_Adapter = tuple[str, Callable[[], Any], Callable[[Any], Any] | None]
_adapters_by_alias: dict[str, list[_Adapter]] = {}


def _adapters(db: Any) -> list[_Adapter]:
    """Per column: its attname, default, and how the driver must be given it."""
    cached = _adapters_by_alias.get(db.alias)
    if cached is not None:
        return cached
    adapters: list[_Adapter] = []
    for f in _record_fields():
        kind = f.get_internal_type()
        adapt: Callable[[Any], Any] | None = None
        if kind == "UUIDField" and not db.features.has_native_uuid_field:
            adapt = _uuid_hex
        elif kind == "DateTimeField":
            adapt = db.ops.adapt_datetimefield_value
        elif kind == "JSONField":
            adapt = functools.partial(db.ops.adapt_json_value, encoder=f.encoder)
        elif kind == "DecimalField":
            adapt = functools.partial(
                db.ops.adapt_decimalfield_value,
                max_digits=f.max_digits,
                decimal_places=f.decimal_places,
            )
        elif kind not in _PLAIN_TYPES:
            adapt = functools.partial(f.get_db_prep_save, connection=db)
        adapters.append((f.attname, f.get_default, adapt))
    _adapters_by_alias[db.alias] = adapters
    return adapters


# Column types whose Python values every driver takes as they are.
_PLAIN_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "BigIntegerField",
        "BooleanField",
        "CharField",
        "FloatField",
        "ForeignKey",
        "IntegerField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SmallIntegerField",
        "TextField",
        "UUIDField",
    }
)


def _uuid_hex(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def _insert_records(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """INSERT the records in one statement; their ids, in order.

    bulk_create would do the same with several times the Python per row, which
    is most of what a usage write costs.
    """
    db = connections[UsageRecord.objects.db]
    adapters = _adapters(db)
    params: list[Any] = []
    for row in rows:
        for attname, default, adapt in adapters:
            value = row[attname] if attname in row else default()
            params.append(value if adapt is None else adapt(value))
    with db.cursor() as cursor:
        cursor.execute(_insert_sql(db.vendor, len(rows)), params)
        return [pk for (pk,) in cursor.fetchall()]


# --- Writing ------------------------------------------------------------------


def write_usage(entries: Sequence[UsageEntry]) -> list[Written]:
    """Store records, settle budgets and add to rollups, in one transaction.

    Raises IntegrityError when any record already exists or refers to a row
    that is gone; `record_usage` handles both for a single entry.
    """
    now = timezone.now()
    rows = [entry.row() for entry in entries]
    with transaction.atomic():
        ids = _insert_records(rows)
        remaining = _settle([s for entry in entries for s in entry.settlements], now)
        _add_to_rollups(rows)
    written = []
    for entry, pk in zip(entries, ids, strict=True):
        room = [
            remaining[s.counter_id]
            for s in entry.settlements
            if remaining.get(s.counter_id) is not None
            and s.budget.scope != BudgetScope.ENDPOINT
        ]
        written.append(Written(pk, entry.request_id, min(room) if room else None))
    return written


def _drop_missing_references(entry: UsageEntry) -> bool:
    """Clear references to rows deleted while the request ran; whether any were."""
    changed = False
    checks = (
        ("user_id", get_user_model()),
        ("api_key_id", ApiKey),
        ("endpoint_id", Endpoint),
    )
    for attribute, model in checks:
        pk = getattr(entry, attribute)
        if pk is not None and not model._default_manager.filter(pk=pk).exists():
            setattr(entry, attribute, None)
            changed = True
    live = set(
        BudgetCounter.objects.filter(
            pk__in=[s.counter_id for s in entry.settlements]
        ).values_list("pk", flat=True)
    )
    if len(live) != len({s.counter_id for s in entry.settlements}):
        entry.settlements = [s for s in entry.settlements if s.counter_id in live]
        changed = True
    return changed


def record_usage(entry: UsageEntry) -> Written:
    """Write one entry exactly once, whatever happened to earlier attempts."""
    for attempt in range(3):
        existing = (
            UsageRecord.objects.filter(request_id=entry.request_id)
            .values_list("pk", flat=True)
            .first()
        )
        if existing is not None:
            # An earlier write committed (its acknowledgement was lost).
            return Written(existing, entry.request_id, None)
        try:
            return write_usage([entry])[0]
        except IntegrityError:
            if attempt or not _drop_missing_references(entry):
                raise
        except (OperationalError, InterfaceError):
            if attempt == 2:
                raise
            connection.close()
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _write_batch(entries: Sequence[UsageEntry]) -> list[Written | BaseException]:
    """The group commit's write: one transaction, or one per entry on failure."""
    try:
        return list(write_usage(entries))
    except Exception as exc:
        if isinstance(exc, OperationalError | InterfaceError):
            connection.close()
        logger.info(
            "Batch of %d usage entries retried one by one: %s", len(entries), exc
        )
    results: list[Written | BaseException] = []
    for entry in entries:
        try:
            results.append(record_usage(entry))
        except Exception as exc:
            logger.exception("Usage record %s could not be written", entry.request_id)
            results.append(exc)
    return results


_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _writer_thread() -> ThreadPoolExecutor:
    # One thread, one database connection held between batches: reconnecting
    # per batch would cost more than the batch.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="usage-writer")
        return _executor


def write_delay() -> float:
    """Seconds the writer gathers entries before one transaction writes them all."""
    return max(0.0, float(getattr(settings, "USAGE_WRITE_DELAY_MS", 50)) / 1000)


class _GroupCommit:
    """Per event loop: entries gather for a moment, then one transaction each time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: list[tuple[UsageEntry, asyncio.Future[Written]]] = []
        self.task: asyncio.Task[None] | None = None
        # Set when someone waits for the records: write without gathering.
        self.hurry = asyncio.Event()

    def submit(self, entry: UsageEntry) -> asyncio.Future[Written]:
        future: asyncio.Future[Written] = self.loop.create_future()
        self.queue.append((entry, future))
        if self.task is None:
            # A fresh context: the writer must not inherit a request's
            # thread-sensitive executor, which dies with the request.
            self.task = self.loop.create_task(
                self._run(), context=contextvars.Context()
            )
        return future

    async def _run(self) -> None:
        try:
            while self.queue:
                delay = write_delay()
                if delay and len(self.queue) < MAX_BATCH and not self.hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.hurry.wait(), delay)
                batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
                job = _writer_thread().submit(_write_batch, [e for e, _ in batch])
                try:
                    results = await asyncio.wrap_future(job)
                except asyncio.CancelledError:
                    _resolve(batch, job.result())
                    raise
                _resolve(batch, results)
        except asyncio.CancelledError:
            # The loop is shutting down: write the rest on the writer thread.
            self.drain_blocking()
            raise
        finally:
            self.task = None
            self.hurry.clear()

    def drain_blocking(self) -> None:
        """Write what is queued without the loop (shutdown, or its loop closed)."""
        rest, self.queue = self.queue, []
        if rest:
            _resolve(rest, _on_writer_thread(_write_batch, [e for e, _ in rest]))


def _resolve(
    batch: Sequence[tuple[UsageEntry, asyncio.Future[Written]]],
    results: Sequence[Written | BaseException],
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done() or future.get_loop().is_closed():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


_group_commits: dict[asyncio.AbstractEventLoop, _GroupCommit] = {}


def submit_usage(entry: UsageEntry) -> asyncio.Future[Written]:
    """Queue an entry for this loop's group commit; await the future for its record.

    The write happens whether or not the future is awaited or the awaiting
    task is cancelled, so callers await it under `asyncio.shield`.
    """
    loop = asyncio.get_running_loop()
    writer = _group_commits.get(loop)
    if writer is None:
        for old in [lp for lp in _group_commits if lp.is_closed()]:
            _group_commits.pop(old).drain_blocking()
        writer = _group_commits[loop] = _GroupCommit(loop)
    future = writer.submit(entry)
    # Nobody need await it: a failure is logged by the writer, not by asyncio.
    future.add_done_callback(_retrieved)
    return future


def _retrieved(future: asyncio.Future[Written]) -> None:
    if not future.cancelled():
        future.exception()


async def arecord_usage(entry: UsageEntry) -> Written:
    """Write one entry through the group commit, now, and wait for it."""
    future = submit_usage(entry)
    hurry()
    return await asyncio.shield(future)


def pending() -> bool:
    """Whether entries of this event loop are still to be written."""
    writer = _group_commits.get(asyncio.get_running_loop())
    return writer is not None and writer.task is not None


def hurry() -> None:
    """Write what is queued on this event loop now, without gathering more."""
    writer = _group_commits.get(asyncio.get_running_loop())
    if writer is not None and writer.task is not None:
        writer.hurry.set()


async def flush() -> None:
    """Write what is queued on this event loop now, and wait until it is."""
    writer = _group_commits.get(asyncio.get_running_loop())
    while writer is not None and writer.task is not None:
        writer.hurry.set()
        await asyncio.shield(writer.task)


def _on_writer_thread(function: Any, *args: Any) -> Any:
    try:
        job = _writer_thread().submit(function, *args)
    except RuntimeError:
        # At interpreter exit the pool takes no more work; nothing else runs.
        return function(*args)
    return job.result()


def close_writer() -> None:
    """Write anything still queued and close the writer's database connection."""
    for writer in list(_group_commits.values()):
        writer.drain_blocking()
    with _executor_lock:
        executor = _executor
    if executor is not None:
        # A function, so that `connection` is the writer thread's own.
        _on_writer_thread(lambda: connection.close())


atexit.register(close_writer)


# --- Reading ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetState:
    """One budget as a user or program sees it."""

    budget_id: int
    scope: str
    holder: str
    period: str
    token_limit: int | None
    used: int
    reserved: int
    resets_at: datetime

    @property
    def remaining(self) -> int | None:
        if self.token_limit is None:
            return None
        return max(0, self.token_limit - self.used - self.reserved)

    @property
    def percent_used(self) -> float | None:
        if not self.token_limit:
            return None
        return round(100 * self.used / self.token_limit, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the chat UI and the API."""
        return {
            "scope": self.scope,
            "holder": self.holder,
            "period": self.period,
            "limit": self.token_limit,
            "used": self.used,
            "reserved": self.reserved,
            "remaining": self.remaining,
            "percent_used": self.percent_used,
            "resets_at": self.resets_at.isoformat(),
        }


def budget_status(
    user_id: int | None, api_key_id: int | None = None, now: datetime | None = None
) -> list[BudgetState]:
    """The budgets that apply to a user (and API key) in their current periods."""
    now = now or timezone.now()
    refs = caller_budgets(user_id, api_key_id)
    if not refs:
        return []
    bounds = {ref.id: period_bounds(ref.period, now) for ref in refs}
    match = Q(pk__in=[])
    for ref in refs:
        match |= Q(budget_id=ref.id, period_start=bounds[ref.id][0])
    counters = {
        budget_id: (used, reserved)
        for budget_id, used, reserved in BudgetCounter.objects.filter(
            match
        ).values_list("budget_id", "used_tokens", "reserved_tokens")
    }
    return [
        BudgetState(
            ref.id,
            ref.scope,
            ref.holder,
            ref.period,
            ref.token_limit,
            *counters.get(ref.id, (0, 0)),
            resets_at=bounds[ref.id][1],
        )
        for ref in refs
    ]


def tokens_used_today(
    user_id: int | None = None,
    api_key_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Tokens a user (or one API key) used since midnight UTC, from the rollups."""
    start, _ = period_bounds(BudgetPeriod.DAILY, now or timezone.now())
    rows = UsageRollup.objects.filter(bucket__gte=start)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    elif user_id is not None:
        rows = rows.filter(user_id=user_id)
    totals = rows.aggregate(
        tokens=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0)
    )
    return int(totals["tokens"])


abudget_status = sync_to_async(budget_status)
atokens_used_today = sync_to_async(tokens_used_today)


# --- Rebuild and retention ----------------------------------------------------


class _Micros(Func):
    """An integer count of millionths, computed exactly as `micros()` does.

    Milliseconds (floats) become microseconds truncated, the same IEEE
    multiplication in Python, SQLite and PostgreSQL. Costs have six decimals:
    rounding their product only undoes SQLite's binary floating point.
    """

    output_field = IntegerField()

    def __init__(self, expression: Any, *, scale: int, rounded: bool) -> None:
        super().__init__(expression)
        self.scale = scale
        self.rounded = rounded

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        sql, params = compiler.compile(self.source_expressions[0])
        product = f"({sql}) * {self.scale}"
        if self.rounded:
            product = f"ROUND({product})"
        elif connection.vendor == "postgresql":
            product = f"TRUNC({product})"
        # SQLite's CAST truncates; PostgreSQL's would round half to even.
        return f"CAST({product} AS BIGINT)", params


def _rebuilt_rows(since: datetime, until: datetime) -> list[UsageRollup]:
    aggregated = (
        UsageRecord.objects.filter(created_at__gte=since, created_at__lt=until)
        .order_by()
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .values(
            "hour",
            "user_id",
            "api_key_id",
            "model_name",
            "endpoint_id",
            "endpoint_name",
        )
        .annotate(
            n_requests=Count("pk"),
            n_errors=Count("pk", filter=Q(status=UsageStatus.ERROR)),
            n_cancelled=Count("pk", filter=Q(status=UsageStatus.CANCELLED)),
            n_rejected=Count("pk", filter=Q(status=UsageStatus.REJECTED)),
            n_cached=Count("pk", filter=Q(status=UsageStatus.CACHED)),
            n_estimated=Count("pk", filter=Q(tokens_estimated=True)),
            s_prompt=Coalesce(Sum("prompt_tokens"), 0),
            s_completion=Coalesce(Sum("completion_tokens"), 0),
            s_cost=Coalesce(Sum(_Micros(F("cost"), scale=1_000_000, rounded=True)), 0),
            s_latency=Coalesce(
                Sum(_Micros(F("latency_ms"), scale=1000, rounded=False)), 0
            ),
            n_latency=Count("latency_ms"),
            s_ttft=Coalesce(Sum(_Micros(F("ttft_ms"), scale=1000, rounded=False)), 0),
            n_ttft=Count("ttft_ms"),
        )
    )
    rows = []
    for row in aggregated:
        rows.append(
            UsageRollup(
                bucket=row["hour"],
                dimensions=dimensions_hash(
                    row["user_id"],
                    row["api_key_id"],
                    row["model_name"],
                    row["endpoint_id"],
                    row["endpoint_name"],
                ),
                user_id=row["user_id"],
                api_key_id=row["api_key_id"],
                model_name=row["model_name"],
                endpoint_id=row["endpoint_id"],
                endpoint_name=row["endpoint_name"],
                requests=row["n_requests"],
                errors=row["n_errors"],
                cancelled=row["n_cancelled"],
                rejected=row["n_rejected"],
                cached=row["n_cached"],
                estimated=row["n_estimated"],
                prompt_tokens=row["s_prompt"],
                completion_tokens=row["s_completion"],
                cost_micros=row["s_cost"],
                latency_us_sum=row["s_latency"],
                latency_count=row["n_latency"],
                ttft_us_sum=row["s_ttft"],
                ttft_count=row["n_ttft"],
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What a rebuild covered and changed."""

    since: datetime | None
    until: datetime
    deleted: int
    created: int


def rebuild_rollups(since: datetime, until: datetime) -> Rebuilt:
    """Recompute the rollups of [since, until) from raw records, whole hours.

    The range starts no earlier than the oldest raw record's hour: earlier
    hours were pruned, and their rollups are all that is left of them.
    """
    since = hour_of(since)
    if until != hour_of(until):
        until = hour_of(until) + timedelta(hours=1)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Live writers wait until the rebuilt rows are in, so no record is
            # counted by both or by neither. (SQLite's write lock does this.)
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {_q(_ROLLUP)} IN SHARE ROW EXCLUSIVE MODE")
        oldest = (
            UsageRecord.objects.order_by("created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        if oldest is None:
            return Rebuilt(None, until, 0, 0)
        since = max(since, hour_of(oldest))
        if since >= until:
            return Rebuilt(since, until, 0, 0)
        deleted, _ = UsageRollup.objects.filter(
            bucket__gte=since, bucket__lt=until
        ).delete()
        rows = _rebuilt_rows(since, until)
        UsageRollup.objects.bulk_create(rows, batch_size=1000)
    return Rebuilt(since, until, deleted, len(rows))


def prune_cutoff(older_than_days: int, now: datetime | None = None) -> datetime:
    """Midnight UTC `older_than_days` days ago: pruning stops at whole hours."""
    today, _ = period_bounds(BudgetPeriod.DAILY, now or timezone.now())
    return today - timedelta(days=older_than_days)


def prune_usage(
    older_than_days: int, *, batch_size: int = 5000, now: datetime | None = None
) -> int:
    """Delete raw records before `prune_cutoff`, in batches; rollups stay."""
    cutoff = prune_cutoff(older_than_days, now)
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(
                UsageRecord.objects.filter(created_at__lt=cutoff)
                .order_by("created_at")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return deleted
            # delete(), not a raw DELETE: chat messages pointing at these
            # records have their link cleared.
            UsageRecord.objects.filter(pk__in=ids).delete()
        deleted += len(ids)


def parse_day_or_time(value: str) -> datetime:
    """A management command argument: 2026-05-01 or 2026-05-01T13:00[+00:00]."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a date (YYYY-MM-DD) or time (YYYY-MM-DDTHH:MM)"
        ) from None
    if isinstance(parsed, date) and not isinstance(parsed, datetime):
        parsed = datetime.combine(parsed, datetime.min.time())
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=UTC)
    return parsed
