"""The data behind the admin dashboards: a fixed, small number of queries each.

Probe charts aggregate ProbeResult through its indexes; usage charts read
`gateway.models.UsageRollup` (hourly buckets), never the raw UsageRecord table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import (
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.functions import Cast, Trunc, TruncDay
from django.utils import timezone

from gateway.breaker import BreakerState
from gateway.breaker import state as breaker_state
from gateway.models import (
    BudgetCounter,
    BudgetPeriod,
    Endpoint,
    EndpointStatus,
    UsageRollup,
)
from monitoring.models import UP_STATUSES, ProbeResult, ProbeRollup

UPTIME_WINDOWS = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
MAX_RANGE = timedelta(days=366)
# Lines and stacks beyond this many are summed into "other".
TOP_SERIES = 8


# --- Date ranges ------------------------------------------------------------------


@dataclass(frozen=True)
class DateRange:
    """A time range picked on a dashboard, in UTC."""

    start: datetime
    end: datetime
    label: str

    @property
    def span(self) -> timedelta:
        return self.end - self.start

    def as_query(self) -> dict[str, str]:
        """The range as form values for links."""
        return {
            "start": self.start.date().isoformat(),
            "end": (self.end - timedelta(microseconds=1)).date().isoformat(),
        }


PRESETS = UPTIME_WINDOWS


def parse_range(
    params: Mapping[str, str], now: datetime | None = None, default: str = "24h"
) -> DateRange:
    """The range from ?range=24h|7d|30d or ?start=&end= (whole UTC days)."""
    now = now or timezone.now()
    preset = params.get("range", "")
    if preset in PRESETS:
        return DateRange(now - PRESETS[preset], now, preset)
    start, end = _date(params.get("start")), _date(params.get("end"))
    if start is None and end is None:
        return DateRange(now - PRESETS[default], now, default)
    end = end or now.date()
    start = start or end - timedelta(days=6)
    if start > end:
        start, end = end, start
    lower = datetime.combine(start, time.min, tzinfo=now.tzinfo)
    upper = datetime.combine(end + timedelta(days=1), time.min, tzinfo=now.tzinfo)
    lower = max(lower, upper - MAX_RANGE)
    return DateRange(lower, upper, "custom")


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def bucket_kind(span: timedelta) -> str:
    """How finely to bucket probes over a span: minutes, hours or days."""
    if span <= timedelta(days=1):
        return "minute"
    if span <= timedelta(days=14):
        return "hour"
    return "day"


def _label(moment: datetime, kind: str) -> str:
    if kind == "day":
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%m-%d %H:%M")


# --- Endpoint status ----------------------------------------------------------------


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def uptime(
    endpoint_ids: Iterable[int], now: datetime | None = None
) -> dict[int, dict[str, float | None]]:
    """Uptime % over 24 h, 7 d and 30 d per endpoint, in one query.

    Read from the hourly ProbeRollup (at most 720 rows per endpoint), so a
    window starts at the top of its first hour.
    """
    now = now or timezone.now()
    ids = list(endpoint_ids)
    if not ids:
        return {}
    aggregates: dict[str, Any] = {}
    for name, window in UPTIME_WINDOWS.items():
        since = Q(hour__gte=_hour(now - window))
        aggregates[f"n_{name}"] = Sum("probes", filter=since)
        aggregates[f"up_{name}"] = Sum("up", filter=since)
    rows = (
        ProbeRollup.objects.filter(
            endpoint_id__in=ids, hour__gte=_hour(now - max(UPTIME_WINDOWS.values()))
        )
        .values("endpoint_id")
        .annotate(**aggregates)
        .order_by()
    )
    result: dict[int, dict[str, float | None]] = {
        pk: dict.fromkeys(UPTIME_WINDOWS) for pk in ids
    }
    for row in rows:
        result[row["endpoint_id"]] = {
            name: (
                round(100 * row[f"up_{name}"] / row[f"n_{name}"], 2)
                if row[f"n_{name}"]
                else None
            )
            for name in UPTIME_WINDOWS
        }
    return result


def probe_series(endpoint_ids: Iterable[int], span: DateRange) -> dict[str, Any]:
    """Latency per endpoint and probe outcomes over time, in one query.

    Up to a day, per minute from the probes themselves (few rows for a few
    endpoints); longer ranges per hour or day from the hourly rollup.
    """
    ids = list(endpoint_ids)
    kind = bucket_kind(span.span)
    rows = []
    if ids and kind == "minute":
        up = Q(status__in=UP_STATUSES)
        rows = list(
            ProbeResult.objects.filter(
                endpoint_id__in=ids, checked_at__gte=span.start, checked_at__lt=span.end
            )
            .annotate(at=Trunc("checked_at", kind))
            .values("endpoint_id", "at")
            .annotate(
                latency_sum=Sum("latency_ms", filter=up),
                latency_count=Count("latency_ms", filter=up),
                connected=Count("id", filter=Q(status=EndpointStatus.CONNECTED)),
                slow=Count("id", filter=Q(status=EndpointStatus.SLOW)),
                disconnected=Count("id", filter=Q(status=EndpointStatus.DISCONNECTED)),
            )
            .order_by("at")
        )
    elif ids:
        rows = list(
            ProbeRollup.objects.filter(
                endpoint_id__in=ids, hour__gte=_hour(span.start), hour__lt=span.end
            )
            .annotate(at=Trunc("hour", kind))
            .values("endpoint_id", "at")
            .annotate(
                latency_sum=Sum("latency_sum_ms"),
                latency_count=Sum("latency_count"),
                connected=Sum("up") - Sum("slow"),
                slow=Sum("slow"),
                disconnected=Sum("probes") - Sum("up"),
            )
            .order_by("at")
        )
    moments = sorted({row["at"] for row in rows})
    index = {moment: i for i, moment in enumerate(moments)}
    latency: dict[int, list[float | None]] = {pk: [None] * len(moments) for pk in ids}
    outcomes = {
        status: [0] * len(moments)
        for status in (
            EndpointStatus.CONNECTED,
            EndpointStatus.SLOW,
            EndpointStatus.DISCONNECTED,
        )
    }
    for row in rows:
        i = index[row["at"]]
        if row["latency_count"]:
            mean = row["latency_sum"] / row["latency_count"]
            latency[row["endpoint_id"]][i] = round(mean, 1)
        for status, counts in outcomes.items():
            counts[i] += row[status] or 0
    return {
        "bucket": kind,
        "labels": [_label(moment, kind) for moment in moments],
        "latency": latency,
        "outcomes": outcomes,
    }


# --- Usage ------------------------------------------------------------------------


def _rollups(span: DateRange, user_id: int | None) -> QuerySet[UsageRollup]:
    """The hourly usage rows of a range, of one user when given.

    With a user, (user, bucket) is the index read; without, the unique
    (bucket, dimensions) one.
    """
    rows = UsageRollup.objects.filter(bucket__gte=span.start, bucket__lt=span.end)
    if user_id is not None:
        rows = rows.filter(user_id=user_id)
    return rows


def requests_per_hour(span: DateRange, user_id: int | None = None) -> dict[str, Any]:
    """Requests and errors per hour (per day over two weeks), from the rollup."""
    kind = "hour" if span.span <= timedelta(days=14) else "day"
    rows = (
        _rollups(span, user_id)
        .annotate(at=Trunc("bucket", kind))
        .values("at")
        .annotate(requests=Sum("requests"), errors=Sum("errors"))
        .order_by("at")
    )
    by_moment = {row["at"]: row for row in rows}
    # Every hour of the range gets a bar, so quiet hours show as quiet.
    moments = _steps(span, kind) if by_moment else []
    return {
        "bucket": kind,
        "labels": [_label(moment, kind) for moment in moments],
        "requests": [by_moment.get(m, {}).get("requests") or 0 for m in moments],
        "errors": [by_moment.get(m, {}).get("errors") or 0 for m in moments],
    }


def _steps(span: DateRange, kind: str) -> list[datetime]:
    """Every hour or day that starts in the range, from its first one."""
    step = timedelta(hours=1) if kind == "hour" else timedelta(days=1)
    moment = span.start.replace(minute=0, second=0, microsecond=0)
    if kind == "day":
        moment = moment.replace(hour=0)
    moments = []
    while moment < span.end:
        moments.append(moment)
        moment += step
    return moments


TOKEN_DIMENSIONS = {
    "model": "model_name",
    "endpoint": "endpoint_name",
    # Grouped by id and named afterwards: grouping by the joined username
    # sorts every rollup row of the range (a 30-day dashboard at 10M records
    # spilled to disk for a second).
    "user": "user_id",
}


def tokens_per_day(
    span: DateRange, by: str, user_id: int | None = None
) -> dict[str, Any]:
    """Tokens per day split by model, endpoint or user: the top few and "other"."""
    column = TOKEN_DIMENSIONS[by]
    rows = list(
        _rollups(span, user_id)
        .annotate(day=TruncDay("bucket"), key=F(column))
        .values("day", "key")
        .annotate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by("day")
    )
    labels = _dimension_labels({row["key"] for row in rows}, by)
    totals: dict[str, int] = defaultdict(int)
    for row in rows:
        totals[labels[row["key"]]] += row["tokens"] or 0
    top = [k for k, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_SERIES]]
    days = _steps(span, "day") if rows else []
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, list[int]] = {key: [0] * len(days) for key in top}
    for row in rows:
        key = labels[row["key"]]
        if key not in series:
            key = "other"
            series.setdefault(key, [0] * len(days))
        series[key][index[row["day"]]] += row["tokens"] or 0
    return {"labels": [_label(day, "day") for day in days], "series": series}


def _dimension_label(value: Any, by: str) -> str:
    if value in (None, ""):
        return {"user": "(API only / deleted)", "endpoint": "(none)"}.get(by, "(none)")
    return str(value)


def _dimension_labels(keys: set[Any], by: str) -> dict[Any, str]:
    """What a chart calls each grouped value; user ids become names, in one query."""
    if by != "user":
        return {key: _dimension_label(key, by) for key in keys}
    names = dict(
        get_user_model()
        .objects.filter(pk__in=[key for key in keys if key is not None])
        .values_list("pk", "username")
    )
    return {key: _dimension_label(names.get(key), by) for key in keys}


def period_start(period: str, now: datetime) -> datetime:
    """The start of the budget period containing `now` (UTC calendar)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.WEEKLY:
        return midnight - timedelta(days=midnight.weekday())
    if period == BudgetPeriod.MONTHLY:
        return midnight.replace(day=1)
    return midnight


