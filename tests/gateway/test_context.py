from __future__ import annotations

import statistics
import time

import pytest
from django.conf import settings

from gateway import tokens
from gateway.context import (
    COMPRESS_KEEP_TOKENS,
    ContextMessage,
    ContextWindowExceeded,
    fit_context,
)

# In o200k_base every role is one token, so a message costs 4 + its content,
# and "hello" followed by n - 1 " hello" is exactly n tokens.
MODEL = "gpt-4o"
TURNS = 10
MESSAGE_COST = 200


def words(n: int, word: str = "hello") -> str:
    """Return a text of exactly n tokens for MODEL."""
    return " ".join([word] * n)


def conversation(total: int) -> list[ContextMessage]:
    """A system prompt, ten old turns and a newest question, costing `total`."""
    messages = [ContextMessage("system", words(96), id="sys")]
    for i in range(TURNS):
        messages.append(ContextMessage("user", words(196), id=f"u{i}"))
        messages.append(ContextMessage("assistant", words(196, "ok"), id=f"a{i}"))
    used = 3 + 100 + TURNS * 2 * MESSAGE_COST
    messages.append(ContextMessage("user", words(total - used - 4), id="new"))
    return messages


def ids(messages) -> list:
    return [m.id for m in messages]


def test_helpers_build_conversations_of_the_intended_size():
    assert tokens.count_text(words(196), MODEL) == 196
    assert tokens.count_text(words(196, "ok"), MODEL) == 196
    fitted, status = fit_context(conversation(4321), model=MODEL)
    assert status.conversation_tokens == 4321
    assert tokens.count_messages([m.to_dict() for m in fitted], MODEL).tokens == 4321


def test_it_keeps_everything_without_warning_at_79_percent():
    messages = conversation(4740)

    fitted, status = fit_context(messages, model=MODEL)

    assert fitted == messages
    assert (status.tokens, status.percent, status.warning) == (4740, 79.0, False)
    assert status.dropped_count == 0


def test_it_warns_at_80_percent_and_keeps_everything():
    messages = conversation(4800)

    fitted, status = fit_context(messages, model=MODEL)

    assert fitted == messages
    assert (status.tokens, status.percent, status.warning) == (4800, 80.0, True)
    assert status.dropped_count == 0


def test_it_warns_but_drops_nothing_at_89_percent():
    messages = conversation(5340)

    fitted, status = fit_context(messages, model=MODEL)

    assert fitted == messages
    assert (status.tokens, status.percent, status.warning) == (5340, 89.0, True)
    assert not status.compressed


def test_it_drops_oldest_turns_at_90_percent_down_to_60_percent():
    fitted, status = fit_context(conversation(5400), model=MODEL)

    # Five turns of 400 tokens: four would leave 3800, over the 3600 target.
    assert status.dropped_ids == (
        *("u0", "a0", "u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4"),
    )
    assert status.tokens == 3400 <= 0.6 * status.limit
    assert status.warning
    assert status.conversation_tokens == 5400
    assert ids(fitted) == ["sys", *ids(conversation(5400))[11:]]


def test_it_always_keeps_system_prompts_and_the_newest_turn():
    messages = [
        ContextMessage("system", words(50), id="sys"),
        ContextMessage("user", words(1000), id="u0", importance=9),
        ContextMessage("assistant", words(1000), id="a0", importance=9),
        ContextMessage("developer", words(50), id="sys2"),
        ContextMessage("user", words(1000), id="u1", pinned=True),
        ContextMessage("assistant", words(1000), id="a1"),
        ContextMessage("user", words(4000), id="new"),
    ]

    fitted, status = fit_context(messages, model=MODEL)

    assert ids(fitted) == ["sys", "sys2", "new"]
    assert status.dropped_ids == ("u0", "a0", "u1", "a1")


def test_the_newest_turn_keeps_its_tool_calls_and_results():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "search", "arguments": '{"q": "x"}'},
            }
        ],
    }
    messages = [
        {"role": "system", "content": words(50)},
        {"role": "user", "content": words(900)},
        {"role": "assistant", "content": words(900)},
        {"role": "user", "content": words(900)},
        {"role": "assistant", "content": words(900)},
        {"role": "user", "content": words(100)},
        call,
        {"role": "tool", "tool_call_id": "call_1", "content": words(2500)},
    ]

    fitted, status = fit_context(messages, model=MODEL)

    assert fitted == [messages[0], *messages[5:]]
    assert status.dropped_ids == (1, 2, 3, 4)


