"""One user's usage: today and this month, by model, budgets and rate limits.

The data behind /usage/. It reads the hourly rollup through the dashboards'
own query functions (filtered to the user), so a user's page costs a few
indexed queries whatever the size of the usage table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.utils import timezone

from gateway import accounting, limits
from gateway.accounting.budgets import format_reset, period_bounds
from gateway.models import Budget, BudgetPeriod, BudgetScope
from monitoring import dashboard

# The REST API's export of usage records; the page only links to it.
EXPORT_PATH = "/api/usage/records/"
# A user with more API keys than this sees the budgets of the first ones.
MAX_KEY_BUDGETS = 20
# Model names come from callers (a rejected request names any model it
# likes): past this many rows, the quietest are summed into one.
MAX_MODEL_ROWS = 30


@dataclass(frozen=True)
class Periods:
    """Today and this month (UTC calendar), up to now."""

    today: dashboard.DateRange
    month: dashboard.DateRange

    @classmethod
    def at(cls, now: datetime) -> Periods:
        day, _ = period_bounds(BudgetPeriod.DAILY, now)
        month, _ = period_bounds(BudgetPeriod.MONTHLY, now)
        return cls(
            dashboard.DateRange(day, now, "today"),
            dashboard.DateRange(month, now, "month"),
        )


def budget_rows(user_id: int, now: datetime, *, own: bool = True) -> list[dict]:
    """Every budget that applies to the user: global, theirs, their keys'.

    Each with used, reserved, left and its reset time. `own` words the labels
    for the user themselves ("Your account") or for staff ("This account").
    """
    states = [(state, "") for state in accounting.budget_status(user_id, now=now)]
    keys = (
        Budget.objects.filter(
            scope=BudgetScope.API_KEY, enabled=True, api_key__user_id=user_id
        )
        .values_list("api_key_id", "api_key__name")
        .order_by("api_key_id")
        .distinct()[:MAX_KEY_BUDGETS]
    )
    for key_id, key_name in keys:
        states += [
            (state, key_name)
            for state in accounting.budget_status(user_id, key_id, now=now)
            if state.scope == BudgetScope.API_KEY
        ]
    order = {BudgetScope.USER: 0, BudgetScope.API_KEY: 1, BudgetScope.GLOBAL: 2}
    states.sort(key=lambda pair: (order.get(pair[0].scope, 3), pair[1]))
    return [
        {
            "label": _budget_label(state.scope, key_name, own),
            # "Daily", without the label's "(resets at ...)": a column says it.
            "period": BudgetPeriod(state.period).label.split(" (")[0],
            "limit": state.token_limit,
            "used": state.used,
            "reserved": state.reserved,
            "remaining": state.remaining,
            "percent": state.percent_used,
            "resets_at": state.resets_at,
            "resets": format_reset(state.resets_at, now),
        }
        for state, key_name in states
    ]


def _budget_label(scope: str, key_name: str, own: bool) -> str:
    if scope == BudgetScope.USER:
        return "Your account" if own else "This account"
    if scope == BudgetScope.API_KEY:
        return f"API key “{key_name}”"
    return "Everyone (shared)"


def rate_limits(user_id: int) -> list[dict[str, Any]]:
    """What is left this minute of the account's requests and tokens limits."""
    return [
        {
            "unit": state.kind,
            "limit": state.limit,
            "remaining": state.remaining,
            "reset_seconds": math.ceil(state.resets_in),
        }
        for state in limits.caller_limit_states(user_id, None)
    ]


def export_url(periods: Periods, user_id: int | None = None) -> str:
    """The API's CSV of the user's records this month (staff name the user)."""
    query = {
        "format": "csv",
        "since": periods.month.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if user_id is not None:
        query["user"] = str(user_id)
    return f"{EXPORT_PATH}?{urlencode(query)}"


def user_usage(
    user_id: int, now: datetime | None = None, *, own: bool = True
) -> dict[str, Any]:
    """Everything the usage page shows about one user."""
    now = now or timezone.now()
    periods = Periods.at(now)
    by_model = dashboard.usage_by(
        {"today": periods.today, "month": periods.month}, "model", user_id
    )
    tokens = dashboard.tokens_per_day(periods.month, "model", user_id)
    requests = dashboard.requests_per_hour(periods.today, user_id)
    return {
        "now": now,
        "periods": periods,
        "totals": by_model["totals"],
        "models": _fold(by_model["rows"], MAX_MODEL_ROWS),
        "chart": {"tokens": {"model": tokens}, "requests": requests},
        "token_days": _day_rows(tokens),
        "request_hours": list(
            zip(
                requests["labels"],
                requests["requests"],
                requests["errors"],
                strict=True,
            )
        ),
        "budgets": budget_rows(user_id, now, own=own),
        "limits": rate_limits(user_id),
        "export_url": export_url(periods, None if own else user_id),
    }


def _fold(rows: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The first `keep` - 1 rows, then the rest summed as "(n other models)"."""
    if len(rows) <= keep:
        return rows
    rest = rows[keep - 1 :]
    other: dict[str, Any] = {"key": f"({len(rest)} other models)"}
    for period in ("today", "month"):
        other[period] = {
            field: sum(row[period][field] for row in rest) for field in rest[0][period]
        }
    return [*rows[: keep - 1], other]


def _day_rows(tokens: dict[str, Any]) -> list[tuple[str, list[int], int]]:
    """The tokens chart as table rows: day, tokens per series, total."""
    names = list(tokens["series"])
    rows = []
    for i, label in enumerate(tokens["labels"]):
        values = [tokens["series"][name][i] for name in names]
        rows.append((label, values, sum(values)))
    return rows
