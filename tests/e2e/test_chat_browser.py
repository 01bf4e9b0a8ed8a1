"""The chat page in the system Chromium, against a live daphne and the simulator.

Screenshots of the main states go to test-artifacts/e2e/.
"""

from __future__ import annotations

import time

import pytest

from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway.models import Budget, BudgetScope, UsageRecord, UsageStatus
from gateway.simulator import Behaviour, generated_tokens
from tests.e2e.conftest import SIM_MODEL, TOKENS_PER_SECOND

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ANSWER = ".msg-assistant"
LIVE = ".msg-assistant[data-status=streaming]"
FOOTER = ".msg-assistant .msg-footer"


def slow_answers(simulator, tokens: int = 200) -> str:
    """Make every answer take a while (tokens / TOKENS_PER_SECOND seconds)."""
    simulator.set_behaviour(
        Behaviour(tokens_per_second=TOKENS_PER_SECOND, completion_tokens=tokens)
    )
    return "".join(generated_tokens(tokens))


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def answer_text(page) -> str:
    return page.locator(f"{ANSWER} .bubble").last.inner_text()


def wait_for_answer(page, timeout: float = 15_000) -> None:
    page.wait_for_selector(
        ".msg-assistant:last-of-type:not([data-status=streaming])", timeout=timeout
    )


def test_signing_in_opens_the_chat_page(page, login, owner, sim_model, screenshot):
    login(page, owner)

    page.wait_for_function("window.llmsiteChat.socket.connected")
    assert page.locator("#model option").all_inner_texts() == [f"{SIM_MODEL} · 8k"]
    assert page.locator("#budget").inner_text().endswith("no budget limit")
    screenshot(page, "01-empty-chat")


def test_the_page_works_under_its_own_policy(
    browser, live_server_url, login, owner, sim_model
):
    context = browser.new_context(base_url=live_server_url)
    page = context.new_page()
    console = []
    page.on("console", lambda message: console.append(message.text))
    try:
        login(page, owner)
        ask(page, "Hello under a strict policy.")
        page.locator(
            ".msg-assistant:not([data-status=streaming]) .msg-footer"
        ).wait_for()
        footer = page.locator(".msg-assistant .msg-footer").inner_text()
    finally:
        context.close()

    assert "via primary" in footer
    assert not [text for text in console if "Content Security Policy" in text]


def test_tokens_arrive_as_they_are_written(
    page, login, owner, sim_model, simulator, screenshot
):
    full = slow_answers(simulator, tokens=120)
    login(page, owner)

    ask(page, "Explain with some code.")
    page.wait_for_selector(LIVE)
    lengths = []
    for _ in range(4):
        page.wait_for_timeout(300)
        lengths.append(len(answer_text(page)))
    screenshot(page, "02-streaming")
    wait_for_answer(page)

    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] < len(full)
    assert page.locator(".msg-user .bubble").inner_text() == "Explain with some code."
    footer = page.locator(FOOTER).inner_text()
    assert "via primary" in footer and "120 out" in footer and "first token" in footer
    # The simulator's reply holds a fenced code block: highlighted, with a copy button.
    assert page.locator(".code-block pre code.hljs").count() == 1
    assert page.locator(".code-block .copy-code").count() == 1
    assert page.locator("#conversation-title").inner_text() == "Explain with some code."
    assert "/chat/c/" in page.url
    assert page.locator(".conversation-link").all_inner_texts() == [
        "Explain with some code."
    ]
    assert page.locator("#gauge .gauge-text").inner_text().startswith("Context:")
    screenshot(page, "03-answer-with-code")


