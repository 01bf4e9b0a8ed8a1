"""The budget admin: what is used and left, names kept, errors in sentences."""

from __future__ import annotations

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from gateway.accounting import period_bounds
from gateway.models import Budget, BudgetCounter, BudgetScope

pytestmark = pytest.mark.django_db

NOW = "2026-03-04 21:30:00+00:00"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


def _form(**changes):
    data = {
        "name": "",
        "scope": "user",
        "user": "",
        "api_key": "",
        "endpoint": "",
        "period": "daily",
        "token_limit": "1200",
        "warning_percent": "80",
        "enabled": "on",
        # The counters inline (read-only, none added).
        "counters-TOTAL_FORMS": "0",
        "counters-INITIAL_FORMS": "0",
        "counters-MIN_NUM_FORMS": "0",
        "counters-MAX_NUM_FORMS": "0",
    }
    data.update(changes)
    return data


def _field_errors(response, name):
    return list(response.context["adminform"].form.errors.get(name, []))


def test_a_user_budget_without_a_user_says_so_on_the_user_field(admin_client):
    response = admin_client.post(reverse("admin:gateway_budget_add"), _form())

    assert response.status_code == 200
    assert _field_errors(response, "user") == ["A user budget needs a user."]
    assert "budget_scope_matches_target" not in response.content.decode()
    assert not Budget.objects.exists()


def test_a_global_budget_with_a_user_says_which_field_to_clear(admin_client, owner):
    response = admin_client.post(
        reverse("admin:gateway_budget_add"), _form(scope="global", user=owner.pk)
    )

    assert _field_errors(response, "user") == [
        "A global budget is not for a user: clear this field or change the scope."
    ]


def test_a_second_budget_for_the_same_period_names_the_period(admin_client, owner):
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=10)

    response = admin_client.post(
        reverse("admin:gateway_budget_add"), _form(user=owner.pk)
    )

    (error,) = _field_errors(response, "period")
    assert error.startswith("Its target has already a user budget for this period")
    assert Budget.objects.count() == 1


def test_a_budget_keeps_its_name_and_shows_it(admin_client, owner):
    response = admin_client.post(
        reverse("admin:gateway_budget_add"), _form(user=owner.pk, name="Trial")
    )

    assert response.status_code == 302
    budget = Budget.objects.get()
    assert budget.name == "Trial"
    listing = admin_client.get(reverse("admin:gateway_budget_changelist"))
    assert "Trial (Daily 1,200 tokens: alice)" in listing.content.decode()


@time_machine.travel(NOW, tick=False)
def test_the_list_shows_used_left_and_reset_in_one_query(admin_client, owner, staff):
    budget = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=1200)
    Budget.objects.create(scope=BudgetScope.USER, user=staff, period="monthly")
    start, _ = period_bounds("daily", budget.created_at)
    BudgetCounter.objects.create(
        budget=budget, period_start=start, used_tokens=700, reserved_tokens=100
    )

    with CaptureQueriesContext(connection) as queries:
        listing = admin_client.get(reverse("admin:gateway_budget_changelist"))
    page = listing.content.decode()

    assert ">700<" in page
    assert ">400<" in page  # 1,200 - 700 used - 100 held by running requests
    assert "00:00 UTC" in page
    assert "no limit" in page
    assert "00:00 UTC on Wed 01 Apr" in page  # the monthly one
    counted = [q for q in queries.captured_queries if "budgetcounter" in q["sql"]]
    assert len(counted) == 1


def test_raising_the_limit_in_the_form_gives_the_room_back(admin_client, owner):
    budget = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=100)
    start, _ = period_bounds("daily", budget.created_at)
    BudgetCounter.objects.create(
        budget=budget,
        period_start=start,
        used_tokens=100,
        exhausted_at=budget.created_at,
    )

    response = admin_client.post(
        reverse("admin:gateway_budget_change", args=[budget.pk]),
        _form(user=owner.pk, token_limit="5000"),
    )

    assert response.status_code == 302
    assert BudgetCounter.objects.get().exhausted_at is None
