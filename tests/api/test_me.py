"""GET /api/me/: the caller, what is left of their per-minute limits and budgets."""

from __future__ import annotations

import pytest
import time_machine
from asgiref.sync import async_to_sync

from gateway import accounting, limits
from gateway.models import Budget, BudgetPeriod, BudgetScope, UserLimits
from tests.api.views_support import (
    NOW,
    Client,
    assert_error,
    key_client,
    session_client,
)

pytestmark = pytest.mark.django_db

URL = "/api/me/"


@pytest.fixture(autouse=True)
def _policy(settings):
    settings.RATE_LIMIT_RPM = 10
    settings.RATE_LIMIT_TPM = 1000
    settings.GATEWAY_POLICY_CACHE_SECONDS = 0
    accounting.forget_budgets()
    with time_machine.travel(NOW, tick=False):
        yield
    accounting.forget_budgets()


def requests_made(user, count, tokens, key=None):
    """`count` requests of `tokens` prompt tokens, admitted as /v1 admits them."""
    for _ in range(count):
        decision = async_to_sync(limits.check_caller)(
            user.pk, key.pk if key else None, tokens
        )
        assert decision.allowed


def test_anonymous_gets_401_json():
    assert_error(Client().get(URL), 401)


def test_a_fresh_user_has_every_limit_whole(owner):
    body = session_client(owner).get(URL).json()
    assert (body["username"], body["is_staff"], body["api_key"]) == (
        "alice",
        False,
        None,
    )
    assert body["rate_limits"]["requests"] == {
        "scope": "user",
        "limit": 10,
        "remaining": 10,
        "reset_seconds": 0.0,
        "unlimited": False,
    }
    assert body["rate_limits"]["tokens"]["remaining"] == 1000
    assert body["budgets"] == []


def test_what_is_left_after_a_few_requests(owner, other_user):
    requests_made(owner, 3, 100)
    requests_made(other_user, 5, 10)
    limits_left = session_client(owner).get(URL).json()["rate_limits"]
    assert limits_left["requests"]["remaining"] == 7
    # Each request holds 6 s of the minute, each 100 tokens another 6 s.
    assert limits_left["requests"]["reset_seconds"] == 18.0
    assert limits_left["tokens"]["remaining"] == 700
    assert limits_left["tokens"]["reset_seconds"] == 18.0


def test_no_token_limit_reads_as_unlimited(owner, settings):
    settings.RATE_LIMIT_TPM = 0
    tokens = session_client(owner).get(URL).json()["rate_limits"]["tokens"]
    assert tokens == {
        "scope": None,
        "limit": None,
        "remaining": None,
        "reset_seconds": 0.0,
        "unlimited": True,
    }


def test_through_a_key_the_tightest_of_user_and_key_limits_shows(owner):
    client, key = key_client(owner, "nightly")
    key.rpm_limit = 4
    key.save()
    requests_made(owner, 1, 10, key=key)
    requests_made(owner, 2, 10)
    body = client.get(URL).json()
    assert body["api_key"] == {"id": key.pk, "name": "nightly", "prefix": key.prefix}
    requests = body["rate_limits"]["requests"]
    assert (requests["scope"], requests["limit"], requests["remaining"]) == (
        "key",
        4,
        3,
    )
    each = {
        (s["scope"], s["limit"], s["remaining"]) for s in body["rate_limits"]["each"]
    }
    assert ("user", 10, 7) in each


def test_a_users_own_limits_replace_the_defaults(owner):
    UserLimits.objects.create(user=owner, rpm_limit=0, tpm_limit=50)
    body = session_client(owner).get(URL).json()["rate_limits"]
    assert body["requests"]["unlimited"] is True
    assert body["tokens"]["limit"] == 50


def test_budgets_that_apply_with_what_is_left(owner, other_user):
    client, key = key_client(owner, "nightly")
    Budget.objects.create(
        scope=BudgetScope.GLOBAL, period=BudgetPeriod.MONTHLY, token_limit=10_000
    )
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=1000)
    Budget.objects.create(scope=BudgetScope.USER, user=other_user, token_limit=5)
    Budget.objects.create(scope=BudgetScope.API_KEY, api_key=key, token_limit=300)
    accounting.reserve(accounting.caller_budgets(owner.pk, key.pk), 200)

    by_key = {b["scope"]: b for b in client.get(URL).json()["budgets"]}
    assert set(by_key) == {"global", "user", "api_key"}
    assert by_key["api_key"]["left"] == 100
    assert by_key["user"] == {
        "id": by_key["user"]["id"],
        "scope": "user",
        "holder": "your account",
        "period": "daily",
        "period_start": "2026-03-10T00:00:00Z",
        "resets_at": "2026-03-11T00:00:00Z",
        "limit": 1000,
        "used": 0,
        "reserved": 200,
        "left": 800,
        "percent_used": 0.0,
        "exhausted": False,
    }
    assert by_key["global"]["resets_at"] == "2026-04-01T00:00:00Z"
    # Through the browser the key's budget does not apply.
    by_session = session_client(owner).get(URL).json()["budgets"]
    assert {b["scope"] for b in by_session} == {"global", "user"}


def test_staff_see_themselves_as_staff(staff):
    assert session_client(staff).get(URL).json()["is_staff"] is True


def test_query_count_is_small_and_fixed(owner, django_assert_max_num_queries):
    client, key = key_client(owner, "nightly")
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=1000)
    Budget.objects.create(scope=BudgetScope.API_KEY, api_key=key, token_limit=300)
    with django_assert_max_num_queries(6):
        response = client.get(URL)
    assert len(response.json()["budgets"]) == 2
