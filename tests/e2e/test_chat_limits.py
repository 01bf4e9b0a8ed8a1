"""The chat page shows a per-minute limit once it is near, and whose it is when hit."""

from __future__ import annotations

import pytest

from gateway import limits
from gateway.models import UserLimits
from tests.e2e.test_chat_browser import ask, wait_for_answer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_requests_left_show_when_near_and_a_refusal_names_the_limit(
    page, login, owner, sim_model, settings, screenshot
):
    settings.RATE_LIMIT_RPM = 0
    UserLimits.objects.create(user=owner, rpm_limit=3)
    limits._caller_limits.clear()
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")
    note = page.locator("#rate-limit")
    assert note.is_hidden()

    ask(page, "First question")
    wait_for_answer(page)
    page.wait_for_function(
        "document.querySelector('#rate-limit').textContent"
        " === '2 requests left this minute'"
    )
    ask(page, "Second question")
    page.wait_for_function(
        "document.querySelector('#rate-limit').textContent"
        " === '1 request left this minute'"
    )
    ask(page, "Third question")
    page.wait_for_function(
        "document.querySelector('#rate-limit').textContent"
        " === '0 requests left this minute'"
    )
    ask(page, "Fourth question")
    banner = page.locator("#banner")
    banner.wait_for(state="visible")

    assert banner.inner_text().startswith(
        "Your limit of 3 requests per minute is used up; it resets in "
    )
    assert page.input_value("#input") == "Fourth question"
    screenshot(page, "limits-refused")