def test_an_answer_is_dropped_together_with_its_question():
    messages = conversation(5400)
    # A turn of four messages: question, tool call, tool result, answer.
    messages[1:3] = [
        ContextMessage("user", words(96), id="q"),
        ContextMessage("assistant", words(96), id="call"),
        ContextMessage("tool", words(96), id="result"),
        ContextMessage("assistant", words(96), id="answer"),
    ]

    _, status = fit_context(messages, model=MODEL)

    assert status.dropped_ids[:4] == ("q", "call", "result", "answer")


def test_pinned_turns_outlive_newer_unpinned_ones():
    messages = conversation(5400)
    messages[1].pinned = True  # u0, so its answer a0 stays too

    fitted, status = fit_context(messages, model=MODEL)

    assert ids(fitted)[:3] == ["sys", "u0", "a0"]
    assert status.dropped_ids[:2] == ("u1", "a1")
    assert status.tokens <= 3600


def test_pinned_turns_stay_above_the_target_while_they_fit_the_budget():
    messages = conversation(5400)
    for message in messages[1:-1]:
        message.pinned = True

    fitted, status = fit_context(messages, model=MODEL)

    assert fitted == messages
    assert status.tokens == 5400


def test_pinned_turns_are_dropped_when_nothing_else_is_left_to_fit_the_budget():
    messages = [
        ContextMessage("system", words(96), id="sys"),
        ContextMessage("user", words(2996), id="pinned-old", pinned=True),
        ContextMessage("user", words(196), id="plain"),
        ContextMessage("user", words(2496), id="pinned-new", pinned=True),
        ContextMessage("user", words(996), id="new"),
    ]

    fitted, status = fit_context(messages, model=MODEL)

    assert status.dropped_ids == ("pinned-old", "plain")
    assert ids(fitted) == ["sys", "pinned-new", "new"]
    assert status.tokens == 3 + 100 + 2500 + 1000


def test_least_important_turns_are_dropped_first():
    messages = conversation(5400)
    messages[2].importance = 2  # a0, the oldest turn
    messages[14].importance = 1  # a6

    fitted, status = fit_context(messages, model=MODEL)

    assert status.dropped_ids == (
        *("u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4", "u5", "a5"),
    )
    assert {"u0", "a0", "u6", "a6"} <= set(ids(fitted))


def test_fitted_messages_keep_their_original_order():
    messages = conversation(6000)
    for position, message in enumerate(messages):
        message.importance = position % 3

    fitted, _ = fit_context(messages, model=MODEL)

    positions = [messages.index(m) for m in fitted]
    assert positions == sorted(positions)
    assert ids(fitted)[0] == "sys"
    assert ids(fitted)[-1] == "new"


def test_a_window_too_small_for_the_system_prompt_and_newest_turn_raises():
    messages = [
        ContextMessage("system", words(996), id="sys"),
        ContextMessage("user", words(10), id="old"),
        ContextMessage("user", words(2996), id="new"),
    ]

    with pytest.raises(ContextWindowExceeded) as caught:
        fit_context(messages, model=MODEL, context_window=4096, max_output_tokens=1024)

    error = caught.value
    assert (error.required, error.limit, error.window) == (4003, 3072, 4096)
    assert error.code == "context_length_exceeded"
    assert str(error) == (
        "The system prompt and newest message need 4,003 tokens, but gpt-4o leaves "
        "3,072 for the prompt (4,096-token window minus 1,024 reserved for the "
        "answer)."
    )


def test_reserving_the_whole_window_for_the_answer_raises():
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_context(
            [ContextMessage("user", "hi")],
            model=MODEL,
            context_window=4096,
            max_output_tokens=4096,
        )

    assert caught.value.limit == 0


def test_each_route_window_gives_its_own_fit():
    messages = conversation(5400)

    _, small = fit_context(messages, model=MODEL, context_window=8000)
    fitted, large = fit_context(messages, model=MODEL, context_window=32000)

    assert small.dropped_count == 10
    assert fitted == messages
    assert (large.limit, large.warning, large.percent) == (30000, False, 18.0)
    with pytest.raises(ContextWindowExceeded):
        fit_context(messages, model=MODEL, context_window=1500, max_output_tokens=500)


