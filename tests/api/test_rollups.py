"""GET /api/usage/rollups/: sums that match the records, and only the caller's own."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db.models import Count, Sum

from gateway.models import Endpoint, UsageRecord
from tests.api.views_support import (
    NOW,
    Client,
    assert_error,
    key_client,
    session_client,
    use,
)

pytestmark = pytest.mark.django_db

URL = "/api/usage/rollups/"


@pytest.fixture(autouse=True)
def _frozen(settings):
    # Most tests write between requests: no sharing of closed hours there.
    settings.API_ROLLUP_CACHE_SECONDS = 0
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def endpoints():
    return [
        Endpoint.objects.create(name=name, base_url=f"https://{name}.test/v1")
        for name in ("primary", "backup")
    ]


@pytest.fixture
def traffic(owner, other_user, endpoints):
    """Alice by browser and by key on two models; Bob on the backup; all in 24 h."""
    primary, backup = endpoints
    _, alice_key = key_client(owner, "alice-script")
    use(owner, hours_ago=1, endpoint=primary, prompt=100, completion=50)
    use(owner, hours_ago=1.5, endpoint=primary, model="gpt-4o", prompt=7, completion=3)
    use(owner, hours_ago=3, endpoint=backup, key=alice_key, prompt=40, completion=0)
    use(owner, hours_ago=3, endpoint=primary, status="error", completion=0)
    use(
        owner,
        hours_ago=5,
        endpoint=None,
        status="rejected",
        prompt=0,
        completion=0,
        latency_ms=None,
        ttft_ms=None,
        cost=None,
    )
    use(owner, hours_ago=6, endpoint=primary, status="cached", estimated=True)
    use(other_user, hours_ago=2, endpoint=backup, prompt=9000, completion=900)
    use(other_user, hours_ago=30, endpoint=backup, prompt=5, completion=5)
    return alice_key


def totals(rows, field):
    return sum(row[field] for row in rows)


def test_anonymous_gets_401_json():
    assert_error(Client().get(URL), 401)


def test_a_user_sees_only_their_own_usage(owner, traffic):
    body = session_client(owner).get(URL).json()
    rows = body["results"]
    assert totals(rows, "requests") == 6
    assert totals(rows, "prompt_tokens") == 100 + 7 + 40 + 10 + 0 + 10
    assert totals(rows, "errors") == 1
    assert totals(rows, "rejected") == 1
    assert totals(rows, "cached") == 1
    assert totals(rows, "estimated") == 1


def test_another_users_rows_never_appear_even_grouped_by_user(other_user, traffic):
    rows = session_client(other_user).get(URL, {"group_by": "user,key"}).json()
    assert {row["user"] for row in rows["results"]} == {"bob"}
    # Only Bob's request of the last 24 h: the one 30 h ago is out of range.
    assert totals(rows["results"], "total_tokens") == 9900


def test_an_api_key_sees_what_its_user_sees(owner, traffic):
    client, _ = key_client(owner, "reader")
    by_key = client.get(URL, {"group_by": "user"}).json()["results"]
    by_session = session_client(owner).get(URL, {"group_by": "user"}).json()
    assert by_key == by_session["results"]
    assert {row["user"] for row in by_key} == {"alice"}


def test_staff_see_everyone_by_name(staff, traffic):
    rows = session_client(staff).get(URL, {"group_by": "user"}).json()["results"]
    tokens = Counter()
    for row in rows:
        tokens[row["user"]] += row["total_tokens"]
    assert tokens == {"alice": 150 + 10 + 40 + 10 + 0 + 15, "bob": 9900}


def test_rollups_sum_to_the_records_for_every_group(staff, traffic):
    rows = (
        session_client(staff)
        .get(
            URL,
            {"group_by": "model,endpoint,user,key", "since": "2026-03-08T00:00:00Z"},
        )
        .json()["results"]
    )
    got = Counter()
    for row in rows:
        group = (row["model"], row["endpoint"], row["user"], row["key"])
        got[group, "requests"] += row["requests"]
        got[group, "prompt"] += row["prompt_tokens"]
        got[group, "completion"] += row["completion_tokens"]
        got[group, "cost"] += Decimal(row["cost"])
    expected = Counter()
    for rec in (
        UsageRecord.objects.values(
            "model_name", "endpoint_name", "user__username", "api_key__name"
        )
        .annotate(
            n=Count("pk"),
            p=Sum("prompt_tokens"),
            c=Sum("completion_tokens"),
            cost=Sum("cost"),
        )
        .order_by()
    ):
        group = (
            rec["model_name"],
            rec["endpoint_name"],
            rec["user__username"] or "",
            rec["api_key__name"] or "",
        )
        expected[group, "requests"] += rec["n"]
        expected[group, "prompt"] += rec["p"]
        expected[group, "completion"] += rec["c"]
        expected[group, "cost"] += rec["cost"] or Decimal(0)
    assert +got == +expected
    assert got[("sim-small", "backup", "alice", "alice-script"), "prompt"] == 40


def test_hourly_rows_start_on_their_hour_and_carry_means(owner, traffic):
    rows = session_client(owner).get(URL, {"group_by": "model"}).json()["results"]
    hour = next(r for r in rows if r["model"] == "gpt-4o")
    assert hour["start"] == "2026-03-10T11:00:00Z"
    assert set(hour) >= {"model", "requests", "total_tokens", "cost"}
    assert "user" not in hour and "endpoint_id" not in hour
    assert hour["mean_latency_ms"] == 100.0
    assert hour["mean_ttft_ms"] == 20.0
    assert hour["cost"] == "0.001000"
    starts = [r["start"] for r in rows]
    assert starts == sorted(starts)


def test_daily_totals_cover_thirty_days_by_default(staff, traffic):
    body = session_client(staff).get(URL, {"bucket": "day"}).json()
    assert body["since"] == "2026-02-08T00:00:00Z"
    days = {row["start"]: row["requests"] for row in body["results"]}
    assert days == {"2026-03-09T00:00:00Z": 1, "2026-03-10T00:00:00Z": 7}


def test_the_default_hourly_range_is_the_last_24_hours(staff, traffic):
    body = session_client(staff).get(URL).json()
    assert body["since"] == "2026-03-09T12:00:00Z"
    assert totals(body["results"], "requests") == 7


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"model": "gpt-4o"}, 1),
        ({"endpoint": "backup"}, 1),
        ({"endpoint": "nowhere"}, 0),
        ({"since": "2026-03-10T09:00:00Z", "until": "2026-03-10T12:00:00Z"}, 4),
        ({"since": "2026-03-10T09:45:00Z", "until": "2026-03-10T11:00:00Z"}, 2),
    ],
)
def test_filters_narrow_the_rows(owner, traffic, params, expected):
    rows = session_client(owner).get(URL, params).json()["results"]
    assert totals(rows, "requests") == expected


def test_endpoint_filter_takes_an_id(owner, traffic, endpoints):
    rows = session_client(owner).get(URL, {"endpoint": endpoints[1].pk}).json()
    assert totals(rows["results"], "requests") == 1


def test_key_filter_gives_that_keys_usage(owner, traffic):
    rows = session_client(owner).get(URL, {"api_key": traffic.pk}).json()["results"]
    assert totals(rows, "prompt_tokens") == 40


def test_staff_filter_by_user_name_or_id(staff, owner, other_user, traffic):
    client = session_client(staff)
    by_name = client.get(URL, {"user": "bob"}).json()["results"]
    by_id = client.get(URL, {"user": other_user.pk}).json()["results"]
    assert totals(by_name, "total_tokens") == totals(by_id, "total_tokens") == 9900


def test_a_user_may_name_themselves_but_not_another(owner, traffic):
    client = session_client(owner)
    assert totals(client.get(URL, {"user": "alice"}).json()["results"], "requests") == 6
    assert_error(client.get(URL, {"user": "bob"}), 403, "user")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"bucket": "week"}, "bucket"),
        ({"group_by": "model,colour"}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"since": "2026-03-10T00:00:00Z", "until": "2026-03-09T00:00:00Z"}, "until"),
        ({"since": "2026-01-01T00:00:00Z"}, "since"),
        ({"bucket": "day", "since": "2024-01-01T00:00:00Z"}, "since"),
        ({"api_key": "abc"}, "api_key"),
        ({"api_key": str(2**70)}, "api_key"),
        ({"model": "m" * 300}, "model"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(owner, params, param):
    assert_error(session_client(owner).get(URL, params), 400, param)


def test_query_count_does_not_grow_with_rows(
    staff, other_user, endpoints, django_assert_max_num_queries
):
    client = session_client(staff)
    use(other_user, endpoint=endpoints[0])
    with django_assert_max_num_queries(3):
        client.get(URL, {"group_by": "model,endpoint,user,key"})
    for hours in range(1, 20):
        use(other_user, hours_ago=hours, endpoint=endpoints[hours % 2])
    with django_assert_max_num_queries(3):
        response = client.get(URL, {"group_by": "model,endpoint,user,key"})
    # Hour 1 has both endpoints: the first request and one of the loop.
    assert len(response.json()["results"]) == 20


def test_rows_are_bounded(staff, other_user, endpoints, monkeypatch):
    monkeypatch.setattr("api.views.rollups.MAX_ROWS", 3)
    for hours in range(1, 6):
        use(other_user, hours_ago=hours, endpoint=endpoints[0])
    assert_error(session_client(staff).get(URL), 400, "group_by")
    day = session_client(staff).get(URL, {"bucket": "day"})
    assert day.status_code == 200


def test_deleted_users_and_keys_leave_their_usage_unnamed(staff, other_user, traffic):
    other_user.delete()
    rows = session_client(staff).get(URL, {"group_by": "user"}).json()["results"]
    assert {row["user"] for row in rows} == {"alice", ""}


def test_closed_hours_are_shared_briefly_and_recent_hours_are_live(
    staff, other_user, traffic, settings
):
    settings.API_ROLLUP_CACHE_SECONDS = 60
    client = session_client(staff)
    assert totals(client.get(URL).json()["results"], "requests") == 7
    use(other_user, hours_ago=3)  # an hour the cache already holds
    use(other_user, hours_ago=0.25)  # the current hour, always read
    assert totals(client.get(URL).json()["results"], "requests") == 8
    # Once the next hour closes, the closed part is summed afresh. (Expiry
    # after the 60 s is the cache's own: Redis keeps real time, not ours.)
    with time_machine.travel(NOW + timedelta(hours=1), tick=False):
        assert totals(client.get(URL).json()["results"], "requests") == 9


@pytest.mark.parametrize("bucket", ["hour", "day"])
def test_shared_and_fresh_sums_are_the_same(staff, traffic, settings, bucket):
    client = session_client(staff)
    params = {"bucket": bucket, "group_by": "model,endpoint,user,key"}
    fresh = client.get(URL, params).json()
    settings.API_ROLLUP_CACHE_SECONDS = 60
    client.get(URL, params)
    shared = client.get(URL, params).json()
    assert shared == fresh
    # A day that straddles the cached and the live hours is still one row.
    starts = [
        (r["start"], r["model"], r["endpoint"], r["user"], r["key"])
        for r in shared["results"]
    ]
    assert len(starts) == len(set(starts))


def test_a_username_that_is_another_users_id_stays_ones_own(
    django_user_model, other_user, traffic
):
    numeric = django_user_model.objects.create_user(str(other_user.pk))
    use(numeric, prompt=1, completion=1)
    rows = session_client(numeric).get(URL, {"user": str(other_user.pk)}).json()
    assert totals(rows["results"], "total_tokens") == 2
