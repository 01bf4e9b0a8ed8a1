"""Hourly usage rollups: kept up to date by the writer, rebuilt and pruned on demand."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import (
    connection,
    transaction,
)
from django.db.models import Count, F, Func, IntegerField, Q, Sum
from django.db.models.functions import Coalesce, Trunc, TruncHour
from django.utils import timezone

from gateway.accounting.budgets import _q, period_bounds
from gateway.models import (
    BudgetPeriod,
    UsageRecord,
    UsageRollup,
    UsageStatus,
)

logger = logging.getLogger("gateway.accounting")


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


def tokens_used_today(
    user_id: int | None = None,
    api_key_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Tokens a user (or one API key) used since midnight UTC, from the rollups."""
    start, _ = period_bounds(BudgetPeriod.DAILY, now or timezone.now())
    return tokens_used_since(start, user_id=user_id, api_key_id=api_key_id)


def tokens_used_since(
    start: datetime,
    *,
    user_id: int | None = None,
    api_key_id: int | None = None,
    endpoint_id: int | None = None,
) -> int:
    """Tokens used since `start` (an hour's start), by one key, user or endpoint.

    From the rollups, which the writer keeps in the record's own transaction;
    with no filter, everyone's.
    """
    rows = UsageRollup.objects.filter(bucket__gte=start)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    elif user_id is not None:
        rows = rows.filter(user_id=user_id)
    if endpoint_id is not None:
        rows = rows.filter(endpoint_id=endpoint_id)
    totals = rows.aggregate(
        tokens=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0)
    )
    return int(totals["tokens"])


atokens_used_today = sync_to_async(tokens_used_today)


# --- Reading ------------------------------------------------------------------

# The dimensions usage can be grouped by: their id column and their name column.
ROLLUP_GROUPS: dict[str, tuple[str, str]] = {
    "model": ("model_name", "model_name"),
    "endpoint": ("endpoint_id", "endpoint_name"),
    "user": ("user_id", "user__username"),
    "key": ("api_key_id", "api_key__name"),
}
ROLLUP_BUCKETS = ("hour", "day")


@dataclass(frozen=True, slots=True)
class RollupQuery:
    """Which rollups to sum: a time range, a bucket size, groups and filters."""

    since: datetime
    until: datetime
    bucket: str = "hour"
    group_by: tuple[str, ...] = ()
    user_id: int | None = None
    api_key_id: int | None = None
    model_name: str | None = None
    endpoint: str | None = None
    # Read at most this many rows (None: all).
    limit: int | None = None


# A closed hour's rollups stop changing once its last records are written: the
# group commit takes milliseconds, so one hour of margin is plenty for all but
# a swept request (whose record may land later; a cache holds it back at most
# its own lifetime).
CLOSED_MARGIN = timedelta(hours=1)

_Key = tuple[Any, ...]
_Sums = list[tuple[_Key, tuple[int, ...]]]