def test_stop_keeps_the_partial_answer_and_closes_the_upstream_request(
    page, login, owner, sim_model, simulator, screenshot
):
    full = slow_answers(simulator, tokens=400)
    disconnects = simulator.stats.client_disconnects
    login(page, owner)
    ask(page, "Talk for a long time.")
    page.wait_for_selector(LIVE)
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble').innerText.length > 40"
    )

    page.click("#stop")
    wait_for_answer(page)
    simulator.wait_for_disconnects_sync(disconnects + 1)

    footer = page.locator(FOOTER).inner_text()
    assert "stopped" in footer
    assert page.locator("#send").is_visible()
    answer = Message.objects.get(role=MessageRole.ASSISTANT)
    assert answer.status == MessageStatus.PARTIAL
    assert 40 < len(answer.content) < len(full)
    assert answer.usage.status == UsageStatus.CANCELLED
    # The usage of a stopped answer comes from its cancelled record.
    assert answer.token_count == answer.usage.completion_tokens > 0
    assert answer.endpoint_name == "primary"
    assert "via primary" in footer
    assert f"{answer.usage.completion_tokens} out" in footer
    screenshot(page, "04-stopped")


def test_escape_stops_and_regenerate_writes_a_new_answer(
    page, login, owner, sim_model, simulator, screenshot
):
    simulator.script(
        Behaviour(
            reply="The first answer takes its time to arrive.", tokens_per_second=4
        ),
        Behaviour(reply="The second answer."),
    )
    login(page, owner)
    ask(page, "Say something.")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble')?.innerText.startsWith('The')"
    )
    page.keyboard.press("Escape")
    wait_for_answer(page)
    assert "stopped" in page.locator(FOOTER).inner_text()

    page.click(".msg-assistant .regenerate")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble')?.innerText"
        " === 'The second answer.'"
    )
    wait_for_answer(page)

    assert page.locator(ANSWER).count() == 1
    # The stopped answer is kept as the first version.
    assert list(
        Message.objects.filter(role=MessageRole.ASSISTANT)
        .order_by("created_at")
        .values_list("status", "active")
    ) == [(MessageStatus.PARTIAL, False), (MessageStatus.COMPLETE, True)]
    assert [r.status for r in UsageRecord.objects.order_by("created_at")] == [
        UsageStatus.CANCELLED,
        UsageStatus.OK,
    ]
    screenshot(page, "05-regenerated")


def test_edit_and_resend_answers_the_new_question(page, login, owner, sim_model):
    login(page, owner)
    ask(page, "/sim echo\nfirst version")
    wait_for_answer(page)

    page.click(".msg-user [data-action=edit]")
    page.fill(".editor textarea", "/sim echo\nsecond version")
    page.press(".editor textarea", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble')?.innerText"
        " === 'second version'"
    )

    assert page.locator(".msg-user .bubble").inner_text() == "/sim echo\nsecond version"
    assert page.locator(".msg-user").count() == 1


def test_shift_enter_makes_a_new_line(page, login, owner, sim_model):
    login(page, owner)

    page.fill("#input", "/sim echo")
    page.press("#input", "Shift+Enter")
    page.type("#input", "two lines")
    assert page.locator(".msg-user").count() == 0
    page.press("#input", "Enter")
    wait_for_answer(page)

    assert page.locator(".msg-user .bubble").inner_text() == "/sim echo\ntwo lines"
    assert page.locator("#input").input_value() == ""


def test_a_fallback_is_shown_under_the_answer(
    page, login, owner, sim_model, simulator, screenshot
):
    simulator.set_behaviour(
        Behaviour(fault="status", fault_status=503), prefix="/e/primary"
    )
    login(page, owner)

    ask(page, "Is anyone there?")
    wait_for_answer(page)

    notice = page.locator(".msg-assistant .notice").first.inner_text()
    assert "primary failed" in notice and "HTTP 503" in notice
    assert "moved on to fallback" in notice
    assert "via fallback" in page.locator(FOOTER).inner_text()
    screenshot(page, "06-fallback-notice")


