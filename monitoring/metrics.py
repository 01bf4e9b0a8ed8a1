"""Prometheus metrics in the text exposition format (version 0.0.4).

Written by hand: a few gauges and counters read from the database do not need
a client library. Usage counters are sums over `UsageRollup`, so every web
process reports the same deployment-wide totals; request latency is a summary
(sum and count), which is what the rollup keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from django.core.cache import cache
from django.db.models import Q, Sum
from django.utils import timezone

from gateway.models import (
    Budget,
    BudgetCounter,
    BudgetPeriod,
    Endpoint,
    EndpointStatus,
    UsageRollup,
)
from monitoring.dashboard import period_start
from monitoring.models import MonitorLease

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Summing the rollup is the costly part; scrapes within this many seconds of
# each other share one result.
USAGE_CACHE_SECONDS = 15
USAGE_CACHE_KEY = "monitoring:metrics:usage"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int | None) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


@dataclass
class Family:
    """One metric family: its help, type and samples."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Mapping[str, object], float | int | None]] = field(
        default_factory=list
    )

    def add(
        self, value: float | int | None, suffix: str = "", **labels: object
    ) -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            label_part = "{" + text + "}" if text else ""
            yield f"{self.name}{suffix}{label_part} {_number(value)}"


def usage_families() -> list[Family]:
    """Requests, errors, tokens, cost and latency by model and endpoint."""
    rows = cache.get(USAGE_CACHE_KEY)
    if rows is None:
        rows = list(
            UsageRollup.objects.values("model_name", "endpoint_name")
            .annotate(
                requests=Sum("requests"),
                errors=Sum("errors"),
                prompt=Sum("prompt_tokens"),
                completion=Sum("completion_tokens"),
                cost_micros=Sum("cost_micros"),
                latency_us=Sum("latency_us_sum"),
                latency_n=Sum("latency_count"),
                ttft_us=Sum("ttft_us_sum"),
                ttft_n=Sum("ttft_count"),
            )
            .order_by("model_name", "endpoint_name")
        )
        cache.set(USAGE_CACHE_KEY, rows, USAGE_CACHE_SECONDS)
    requests = Family("llmsite_requests_total", "counter", "Requests handled.")
    errors = Family("llmsite_request_errors_total", "counter", "Requests that failed.")
    tokens = Family("llmsite_tokens_total", "counter", "Tokens used, by kind.")
    cost = Family("llmsite_cost_total", "counter", "Cost in the price unit.")
    latency = Family(
        "llmsite_request_duration_seconds", "summary", "Time to answer a request."
    )
    ttft = Family(
        "llmsite_time_to_first_token_seconds",
        "summary",
        "Time to the first streamed token.",
    )
    for row in rows:
        labels = {"model": row["model_name"], "endpoint": row["endpoint_name"] or ""}
        requests.add(row["requests"] or 0, **labels)
        errors.add(row["errors"] or 0, **labels)
        tokens.add(row["prompt"] or 0, kind="prompt", **labels)
        tokens.add(row["completion"] or 0, kind="completion", **labels)
        cost.add((row["cost_micros"] or 0) / 1_000_000, **labels)
        latency.add((row["latency_us"] or 0) / 1_000_000, "_sum", **labels)
        latency.add(row["latency_n"] or 0, "_count", **labels)
        ttft.add((row["ttft_us"] or 0) / 1_000_000, "_sum", **labels)
        ttft.add(row["ttft_n"] or 0, "_count", **labels)
    return [requests, errors, tokens, cost, latency, ttft]


def endpoint_families(now: datetime) -> list[Family]:
    """Each endpoint's status, probe latency and breaker state."""
    status = Family(
        "llmsite_endpoint_status",
        "gauge",
        "1 for the endpoint's current status (connected, slow, disconnected, "
        "unknown), 0 for the others.",
    )
    up = Family(
        "llmsite_endpoint_up", "gauge", "1 if the endpoint is connected or slow."
    )
    latency = Family(
        "llmsite_endpoint_probe_latency_seconds",
        "gauge",
        "Latency of the endpoint's last probe.",
    )
    failures = Family(
        "llmsite_endpoint_consecutive_failures",
        "gauge",
        "Failed requests in a row (circuit breaker).",
    )
    disabled = Family(
        "llmsite_endpoint_disabled",
        "gauge",
        "1 while the circuit breaker keeps the endpoint disabled.",
    )
    fields = ("name", "enabled", "status", "last_latency_ms")
    endpoints = Endpoint.objects.only(
        *fields, "consecutive_failures", "disabled_until"
    ).order_by("name")
    for endpoint in endpoints:
        name = endpoint.name
        for value in EndpointStatus.values:
            status.add(int(endpoint.status == value), endpoint=name, status=value)
        up.add(
            int(endpoint.status in {EndpointStatus.CONNECTED, EndpointStatus.SLOW}),
            endpoint=name,
        )
        if endpoint.last_latency_ms is not None:
            latency.add(endpoint.last_latency_ms / 1000, endpoint=name)
        failures.add(endpoint.consecutive_failures, endpoint=name)
        is_disabled = (
            endpoint.disabled_until is not None and endpoint.disabled_until > now
        )
        disabled.add(int(is_disabled), endpoint=name)
    return [status, up, latency, failures, disabled]


def budget_families(now: datetime) -> list[Family]:
    """Tokens used and remaining in the current period of each budget."""
    limit = Family("llmsite_budget_limit_tokens", "gauge", "A budget's token limit.")
    used = Family("llmsite_budget_used_tokens", "gauge", "Tokens used this period.")
    remaining = Family(
        "llmsite_budget_remaining_tokens",
        "gauge",
        "Tokens left this period (reservations of running requests count as used).",
    )
    current = Q()
    for period in BudgetPeriod.values:
        current |= Q(budget__period=period, period_start=period_start(period, now))
    counters = {
        c.budget_id: c
        for c in BudgetCounter.objects.filter(current, budget__enabled=True).only(
            "budget_id", "used_tokens", "reserved_tokens"
        )
    }
    budgets = Budget.objects.filter(enabled=True, token_limit__isnull=False).only(
        "id", "name", "scope", "period", "token_limit"
    )
    for budget in budgets:
        counter = counters.get(budget.pk)
        spent = counter.used_tokens if counter else 0
        held = counter.reserved_tokens if counter else 0
        labels = {
            "budget": budget.pk,
            "name": budget.name,
            "scope": budget.scope,
            "period": budget.period,
        }
        limit.add(budget.token_limit, **labels)
        used.add(spent, **labels)
        remaining.add(max(0, budget.token_limit - spent - held), **labels)
    return [limit, used, remaining]


def monitor_families(now: datetime) -> list[Family]:
    """Whether a monitor holds the lease."""
    active = Family(
        "llmsite_monitor_active", "gauge", "1 while a monitor holds its lease."
    )
    lease = MonitorLease.objects.filter(name="monitor").first()
    active.add(int(bool(lease and lease.holder and lease.expires_at > now)))
    return [active]


def render() -> str:
    """The whole exposition."""
    now = timezone.now()
    families = [
        *usage_families(),
        *endpoint_families(now),
        *budget_families(now),
        *monitor_families(now),
    ]
    lines = [line for family in families for line in family.render()]
    return "\n".join(lines) + "\n"
