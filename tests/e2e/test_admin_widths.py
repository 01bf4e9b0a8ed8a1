"""The admin at 1280 px: lists and the endpoint page fit, their key columns shown."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from gateway.models import Endpoint, EndpointStatus, ModelRoute, UsageRecord
from tests.conftest import PASSWORD

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

WIDTH, HEIGHT = 1280, 800


@pytest.fixture
def busy_admin_data(owner):
    """Endpoints, routes and records with the longest values the admin shows."""
    now = timezone.now()
    endpoints = [
        Endpoint.objects.create(
            name=f"{name}-endpoint-with-a-long-name",
            base_url=f"https://{name}.inference.example-provider.com/openai/deployments/v1",
            status=EndpointStatus.SLOW,
            last_checked_at=now - timedelta(minutes=1),
            last_latency_ms=1234.5,
            consecutive_failures=2,
            disabled_until=now + timedelta(minutes=5),
            resting_until=now + timedelta(minutes=1),
            api_key="sk-test",
        )
        for name in ("primary", "fallback")
    ]
    for index in range(4):
        ModelRoute.objects.create(
            model_name=f"a-rather-long-public-model-name-{index}",
            endpoint=endpoints[0],
            upstream_model=f"vendor/some-long-upstream-model-name-{index}-instruct",
            input_price_per_1k=Decimal("0.001500"),
            output_price_per_1k=Decimal("0.002000"),
            hedge_after_ms=1500,
        )
    UsageRecord.objects.bulk_create(
        UsageRecord(
            created_at=now - timedelta(minutes=index),
            source="api",
            user=owner,
            model_name="a-rather-long-public-model-name-0",
            endpoint_name=endpoints[index % 2].name,
            upstream_model="vendor/some-long-upstream-model-name-0-instruct",
            prompt_tokens=123_456,
            completion_tokens=98_765,
            latency_ms=12_345.6,
            ttft_ms=1_234.5,
            status="ok",
            attempts=3,
            cost=Decimal("12.345678"),
        )
        for index in range(20)
    )
    return endpoints


def test_the_lists_and_the_endpoint_page_fit_1280_px(
    browser, live_server_url, staff, busy_admin_data, screenshot
):
    context = browser.new_context(
        base_url=live_server_url, viewport={"width": WIDTH, "height": HEIGHT}
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    try:
        page.goto("/admin/login/?next=/admin/")
        page.fill("#id_username", staff.get_username())
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url("**/admin/")

        pages = {
            "endpoints": (
                "/admin/gateway/endpoint/",
                ["Status", "Latency", "Last check", "Breaker"],
            ),
            "endpoint": (
                f"/admin/gateway/endpoint/{busy_admin_data[0].pk}/change/",
                ["Model routes", "Test connection", "Fetch models"],
            ),
            "usage-records": (
                "/admin/gateway/usagerecord/",
                ["Tokens in → out", "Latency", "Cost"],
            ),
        }
        widths = {}
        for name, (path, visible) in pages.items():
            page.goto(path)
            for text in visible:
                assert page.get_by_text(text, exact=True).first.is_visible(), (
                    f"{name}: {text!r} is not visible"
                )
            widths[name] = page.evaluate("document.documentElement.scrollWidth")
            # A list scrolls inside its own box: its columns must all be in view.
            hidden = page.evaluate(
                "() => [...document.querySelectorAll('.results')]"
                ".map(box => box.scrollWidth - box.clientWidth)"
            )
            assert all(pixels <= 0 for pixels in hidden), (
                f"{name}: the list is {hidden} px wider than its box"
            )
            screenshot(page, f"admin-1280-{name}")
        assert widths == {name: WIDTH for name in pages}, widths
    finally:
        context.close()