def test_a_status_line_says_what_happens_until_the_answer_replaces_it(
    page, login, owner, sim_model, simulator, screenshot
):
    simulator.set_behaviour(
        Behaviour(fault="status", fault_status=503), prefix="/e/primary"
    )
    # The fallback takes a moment to its first token: the line stays meanwhile.
    full = slow_answers(simulator, tokens=40)
    simulator.set_behaviour(
        Behaviour(ttft=2.0, tokens_per_second=TOKENS_PER_SECOND, completion_tokens=40),
        prefix="/e/fallback",
    )
    page.set_viewport_size({"width": 390, "height": 844})
    page.emulate_media(color_scheme="dark")
    login(page, owner)

    ask(page, "Is anyone there?")
    line = page.locator(f"{LIVE} .msg-waiting")
    line.wait_for()
    shown = line.inner_text()
    polite = line.get_attribute("aria-live")
    footer_while_waiting = page.locator(f"{LIVE} .msg-footer").inner_text()
    screenshot(page, "06b-status-line-phone-dark")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble')?.innerText.length > 0"
    )
    gone_with_first_text = page.locator(".msg-waiting:visible").count() == 0
    wait_for_answer(page)

    assert shown == "primary failed (HTTP 503), trying fallback…"
    assert polite == "polite"
    assert footer_while_waiting == ""
    assert gone_with_first_text
    assert page.locator(".msg-waiting:visible").count() == 0
    stored = Message.objects.get(role=MessageRole.ASSISTANT)
    assert (stored.status, stored.content) == (MessageStatus.COMPLETE, full)
    assert "via fallback" in page.locator(FOOTER).inner_text()
    # The line never took the focus from the message box.
    assert page.evaluate("document.activeElement.id") == "input"


def test_a_reload_mid_answer_resumes_it(
    page, login, owner, sim_model, simulator, screenshot
):
    full = slow_answers(simulator, tokens=240)
    disconnects = simulator.stats.client_disconnects
    login(page, owner)
    ask(page, "A long answer, please.")
    page.wait_for_function(
        "document.querySelector('.msg-assistant .bubble')?.innerText.length > 60"
    )
    before = len(answer_text(page))

    page.reload()
    page.wait_for_selector(LIVE)
    resumed = len(answer_text(page))
    screenshot(page, "07-resumed-after-reload")
    wait_for_answer(page, timeout=20_000)

    assert resumed >= before
    assert page.locator(".msg-user .bubble").inner_text() == "A long answer, please."
    stored = Message.objects.get(role=MessageRole.ASSISTANT)
    assert (stored.status, stored.content) == (MessageStatus.COMPLETE, full)
    assert simulator.stats.client_disconnects == disconnects
    assert UsageRecord.objects.get().status == UsageStatus.OK


def test_model_output_cannot_run_script(page, login, owner, sim_model, screenshot):
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    login(page, owner)

    ask(
        page,
        '/sim reply="<img src=x onerror=\\"window.pwned=1;alert(1)\\"> '
        "<script>window.pwned=2</script> [click](javascript:window.pwned=3) "
        '<a href=\\"javascript:window.pwned=4\\">me</a>"',
    )
    wait_for_answer(page)

    bubble = page.locator(".msg-assistant .bubble")
    # The neutralised links are plain text: nothing left to click.
    assert bubble.locator("a").count() == 0
    assert " click <a href=" in bubble.inner_text()
    assert '<img src=x onerror="window.pwned=1;alert(1)">' in bubble.inner_text()
    assert "<script>window.pwned=2</script>" in bubble.inner_text()
    assert bubble.locator("img, script").count() == 0
    hrefs = bubble.locator("a").evaluate_all("links => links.map(a => a.href)")
    assert not any(h.startswith("javascript:") for h in hrefs)
    assert page.evaluate("window.pwned") is None
    assert dialogs == []
    screenshot(page, "08-xss-shown-as-text")


def test_errors_are_sentences_and_the_question_can_be_retried(
    page, login, owner, sim_model, simulator, screenshot
):
    simulator.set_behaviour(Behaviour(fault="status", fault_status=503))
    login(page, owner)

    ask(page, "Hello?")
    page.wait_for_selector(".msg-assistant .msg-error[role=alert]")
    error = page.locator(".msg-assistant .msg-error").inner_text()
    screenshot(page, "09-all-endpoints-down")
    simulator.reset()
    page.wait_for_function(
        "document.querySelector('.msg-assistant .regenerate').innerText === 'Retry'",
        timeout=20_000,
    )
    page.click(".msg-assistant .regenerate")
    page.wait_for_selector(".msg-assistant[data-status=complete]", timeout=20_000)

    assert error.startswith("No endpoint can answer right now")
    assert "Your message is saved" in error
    assert page.locator(".msg-user .bubble").inner_text() == "Hello?"
    assert [r.status for r in UsageRecord.objects.order_by("created_at")] == [
        UsageStatus.ERROR,
        UsageStatus.OK,
    ]


