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
