"""A conversation far larger than one websocket frame, in the browser.

The page gets the newest messages first and loads older ones when the reader
scrolls up (or presses "Load earlier messages"); a message longer than a
frame arrives in chunks and is shown whole.
"""

from __future__ import annotations

import pytest

from chat.models import Conversation, Message, MessageRole
from tests.e2e.conftest import SIM_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

COUNT = 40
BIG = 7
BIG_CHARS = 300_000  # over the 256 KiB frame cap


def text_of(index: int) -> str:
    size = BIG_CHARS if index == BIG else 32_000
    unit = f"Message {index} says caf\u00e9 again. "
    return f"Start of message {index}. " + unit * (size // len(unit))


@pytest.fixture
def big_conversation(owner) -> Conversation:
    conversation = Conversation.objects.create(
        user=owner, title="Long talk", model_name=SIM_MODEL
    )
    for index in range(COUNT):
        Message.objects.create(
            conversation=conversation,
            role=MessageRole.USER if index % 2 == 0 else MessageRole.ASSISTANT,
            content=text_of(index),
        )
    return conversation


def test_scrolling_up_loads_every_earlier_message(
    page, login, owner, sim_model, big_conversation, screenshot
):
    login(page, owner)
    page.goto(f"/chat/c/{big_conversation.id}/")
    page.wait_for_selector(f"article >> text=Start of message {COUNT - 1}.")

    shown_first = page.locator("article.msg").count()
    assert 0 < shown_first < COUNT
    assert page.locator("button.load-earlier").is_visible()
    screenshot(page, "history-01-newest-page")

    # Scroll to the top until everything is there, as a reader would.
    for _ in range(COUNT):
        if page.locator("button.load-earlier").count() == 0:
            break
        page.locator("#messages").evaluate("m => { m.scrollTop = 0; }")
        page.wait_for_timeout(150)

    page.wait_for_selector("article >> text=Start of message 0.")
    assert page.locator("article.msg").count() == COUNT
    assert page.locator("button.load-earlier").count() == 0
    # The message longer than a frame arrived in chunks and is shown whole.
    big = page.locator("article.msg").nth(BIG).inner_text()
    assert f"Start of message {BIG}." in big
    assert len(big) >= BIG_CHARS - 100