def test_status_to_dict_has_the_values_the_ui_shows():
    _, status = fit_context(conversation(5400), model=MODEL)

    assert status.to_dict() == {
        "tokens": 3400,
        "limit": 6000,
        "window": 8000,
        "reserved_output": 2000,
        "percent": 56.7,
        "warning": True,
        "compressed": False,
        "compressed_ids": [],
        "dropped_ids": ["u0", "a0", "u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4"],
        "dropped_count": 10,
        "conversation_tokens": 5400,
        "method": "tiktoken:o200k_base",
    }


def test_plain_dicts_come_back_as_the_same_dicts_and_counts_agree():
    paragraph = "Routes of one chain can differ in their windows, so fit per route. "
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(30):
        messages.append({"role": "user", "content": f"Question {i}. " + paragraph * 8})
        messages.append({"role": "assistant", "content": paragraph * 9})
    messages.append({"role": "user", "content": "And now?"})

    fitted, status = fit_context(messages, model="gpt-4-turbo", context_window=8192)

    assert status.dropped_count > 0
    assert all(any(m is original for original in messages) for m in fitted)
    assert tokens.count_messages(fitted, "gpt-4-turbo").tokens == status.tokens
    assert tokens.count_messages(messages, "gpt-4-turbo").tokens == (
        status.conversation_tokens
    )
    assert status.method == "tiktoken:cl100k_base"
    assert status.dropped_ids[:2] == (1, 2)


def test_an_over_long_old_message_is_shortened_before_any_turn_is_dropped():
    log = "\n".join(
        f"Line {i}: the job finished with exit code {i % 7}." for i in range(250)
    )
    old = conversation(5400)
    # The log's turn is the oldest; four more turns and the question follow.
    messages = [
        old[0],
        ContextMessage("user", log, id="log"),
        *old[2:11],
        ContextMessage("user", words(1000), id="new"),
    ]
    assert tokens.count_text(log, MODEL) > 3000

    fitted, status = fit_context(messages, model=MODEL)

    shortened = fitted[1].content
    assert status.dropped_count == 0
    assert (status.compressed, status.compressed_ids) == (True, ("log",))
    assert shortened.startswith("Line 0: the job finished")
    assert shortened.endswith("Line 249: the job finished with exit code 4.")
    assert "tokens left out to fit the context window" in shortened
    assert tokens.count_text(shortened, MODEL) < 2 * COMPRESS_KEEP_TOKENS + 30
    assert tokens.count_messages([m.to_dict() for m in fitted], MODEL).tokens == (
        status.tokens
    )
    assert status.tokens <= 3600
    assert messages[1].content == log


def test_pinned_and_newest_messages_are_never_shortened():
    long_text = words(1800)
    messages = [
        ContextMessage("system", long_text, id="sys"),
        ContextMessage("user", long_text, id="pinned", pinned=True),
        ContextMessage("user", words(196), id="u0"),
        ContextMessage("user", long_text, id="new"),
    ]

    fitted, status = fit_context(messages, model=MODEL)

    assert status.conversation_tokens >= 5400
    assert not status.compressed
    assert [m.content for m in fitted] == [long_text, long_text, long_text]
    assert status.dropped_ids == ("u0",)


def test_unknown_models_are_fitted_with_the_estimate():
    messages = [
        ContextMessage("system", "x" * 400),
        ContextMessage("user", "y" * 20000),
        ContextMessage("assistant", "z" * 4000),
        ContextMessage("user", "question?"),
    ]

    fitted, status = fit_context(messages, model="llama3.1:8b")

    assert status.method == "estimate"
    assert status.dropped_count == 0
    assert status.compressed_ids == (1,)
    assert len(fitted[1].content) < 4000
    assert status.tokens <= 3600


def test_a_message_shorter_than_its_known_count_is_not_shortened():
    messages = [
        ContextMessage("system", "Be brief.", id="sys"),
        ContextMessage("user", "short", id="old", tokens=3000),
        ContextMessage("user", words(2500), id="new"),
    ]

    fitted, status = fit_context(messages, model=MODEL)

    assert not status.compressed
    assert status.dropped_ids == ("old",)
    assert ids(fitted) == ["sys", "new"]


