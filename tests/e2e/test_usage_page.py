"""A user's usage page in a real Chromium: numbers, drawn charts, the CSV link."""

from __future__ import annotations

import csv
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway import accounting
from gateway.accounting import UsageEntry
from gateway.models import Budget, BudgetCounter
from tests.e2e.test_admin_dashboard import PAINTED_PIXELS

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def traffic(owner, other_user):
    """Alice's requests over the last few hours; one of Bob's."""
    now = timezone.now()
    for minutes, model in [(1, "sim-small"), (2, "sim-small"), (3, "sim-large")]:
        accounting.record_usage(
            UsageEntry(
                model_name=model,
                status="ok",
                user_id=owner.pk,
                created_at=now - timedelta(minutes=minutes),
                prompt_tokens=120,
                completion_tokens=30,
            )
        )
    accounting.record_usage(
        UsageEntry(
            model_name="bob-model",
            status="ok",
            user_id=other_user.pk,
            created_at=now - timedelta(minutes=1),
            prompt_tokens=999,
        )
    )
    budget = Budget.objects.create(
        scope="user", user=owner, period="daily", token_limit=1_000
    )
    # The budget starts at what the rollups say was used today; set it here.
    BudgetCounter.objects.update_or_create(
        budget=budget,
        period_start=now.replace(hour=0, minute=0, second=0, microsecond=0),
        defaults={"used_tokens": 450},
    )


def assert_drawn(page, canvas_id: str) -> None:
    page.wait_for_selector(f"#{canvas_id}[data-drawn]")
    assert page.evaluate(PAINTED_PIXELS, canvas_id) > 500, canvas_id


def test_a_user_finds_their_usage_from_the_chat(
    page, login, screenshot, owner, traffic
):
    login(page, owner)

    page.click("#usage-link")
    page.wait_for_url("**/usage/")

    assert page.locator("h1").inner_text() == "Your usage"
    today = page.locator("#totals-today td").all_inner_texts()
    assert today == ["3", "0", "360", "90", "450"]
    assert "bob-model" not in page.content()
    assert_drawn(page, "chart-tokens")
    assert_drawn(page, "chart-requests")
    budgets = page.locator("#usage-budgets tbody tr").first.inner_text()
    assert "Your account" in budgets and "550" in budgets
    # The chart's numbers, as a table, a click (or Enter) away.
    page.locator("figure").first.locator("summary").focus()
    page.keyboard.press("Enter")
    assert page.locator("#table-tokens").is_visible()
    screenshot(page, "usage-page")


def read_download(page, selector: str) -> tuple[str, list[dict[str, str]]]:
    """Click a download link; the file's suggested name and its rows."""
    with page.expect_download() as info:
        page.click(selector)
    download = info.value
    with open(download.path(), encoding="utf-8") as file:
        return download.suggested_filename, list(csv.DictReader(file))


def test_the_csv_link_downloads_this_months_records_of_the_user(
    page, login, owner, traffic
):
    login(page, owner, next_path="/usage/")

    href = page.get_attribute("#download-csv", "href")
    name, rows = read_download(page, "#download-csv")

    month = f"{timezone.now():%Y-%m}-01T00%3A00%3A00Z"
    assert href == f"/api/usage/records/?format=csv&since={month}"
    assert name.endswith(".csv")
    assert [(row["user"], row["model"]) for row in rows] == [
        ("alice", "sim-large"),
        ("alice", "sim-small"),
        ("alice", "sim-small"),
    ]
    assert sum(int(row["prompt_tokens"]) for row in rows) == 360


def test_staff_download_the_filtered_usage_records_from_the_admin(
    page, login, staff, traffic
):
    login(page, staff, next_path="/admin/")
    page.goto("/admin/gateway/usagerecord/?q=sim-small")

    name, rows = read_download(page, "#usage-export-csv")

    assert name.startswith("llmsite-usage-") and name.endswith(".csv")
    assert [(row["user"], row["model"]) for row in rows] == [
        ("alice", "sim-small"),
        ("alice", "sim-small"),
    ]


def test_the_page_fits_a_phone_in_dark_mode_under_its_own_policy(
    browser, live_server_url, login, owner, traffic
):
    context = browser.new_context(
        base_url=live_server_url,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
    )
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    try:
        login(page, owner, next_path="/usage/")
        assert_drawn(page, "chart-tokens")
        width = page.evaluate("document.documentElement.scrollWidth")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        label_colour = page.evaluate(
            "() => Chart.getChart(document.getElementById('chart-tokens'))"
            ".options.color"
        )
    finally:
        context.close()

    assert width <= 390
    assert background == "rgb(21, 23, 27)"
    # Chart labels in the page's light text, not Chart.js's default grey.
    assert label_colour == "rgb(230, 232, 235)"
    assert not [text for text in console if "Content Security Policy" in text]


def test_staff_reach_the_dashboards_from_the_admin_index(
    page, login, screenshot, staff, owner, traffic
):
    login(page, staff, next_path="/admin/")
    screenshot(page, "admin-index-dashboards")

    page.click("#dashboards >> text=Usage")
    page.wait_for_url("**/admin/monitoring/endpointhealth/usage/")

    page.goto(f"/admin/auth/user/{owner.pk}/change/")
    page.click("#user-usage-page")
    page.wait_for_url(f"**/usage/?user={owner.pk}")
    assert page.locator("h1").inner_text() == "Usage of alice"
    assert page.locator("#totals-today td").first.inner_text() == "3"
