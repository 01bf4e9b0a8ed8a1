"""A small budget's last tokens, spent from the chat page in the system Chromium."""

from __future__ import annotations

import re

import pytest

from gateway import router
from gateway.models import Budget, BudgetScope, ModelRoute, UsageRecord, UsageStatus
from gateway.simulator import Behaviour

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_small_daily_budget_gets_a_shorter_answer_not_a_refusal(
    page, login, owner, sim_model, simulator, screenshot
):
    # As in the demo: routes allow 2,000 output tokens, more than the budget.
    ModelRoute.objects.update(max_output_tokens=2000)
    router.forget_routes()
    simulator.set_behaviour(Behaviour(completion_tokens=3000))
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=1200)
    login(page, owner)
    assert "1,200 tokens left today" in page.locator("#budget").inner_text()

    page.fill("#input", "Tell me everything about tea.")
    page.press("#input", "Enter")
    page.wait_for_selector(
        ".msg-assistant:last-of-type:not([data-status=streaming])", timeout=20_000
    )
    page.wait_for_function(
        "!document.querySelector('#budget').innerText.startsWith('1,200 ')"
    )
    screenshot(page, "budget-last-tokens")

    record = UsageRecord.objects.get()
    assert record.status == UsageStatus.OK
    assert 0 < record.completion_tokens < 1200
    assert page.locator("#banner:not([hidden])").count() == 0
    assert page.locator(".msg-assistant .bubble").last.inner_text().strip()
    left = int(
        re.match(r"([\d,]+) tokens left", page.locator("#budget").inner_text())
        .group(1)
        .replace(",", "")
    )
    assert left < 1200 - record.completion_tokens
