"""Conversations and answers far larger than a websocket frame still get through.

Daphne drops any frame over 1 MiB; every frame the server sends must stay
under CHAT_MAX_SEND_FRAME_BYTES, and the browser must still end up with every
message, whole and in order.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat import frames
from chat.generation import registry
from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import client as upstream_client
from gateway import router
from gateway.models import Endpoint, ModelRoute
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens
from llmsite.asgi import application
from tests.chat.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = "http://127.0.0.1"
KIB = 1024
MIB = 1024 * KIB


def long_text(index: int, chars: int) -> str:
    """Text that costs more than a byte a character: accents, emoji, quotes, tabs."""
    unit = f'Message {index}: caf\u00e9 \U0001f600 "quoted"\t\\ line\n'
    return (unit * (chars // len(unit) + 1))[:chars]


def make_big_conversation(user, sizes: list[int]) -> tuple[Conversation, list[str]]:
    conversation = Conversation.objects.create(user=user, title="Big", model_name=MODEL)
    texts = [long_text(i, size) for i, size in enumerate(sizes)]
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=MessageRole.USER if i % 2 == 0 else MessageRole.ASSISTANT,
            content=text,
            status=MessageStatus.COMPLETE,
        )
        for i, text in enumerate(texts)
    )
    # One path, each message after the one before, as the chat stores them.
    rows = list(conversation.messages.order_by("created_at", "id").only("id"))
    for previous, message in itertools.pairwise(rows):
        message.parent_id = previous.id
    Message.objects.bulk_update(rows[1:], ["parent"])
    return conversation, texts


async def connect(user) -> WebsocketCommunicator:
    client = Client()
    await sync_to_async(client.force_login)(user)
    cookie = client.cookies["sessionid"].value
    communicator = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"origin", ORIGIN.encode()),
            (b"cookie", f"sessionid={cookie}".encode()),
        ],
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


class Browser:
    """What chat/static/js/app.js does with frames: chunks go before their text."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: dict[tuple[str, Any], str] = {}
        self.largest = 0

    def take(self, text: str) -> dict[str, Any]:
        self.largest = max(self.largest, len(text.encode()))
        assert len(text.encode()) <= self.cap
        frame = json.loads(text)
        cid = frame.get("conversation_id")
        if frame["type"] == "chunk":
            key = (cid, frame["message_id"])
            self.chunks[key] = self.chunks.get(key, "") + frame["text"]
            return frame
        if frame["type"] == "start":
            frame["text"] = self.chunks.pop((cid, None), "") + frame["text"]
        for message in frame.get("messages") or []:
            message["content"] = (
                self.chunks.pop((cid, message["id"]), "") + (message["content"])
            )
        answer = frame.get("answer")
        if answer and answer.get("id"):
            answer["content"] = (
                self.chunks.pop((cid, answer["id"]), "") + (answer["content"])
            )
        return frame

    async def until(self, communicator, *types: str, wait: float = 10) -> dict:
        while True:
            frame = self.take(await communicator.receive_from(wait))
            if frame["type"] in types:
                return frame


async def read_everything(communicator, browser: Browser, conversation_id) -> list:
    """Open a conversation and page back to its first message, like scrolling up."""
    await communicator.send_json_to(
        {"type": "open", "conversation_id": str(conversation_id)}
    )
    page = await browser.until(communicator, "opened", "error")
    assert page["type"] == "opened", page
    messages = page["messages"]
    pages = 1
    while page["more"]:
        await communicator.send_json_to(
            {
                "type": "history",
                "conversation_id": str(conversation_id),
                "before": messages[0]["id"],
            }
        )
        page = await browser.until(communicator, "history", "error")
        assert page["type"] == "history", page
        messages = page["messages"] + messages
        pages += 1
    return messages, pages


