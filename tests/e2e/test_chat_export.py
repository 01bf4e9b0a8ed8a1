"""In Chromium: downloading conversations, the cursor, unsafe links, the
keyboard shortcuts with their help, and the theme toggle."""

from __future__ import annotations

import json
import re

import pytest

from chat.models import Conversation, Message, MessageRole
from gateway.simulator import Behaviour
from tests.e2e.conftest import SIM_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ROW = ".conversation"
FINISHED = ".msg-assistant:last-of-type:not([data-status=streaming])"
DARK_BG = "rgb(21, 23, 27)"
LIGHT_BG = "rgb(255, 255, 255)"


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def answered(page, question: str, reply: str, simulator) -> None:
    simulator.set_behaviour(Behaviour(reply=reply))
    ask(page, question)
    page.wait_for_selector(FINISHED)


def download(page, trigger) -> str:
    with page.expect_download() as info:
        trigger()
    return info.value.path().read_text(encoding="utf-8"), info.value.suggested_filename


def background(page) -> str:
    return page.evaluate("getComputedStyle(document.body).backgroundColor")


# --- Export -------------------------------------------------------------------


def test_a_conversation_downloads_and_reads_back(
    page, login, owner, sim_model, simulator, screenshot
):
    login(page, owner)
    answered(
        page, "## Tides, *briefly*\nplease", "The moon:\n\n```\npull\n```", simulator
    )
    page.wait_for_selector(f"{ROW} .conversation-link:text('Tides, briefly')")

    toggle = page.locator(f"{ROW} .download-toggle")
    toggle.focus()
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true"
    screenshot(page, "export-01-download-menu")
    data, name = download(
        page, lambda: page.click(f"{ROW} .download-menu >> text=JSON")
    )
    assert name == "tides-briefly.json"
    document = json.loads(data)
    [conversation] = document["conversations"]
    assert document["format"] == "llmsite.conversations"
    assert conversation["title"] == "Tides, briefly"
    question, answer = conversation["messages"]
    assert question["content"] == "## Tides, *briefly*\nplease"
    assert answer["content"] == "The moon:\n\n```\npull\n```"
    assert answer["endpoint"] == "primary"
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["usage"]["request_id"]

    toggle.click()
    text, name = download(
        page, lambda: page.click(f"{ROW} .download-menu >> text=Markdown")
    )
    assert name == "tides-briefly.md"
    assert text.startswith("# Tides, briefly\n")
    assert "## You · " in text
    assert f"## Assistant ({SIM_MODEL}) · " in text
    assert "The moon:\n\n```\npull\n```" in text
    assert "_via primary · " in text

    everything, name = download(page, lambda: page.click("#export-all"))
    assert name == "llmsite-conversations.json"
    assert json.loads(everything)["conversations"][0]["id"] == conversation["id"]


def test_another_users_export_link_finds_nothing(page, login, owner, other_user):
    theirs = Conversation.objects.create(user=other_user, title="Bob's plans")
    login(page, owner)

    response = page.request.get(f"/chat/export/{theirs.id}.json")

    assert response.status == 404
    assert "Bob" not in response.text()


# --- What the answer looks like -----------------------------------------------


def test_the_cursor_sits_after_the_last_text(page, login, owner, sim_model, simulator):
    login(page, owner)
    lines = "\n".join(f"value_{n} = {n}" for n in range(80))
    items = "- one\n- two three four five six seven eight"
    reply = f"Intro.\n\n{items}\n\n```python\n{lines}\n```"
    simulator.set_behaviour(Behaviour(reply=reply, tokens_per_second=40))
    ask(page, "Write it slowly")

    # Measured in the same task as it is found: the text moves on meanwhile.
    in_item = page.wait_for_function(
        """() => {
          const cursor = document.querySelector('.msg-assistant .bubble li > .cursor');
          if (!cursor || !cursor.previousSibling) return null;
          const item = cursor.parentElement;
          const range = document.createRange();
          range.selectNodeContents(item);
          range.setEndBefore(cursor);
          const rects = range.getClientRects();
          if (!rects.length) return null;
          const text = rects[rects.length - 1];
          const box = cursor.getBoundingClientRect();
          return {tag: item.tagName, sameLine: Math.abs(box.top - text.top) < 4,
                  after: box.left >= text.right - 1};
        }"""
    ).json_value()
    assert in_item == {"tag": "LI", "sameLine": True, "after": True}

    page.wait_for_selector(".msg-assistant .bubble pre code .cursor")
    assert page.locator(".msg-assistant .bubble > .cursor").count() == 0