def test_the_sidebar_searches_renames_and_deletes(
    page, login, owner, other_user, sim_model
):
    for user, title, text in (
        (owner, "Sea", "How do tides work?"),
        (owner, "Bread", "Sourdough starter"),
        (other_user, "Bob's tides", "tides again"),
    ):
        conversation = Conversation.objects.create(user=user, title=title)
        Message.objects.create(conversation=conversation, role="user", content=text)
    login(page, owner)
    page.wait_for_selector(".conversation")
    assert page.locator(".conversation-link").count() == 2

    page.fill("#search", "tides")
    page.wait_for_function("document.querySelectorAll('.conversation').length === 1")
    assert page.locator(".conversation-link").inner_text() == "Sea"

    page.fill("#search", "")
    page.wait_for_function("document.querySelectorAll('.conversation').length === 2")
    bread = page.locator(".conversation", has_text="Bread")
    bread.hover()
    bread.get_by_role("button", name="Rename").click()
    page.fill(".rename-input", "Baking")
    page.press(".rename-input", "Enter")
    page.wait_for_function(
        "[...document.querySelectorAll('.conversation-link')]"
        ".some(a => a.innerText === 'Baking')"
    )
    page.on("dialog", lambda dialog: dialog.accept())
    sea = page.locator(".conversation", has_text="Sea")
    sea.hover()
    sea.get_by_role("button", name="Delete").click()
    page.wait_for_function("document.querySelectorAll('.conversation').length === 1")

    assert list(
        Conversation.objects.filter(user=owner).values_list("title", flat=True)
    ) == ["Baking"]


def test_budget_and_context_gauge_are_shown(page, login, owner, sim_model):
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=100_000)
    login(page, owner)
    assert "100,000 tokens left today" in page.locator("#budget").inner_text()

    ask(page, "Count my tokens.")
    wait_for_answer(page)

    record = UsageRecord.objects.get()
    left = 100_000 - record.prompt_tokens - record.completion_tokens
    page.wait_for_function(
        f"document.querySelector('#budget').innerText.includes('{left:,}')"
    )
    gauge = page.locator("#gauge .gauge-text").inner_text()
    assert gauge.startswith("Context: ") and "tokens" in gauge


def test_a_phone_in_dark_mode_can_chat(
    browser, live_server_url, owner, sim_model, login, screenshot
):
    context = browser.new_context(
        base_url=live_server_url,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
        is_mobile=True,
        has_touch=True,
    )
    page = context.new_page()
    try:
        login(page, owner)
        assert not page.locator("#sidebar").is_visible() or page.evaluate(
            "document.querySelector('#sidebar').getBoundingClientRect().right <= 0"
        )
        ask(page, "Hello from a phone.")
        wait_for_answer(page)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        screenshot(page, "10-phone-dark")

        page.click("#open-sidebar")
        page.wait_for_timeout(300)
        assert page.locator(".conversation-link").first.is_visible()
        screenshot(page, "11-phone-sidebar")
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        assert page.locator("#input").is_visible()
    finally:
        context.close()

    assert background == "rgb(21, 23, 27)"


def test_the_page_is_usable_by_keyboard(page, login, owner, sim_model, simulator):
    simulator.set_behaviour(Behaviour(reply="Keyboard answer."))
    login(page, owner)

    # The message box has focus on arrival; the first Tab stop is the skip link.
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.type("Typed without a mouse")
    page.keyboard.press("Enter")
    wait_for_answer(page)
    page.keyboard.press("Shift+Tab")
    started = time.monotonic()
    while page.evaluate("document.activeElement.tagName") == "BODY":
        assert time.monotonic() - started < 2
        page.keyboard.press("Shift+Tab")

    assert answer_text(page) == "Keyboard answer."
    assert page.evaluate("document.activeElement !== document.body")


