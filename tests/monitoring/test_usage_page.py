"""/usage/: a user's own usage, budgets and limits; staff see anyone's."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway import accounting, limits
from gateway.accounting import UsageEntry
from gateway.models import ApiKey, Budget, BudgetCounter, UserLimits

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
URL = "/usage/"


@pytest.fixture(autouse=True)
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def record(user, at: datetime, model: str = "sim-small", **fields) -> None:
    """One request, through the real writer: its record and its rollup."""
    fields.setdefault("prompt_tokens", 100)
    fields.setdefault("completion_tokens", 50)
    fields.setdefault("status", "ok")
    accounting.record_usage(
        UsageEntry(model_name=model, created_at=at, user_id=user.pk, **fields)
    )


@pytest.fixture
def traffic(owner, other_user):
    """Alice's requests today, earlier this month and last month; one of Bob's."""
    record(owner, NOW - timedelta(minutes=20))
    record(owner, NOW - timedelta(hours=2))
    record(
        owner,
        NOW - timedelta(hours=3),
        "sim-large",
        status="error",
        prompt_tokens=30,
        completion_tokens=0,
    )
    record(owner, datetime(2026, 3, 3, 9, tzinfo=UTC), prompt_tokens=1000)
    record(owner, datetime(2026, 2, 20, 9, tzinfo=UTC), prompt_tokens=5000)
    record(
        other_user,
        NOW - timedelta(minutes=5),
        "bob-secret-model",
        prompt_tokens=7777,
        completion_tokens=0,
    )


def chart_data(response) -> dict:
    match = re.search(
        r'<script id="usage-data" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match, "no chart data in the page"
    return json.loads(match.group(1))


def cells(page: str, row_id: str) -> list[str]:
    row = re.search(rf'<tr id="{row_id}">(.*?)</tr>', page, re.S).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_a_user_sees_their_usage_today_and_this_month(client, owner, traffic):
    client.force_login(owner)

    response = client.get(URL)

    assert response.status_code == 200
    page = response.content.decode()
    # requests, errors, prompt, completion, tokens
    assert cells(page, "totals-today") == ["3", "1", "230", "100", "330"]
    assert cells(page, "totals-month") == ["4", "1", "1230", "150", "1380"]
    models = re.findall(
        r'<tr><th scope="row">([^<]+)</th>((?:<td class="num">\d+</td>){4})</tr>', page
    )
    assert [(m, re.findall(r"\d+", nums)) for m, nums in models] == [
        ("sim-small", ["2", "300", "3", "1350"]),
        ("sim-large", ["1", "30", "1", "30"]),
    ]
    # Another user's traffic appears nowhere: not in tables, not in the chart.
    assert "bob-secret-model" not in page and "7777" not in page


def test_the_charts_carry_the_same_numbers_as_the_tables(client, owner, traffic):
    client.force_login(owner)

    response = client.get(URL)

    data = chart_data(response)
    tokens = data["tokens"]["model"]
    assert tokens["labels"] == [f"2026-03-{d:02}" for d in range(1, 11)]
    assert tokens["series"]["sim-small"][2] == 1050
    assert tokens["series"]["sim-small"][9] == 300
    assert tokens["series"]["sim-large"][9] == 30
    assert sum(sum(values) for values in tokens["series"].values()) == 1380
    requests = data["requests"]
    assert requests["bucket"] == "hour"
    assert len(requests["labels"]) == 13  # 00:00 to 12:00 today
    assert (sum(requests["requests"]), sum(requests["errors"])) == (3, 1)
    page = response.content.decode()
    for canvas in ("chart-tokens", "chart-requests"):
        assert f'<canvas id="{canvas}"' in page
    # The table fallbacks hold the numbers the charts draw.
    assert '<th scope="row">2026-03-03</th>' in page
    assert 'id="table-requests"' in page


def test_a_user_with_no_traffic_sees_zeros_and_no_chart(client, owner, other_user):
    record(other_user, NOW - timedelta(minutes=5))
    client.force_login(owner)

    response = client.get(URL)

    page = response.content.decode()
    assert cells(page, "totals-month") == ["0", "0", "0", "0", "0"]
    assert "No requests this month yet." in page
    assert "<canvas" not in page


def test_every_budget_that_applies_is_shown_with_what_is_left(
    client, owner, other_user
):
    mine = Budget.objects.create(
        scope="user", user=owner, period="daily", token_limit=1000
    )
    BudgetCounter.objects.create(
        budget=mine,
        period_start=datetime(2026, 3, 10, tzinfo=UTC),
        used_tokens=850,
        reserved_tokens=50,
    )
    Budget.objects.create(scope="global", period="monthly", token_limit=1_000_000)
    key, _ = ApiKey.generate(owner, "laptop")
    Budget.objects.create(
        scope="api_key", api_key=key, period="weekly", token_limit=500
    )
    theirs, _ = ApiKey.generate(other_user, "bobs-key")
    Budget.objects.create(
        scope="api_key", api_key=theirs, period="daily", token_limit=9
    )
    Budget.objects.create(scope="user", user=other_user, period="daily", token_limit=9)
    client.force_login(owner)

    page = client.get(URL).content.decode()

    table = re.search(
        r'<table class="usage-table" id="usage-budgets">(.*?)</table>', page, re.S
    ).group(1)
    rows = [
        [
            re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        ]
        for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    ]
    assert rows == [
        ["Your account", "Daily", "850 (85.0 %)", "50", "100", "1000", "00:00 UTC"],
        [
            "API key “laptop”",
            "Weekly",
            "0 (0.0 %)",
            "0",
            "500",
            "500",
            "00:00 UTC on Mon 16 Mar",
        ],
        [
            "Everyone (shared)",
            "Monthly",
            "0 (0.0 %)",
            "0",
            "1000000",
            "1000000",
            "00:00 UTC on Wed 01 Apr",
        ],
    ]
    assert "bobs-key" not in page


def test_what_is_left_of_the_rate_limits_this_minute_is_shown(
    client, owner, other_user, settings
):
    settings.RATE_LIMIT_RPM = 30
    settings.RATE_LIMIT_TPM = 1000
    UserLimits.objects.create(user=owner, rpm_limit=12)
    # One request of 200 prompt tokens, as the chat would admit it; and Bob's.
    assert async_to_sync(limits.check_caller)(owner.pk, None, 200).allowed
    assert async_to_sync(limits.check_caller)(other_user.pk, None, 500).allowed
    client.force_login(owner)

    page = client.get(URL).content.decode()

    def line(unit: str) -> str:
        item = re.search(rf'<li id="limit-{unit}">(.*?)</li>', page, re.S).group(1)
        return re.sub(r"<[^>]+>", "", item)

    assert line("requests") == (
        "11 of 12 requests left this minute; all 12 again in 5 s"
    )
    assert (
        line("tokens") == "800 of 1000 tokens left this minute; all 1000 again in 12 s"
    )


def test_no_limit_line_where_no_limit_applies(client, owner, settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    client.force_login(owner)

    page = client.get(URL).content.decode()

    assert "No per-minute limit applies to you." in page


def test_the_csv_link_asks_the_api_for_this_months_records(client, owner):
    client.force_login(owner)

    page = client.get(URL).content.decode()

    link = re.search(r'id="download-csv" href="([^"]+)"', page).group(1)
    assert link == ("/api/usage/records/?format=csv&amp;since=2026-03-01T00%3A00%3A00Z")


def test_the_page_costs_a_few_queries_and_has_a_strict_policy(
    client, owner, traffic, django_assert_max_num_queries
):
    key, _ = ApiKey.generate(owner, "laptop")
    Budget.objects.create(scope="api_key", api_key=key, period="weekly", token_limit=5)
    Budget.objects.create(scope="user", user=owner, period="daily", token_limit=5)
    client.force_login(owner)

    with django_assert_max_num_queries(12):
        response = client.get(URL)

    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "no-cache" in response["Cache-Control"]


def test_the_user_queries_read_the_rollups_of_that_user_only(client, owner, traffic):
    client.force_login(owner)

    with CaptureQueriesContext(connection) as queries:
        client.get(URL)

    usage = [q["sql"] for q in queries if "usagerollup" in q["sql"].lower()]
    assert len(usage) == 3
    assert all(f'"user_id" = {owner.pk}' in sql for sql in usage)
    assert not [q for q in queries if '"gateway_usagerecord"' in q["sql"]]


# --- Who may see whose page ---------------------------------------------------


def test_anonymous_visitors_are_sent_to_sign_in(client):
    response = client.get(URL)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_a_user_cannot_see_another_users_page(client, owner, other_user, traffic):
    client.force_login(owner)

    response = client.get(URL, {"user": other_user.pk})

    assert response.status_code == 403
    assert b"bob-secret-model" not in response.content


def test_a_user_may_name_themselves(client, owner, traffic):
    client.force_login(owner)

    response = client.get(URL, {"user": owner.pk})

    assert response.status_code == 200
    assert cells(response.content.decode(), "totals-today")[0] == "3"


@pytest.mark.parametrize("value", ["bob", "-1", "1e3", "9" * 40])
def test_a_malformed_user_is_a_400(client, staff, value):
    client.force_login(staff)

    assert client.get(URL, {"user": value}).status_code == 400


def test_staff_see_any_users_page(client, staff, owner, other_user, traffic):
    client.force_login(staff)

    response = client.get(URL, {"user": other_user.pk})

    assert response.status_code == 200
    page = response.content.decode()
    assert "Usage of bob" in page
    assert cells(page, "totals-today") == ["1", "0", "7777", "0", "7777"]
    assert "sim-large" not in page
    link = re.search(r'id="download-csv" href="([^"]+)"', page).group(1)
    assert link.endswith(f"&amp;user={other_user.pk}")


def test_staff_asking_for_an_unknown_user_get_a_404(client, staff):
    client.force_login(staff)

    assert client.get(URL, {"user": 987654}).status_code == 404


def test_staff_without_the_usage_permission_see_only_their_own(
    client, django_user_model, owner
):
    clerk = django_user_model.objects.create_user("clerk", password="x", is_staff=True)
    client.force_login(clerk)

    assert client.get(URL, {"user": owner.pk}).status_code == 403
    assert client.get(URL).status_code == 200


def test_the_chat_page_links_to_the_usage_page(client, owner):
    client.force_login(owner)

    page = client.get("/chat/").content.decode()

    assert re.search(r'<a href="/usage/"[^>]*id="usage-link">Usage</a>', page)


def test_many_model_names_fold_into_one_row(client, owner, settings):
    for i in range(40):
        record(owner, NOW - timedelta(minutes=i), f"made-up-{i:02}", prompt_tokens=i)
    client.force_login(owner)

    page = client.get(URL).content.decode()

    table = re.search(r'id="usage-models">(.*?)</table>', page, re.S).group(1)
    names = re.findall(r'<th scope="row">([^<]+)</th>', table)
    assert len(names) == 30
    assert names[0] == "made-up-39" and names[-1] == "(11 other models)"
    other = re.search(r"\(11 other models\)</th>(.*?)</tr>", table, re.S).group(1)
    # Requests and tokens of the eleven quietest: prompts 0..10, 50 out each.
    assert re.findall(r"\d+", other)[:2] == ["11", str(sum(range(11)) + 11 * 50)]
