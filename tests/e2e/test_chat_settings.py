"""Conversation settings and presets in the system Chromium, against the simulator.

The simulated upstream answers ``/sim echo_settings`` with the system prompt
and the temperature, top_p and max_tokens it received, so what the browser
shows is what reached the upstream.
"""

from __future__ import annotations

import pytest

from chat.models import Conversation, Preset
from gateway.models import ModelDefaults
from tests.e2e.conftest import SIM_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO = "/sim echo_settings\nWho are you?"
DONE = ".msg-assistant:last-of-type:not([data-status=streaming]) .bubble"


def ask(page, text: str) -> str:
    """Send a question and return the text of its finished answer."""
    count = page.locator(".msg-assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg-assistant').length > n", arg=count
    )
    page.wait_for_selector(DONE, timeout=15_000)
    return page.locator(".msg-assistant .bubble").last.inner_text()


def open_settings(page) -> None:
    page.wait_for_function("window.llmsiteChat.socket.connected")
    page.click("#settings-button")
    page.wait_for_selector("#settings-panel[open]")


def fill_settings(page, **values: str) -> None:
    for field, value in values.items():
        page.fill(f"#settings-{field}", value)


def test_a_system_prompt_changes_the_answer_and_params_reach_the_upstream(
    page, login, owner, sim_model, screenshot
):
    login(page, owner)
    assert page.locator("#model option").all_inner_texts() == [f"{SIM_MODEL} · 8k"]
    open_settings(page)
    fill_settings(
        page,
        system_prompt="You are a pirate.",
        temperature="0.4",
        top_p="0.8",
        max_tokens="500",
    )
    screenshot(page, "settings-01-panel")
    page.click("#settings-apply")
    page.wait_for_selector("#settings-panel", state="hidden")

    answer = ask(page, ECHO)

    assert "system: You are a pirate." in answer
    assert "temperature: 0.4" in answer
    assert "top_p: 0.8" in answer
    assert "max_tokens: 500" in answer
    conversation = Conversation.objects.get()
    assert (conversation.system_prompt, conversation.max_tokens) == (
        "You are a pirate.",
        500,
    )

    # The same conversation, changed: a settings frame, then the next answer.
    open_settings(page)
    assert page.input_value("#settings-system_prompt") == "You are a pirate."
    fill_settings(page, system_prompt="You are a poet.", temperature="1.1")
    page.press("#settings-temperature", "Enter")
    page.wait_for_selector("#settings-panel", state="hidden")

    answer = ask(page, ECHO)

    assert "system: You are a poet." in answer
    assert "temperature: 1.1" in answer
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.temperature) == (
        "You are a poet.",
        1.1,
    )


def test_out_of_range_values_are_named_and_nothing_is_sent(
    page, login, owner, sim_model
):
    login(page, owner)
    open_settings(page)
    fill_settings(page, temperature="3")

    page.click("#settings-apply")

    assert page.locator("#settings-error").inner_text() == (
        "temperature must be a number from 0 to 2, or empty."
    )
    assert page.locator("#settings-panel[open]").count() == 1
    # Keyboard: Esc closes the panel and gives the focus back to its button.
    page.keyboard.press("Escape")
    page.wait_for_selector("#settings-panel", state="hidden")
    assert page.evaluate("document.activeElement.id") == "settings-button"
    assert not Conversation.objects.exists()


def test_a_saved_preset_is_applied_to_a_new_chat(page, login, owner, sim_model):
    login(page, owner)
    open_settings(page)
    fill_settings(page, system_prompt="Answer in haiku.", top_p="0.3")
    page.fill("#settings-preset-name", "Haiku")
    page.click("#settings-save-preset")
    page.wait_for_function(
        "[...document.querySelectorAll('#settings-preset option')]"
        ".some(o => o.textContent.startsWith('Haiku'))"
    )
    page.click("#settings-cancel")
    preset = Preset.objects.get(user=owner)
    assert (preset.name, preset.system_prompt, preset.top_p) == (
        "Haiku",
        "Answer in haiku.",
        0.3,
    )

    # A later new chat picks it.
    page.reload()
    open_settings(page)
    assert page.input_value("#settings-system_prompt") == ""
    page.select_option("#settings-preset", str(preset.pk))
    assert page.input_value("#settings-system_prompt") == "Answer in haiku."
    page.click("#settings-apply")
    page.wait_for_selector("#settings-panel", state="hidden")

    answer = ask(page, ECHO)

    assert "system: Answer in haiku." in answer
    assert "top_p: 0.3" in answer


def test_a_new_chat_starts_with_the_models_defaults(page, login, owner, sim_model):
    ModelDefaults.objects.create(
        model_name=SIM_MODEL, system_prompt="Be precise.", temperature=0.2
    )
    login(page, owner)

    answer = ask(page, ECHO)

    assert "system: Be precise." in answer
    assert "temperature: 0.2" in answer
    open_settings(page)
    assert page.input_value("#settings-system_prompt") == "Be precise."
