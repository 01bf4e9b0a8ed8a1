"""The admin dashboards: right numbers, with data and without, bounded queries."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from gateway.models import (
    Budget,
    BudgetCounter,
    Endpoint,
    EndpointStatus,
    UsageRollup,
)
from monitoring.models import AlertChannel, ChannelKind, MonitorLease, ProbeResult
from monitoring.probes import refresh_rollups

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.monitoring.urls")]

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
STATUS_URL = "/admin/monitoring/endpointhealth/"
USAGE_URL = "/admin/monitoring/endpointhealth/usage/"


@pytest.fixture(autouse=True)
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


def make_endpoints(count: int, prefix: str = "ep", **fields) -> list[Endpoint]:
    statuses = list(EndpointStatus.values)
    return [
        Endpoint.objects.create(
            name=f"{prefix}-{i:03}",
            base_url=f"http://127.0.0.1:9/e/{i}/v1",
            status=statuses[i % len(statuses)],
            last_checked_at=NOW - timedelta(minutes=3),
            last_latency_ms=42.0 + i,
            **fields,
        )
        for i in range(count)
    ]


def probe_history(endpoint: Endpoint, outcomes: list[tuple[int, str]]) -> None:
    """Probe results `hours_ago` hours back, with the given status, rolled up."""
    results = ProbeResult.objects.bulk_create(
        ProbeResult(
            endpoint=endpoint,
            checked_at=NOW - timedelta(hours=hours),
            status=status,
            latency_ms=None if status == "disconnected" else 100.0 + hours,
            http_status=503 if status == "disconnected" else 200,
            error="HTTP 503 from upstream" if status == "disconnected" else "",
        )
        for hours, status in outcomes
    )
    refresh_rollups([endpoint.pk], min(r.checked_at for r in results))


def chart_data(response, element_id: str) -> dict:
    match = re.search(
        rf'<script id="{element_id}" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match, f"no {element_id} in the page"
    return json.loads(match.group(1))


def test_the_status_page_shows_each_status_in_words_and_uptime(admin_client):
    first, second, *_ = make_endpoints(4)
    # 24 h: 3 of 4 up; 7 d: 5 of 7; 30 d: 6 of 9.
    probe_history(
        first,
        [
            (1, "connected"),
            (2, "slow"),
            (3, "disconnected"),
            (4, "connected"),
            (48, "disconnected"),
            (72, "connected"),
            (100, "connected"),
            (24 * 20, "disconnected"),
            (24 * 25, "connected"),
            (24 * 40, "disconnected"),  # outside every window
        ],
    )
    Endpoint.objects.filter(pk=second.pk).update(
        disabled_until=NOW + timedelta(seconds=45), consecutive_failures=4
    )

    response = admin_client.get(STATUS_URL)

    assert response.status_code == 200
    page = response.content.decode()
    for word, css in [
        ("Unknown", "unknown"),
        ("Connected", "connected"),
        ("Slow", "slow"),
        ("Disconnected", "disconnected"),
    ]:
        assert re.search(
            rf'mon-status-{css}"><span aria-hidden="true">.</span> {word}', page
        )
    row = page[page.index(">ep-000<") :].split("</tr>")[0]
    assert "75.00 %" in row and "71.43 %" in row and "66.67 %" in row
    assert "3\xa0minutes ago" in row
    assert "42 ms" in row
    second_row = page[page.index(">ep-001<") :].split("</tr>")[0]
    assert "2026-03-10 12:00:45 UTC" in second_row
    assert "0 / 4" in second_row
    data = chart_data(response, "probe-data")
    assert data["latency"][0]["label"] == "ep-000"
    assert sum(data["outcomes"]["disconnected"]) == 1
    assert '<canvas id="chart-latency"' in page


def test_the_status_page_renders_with_no_endpoints(admin_client):
    response = admin_client.get(STATUS_URL)

    assert response.status_code == 200
    page = response.content.decode()
    assert "No endpoints yet" in page
    assert "No probes in this range." in page
    assert "<canvas" not in page
    assert "No monitor is running" in page


def test_the_status_page_names_the_active_monitor(admin_client):
    MonitorLease.objects.create(
        name="monitor", holder="box:42:abcd", expires_at=NOW + timedelta(seconds=20)
    )

    response = admin_client.get(STATUS_URL)

    assert "Active monitor: <code>box:42:abcd</code>" in response.content.decode()


def test_the_status_page_filters_by_status(admin_client):
    make_endpoints(8)

    response = admin_client.get(STATUS_URL, {"status": "slow"})

    names = re.findall(r">(ep-\d+)</a>", response.content.decode())
    assert names == ["ep-002", "ep-006"]


def queries_for(client, url: str, **params) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, params)
    assert response.status_code == 200
    return len(queries)


def test_the_status_page_query_count_does_not_grow_with_endpoints(
    admin_client, django_assert_max_num_queries
):
    few = make_endpoints(2)
    for endpoint in few:
        probe_history(endpoint, [(1, "connected"), (30, "slow")])
    baseline = queries_for(admin_client, STATUS_URL)

    for endpoint in make_endpoints(40, prefix="more", priority=5)[:10]:
        probe_history(endpoint, [(h, "connected") for h in range(1, 30)])

    with django_assert_max_num_queries(baseline):
        response = admin_client.get(STATUS_URL, {"range": "7d"})
    page = response.content.decode()
    table = page[page.index('id="endpoint-status"') :].split("</table>")[0]
    assert table.count("<tr>") == 42 + 1
    assert baseline <= 10


def test_the_endpoint_page_shows_history_and_recent_failures(
    admin_client, django_assert_max_num_queries
):
    endpoint = make_endpoints(1)[0]
    probe_history(
        endpoint,
        [(h, "disconnected" if h % 5 == 0 else "connected") for h in range(1, 80)],
    )
    url = reverse("admin:monitoring_endpointhealth_change", args=[endpoint.pk])

    with django_assert_max_num_queries(10):
        response = admin_client.get(url, {"range": "7d"})

    assert response.status_code == 200
    page = response.content.decode()
    failures = page[page.index('id="recent-failures"') :].split("</table>")[0]
    assert failures.count("HTTP 503 from upstream") == 15
    history = page[page.index('id="probe-history"') :].split("</table>")[0]
    assert history.count("<tr>") == 50 + 1
    assert "page 1 of 2" in page
    data = chart_data(response, "probe-data")
    assert data["bucket"] == "hour"
    assert len(data["labels"]) == 79
    assert sum(data["outcomes"]["disconnected"]) == 15


def test_the_endpoint_page_of_a_never_probed_endpoint(admin_client):
    endpoint = make_endpoints(1)[0]

    response = admin_client.get(
        reverse("admin:monitoring_endpointhealth_change", args=[endpoint.pk])
    )

    page = response.content.decode()
    assert "Never probed." in page
    assert "No failed probes on record." in page
    assert "<canvas" not in page


def test_an_unknown_endpoint_is_a_404(admin_client):
    url = reverse("admin:monitoring_endpointhealth_change", args=[987654])
    assert admin_client.get(url).status_code in {302, 404}


def rollup(hours_ago: int, n: int, **fields) -> UsageRollup:
    return UsageRollup.objects.create(
        bucket=(NOW - timedelta(hours=hours_ago)).replace(minute=0),
        dimensions=f"{hours_ago}-{n}-{fields.get('model_name', 'm')}",
        **{
            "model_name": "sim-small",
            "endpoint_name": "ep-000",
            "requests": 10,
            "errors": 1,
            "prompt_tokens": 100,
            "completion_tokens": 50,
            **fields,
        },
    )


def test_the_usage_page_charts_requests_tokens_and_budgets(
    admin_client, owner, django_assert_max_num_queries
):
    # Before this month's traffic, so that it has last month's counter only.
    old = Budget.objects.create(scope="global", period="monthly", token_limit=10)
    BudgetCounter.objects.create(  # last month's counter: not this period
        budget=old, period_start=datetime(2026, 2, 1, tzinfo=UTC), used_tokens=10
    )
    rollup(1, 1, user=owner)
    rollup(1, 2, model_name="sim-large", requests=5, errors=0)
    rollup(30, 3, user=owner, prompt_tokens=1000)
    rollup(24 * 30, 4)  # outside the 7-day default range
    budget = Budget.objects.create(
        scope="user", user=owner, period="daily", token_limit=1000, warning_percent=80
    )
    # The budget started at what alice used today (the rollups); set it here.
    BudgetCounter.objects.update_or_create(
        budget=budget, period_start=NOW.replace(hour=0), defaults={"used_tokens": 850}
    )

    with django_assert_max_num_queries(12):
        response = admin_client.get(USAGE_URL)

    assert response.status_code == 200
    page = response.content.decode()
    assert "<strong>25</strong> requests" in page
    assert "<strong>2</strong> errors" in page
    data = chart_data(response, "usage-data")
    assert data["requests"]["bucket"] == "hour"
    assert sum(data["requests"]["requests"]) == 25
    # Every day of the range, the quiet ones too.
    assert data["tokens"]["model"]["labels"] == [
        f"2026-03-{d:02}" for d in range(3, 11)
    ]
    assert data["tokens"]["model"]["series"] == {
        "sim-small": [0] * 6 + [1050, 150],
        "sim-large": [0] * 7 + [150],
    }
    assert len(data["requests"]["labels"]) == 7 * 24
    assert set(data["tokens"]["user"]["series"]) == {"alice", "(API only / deleted)"}
    assert [(b["used"], b["limit"], b["percent"]) for b in data["budgets"]] == [
        (850, 1000, 85.0)
    ]
    assert "85.0 % (warning)" in page
    for chart in ("chart-requests", "chart-tokens-model", "chart-budgets"):
        assert f'<canvas id="{chart}"' in page


def test_the_usage_page_renders_with_no_usage(admin_client):
    response = admin_client.get(USAGE_URL, {"start": "2026-01-01", "end": "2026-01-31"})

    assert response.status_code == 200
    page = response.content.decode()
    assert "No requests in this range." in page
    assert "No budget with a limit has been used this period." in page
    assert "<canvas" not in page
    assert 'value="2026-01-01"' in page and 'value="2026-01-31"' in page


def test_dashboards_are_for_staff_only(client, owner):
    client.force_login(owner)
    for url in (STATUS_URL, USAGE_URL):
        response = client.get(url)
        assert response.status_code == 302
        assert "/admin/login/" in response["Location"]


def test_probe_results_list_stays_cheap(admin_client, django_assert_max_num_queries):
    for endpoint in make_endpoints(5):
        probe_history(endpoint, [(h, "connected") for h in range(20)])

    with django_assert_max_num_queries(8):
        response = admin_client.get("/admin/monitoring/proberesult/")

    assert response.status_code == 200
    assert response.content.decode().count("mon-status-connected") == 100


def test_a_webhook_url_is_never_shown_again(admin_client):
    channel = AlertChannel.objects.create(
        name="hook",
        kind=ChannelKind.WEBHOOK,
        target="https://hooks.example.com/services/T000/SECRET-TOKEN",
    )

    listing = admin_client.get("/admin/monitoring/alertchannel/").content.decode()
    form = admin_client.get(
        f"/admin/monitoring/alertchannel/{channel.pk}/change/"
    ).content.decode()

    assert "SECRET-TOKEN" not in listing
    assert "SECRET-TOKEN" not in form
    assert "https://hooks.example.com/…" in listing

    response = admin_client.post(
        f"/admin/monitoring/alertchannel/{channel.pk}/change/",
        {
            "name": "hook renamed",
            "kind": "webhook",
            "target": "",
            "endpoint_events": "on",
            "enabled": "on",
        },
    )
    assert response.status_code == 302
    channel.refresh_from_db()
    assert channel.name == "hook renamed"
    assert channel.target.endswith("SECRET-TOKEN")


def test_a_test_alert_can_be_sent_from_the_admin(admin_client, webhook):
    channel = AlertChannel.objects.create(
        name="hook", kind=ChannelKind.WEBHOOK, target=webhook.url
    )

    response = admin_client.post(
        "/admin/monitoring/alertchannel/",
        {"action": "send_test_alert", "_selected_action": [channel.pk]},
        follow=True,
    )

    assert [str(m) for m in response.context["messages"]] == ["hook: test alert sent."]
    assert webhook.received[0]["event"] == "test"


def test_the_status_pages_warn_about_endpoints_that_send_keys_in_clear(
    admin_client, django_assert_max_num_queries
):
    _local, lan, cloud = make_endpoints(3)
    Endpoint.objects.filter(pk=lan.pk).update(
        base_url="http://10.0.0.5:8000/v1", allow_plain_http=True
    )
    Endpoint.objects.filter(pk=cloud.pk).update(base_url="https://api.example.com/v1")

    with django_assert_max_num_queries(10):
        status = admin_client.get(STATUS_URL).content.decode()
    detail = admin_client.get(
        reverse("admin:monitoring_endpointhealth_change", args=[lan.pk])
    ).content.decode()

    table = status[status.index('id="endpoint-status"') :].split("</table>")[0]
    rows = {
        name: row
        for row in table.split("<tr>")[2:]
        for name in re.findall(r">(ep-\d+)</a>", row)
    }
    warning = "plain HTTP: key sent in clear"
    assert warning in rows["ep-001"]
    assert warning not in rows["ep-000"] and warning not in rows["ep-002"]
    assert warning in detail
    facts = detail[detail.index('class="mon-facts"') :].split("</dl>")[0]
    assert "<dt>Transport</dt>" in facts