async def test_a_several_mib_conversation_opens_in_pages_that_fit_a_frame(owner):
    # 120 messages of 32,000 characters, as many as the message limit allows,
    # plus one stored answer of 3 MiB that fits no frame on its own.
    sizes = [32_000] * 60 + [3 * MIB] + [32_000] * 60
    conversation, texts = await sync_to_async(make_big_conversation)(owner, sizes)
    assert sum(len(t.encode()) for t in texts) > 6 * MIB
    communicator = await connect(owner)
    browser = Browser(cap=frames.limit())

    messages, pages = await read_everything(communicator, browser, conversation.id)

    assert [m["content"] for m in messages] == texts
    assert len({m["id"] for m in messages}) == len(texts)
    assert pages > 10
    assert browser.largest <= 256 * KIB
    assert browser.chunks == {}
    await communicator.disconnect()


async def test_history_of_another_users_conversation_is_not_found(owner, other_user):
    conversation, _ = await sync_to_async(make_big_conversation)(owner, [10, 10])
    first = await conversation.messages.afirst()
    communicator = await connect(other_user)

    await communicator.send_json_to(
        {
            "type": "history",
            "conversation_id": str(conversation.id),
            "before": first.id + 1,
        }
    )
    error = await communicator.receive_json_from()

    assert (error["type"], error["code"], error["request"]) == (
        "error",
        "not_found",
        "history",
    )
    assert "Message 0" not in json.dumps(error)
    await communicator.disconnect()


async def test_history_before_a_message_of_another_conversation_is_not_found(owner):
    mine, _ = await sync_to_async(make_big_conversation)(owner, [10, 10])
    other, _ = await sync_to_async(make_big_conversation)(owner, [10, 10])
    elsewhere = await other.messages.afirst()
    communicator = await connect(owner)

    await communicator.send_json_to(
        {"type": "history", "conversation_id": str(mine.id), "before": elsewhere.id}
    )

    assert (await communicator.receive_json_from())["code"] == "not_found"
    await communicator.disconnect()


# --- Answers larger than a frame ------------------------------------------------------

LONG_TOKENS = 12_000
LONG_ANSWER = "".join(generated_tokens(LONG_TOKENS))


@pytest.fixture
def fast_upstream():
    server = SimulatedUpstream(
        behaviour=Behaviour(completion_tokens=LONG_TOKENS, tokens_per_second=0)
    )
    with server.run_in_thread():
        yield server


@pytest.fixture
def long_route(fast_upstream, settings):
    settings.RATE_LIMIT_RPM = 1000
    # The smallest cap allowed, so an answer of ~40 KB needs several frames.
    settings.CHAT_MAX_SEND_FRAME_BYTES = 16 * KIB
    endpoint = Endpoint.objects.create(
        name="primary",
        base_url=fast_upstream.base_url_for("/e/1"),
        timeout=10,
        max_retries=1,
    )
    ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model="sim-small",
        max_output_tokens=LONG_TOKENS,
        context_window=LONG_TOKENS * 4,
    )
    router.forget_routes()
    yield
    for generation in registry.running():
        generation.stop()


async def test_a_long_answer_arrives_whole_in_frames_under_the_cap(owner, long_route):
    assert len(LONG_ANSWER.encode()) > 2 * 16 * KIB
    communicator = await connect(owner)
    browser = Browser(cap=16 * KIB)

    await communicator.send_json_to(
        {"type": "send", "conversation_id": None, "content": "Go on.", "model": MODEL}
    )
    start = await browser.until(communicator, "start")
    streamed = start["text"]
    while True:
        frame = await browser.until(communicator, "delta", "done", "error", wait=30)
        if frame["type"] != "delta":
            break
        streamed += frame["text"]

    assert frame["type"] == "done", frame
    assert frame["answer"]["content"] == LONG_ANSWER
    assert streamed == LONG_ANSWER
    assert browser.chunks == {}

    # Reopening shows the stored answer whole, from pages under the cap.
    messages, _ = await read_everything(communicator, browser, frame["conversation_id"])
    assert [m["content"] for m in messages] == ["Go on.", LONG_ANSWER]
    await communicator.disconnect()
    await upstream_client.aclose_all()