def usage_rollups(
    query: RollupQuery, *, cache_seconds: int = 0, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Usage summed per hour or day (UTC) and per group, in one or two queries.

    The range covers whole hours: [hour of since, until). A user filter uses
    the (user, bucket) index, a key filter the (api_key, bucket) one, and no
    filter the (bucket, dimensions) unique index. With `cache_seconds`, the
    sums of closed hours (older than CLOSED_MARGIN) are kept in the cache
    that long and only the recent hours are read: a month of every user's
    rollups is a few million rows to sum, the last hours a few thousand.
    """
    if query.bucket not in ROLLUP_BUCKETS:
        raise ValueError(f"unknown bucket {query.bucket!r}")
    columns: list[str] = []
    for group in query.group_by:
        for column in ROLLUP_GROUPS[group]:
            if column not in columns:
                columns.append(column)
    since = hour_of(query.since)
    boundary = hour_of(now or timezone.now()) - CLOSED_MARGIN
    if cache_seconds > 0 and since < boundary < query.until:
        # Not `until`: the closed part ends at the boundary whatever it is.
        identity = (
            query.bucket,
            query.group_by,
            query.user_id,
            query.api_key_id,
            query.model_name,
            query.endpoint,
            query.limit,
            since,
            boundary,
        )
        digest = hashlib.sha1(repr(identity).encode(), usedforsecurity=False)
        key = f"rollups:{digest.hexdigest()}"
        closed: _Sums | None = cache.get(key)
        if closed is None:
            closed = _sums(query, since, boundary, columns)
            cache.set(key, closed, cache_seconds)
        sums = _merge(closed, _sums(query, boundary, query.until, columns))
    else:
        sums = _sums(query, since, query.until, columns)
    if query.limit is not None:
        sums = sums[: query.limit]
    return [
        _rollup_item(key, counters, query.group_by, columns) for key, counters in sums
    ]


def _sums(
    query: RollupQuery, since: datetime, until: datetime, columns: list[str]
) -> _Sums:
    """The counters of [since, until) summed per bucket and group: one query."""
    rows = UsageRollup.objects.filter(bucket__gte=since, bucket__lt=until)
    if query.user_id is not None:
        rows = rows.filter(user_id=query.user_id)
    if query.api_key_id is not None:
        rows = rows.filter(api_key_id=query.api_key_id)
    if query.model_name is not None:
        rows = rows.filter(model_name=query.model_name)
    if query.endpoint is not None:
        # An endpoint's name, or its id.
        match = Q(endpoint_name=query.endpoint)
        if (
            query.endpoint.isascii()
            and query.endpoint.isdigit()
            and len(query.endpoint) < 19
        ):
            match |= Q(endpoint_id=int(query.endpoint))
        rows = rows.filter(match)
    start = (
        F("bucket") if query.bucket == "hour" else Trunc("bucket", "day", tzinfo=UTC)
    )
    aggregated = (
        rows.annotate(start=start)
        .values("start", *columns)
        .annotate(**{name: Sum(name) for name in _ROLLUP_COUNTERS})
        .order_by()
    )
    if query.limit is not None:
        aggregated = aggregated[: query.limit]
    sums = [
        (
            (row["start"], *(row[c] for c in columns)),
            tuple(int(row[name] or 0) for name in _ROLLUP_COUNTERS),
        )
        for row in aggregated
    ]
    return sorted(sums, key=_order)


def _order(item: tuple[_Key, tuple[int, ...]]) -> tuple:
    # None (a deleted user, no endpoint) last, as PostgreSQL sorts it.
    return tuple((value is None, value) for value in item[0])


def _merge(first: _Sums, second: _Sums) -> _Sums:
    """Two sets of sums added up where their bucket and group meet (a day)."""
    merged = dict(first)
    for key, counters in second:
        known = merged.get(key)
        merged[key] = (
            counters
            if known is None
            else tuple(a + b for a, b in zip(known, counters, strict=True))
        )
    return sorted(merged.items(), key=_order)


def _rollup_item(
    key: _Key, counters: tuple[int, ...], groups: tuple[str, ...], columns: list[str]
) -> dict[str, Any]:
    row = dict(zip(_ROLLUP_COUNTERS, counters, strict=True))
    values = dict(zip(columns, key[1:], strict=True))
    item: dict[str, Any] = {"start": key[0]}
    for group in groups:
        id_column, name_column = ROLLUP_GROUPS[group]
        if id_column != name_column:
            item[f"{group}_id"] = values[id_column]
        # "" for a deleted user or key, or no endpoint (a rejected request).
        item[group] = values[name_column] or ""
    for name in _ROLLUP_COUNTERS[:8]:  # requests ... completion_tokens
        item[name] = row[name]
    item["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
    item["cost"] = Decimal(row["cost_micros"]) / 1_000_000
    item["mean_latency_ms"] = _mean_ms(row["latency_us_sum"], row["latency_count"])
    item["mean_ttft_ms"] = _mean_ms(row["ttft_us_sum"], row["ttft_count"])
    return item


def _mean_ms(total_us: int | None, count: int | None) -> float | None:
    if not count:
        return None
    return round(int(total_us or 0) / int(count) / 1000, 3)


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