def test_known_token_counts_are_used_instead_of_counting():
    messages = [
        ContextMessage("system", "short", tokens=96),
        ContextMessage("user", "short", tokens=896),
        ContextMessage("user", "short", tokens=896),
        ContextMessage("user", "short", tokens=3996),
    ]

    _, status = fit_context(messages, model=MODEL)

    assert status.conversation_tokens == 3 + 100 + 900 + 900 + 4000
    # Both old turns go; the rest stays above the target but fits the budget.
    assert (status.dropped_count, status.tokens) == (2, 4103)


def test_each_distinct_text_is_counted_once_per_call(monkeypatch):
    counter = tokens.counter_for(MODEL)
    calls = []
    encode = counter._encode

    def counting_encode(text):
        calls.append(text)
        return encode(text)

    monkeypatch.setattr(counter, "_encode", counting_encode)
    messages = [ContextMessage("system", "Be brief.")] + [
        ContextMessage("user" if i % 2 == 0 else "assistant", f"text {i % 3}")
        for i in range(200)
    ]

    fit_context(messages, model=MODEL)

    # Three roles and four distinct texts.
    assert len(calls) == 7


def test_thresholds_can_be_passed_per_call():
    messages = conversation(4000)

    _, default = fit_context(messages, model=MODEL)
    _, strict = fit_context(
        messages, model=MODEL, warn_ratio=0.5, compress_ratio=0.6, target_ratio=0.4
    )

    assert (default.warning, default.dropped_count) == (False, 0)
    assert strict.warning
    assert strict.tokens <= 2400


@pytest.mark.skipif(not settings.configured, reason="needs Django settings")
def test_thresholds_come_from_settings():
    from django.test import override_settings

    with override_settings(
        CONTEXT_WARN_RATIO=0.5, CONTEXT_COMPRESS_RATIO=0.6, CONTEXT_TARGET_RATIO=0.4
    ):
        _, status = fit_context(conversation(4000), model=MODEL)

    assert status.warning
    assert status.tokens <= 2400


def test_inconsistent_thresholds_are_refused():
    with pytest.raises(ValueError, match="target < compress"):
        fit_context(conversation(4000), model=MODEL, target_ratio=0.95)


def test_an_empty_conversation_fits():
    fitted, status = fit_context([], model=MODEL)

    assert fitted == []
    assert (status.tokens, status.warning, status.dropped_count) == (3, False, 0)


def test_fitting_200_messages_costs_well_under_two_milliseconds_beyond_counting():
    messages = [ContextMessage("system", "s", tokens=50)] + [
        ContextMessage("user" if i % 2 == 0 else "assistant", "m", id=i, tokens=40)
        for i in range(199)
    ]
    fit_context(messages, model=MODEL)
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        _, status = fit_context(messages, model=MODEL)
        timings.append(time.perf_counter() - started)

    assert status.dropped_count > 100
    assert statistics.median(timings) < 0.002


# --- Image parts ----------------------------------------------------------------------


def _image_message(id_: str, text: str, width: int, height: int) -> ContextMessage:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    parts = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return ContextMessage("user", parts, id=id_)


def test_images_count_by_their_size_and_old_ones_are_dropped_whole():
    # An old question with 3000 tokens of text and a 1024 square image (765),
    # then a small new one with a 40x30 image (255).
    old = _image_message("old", words(3000), 1024, 1024)
    answer = ContextMessage("assistant", words(10, "ok"), id="a")
    new = _image_message("new", words(10), 40, 30)

    roomy = fit_context([old, answer, new], model=MODEL, context_window=20_000)
    assert roomy.status.tokens == 3 + (4 + 3000 + 765) + (4 + 10) + (4 + 10 + 255)

    fitted = fit_context([old, answer, new], model=MODEL, context_window=6000)
    # Text with an image is never cut in the middle: its turn is left out.
    assert ids(fitted.messages) == ["new"]
    assert fitted.messages[0].content[1]["type"] == "image_url"
    assert fitted.status.dropped_ids == ("old", "a")


def test_a_new_image_too_large_for_the_window_is_refused():
    big = _image_message("new", "look", 2048, 2048)

    with pytest.raises(ContextWindowExceeded):
        fit_context([big], model=MODEL, context_window=1000, max_output_tokens=300)
