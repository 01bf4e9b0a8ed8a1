"""The websocket refuses strangers and bad frames, and stays usable after each."""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat.models import Conversation
from llmsite.asgi import application
from tests.chat.conftest import MODEL, USER

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = "http://127.0.0.1"


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def connect(cookie: str | None, origin: str = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1"), (b"origin", origin.encode())]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, "/ws/chat/", headers=headers)


@pytest.fixture
def alice_cookie(owner) -> str:
    return session_cookie(owner)


@pytest.fixture
def bob_cookie(other_user) -> str:
    return session_cookie(other_user)


async def test_anonymous_connections_are_refused():
    communicator = await connect(None)

    connected, _ = await communicator.connect()

    assert connected is False


async def test_connections_from_another_site_are_refused(alice_cookie):
    communicator = await connect(alice_cookie, origin="https://evil.example")

    connected, _ = await communicator.connect()

    assert connected is False


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{oops", "bad_json"),
        ("[]", "bad_frame"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "send", "content": "", "model": "house-model"}', "empty_content"),
        ('{"type": "send", "content": "hi"}', "invalid"),
        ('{"type": "open", "conversation_id": "not-a-uuid"}', "invalid"),
    ],
)
async def test_a_bad_frame_gets_an_error_and_the_socket_stays_open(
    alice_cookie, frame, code
):
    communicator = await connect(alice_cookie)
    assert (await communicator.connect())[0]

    await communicator.send_to(text_data=frame)
    error = await communicator.receive_json_from()
    await communicator.send_json_to({"type": "ping"})
    pong = await communicator.receive_json_from()

    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    assert pong == {"type": "pong"}
    await communicator.disconnect()


async def test_binary_frames_get_an_error(alice_cookie):
    communicator = await connect(alice_cookie)
    await communicator.connect()

    await communicator.send_to(bytes_data=b"\x00")

    assert (await communicator.receive_json_from())["code"] == "bad_frame"
    await communicator.disconnect()


async def test_an_oversize_message_is_refused_and_not_stored(
    alice_cookie, settings, model_route
):
    settings.CHAT_MAX_MESSAGE_CHARS = 50
    communicator = await connect(alice_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "send", "conversation_id": None, "content": "x" * 51, "model": MODEL}
    )
    error = await communicator.receive_json_from()

    assert (error["code"], error["request"]) == ("too_large", "send")
    assert "50" in error["message"]
    await communicator.disconnect()


async def test_an_unknown_model_is_refused(alice_cookie, model_route):
    communicator = await connect(alice_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "send", "conversation_id": None, "content": "hi", "model": "nope"}
    )

    assert (await communicator.receive_json_from())["code"] == "unknown_model"
    await communicator.disconnect()


async def test_bob_cannot_open_alices_conversation(
    bob_cookie, owner, make_conversation
):
    conversation = await _conversation(make_conversation, owner)
    communicator = await connect(bob_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "open", "conversation_id": str(conversation.id)}
    )
    error = await communicator.receive_json_from()

    assert error["code"] == "not_found"
    assert "Alice's secret" not in json.dumps(error)
    await communicator.disconnect()


@pytest.mark.parametrize("kind", ["send", "regenerate", "stop"])
async def test_bob_cannot_write_to_alices_conversation(
    bob_cookie, owner, make_conversation, model_route, kind
):
    conversation = await _conversation(make_conversation, owner)
    communicator = await connect(bob_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {
            "type": kind,
            "conversation_id": str(conversation.id),
            "content": "mine now",
            "model": MODEL,
        }
    )
    error = await communicator.receive_json_from()

    assert error["code"] in {"not_found", "not_running"}
    assert await conversation.messages.acount() == 1
    await communicator.disconnect()


async def test_bob_cannot_edit_alices_message(
    bob_cookie, owner, make_conversation, model_route
):
    conversation = await _conversation(make_conversation, owner)
    message = await conversation.messages.afirst()
    communicator = await connect(bob_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "edit", "message_id": message.id, "content": "rewritten"}
    )

    assert (await communicator.receive_json_from())["code"] == "not_found"
    await message.arefresh_from_db()
    assert message.content == "Alice's secret"
    await communicator.disconnect()


async def test_opening_a_conversation_returns_its_messages(
    alice_cookie, owner, make_conversation
):
    conversation = await _conversation(make_conversation, owner)
    communicator = await connect(alice_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "open", "conversation_id": str(conversation.id)}
    )
    opened = await communicator.receive_json_from()

    assert opened["type"] == "opened"
    assert opened["conversation"]["id"] == str(conversation.id)
    assert [m["content"] for m in opened["messages"]] == ["Alice's secret"]
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_stop_without_a_running_answer_says_so(alice_cookie):
    communicator = await connect(alice_cookie)
    await communicator.connect()

    await communicator.send_json_to(
        {"type": "stop", "conversation_id": str(uuid.uuid4())}
    )

    assert (await communicator.receive_json_from())["code"] == "not_running"
    await communicator.disconnect()


async def _conversation(make_conversation, owner):
    return await sync_to_async(make_conversation)(owner, (USER, "Alice's secret"))


def send_frame(**fields) -> str:
    return json.dumps(
        {"type": "send", "conversation_id": None, "content": "hi", "model": MODEL}
        | fields
    )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (send_frame(content="a\x00b"), "invalid"),
        (send_frame(content="\udc00"), "invalid"),
        (send_frame()[:-1] + ', "x": ' + "[" * 3_000 + "]" * 3_000 + "}", "bad_json"),
        (send_frame(content=["hi"]), "invalid"),
        (send_frame(model=5), "invalid"),
    ],
    ids=["nul", "surrogate", "deep", "content-list", "model-number"],
)
async def test_a_hostile_send_is_refused_stores_nothing_and_the_socket_stays_open(
    alice_cookie, model_route, frame, code, caplog
):
    communicator = await connect(alice_cookie)
    assert (await communicator.connect())[0]

    await communicator.send_to(text_data=frame)
    error = await communicator.receive_json_from()
    await communicator.send_json_to({"type": "ping"})
    pong = await communicator.receive_json_from()

    assert (error["type"], error["code"]) == ("error", code)
    assert pong == {"type": "pong"}
    assert await Conversation.objects.acount() == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    await communicator.disconnect()