def test_a_blank_message_cannot_be_sent(page, login, owner, sim_model):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")

    assert page.locator("#send").is_disabled()
    page.fill("#input", "   \n  ")
    assert page.locator("#send").is_disabled()
    page.press("#input", "Enter")
    page.wait_for_timeout(300)
    assert page.locator(ANSWER).count() == 0
    assert not Message.objects.exists()
    page.fill("#input", "Now with words.")
    assert page.locator("#send").is_enabled()


def test_sidebar_titles_use_the_width_and_show_a_running_answer(
    page, login, owner, sim_model, simulator
):
    slow_answers(simulator, tokens=200)
    login(page, owner)
    title = "A conversation title that is long enough to need the whole sidebar"
    ask(page, title)
    page.wait_for_selector(LIVE)
    row = page.locator(".conversation").first
    page.mouse.move(900, 500)  # Not hovering the row.

    page.wait_for_selector(".conversation.running")
    dot = page.evaluate(
        """() => {
        const row = document.querySelector('.conversation.running');
        const style = getComputedStyle(row, '::after');
        const link = row.querySelector('.conversation-link');
        const rowBox = row.getBoundingClientRect();
        return {content: style.content, width: parseFloat(style.width) || 0,
                linkRight: link.getBoundingClientRect().right, rowRight: rowBox.right,
                linkWidth: link.getBoundingClientRect().width, rowWidth: rowBox.width};
    }"""
    )
    assert "●" in dot["content"]
    # The dot is outside the truncated title, and the hidden buttons take no room.
    assert dot["rowRight"] - dot["linkRight"] > 5
    assert dot["linkWidth"] > dot["rowWidth"] * 0.8
    for button in row.locator(".icon-btn").all():
        assert button.bounding_box()["width"] == 0

    # Keyboard users reach the buttons: focus shows them.
    row.locator(".icon-btn").first.focus()
    assert row.locator(".icon-btn").first.bounding_box()["width"] > 10
    page.click("#stop")
    wait_for_answer(page)


def test_a_refused_message_stays_in_the_input_with_the_reason(
    page, login, owner, sim_model, screenshot
):
    Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=1)
    login(page, owner)

    ask(page, "Is there budget left?")
    page.wait_for_selector("#banner:not([hidden])")
    # Read before the screenshot: a slow machine can outlast the banner.
    banner = page.locator("#banner").inner_text()
    screenshot(page, "16-refused-send-kept")

    assert "your text is still here" in banner
    assert page.input_value("#input") == "Is there budget left?"
    assert page.locator(".msg-user").count() == 0
    assert not Conversation.objects.exists()


def test_an_interrupted_answer_offers_retry(page, login, owner, sim_model, screenshot):
    conversation = Conversation.objects.create(
        user=owner, title="Cut short", model_name=SIM_MODEL
    )
    Message.objects.create(
        conversation=conversation, role=MessageRole.USER, content="Still there?"
    )
    Message.objects.create(
        conversation=conversation,
        role=MessageRole.ASSISTANT,
        status=MessageStatus.STREAMING,
        model_name=SIM_MODEL,
    )
    login(page, owner, f"/chat/c/{conversation.id}/")

    page.wait_for_selector(".msg-assistant[data-status=interrupted]")
    screenshot(page, "17-interrupted-answer")
    notice = page.locator(".msg-assistant .msg-error").inner_text()
    page.click(".msg-assistant .regenerate")
    page.wait_for_selector(".msg-assistant[data-status=complete]", timeout=20_000)

    assert notice.startswith("Interrupted.")
    assert page.locator(".msg-assistant").count() == 1
    assert Message.objects.get(role=MessageRole.ASSISTANT, active=True).status == (
        MessageStatus.COMPLETE
    )
