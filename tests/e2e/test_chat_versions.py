"""Answer versions in the browser: the pager after regenerate and after edit."""

from __future__ import annotations

import pytest

from chat.models import Message, MessageRole
from gateway.simulator import Behaviour

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ANSWER = ".msg-assistant"


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_answer(page) -> None:
    page.wait_for_selector(
        ".msg-assistant:last-of-type:not([data-status=streaming])", timeout=15_000
    )


def wait_for_last_answer(page, text: str) -> None:
    page.wait_for_function(
        "(text) => [...document.querySelectorAll('.msg-assistant .bubble')]"
        ".at(-1)?.innerText === text",
        arg=text,
    )
    wait_for_answer(page)


def bubbles(page) -> list[str]:
    return page.locator(".msg .bubble").all_inner_texts()


def test_switching_answer_versions_after_regenerate(
    page, login, owner, sim_model, simulator, screenshot
):
    simulator.script(
        Behaviour(reply="The first answer."), Behaviour(reply="The second answer.")
    )
    login(page, owner)
    ask(page, "Say something.")
    wait_for_last_answer(page, "The first answer.")
    # A single version has no pager.
    assert page.locator(".versions").count() == 0

    page.click(".msg-assistant .regenerate")
    wait_for_last_answer(page, "The second answer.")
    pager = page.locator(f"{ANSWER} .versions")
    assert pager.get_attribute("aria-label") == "Version 2 of 2"
    assert pager.locator(".versions-position").inner_text() == "2 / 2"
    screenshot(page, "versions-01-regenerated")

    # By keyboard: the previous version, then focus stays in the pager.
    page.focus(f"{ANSWER} [aria-label='Previous version']")
    page.keyboard.press("Enter")
    wait_for_last_answer(page, "The first answer.")

    assert pager.get_attribute("aria-label") == "Version 1 of 2"
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == (
        "Next version"
    )
    assert page.locator(f"{ANSWER}").count() == 1

    # The next question continues from the version shown.
    ask(page, "/sim echo\nAnd then?")
    wait_for_last_answer(page, "And then?")
    question = Message.objects.get(role=MessageRole.USER, content__endswith="then?")
    assert question.parent.content == "The first answer."
    assert bubbles(page) == [
        "Say something.",
        "The first answer.",
        "/sim echo\nAnd then?",
        "And then?",
    ]


def test_switching_question_versions_after_edit_brings_their_branches(
    page, login, owner, sim_model, screenshot
):
    login(page, owner)
    ask(page, "/sim echo\nfirst version")
    wait_for_last_answer(page, "first version")
    ask(page, "/sim echo\nfollow-up")
    wait_for_last_answer(page, "follow-up")

    page.locator(".msg-user [data-action=edit]").first.click()
    page.fill(".editor textarea", "/sim echo\nsecond version")
    page.press(".editor textarea", "Enter")
    wait_for_last_answer(page, "second version")

    assert bubbles(page) == ["/sim echo\nsecond version", "second version"]
    pager = page.locator(".msg-user .versions")
    assert pager.get_attribute("aria-label") == "Version 2 of 2"
    screenshot(page, "versions-02-edited")

    page.click(".msg-user [aria-label='Previous version']")
    page.wait_for_function(
        "document.querySelectorAll('.msg').length === 4", timeout=10_000
    )
    assert bubbles(page) == [
        "/sim echo\nfirst version",
        "first version",
        "/sim echo\nfollow-up",
        "follow-up",
    ]
    assert page.locator(".msg-user .versions").first.get_attribute("aria-label") == (
        "Version 1 of 2"
    )

    page.locator(".msg-user").first.locator("[aria-label='Next version']").click()
    page.wait_for_function(
        "document.querySelectorAll('.msg').length === 2", timeout=10_000
    )
    assert bubbles(page) == ["/sim echo\nsecond version", "second version"]

    # A reload shows the version last chosen.
    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg').length === 2")
    assert bubbles(page) == ["/sim echo\nsecond version", "second version"]
