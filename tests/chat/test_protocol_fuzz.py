"""Fuzzing the chat websocket: every frame gets an answer, never internal_error.

Hypothesis draws frames of every type, valid and broken (wrong types, missing
and unknown fields, NUL, lone surrogates, deep nesting, huge numbers, cut
JSON), and sends them on one signed-in socket through channels'
WebsocketCommunicator. Each must be answered with a known frame and no
``internal_error``; the socket must still answer a ping afterwards; nothing
may be logged at ERROR, and no conversation may be created.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chat.models import Conversation, Message, MessageRole
from llmsite.asgi import application
from tests.chat.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ANSWERS = {"error", "pong", "opened", "history", "chunk"}

HOSTILE_TEXT = st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "x\udfffy"])
TEXT = st.one_of(st.text(max_size=20), HOSTILE_TEXT)
NUMBER = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBER, TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)
    ),
    max_leaves=6,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value three times in four, else junk."""
    return st.integers(0, 3).flatmap(lambda n: valid if n else JUNK)


@st.composite
def frames(draw: st.DrawFn, conversation_id: str, message_ids: list[int]) -> str:
    """One frame as text: plausible fields, some of them wrong."""
    ids = mostly(st.sampled_from(message_ids))
    conversation = mostly(st.one_of(st.just(conversation_id), st.uuids().map(str)))
    # Always a model nobody serves (or no valid one): a fuzzed send, edit or
    # regenerate is refused before anything is stored or changed.
    model = st.one_of(
        st.just("no-such-model"), TEXT, JUNK.filter(lambda v: v is not None)
    )
    kind = draw(
        st.sampled_from(
            [
                *("send", "stop", "regenerate", "edit", "open", "resume"),
                *("history", "ping", "dance"),
            ]
        ).map(lambda k: k if draw(st.integers(0, 9)) else draw(JUNK))
    )
    fields = {
        "type": kind,
        "conversation_id": draw(conversation),
        "content": draw(mostly(TEXT)),
        "model": draw(model),
        "message_id": draw(ids),
        "before": draw(ids),
    }
    # Drop some fields; add an unknown one now and then.
    frame = {
        k: v for k, v in fields.items() if k in ("type", "model") or draw(st.booleans())
    }
    if draw(st.integers(0, 4)) == 0:
        frame[draw(TEXT)] = draw(JUNK)
    text = json.dumps(frame, allow_nan=True)
    shape = draw(st.sampled_from(["plain"] * 6 + ["deep", "cut", "array"]))
    if shape == "deep":
        depth = draw(st.sampled_from([60, 70, 2_000, 20_000]))
        text = text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    elif shape == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif shape == "array":
        text = f"[{text}]"
    return text


@pytest.fixture
def conversation(owner) -> tuple[str, list[int]]:
    """Alice's conversation, so open and history also reach real rows."""
    conversation = Conversation.objects.create(
        user=owner, title="Fuzz", model_name=MODEL
    )
    ids = [
        Message.objects.create(
            conversation=conversation,
            role=MessageRole.USER if i % 2 == 0 else MessageRole.ASSISTANT,
            content=f"turn {i}",
        ).id
        for i in range(4)
    ]
    return str(conversation.id), ids


@pytest.fixture
def cookie(owner) -> str:
    client = Client()
    client.force_login(owner)
    return client.cookies["sessionid"].value


async def exchange(cookie: str, text: str) -> tuple[list[dict[str, Any]], dict]:
    communicator = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"origin", b"http://127.0.0.1"),
            (b"cookie", f"sessionid={cookie}".encode()),
        ],
    )
    connected, _ = await communicator.connect()
    assert connected
    # send_input, not send_to: an empty text frame is legal on the wire.
    await communicator.send_input({"type": "websocket.receive", "text": text})
    await communicator.send_json_to({"type": "ping"})
    answers = []
    while True:
        frame = await communicator.receive_json_from(timeout=5)
        if frame["type"] == "pong":
            break
        answers.append(frame)
    stored = {
        "conversations": await Conversation.objects.acount(),
        "messages": await sync_to_async(list)(
            Message.objects.order_by("id").values_list("content", flat=True)
        ),
    }
    await communicator.disconnect()
    return answers, stored


@FUZZ
@given(data=st.data())
def test_no_frame_gets_internal_error_or_closes_the_socket(
    cookie, conversation, data, caplog
):
    conversation_id, ids = conversation
    text = data.draw(frames(conversation_id, ids), label="frame")
    caplog.clear()

    with caplog.at_level(logging.WARNING):
        answers, stored = async_to_sync(exchange)(cookie, text)

    # A ping sent as the frame is answered by the same pong as the check.
    for frame in answers:
        event(f"{frame['type']} {frame.get('code', '')}".strip())
        assert frame["type"] in ANSWERS, frame
        assert frame.get("code") != "internal_error", (text[:300], frame)
        if frame["type"] == "error":
            assert isinstance(frame["message"], str) and frame["message"]
    assert stored == {
        "conversations": 1,
        "messages": [f"turn {i}" for i in range(4)],
    }
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
