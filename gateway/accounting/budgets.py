"""Budgets: which apply, reserving before the call, settling after it, status.

A request reserves its maximum (prompt tokens + max output tokens) on every
budget that applies to it, before anything is sent upstream, with one
conditional UPDATE per budget (`used + reserved + n <= limit`) in a single
transaction: all of them or none. The row lock that UPDATE takes is what makes
concurrent requests queue on PostgreSQL and SQLite alike, so a budget cannot be
overspent however many race. A request may ask for less when the whole does
not fit (`minimum`): it then reserves what is left, down to its prompt and a
few tokens of answer, and the caller lowers its max_tokens to match, so a
budget can be spent to its last tokens. Each try is the same conditional
UPDATE, so the guarantee holds for the smaller amount too. Counters belong to
calendar periods (midnight UTC, Monday, the 1st), so a reset is a new row,
never a write that can race. A budget created mid-period starts at what its
holder used since the period began.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import (
    IntegrityError,
    connection,
    transaction,
)
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from gateway.accounting import storable
from gateway.accounting.owners import owner_id
from gateway.limits import LocalTTLCache
from gateway.models import (
    Budget,
    BudgetCounter,
    BudgetHold,
    BudgetPeriod,
    BudgetScope,
)
from gateway.signals import budget_threshold_crossed

logger = logging.getLogger("gateway.accounting")


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


def read_users_budgets(user_ids: Sequence[int]) -> None:
    """`caller_budgets` of several users (no API key) read in one query, and kept."""
    missing = {u for u in user_ids if _caller_budgets.get((u, None)) is None}
    if not missing:
        return
    rows = (
        Budget.objects.filter(
            Q(scope=BudgetScope.GLOBAL)
            | Q(scope=BudgetScope.USER, user_id__in=missing),
            enabled=True,
        )
        .values_list("user_id", *_REF_FIELDS)
        .order_by("id")
    )
    shared: list[BudgetRef] = []
    own: dict[int, list[BudgetRef]] = defaultdict(list)
    for user_id, *row in rows:
        ref = BudgetRef(*row[:-1], endpoint_name=row[-1] or "")
        if ref.scope == BudgetScope.GLOBAL:
            shared.append(ref)
        else:
            own[user_id].append(ref)
    for user_id in missing:
        # In id order, as caller_budgets reads them.
        refs = sorted([*shared, *own.get(user_id, ())], key=lambda ref: ref.id)
        _caller_budgets.set((user_id, None), tuple(refs))


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


@receiver(post_save, sender=Budget)
def budget_saved(instance: Budget, raw: bool = False, **kwargs: Any) -> None:
    """Bring the current period's counter in line with the budget as saved."""
    if not raw:
        open_period(instance)


def open_period(budget: Budget, now: datetime | None = None) -> None:
    """Count what the budget's scope already used; clear a state it left behind.

    A budget that starts (or starts to apply) mid-period begins at what its
    holder used since the period began, not at zero. A limit raised, or
    removed, above what is used gives the room back at once: the counter's
    exhausted and warned marks go with it, so the next crossing alerts again.
    """
    now = now or timezone.now()
    start, _ = period_bounds(budget.period, now)
    counters = BudgetCounter.objects.filter(budget_id=budget.pk, period_start=start)
    if not counters.exists():
        used = _used_in_scope(budget, start)
        if used:
            BudgetCounter.objects.bulk_create(
                [
                    BudgetCounter(
                        budget_id=budget.pk, period_start=start, used_tokens=used
                    )
                ],
                ignore_conflicts=True,
            )
        return
    limit = budget.token_limit
    if limit is None:
        counters.filter(
            Q(exhausted_at__isnull=False) | Q(warned_at__isnull=False)
        ).update(exhausted_at=None, warned_at=None)
        return
    counters.filter(used_tokens__lt=limit, exhausted_at__isnull=False).update(
        exhausted_at=None
    )
    warning = math.ceil(limit * budget.warning_percent / 100)
    counters.filter(used_tokens__lt=warning, warned_at__isnull=False).update(
        warned_at=None
    )