def budget_use(now: datetime | None = None, limit: int = 40) -> list[dict[str, Any]]:
    """Budgets used this period against their limits, fullest first, one query.

    Budgets nobody has used this period have no counter yet and are left out.
    """
    now = now or timezone.now()
    current = Q()
    for period in BudgetPeriod.values:
        current |= Q(budget__period=period, period_start=period_start(period, now))
    counters = (
        BudgetCounter.objects.filter(
            current, budget__enabled=True, budget__token_limit__gt=0
        )
        .select_related("budget", "budget__user", "budget__api_key", "budget__endpoint")
        .annotate(
            ratio=ExpressionWrapper(
                Cast("used_tokens", FloatField()) / F("budget__token_limit"),
                output_field=FloatField(),
            )
        )
        .order_by("-ratio", "budget_id")[:limit]
    )
    return [
        {
            "id": counter.budget_id,
            "label": counter.budget.name or str(counter.budget),
            "period": counter.budget.period,
            "used": counter.used_tokens,
            "reserved": counter.reserved_tokens,
            "limit": counter.budget.token_limit,
            "percent": round(100 * counter.ratio, 1),
            "warning_percent": counter.budget.warning_percent,
        }
        for counter in counters
    ]


def usage_totals(span: DateRange, user_id: int | None = None) -> dict[str, Any]:
    """Totals over the range for the summary line above the charts."""
    totals = _rollups(span, user_id).aggregate(
        requests=Sum("requests"),
        errors=Sum("errors"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
    )
    return {key: value or 0 for key, value in totals.items()}


# --- Overall status ---------------------------------------------------------------

OVERALL_OK = "ok"
OVERALL_DEGRADED = "degraded"
OVERALL_DOWN = "down"


@dataclass(frozen=True)
class EndpointHealth:
    """One enabled endpoint as a status page shows it."""

    endpoint: Endpoint
    circuit: str
    uptime: Mapping[str, float | None]

    @property
    def available(self) -> bool:
        """Whether it can take a request now: circuit not open, not known down."""
        return (
            self.circuit != BreakerState.OPEN
            and self.endpoint.status != EndpointStatus.DISCONNECTED
        )


@dataclass(frozen=True)
class Overview:
    """Every enabled endpoint's health and the deployment's overall status."""

    status: str
    endpoints: list[EndpointHealth]

    @property
    def available(self) -> list[str]:
        return [health.endpoint.name for health in self.endpoints if health.available]


def endpoint_overview(now: datetime | None = None) -> Overview:
    """Health, uptime and circuit of every enabled endpoint, in two queries.

    Overall: "ok" when every enabled endpoint is connected with its circuit
    closed, "down" when none can take a request, "degraded" in between.
    """
    now = now or timezone.now()
    endpoints = list(Endpoint.objects.filter(enabled=True).order_by("priority", "name"))
    windows = uptime([e.pk for e in endpoints], now)
    rows = [
        # The breaker reads only disabled_until, which the row carries.
        EndpointHealth(e, str(breaker_state(e, now)), windows[e.pk])  # type: ignore[arg-type]
        for e in endpoints
    ]
    if rows and all(
        h.endpoint.status == EndpointStatus.CONNECTED
        and h.circuit == BreakerState.CLOSED
        for h in rows
    ):
        overall = OVERALL_OK
    elif any(h.available for h in rows):
        overall = OVERALL_DEGRADED
    else:
        overall = OVERALL_DOWN
    return Overview(overall, rows)


USAGE_FIELDS = {
    "requests": "requests",
    "errors": "errors",
    "prompt": "prompt_tokens",
    "completion": "completion_tokens",
}


def usage_by(
    periods: Mapping[str, DateRange], by: str = "model", user_id: int | None = None
) -> dict[str, Any]:
    """Requests, errors and tokens per model (endpoint, user) over several ranges.

    One query over the union of the ranges, each summed under its own name:
    "today" and "this month" cost one pass over the month's rows. Returns the
    totals per range and the rows, busiest (in the longest range) first.
    """
    names = list(periods)
    if not names:
        return {"totals": {}, "rows": []}
    union = DateRange(
        min(p.start for p in periods.values()),
        max(p.end for p in periods.values()),
        "union",
    )
    aggregates: dict[str, Any] = {}
    for name, span in periods.items():
        within = Q(bucket__gte=span.start, bucket__lt=span.end)
        for key, column in USAGE_FIELDS.items():
            aggregates[f"{name}_{key}"] = Sum(column, filter=within)
    rows = (
        _rollups(union, user_id)
        .annotate(key=F(TOKEN_DIMENSIONS[by]))
        .values("key")
        .annotate(**aggregates)
        .order_by()
    )
    rows = list(rows)
    labels = _dimension_labels({row["key"] for row in rows}, by)
    merged: dict[str, dict[str, dict[str, int]]] = {}
    for row in rows:
        label = labels[row["key"]]
        entry = merged.setdefault(
            label, {name: dict.fromkeys(USAGE_FIELDS, 0) for name in names}
        )
        for name in names:
            for key in USAGE_FIELDS:
                entry[name][key] += row[f"{name}_{key}"] or 0
    for entry in merged.values():
        for counts in entry.values():
            counts["tokens"] = counts["prompt"] + counts["completion"]
    totals = {name: dict.fromkeys([*USAGE_FIELDS, "tokens"], 0) for name in names}
    for entry in merged.values():
        for name, counts in entry.items():
            for key, value in counts.items():
                totals[name][key] += value
    longest = max(names, key=lambda name: periods[name].span)
    ordered = sorted(
        merged.items(),
        key=lambda item: (-item[1][longest]["tokens"], -item[1][longest]["requests"]),
    )
    return {
        "totals": totals,
        "rows": [{"key": key, **counts} for key, counts in ordered],
    }