def test_an_unsafe_link_is_shown_as_plain_text(
    page, login, owner, sim_model, simulator
):
    login(page, owner)
    answered(
        page,
        "links please",
        "Try [click me](javascript:alert(1)) or [the docs](https://example.com/docs).",
        simulator,
    )

    bubble = page.locator(".msg-assistant .bubble")
    links = bubble.locator("a")
    assert links.count() == 1
    assert links.first.get_attribute("href") == "https://example.com/docs"
    assert "Try click me or the docs." in bubble.inner_text()
    assert "javascript" not in bubble.inner_html()


# --- Keyboard -----------------------------------------------------------------


def test_the_help_lists_the_shortcuts_and_gives_the_focus_back(
    page, login, owner, screenshot
):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")

    # Typing a question mark in the message box is just typing.
    page.press("#input", "?")
    assert page.input_value("#input") == "?"
    assert not page.locator("#shortcuts-dialog").is_visible()

    page.focus("#messages")
    page.keyboard.press("?")
    dialog = page.locator("#shortcuts-dialog")
    assert dialog.is_visible()
    assert page.evaluate("document.activeElement.closest('dialog') !== null")
    text = dialog.inner_text()
    assert "New chat" in text and "Search conversations" in text
    screenshot(page, "export-02-shortcuts-help")
    assert re.search(r"Ctrl\s*\+\s*Shift\s*\+\s*O", text)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('dialog') !== null")
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    assert page.evaluate("document.activeElement.id") == "messages"

    page.click("#shortcuts-help")
    assert dialog.is_visible()
    page.click("#shortcuts-dialog button")
    assert not dialog.is_visible()
    assert page.evaluate("document.activeElement.id") == "shortcuts-help"


def test_shortcuts_start_a_new_chat_and_go_to_search(page, login, owner):
    conversation = Conversation.objects.create(user=owner, title="Old plans")
    Message.objects.create(
        conversation=conversation, role=MessageRole.USER, content="old question"
    )
    login(page, owner, f"/chat/c/{conversation.id}/")
    page.wait_for_selector(".msg-user")

    page.focus("#input")
    page.keyboard.press("Control+K")
    assert page.evaluate("document.activeElement.id") == "search"

    page.keyboard.press("Control+Shift+O")
    page.wait_for_url("**/chat/")
    assert page.locator("#conversation-title").inner_text() == "New chat"
    assert page.locator(".msg-user").count() == 0
    assert page.evaluate("document.activeElement.id") == "input"


# --- Theme --------------------------------------------------------------------


def test_the_theme_choice_persists_across_reloads_and_pages(
    page, login, owner, screenshot
):
    page.emulate_media(color_scheme="light")
    login(page, owner)
    toggle = page.locator("#theme-toggle")
    assert toggle.inner_text() == "◐ System"
    assert toggle.get_attribute("aria-label") == "Theme: System (change)"
    assert background(page) == LIGHT_BG

    toggle.click()
    assert toggle.inner_text() == "☀ Light"
    toggle.click()
    assert toggle.inner_text() == "☾ Dark"
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert background(page) == DARK_BG

    page.reload()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert background(page) == DARK_BG
    assert page.locator("#theme-toggle").inner_text() == "☾ Dark"
    screenshot(page, "export-03-dark-theme")
    page.goto("/usage/")
    assert background(page) == DARK_BG

    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") is None
    assert page.evaluate("localStorage.getItem('llmsite-theme')") is None
    page.emulate_media(color_scheme="dark")
    assert background(page) == DARK_BG
    page.emulate_media(color_scheme="light")
    assert background(page) == LIGHT_BG
