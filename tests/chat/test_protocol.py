"""Frames from the browser: every malformed one is refused with a clear code."""

from __future__ import annotations

import json
import uuid

import pytest

from chat import protocol
from chat.errors import ChatError

CONVERSATION = str(uuid.uuid4())


def refused(text: str) -> ChatError:
    with pytest.raises(ChatError) as caught:
        protocol.parse(protocol.decode(text))
    return caught.value


def test_a_send_frame_is_parsed():
    request = protocol.parse(
        protocol.decode(
            json.dumps(
                {"type": "send", "conversation_id": None, "content": "Hi", "model": "m"}
            )
        )
    )

    assert request == protocol.Send(conversation_id=None, content="Hi", model="m")


def test_open_and_resume_are_the_same_request():
    for kind in ("open", "resume"):
        request = protocol.parse({"type": kind, "conversation_id": CONVERSATION})
        assert request == protocol.Open(uuid.UUID(CONVERSATION))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('"send"', "bad_frame"),
        ("{}", "bad_frame"),
        ('{"type": 7}', "bad_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "send", "content": "hi"}', "invalid"),
        ('{"type": "send", "content": 5, "model": "m"}', "invalid"),
        ('{"type": "send", "content": "   \\n ", "model": "m"}', "empty_content"),
        (
            '{"type": "send", "content": "hi", "model": "m", "conversation_id": 3}',
            "invalid",
        ),
        (
            '{"type": "send", "content": "hi", "model": "m", "conversation_id": "x"}',
            "invalid",
        ),
        ('{"type": "stop"}', "invalid"),
        ('{"type": "edit", "message_id": true, "content": "x"}', "invalid"),
        ('{"type": "edit", "message_id": -1, "content": "x"}', "invalid"),
        (
            json.dumps(
                {"type": "regenerate", "conversation_id": CONVERSATION, "model": ""}
            ),
            "invalid",
        ),
    ],
)
def test_malformed_frames_are_refused_with_a_code(text, code):
    assert refused(text).code == code


def test_binary_frames_are_refused():
    with pytest.raises(ChatError) as caught:
        protocol.decode(None, b"\x00\x01")

    assert caught.value.code == "bad_frame"


def test_an_oversize_message_names_its_length_and_the_limit(settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10

    error = refused(json.dumps({"type": "send", "content": "x" * 11, "model": "m"}))

    assert error.code == "too_large"
    assert "11" in error.message and "10" in error.message


def test_an_oversize_frame_is_refused_before_it_is_parsed(settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10

    with pytest.raises(ChatError) as caught:
        protocol.decode("x" * 10_000)

    assert caught.value.code == "too_large"


def test_an_unknown_type_lists_the_known_ones():
    error = refused('{"type": "dance"}')

    assert "send" in error.message and "regenerate" in error.message


def test_a_history_frame_names_the_oldest_message_shown():
    request = protocol.parse(
        {"type": "history", "conversation_id": CONVERSATION, "before": 41}
    )

    assert request == protocol.History(uuid.UUID(CONVERSATION), before=41)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        # json.dumps writes these as \u0000 and \ud800, as a browser would.
        (json.dumps({"type": "send", "content": "a\x00b", "model": "m"}), "invalid"),
        (json.dumps({"type": "send", "content": "a\ud800b", "model": "m"}), "invalid"),
        (json.dumps({"type": "send", "content": "hi", "model": "m\x00"}), "invalid"),
        (json.dumps({"type": "ping", "x\x00": 1}), "invalid"),
        ('{"type": "ping", "x": ' + "[" * 2_000 + "]" * 2_000 + "}", "bad_json"),
        ('{"type": "ping", "x": ' + "{" * 50_000, "bad_json"),
        ('{"type": "ping", "x": NaN}', "bad_json"),
        ('{"type": "ping", "x": 1e999}', "invalid"),
        ('{"type": "edit", "message_id": ' + "9" * 30 + ', "content": "x"}', "invalid"),
        (json.dumps({"type": "history", "conversation_id": CONVERSATION}), "invalid"),
        (
            json.dumps(
                {"type": "history", "conversation_id": CONVERSATION, "before": "3"}
            ),
            "invalid",
        ),
    ],
    ids=[
        "nul-content",
        "surrogate-content",
        "nul-model",
        "nul-key",
        "deep",
        "deep-unclosed",
        "nan",
        "infinity",
        "huge-id",
        "history-without-before",
        "history-before-a-string",
    ],
)
def test_hostile_frames_are_refused_with_a_code(text, code):
    assert refused(text).code == code


def test_send_and_edit_carry_attachment_ids():
    first, second = uuid.uuid4(), uuid.uuid4()
    send = protocol.parse(
        {
            "type": "send",
            "content": "look",
            "model": "m",
            "attachments": [str(first), str(second)],
        }
    )
    edit = protocol.parse(
        {"type": "edit", "message_id": 3, "content": "x", "attachments": [str(first)]}
    )

    assert send.attachments == (first, second)
    assert edit.attachments == (first,)
    assert (
        protocol.parse({"type": "send", "content": "a", "model": "m"}).attachments == ()
    )


@pytest.mark.parametrize(
    ("attachments", "words"),
    [
        ("abc", "a list of image ids"),
        ([1, 2], "a list of image ids"),
        (["not-a-uuid"], "a list of image ids"),
        ([str(uuid.UUID(int=1))] * 2, "attached twice"),
        ([str(uuid.uuid4()) for _ in range(5)], "at most 4 images; this one has 5"),
    ],
)
def test_bad_attachment_lists_are_refused_with_a_sentence(attachments, words):
    frame = {"type": "send", "content": "a", "model": "m", "attachments": attachments}

    with pytest.raises(ChatError) as refused:
        protocol.parse(frame)

    assert refused.value.code == "invalid"
    assert words in refused.value.message
