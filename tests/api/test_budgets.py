"""GET /api/budgets/: the budgets a caller may see, with used, reserved and left."""

from __future__ import annotations

import pytest
import time_machine

from gateway import accounting
from gateway.accounting import UsageEntry
from gateway.models import Budget, BudgetPeriod, BudgetScope, Endpoint
from tests.api.views_support import (
    NOW,
    Client,
    assert_error,
    key_client,
    session_client,
)

pytestmark = pytest.mark.django_db

URL = "/api/budgets/"


@pytest.fixture(autouse=True)
def _frozen():
    accounting.forget_budgets()
    with time_machine.travel(NOW, tick=False):
        yield
    accounting.forget_budgets()


@pytest.fixture
def budgets(owner, other_user):
    """A global budget, one per user, one on Alice's key and one on an endpoint."""
    _, alice_key = key_client(owner, "alice-script")
    _, bob_key = key_client(other_user, "bob-script")
    endpoint = Endpoint.objects.create(name="primary", base_url="https://p.test/v1")
    made = {
        "global": Budget.objects.create(
            scope=BudgetScope.GLOBAL, period=BudgetPeriod.MONTHLY, token_limit=10**6
        ),
        "alice": Budget.objects.create(
            scope=BudgetScope.USER,
            user=owner,
            period=BudgetPeriod.DAILY,
            token_limit=1000,
            warning_percent=75,
            name="alice daily",
        ),
        "bob": Budget.objects.create(
            scope=BudgetScope.USER, user=other_user, token_limit=500
        ),
        "alice_key": Budget.objects.create(
            scope=BudgetScope.API_KEY,
            api_key=alice_key,
            period=BudgetPeriod.WEEKLY,
            token_limit=None,
        ),
        "bob_key": Budget.objects.create(
            scope=BudgetScope.API_KEY, api_key=bob_key, token_limit=100
        ),
        "endpoint": Budget.objects.create(
            scope=BudgetScope.ENDPOINT, endpoint=endpoint, token_limit=5000
        ),
    }
    return made


def ids(response):
    return {row["id"] for row in response.json()["results"]}


def test_anonymous_gets_401_json():
    assert_error(Client().get(URL), 401)


def test_a_user_sees_global_their_own_and_their_keys_budgets(owner, budgets):
    seen = ids(session_client(owner).get(URL))
    assert seen == {budgets[n].pk for n in ("global", "alice", "alice_key")}


def test_another_user_never_sees_alices_budgets(other_user, budgets):
    seen = ids(session_client(other_user).get(URL))
    assert seen == {budgets[n].pk for n in ("global", "bob", "bob_key")}


def test_an_api_key_sees_what_its_user_sees(owner, budgets):
    client, _ = key_client(owner, "reader")
    assert ids(client.get(URL)) == ids(session_client(owner).get(URL))


def test_staff_see_every_budget_including_endpoints(staff, budgets):
    rows = session_client(staff).get(URL).json()["results"]
    assert {row["id"] for row in rows} == {b.pk for b in budgets.values()}
    holders = {row["scope"]: row["holder"] for row in rows if row["scope"] != "user"}
    assert holders == {
        "global": "everyone",
        "api_key": holders["api_key"],
        "endpoint": "primary",
    }
    assert holders["api_key"] in {"alice-script", "bob-script"}


def test_revoked_keys_and_disabled_budgets_are_left_out(owner, budgets):
    budgets["alice_key"].api_key.revoked_at = NOW
    budgets["alice_key"].api_key.save()
    Budget.objects.filter(pk=budgets["global"].pk).update(enabled=False)
    assert ids(session_client(owner).get(URL)) == {budgets["alice"].pk}


def test_numbers_follow_a_reservation_and_its_settling(owner, budgets):
    client = session_client(owner)
    fresh = next(
        row
        for row in client.get(URL).json()["results"]
        if row["id"] == budgets["alice"].pk
    )
    assert fresh == {
        "id": budgets["alice"].pk,
        "name": "alice daily",
        "scope": "user",
        "holder": "alice",
        "period": "daily",
        "period_start": "2026-03-10T00:00:00Z",
        "resets_at": "2026-03-11T00:00:00Z",
        "limit": 1000,
        "used": 0,
        "reserved": 0,
        "left": 1000,
        "percent_used": 0.0,
        "warning_percent": 75,
        "exhausted": False,
    }

    reservation = accounting.reserve(accounting.caller_budgets(owner.pk, None), 300)
    held = {row["id"]: row for row in client.get(URL).json()["results"]}
    mine = held[budgets["alice"].pk]
    assert (mine["used"], mine["reserved"], mine["left"]) == (0, 300, 700)
    assert held[budgets["global"].pk]["reserved"] == 300

    accounting.record_usage(
        UsageEntry(
            model_name="sim-small",
            status="ok",
            user_id=owner.pk,
            prompt_tokens=120,
            completion_tokens=80,
            settlements=accounting.settlements_for(reservation, 200),
        )
    )
    settled = {row["id"]: row for row in client.get(URL).json()["results"]}
    mine = settled[budgets["alice"].pk]
    assert (mine["used"], mine["reserved"], mine["left"]) == (200, 0, 800)
    assert mine["percent_used"] == 20.0
    assert settled[budgets["global"].pk]["used"] == 200
    # The key's budget has no limit: nothing is ever "left" to run out of.
    unlimited = settled[budgets["alice_key"].pk]
    assert (unlimited["limit"], unlimited["left"], unlimited["exhausted"]) == (
        None,
        None,
        False,
    )
    assert unlimited["resets_at"] == "2026-03-16T00:00:00Z"


def test_a_spent_budget_is_exhausted(owner, budgets):
    reservation = accounting.reserve([accounting.budget_ref(budgets["alice"])], 1000)
    accounting.record_usage(
        UsageEntry(
            model_name="sim-small",
            status="ok",
            user_id=owner.pk,
            prompt_tokens=1000,
            settlements=accounting.settlements_for(reservation, 1000),
        )
    )
    rows = {r["id"]: r for r in session_client(owner).get(URL).json()["results"]}
    assert rows[budgets["alice"].pk]["exhausted"] is True
    assert rows[budgets["alice"].pk]["left"] == 0
    assert rows[budgets["global"].pk]["exhausted"] is False


def test_pages_are_bounded_and_counted(staff, budgets):
    first = session_client(staff).get(URL, {"page_size": 2}).json()
    assert first["count"] == 6
    assert len(first["results"]) == 2
    assert first["next"]


def test_the_last_page_ends_the_list(staff, budgets):
    last = session_client(staff).get(URL, {"page_size": 4, "page": 2}).json()
    assert (len(last["results"]), last["next"]) == (2, None)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"page": 9}, "page"),
        ({"page": "x"}, "page"),
        ({"page_size": 1001}, "page_size"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": "1e3"}, "page_size"),
        ({"scope": "user"}, "scope"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(owner, budgets, params, param):
    assert_error(session_client(owner).get(URL, params), 400, param)


def test_query_count_does_not_grow_with_budgets(
    staff, budgets, django_user_model, django_assert_max_num_queries
):
    client = session_client(staff)
    with django_assert_max_num_queries(5):
        client.get(URL)
    for n in range(10):
        user = django_user_model.objects.create_user(f"user{n}")
        Budget.objects.create(scope=BudgetScope.USER, user=user, token_limit=10)
    with django_assert_max_num_queries(5):
        response = client.get(URL)
    assert response.json()["count"] == 16
