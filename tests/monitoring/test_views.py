"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from channels.layers import channel_layers

from gateway.models import Budget, BudgetCounter, Endpoint, UsageRollup

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.monitoring.urls")]

TOKEN = "metrics-token-0123456789abcdef0123"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def test_healthz_answers_without_touching_the_database(
    client, django_assert_num_queries
):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.content == b"ok\n"


def test_readyz_reports_each_dependency(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "cache": "ok", "channel_layer": "ok"},
    }


def test_readyz_is_503_when_the_cache_keeps_nothing(client, settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}
    }

    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["cache"] == "error: RuntimeError"
    assert body["checks"]["database"] == "ok"


def test_readyz_is_503_when_the_channel_layer_is_unreachable(client, settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]},
        }
    }
    channel_layers.backends.clear()
    try:
        response = client.get("/readyz")
    finally:
        channel_layers.backends.clear()

    assert response.status_code == 503
    assert response.json()["checks"]["channel_layer"] != "ok"


def test_metrics_need_a_token_or_a_staff_login(client, owner, settings):
    settings.METRICS_TOKEN = TOKEN

    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"] == 'Bearer realm="metrics"'
    client.force_login(owner)
    assert client.get("/metrics").status_code == 401


def test_metrics_for_a_staff_login_without_a_token(client, staff, settings):
    settings.METRICS_TOKEN = ""
    client.force_login(staff)
    assert client.get("/metrics").status_code == 200


def samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_expose_usage_endpoints_and_budgets(client, owner, settings):
    settings.METRICS_TOKEN = TOKEN
    Endpoint.objects.create(
        name='odd "name"',
        base_url="http://127.0.0.1:9/v1",
        status="slow",
        last_latency_ms=812.0,
        consecutive_failures=2,
        disabled_until=NOW + timedelta(seconds=30),
    )
    for hour, requests in ((1, 10), (2, 5)):
        UsageRollup.objects.create(
            bucket=NOW - timedelta(hours=hour),
            dimensions=f"d{hour}",
            model_name="sim-small",
            endpoint_name="primary",
            requests=requests,
            errors=1,
            prompt_tokens=100,
            completion_tokens=40,
            latency_us_sum=2_500_000,
            latency_count=requests,
        )
    budget = Budget.objects.create(
        name="alice", scope="user", user=owner, period="daily", token_limit=1000
    )
    BudgetCounter.objects.create(
        budget=budget,
        period_start=NOW.replace(hour=0),
        used_tokens=700,
        reserved_tokens=50,
    )

    with time_machine.travel(NOW, tick=False):
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.content.decode()
    values = samples(text)
    usage = 'model="sim-small",endpoint="primary"'
    assert values[f"llmsite_requests_total{{{usage}}}"] == 15
    assert values[f"llmsite_request_errors_total{{{usage}}}"] == 2
    assert values[f'llmsite_tokens_total{{kind="prompt",{usage}}}'] == 200
    assert values[f"llmsite_request_duration_seconds_sum{{{usage}}}"] == 5.0
    assert values[f"llmsite_request_duration_seconds_count{{{usage}}}"] == 15
    name = 'endpoint="odd \\"name\\""'
    assert values[f'llmsite_endpoint_status{{{name},status="slow"}}'] == 1
    assert values[f'llmsite_endpoint_status{{{name},status="connected"}}'] == 0
    assert values[f"llmsite_endpoint_up{{{name}}}"] == 1
    assert values[f"llmsite_endpoint_probe_latency_seconds{{{name}}}"] == 0.812
    assert values[f"llmsite_endpoint_disabled{{{name}}}"] == 1
    labels = f'budget="{budget.pk}",name="alice",scope="user",period="daily"'
    assert values[f"llmsite_budget_remaining_tokens{{{labels}}}"] == 250
    assert values["llmsite_monitor_active"] == 0
    assert re.search(r"^# TYPE llmsite_requests_total counter$", text, re.M)
    assert re.search(r"^# TYPE llmsite_request_duration_seconds summary$", text, re.M)