def _used_in_scope(budget: Budget, start: datetime) -> int:
    # Imported here: rollups builds on this module's periods.
    from gateway.accounting.rollups import tokens_used_since

    if budget.scope == BudgetScope.USER:
        return tokens_used_since(start, user_id=budget.user_id)
    if budget.scope == BudgetScope.API_KEY:
        return tokens_used_since(start, api_key_id=budget.api_key_id)
    if budget.scope == BudgetScope.ENDPOINT:
        return tokens_used_since(start, endpoint_id=budget.endpoint_id)
    return tokens_used_since(start)


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
        at_least: bool = False,
    ) -> None:
        self.budget = budget
        self.needed = needed
        self.remaining = max(0, remaining)
        self.resets_at = resets_at
        self.retry_after = max(0.0, (resets_at - now).total_seconds())
        period = budget.period if budget.period in BudgetPeriod.values else "token"
        # `at_least`: the request would have taken less, down to `needed`.
        needs = "needs at least" if at_least else "needs up to"
        super().__init__(
            f"Budget exhausted: the {period} budget of {budget.token_limit:,} tokens "
            f"for {budget.holder} has {self.remaining:,} left and this request "
            f"{needs} {needed:,}; it resets at {format_reset(resets_at, now)}."
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
    # Set when the holds were recorded as BudgetHold rows for this request.
    request_id: uuid.UUID | None = None

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
        self.request_id = self.request_id or other.request_id
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


_HOLD = BudgetHold._meta.db_table
_HOLD_COLUMNS = (
    "request_id",
    "tokens",
    "owner",
    "created_at",
    "expires_at",
    "user_id",
    "api_key_id",
    "conversation_id",
    "model_name",
    "source",
    "prompt_tokens",
)
# How long past the whole-request cap a hold may live before it is swept:
# the usage writer's delay, a slow commit, a clock a little off.
HOLD_MARGIN_SECONDS = 60


def request_max_seconds() -> float:
    """The whole-request cap: no request still runs this long after reserving."""
    try:
        seconds = float(getattr(settings, "GATEWAY_REQUEST_MAX_SECONDS", 600))
    except (TypeError, ValueError):
        return 600.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 600.0


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """The request a reservation is for, kept on its hold rows for the sweeper."""

    request_id: uuid.UUID
    user_id: int | None = None
    api_key_id: int | None = None
    conversation_id: uuid.UUID | None = None
    model_name: str = ""
    source: str = ""
    prompt_tokens: int = 0

    def hold_values(self, tokens: int, now: datetime) -> list[Any]:
        """The hold row's values in _HOLD_COLUMNS order, adapted for the driver."""
        ops = connection.ops
        uuid_native = connection.features.has_native_uuid_field
        conversation = storable.optional_uuid(self.conversation_id)
        expires = now + timedelta(seconds=request_max_seconds() + HOLD_MARGIN_SECONDS)
        return [
            self.request_id if uuid_native else self.request_id.hex,
            tokens,
            owner_id(),
            ops.adapt_datetimefield_value(now),
            ops.adapt_datetimefield_value(expires),
            storable.optional_id(self.user_id),
            storable.optional_id(self.api_key_id),
            conversation if uuid_native or conversation is None else conversation.hex,
            storable.text(self.model_name, 200),
            storable.text(self.source, 8),
            storable.integer(self.prompt_tokens, storable.INT_MAX),
        ]


def _reserve_on(
    budget: BudgetRef,
    period_start: datetime,
    tokens: int,
    request: HoldRequest | None = None,
    now: datetime | None = None,
) -> Any:
    """Add to one counter's reservation if it fits, with its hold; its row, or None.

    On PostgreSQL the hold is inserted by the same statement (a data-modifying
    WITH), so recording it costs no round trip; elsewhere by a second one in
    the caller's transaction.
    """
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
    values = (
        None if request is None else request.hold_values(tokens, now or timezone.now())
    )
    columns = ", ".join(_q(c) for c in ("counter_id", *_HOLD_COLUMNS))
    if values is not None and connection.vendor == "postgresql":
        placeholders = ", ".join(["%s"] * len(values))
        sql = (
            f"WITH reserved AS ({sql}), held AS (INSERT INTO {_q(_HOLD)} "
            f"({columns}) SELECT id, {placeholders} FROM reserved) "
            "SELECT id, used_tokens, reserved_tokens FROM reserved"
        )
        params += values
        values = None
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is not None and values is not None:
            placeholders = ", ".join(["%s"] * (len(values) + 1))
            cursor.execute(
                f"INSERT INTO {_q(_HOLD)} ({columns}) VALUES ({placeholders})",
                [row[0], *values],
            )
        return row


def drop_holds(request_ids: Sequence[uuid.UUID]) -> None:
    """Delete the hold rows of requests being settled, in the caller's transaction."""
    if request_ids:
        BudgetHold.objects.filter(request_id__in=request_ids).delete()


def _ensure_counter(budget: BudgetRef, period_start: datetime) -> None:
    # ON CONFLICT DO NOTHING: neither fails nor aborts the transaction when
    # another request created the row first.
    BudgetCounter.objects.bulk_create(
        [BudgetCounter(budget_id=budget.id, period_start=period_start)],
        ignore_conflicts=True,
    )


# How many times a request that may shrink looks again at what is left: each
# look follows a refusal that showed less room, and racing requests may take
# that room too; past these it is refused like any request that does not fit.
SHRINK_ATTEMPTS = 4


def reserve(
    budgets: Sequence[BudgetRef],
    tokens: int,
    now: datetime | None = None,
    request: HoldRequest | None = None,
    *,
    minimum: int | None = None,
    shrink: bool = True,
) -> Reservation:
    """Reserve `tokens` on every budget, or on none and raise BudgetExhausted.

    With `minimum`, a request that does not fit whole reserves what every
    budget has left instead, down to `minimum`; `Reservation.tokens` says how
    much it got. `shrink=False` tries the whole only, but a budget is still
    marked exhausted only when not even `minimum` fits. With `request`, each
    hold is also recorded as a BudgetHold row in the same transaction, for
    the sweeper should this process die before settling.
    """
    if not budgets:
        return Reservation(tokens)
    now = now or timezone.now()
    floor = tokens if minimum is None else max(0, min(minimum, tokens))
    amount, attempt = tokens, 1
    while True:
        try:
            return _reserve_all(budgets, amount, now, request)
        except _NoRoom as refusal:
            room = refusal.room
            if shrink and floor <= room < amount and attempt < SHRINK_ATTEMPTS:
                amount, attempt = room, attempt + 1
                continue
            budget, used = refusal.budget, refusal.used
            assert budget.token_limit is not None
            if used + floor > budget.token_limit:
                # Refused on settled usage alone, not on requests still running.
                _mark_exhausted(budget, period_bounds(budget.period, now)[0], now)
            raise BudgetExhausted(
                budget,
                needed=floor,
                remaining=room,
                resets_at=refusal.resets_at,
                now=now,
                at_least=floor < tokens,
            ) from None


class _NoRoom(Exception):
    """One budget could not take the amount; nothing was reserved."""

    def __init__(
        self, budget: BudgetRef, used: int, reserved: int, resets_at: datetime
    ) -> None:
        self.budget = budget
        self.used = used
        self.resets_at = resets_at
        assert budget.token_limit is not None
        self.room = budget.token_limit - used - reserved


def _reserve_all(
    budgets: Sequence[BudgetRef],
    tokens: int,
    now: datetime,
    request: HoldRequest | None,
) -> Reservation:
    """Reserve `tokens` on every budget or on none (then raise _NoRoom)."""
    holds: list[Hold] = []
    refusal: tuple[BudgetRef, int, int, datetime] | None = None
    # One order for everyone, so two requests never wait on each other's rows.
    ordered = sorted(budgets, key=lambda b: b.id)
    # One budget needs no transaction: its conditional UPDATE is atomic on its
    # own (with its hold, on PostgreSQL), which saves the BEGIN and COMMIT
    # round trips there.
    one_statement = request is None or connection.vendor == "postgresql"
    atomic = len(ordered) > 1 or not one_statement
    with transaction.atomic() if atomic else contextlib.nullcontext():
        for budget in ordered:
            start, resets_at = period_bounds(budget.period, now)
            row = _reserve_on(budget, start, tokens, request, now)
            if row is None:
                _ensure_counter(budget, start)
                row = _reserve_on(budget, start, tokens, request, now)
            if row is None:
                used, reserved = BudgetCounter.objects.values_list(
                    "used_tokens", "reserved_tokens"
                ).get(budget_id=budget.id, period_start=start)
                refusal = (budget, used, reserved, resets_at)
                if atomic:
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
        raise _NoRoom(*refusal)
    return Reservation(tokens, holds, request.request_id if request else None)


def _reserve_fresh(
    budgets: Sequence[BudgetRef],
    tokens: int,
    now: datetime | None,
    request: HoldRequest | None,
    minimum: int | None,
    shrink: bool,
) -> Reservation:
    try:
        return reserve(budgets, tokens, now, request, minimum=minimum, shrink=shrink)
    except IntegrityError:
        # A budget deleted since this process cached it.
        forget_budgets()
        raise


async def areserve(
    budgets: Sequence[BudgetRef],
    tokens: int,
    now: datetime | None = None,
    request: HoldRequest | None = None,
    *,
    minimum: int | None = None,
    shrink: bool = True,
) -> Reservation:
    """`reserve` from async code; no thread hop when no budget applies."""
    if not budgets:
        return Reservation(tokens)
    return await sync_to_async(_reserve_fresh)(
        budgets, tokens, now, request, minimum, shrink
    )


def release(reservation: Reservation) -> None:
    """Give back every token a reservation holds, without a usage record."""
    if reservation.holds:
        with transaction.atomic():
            held = reservation.request_id is None or bool(
                BudgetHold.objects.filter(
                    request_id=reservation.request_id,
                    counter_id__in=[hold.counter_id for hold in reservation.holds],
                ).delete()[0]
            )
            if not held:
                return  # The sweeper released it already.
            _settle(settlements_for(reservation, 0, only_release=True), timezone.now())


# --- Settling and threshold events --------------------------------------------


@dataclass(frozen=True, slots=True)
class Settlement:
    """Release `reserved` tokens on a counter and count `used` ones instead."""

    counter_id: int
    budget: BudgetRef
    reserved: int
    used: int
    # Whether the reservation was recorded as BudgetHold rows, to delete.
    held: bool = False


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
        Settlement(
            hold.counter_id,
            hold.budget,
            hold.tokens,
            used_on(hold.budget),
            reservation.request_id is not None,
        )
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
    period_start: datetime | None = None
    warning_percent: int | None = None

    @property
    def remaining(self) -> int | None:
        if self.token_limit is None:
            return None
        return max(0, self.token_limit - self.used - self.reserved)

    @property
    def exhausted(self) -> bool:
        """No room left for another request until the period resets."""
        return self.remaining == 0

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
    return budget_states(caller_budgets(user_id, api_key_id), now)


def budget_states(
    refs: Sequence[BudgetRef], now: datetime | None = None
) -> list[BudgetState]:
    """Each budget's use in its current period, in one query (none if no refs)."""
    now = now or timezone.now()
    if not refs:
        return []
    bounds = {ref.id: period_bounds(ref.period, now) for ref in refs}
    # Two IN lists (at most three period starts) rather than one OR per budget:
    # a page of a thousand budgets is still one short query.
    counters = {
        budget_id: (used, reserved)
        for budget_id, start, used, reserved in BudgetCounter.objects.filter(
            budget_id__in=list(bounds),
            period_start__in={start for start, _ in bounds.values()},
        ).values_list("budget_id", "period_start", "used_tokens", "reserved_tokens")
        if start == bounds[budget_id][0]
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
            period_start=bounds[ref.id][0],
            warning_percent=ref.warning_percent,
        )
        for ref in refs
    ]


def budget_ref(budget: Budget) -> BudgetRef:
    """The snapshot of a loaded Budget (select_related its endpoint)."""
    return BudgetRef(
        budget.pk,
        budget.scope,
        budget.period,
        budget.token_limit,
        budget.warning_percent,
        budget.endpoint_id,
        budget.endpoint.name if budget.endpoint_id else "",
    )


abudget_status = sync_to_async(budget_status)
