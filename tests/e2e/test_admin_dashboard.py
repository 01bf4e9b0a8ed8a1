"""The admin dashboards in a real Chromium: the charts are drawn, not just served."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page

from gateway.models import Budget, BudgetCounter, Endpoint, EndpointStatus, UsageRollup
from monitoring.models import ProbeResult
from monitoring.probes import refresh_rollups

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# How many pixels of a canvas something was drawn on.
PAINTED_PIXELS = """(id) => {
  const canvas = document.getElementById(id);
  const context = canvas.getContext("2d");
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) painted++;
  return painted;
}"""


@pytest.fixture
def dashboard_data(owner):
    now = timezone.now()
    endpoints = [
        Endpoint.objects.create(
            name=name,
            base_url=f"http://127.0.0.1:9/{name}/v1",
            status=status,
            last_checked_at=now - timedelta(minutes=2),
            last_latency_ms=latency,
        )
        for name, status, latency in [
            ("primary", EndpointStatus.CONNECTED, 48.0),
            ("fallback", EndpointStatus.SLOW, 730.0),
            ("flaky", EndpointStatus.DISCONNECTED, None),
        ]
    ]
    results = []
    for endpoint_index, endpoint in enumerate(endpoints):
        for minutes in range(0, 24 * 60, 30):
            down = endpoint.name == "flaky" and minutes % 120 == 0
            results.append(
                ProbeResult(
                    endpoint=endpoint,
                    checked_at=now - timedelta(minutes=minutes + 1),
                    status="disconnected" if down else "connected",
                    latency_ms=None if down else 40.0 + 25 * endpoint_index,
                    error="timed out" if down else "",
                )
            )
    ProbeResult.objects.bulk_create(results)
    refresh_rollups([e.pk for e in endpoints], now - timedelta(days=2))
    for hours in range(1, 72, 3):
        UsageRollup.objects.create(
            bucket=(now - timedelta(hours=hours)).replace(
                minute=0, second=0, microsecond=0
            ),
            dimensions=f"e2e-{hours}",
            user=owner,
            model_name="sim-small" if hours % 2 else "sim-large",
            endpoint=endpoints[0],
            endpoint_name="primary",
            requests=20 + hours,
            errors=hours % 4,
            prompt_tokens=400 + hours * 10,
            completion_tokens=200,
        )
    budget = Budget.objects.create(
        scope="user", user=owner, period="daily", token_limit=10_000
    )
    # The budget starts at what the rollups say was used today; set it here.
    BudgetCounter.objects.update_or_create(
        budget=budget,
        period_start=now.replace(hour=0, minute=0, second=0, microsecond=0),
        defaults={"used_tokens": 8_600},
    )
    return endpoints


def assert_drawn(page: Page, canvas_ids: list[str]) -> None:
    for canvas_id in canvas_ids:
        page.wait_for_selector(f"#{canvas_id}[data-drawn]", timeout=10_000)
        assert page.evaluate(PAINTED_PIXELS, canvas_id) > 500, canvas_id


def test_the_admin_dashboards_draw_their_charts(
    page, login, screenshot, staff, dashboard_data
):
    login(page, staff, next_path="/admin/")

    page.click("text=Endpoint status")
    page.wait_for_selector("#endpoint-status")
    assert page.locator("#endpoint-status tbody tr").count() == 3
    flaky = page.locator("#endpoint-status tr", has_text="flaky")
    assert "Disconnected" in flaky.inner_text()
    assert_drawn(page, ["chart-latency", "chart-outcomes"])
    screenshot(page, "admin-endpoint-status")

    page.click("#endpoint-status >> text=flaky")
    page.wait_for_selector("#recent-failures")
    assert page.locator("#recent-failures tbody tr").count() == 12
    assert_drawn(page, ["chart-latency", "chart-outcomes"])
    screenshot(page, "admin-endpoint-history")

    page.goto("/admin/monitoring/endpointhealth/usage/?range=7d")
    assert_drawn(
        page,
        [
            "chart-requests",
            "chart-tokens-model",
            "chart-tokens-endpoint",
            "chart-tokens-user",
            "chart-budgets",
        ],
    )
    assert "86.0 % (warning)" in page.inner_text("#budget-use")
    screenshot(page, "admin-usage-charts")


def test_the_dashboards_fit_a_phone_and_their_charts_stay_readable(
    browser, live_server_url, login, staff, dashboard_data
):
    context = browser.new_context(
        base_url=live_server_url, viewport={"width": 390, "height": 844}
    )
    page = context.new_page()
    try:
        login(page, staff, next_path="/admin/monitoring/endpointhealth/")
        page.wait_for_selector("#endpoint-status")
        assert_drawn(page, ["chart-outcomes"])
        # The wide table scrolls inside its box; the page does not scroll sideways.
        widths = page.evaluate(
            """() => ({page: document.documentElement.scrollWidth,
                       viewport: document.documentElement.clientWidth,
                       table: document.getElementById("endpoint-status")
                         .scrollWidth})"""
        )
        assert widths["page"] <= widths["viewport"] == 390
        assert widths["table"] > widths["viewport"]
        ticks = page.evaluate(
            """() => Chart.getChart(document.getElementById('chart-outcomes'))
                .scales.y.ticks.map((t) => t.value)"""
        )
        assert ticks and all(float(t).is_integer() for t in ticks)

        page.goto("/admin/monitoring/endpointhealth/usage/?range=7d")
        assert_drawn(page, ["chart-requests"])
        kind = page.evaluate(
            "() => Chart.getChart(document.getElementById('chart-requests'))"
            ".config.type"
        )
        assert kind == "line"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
