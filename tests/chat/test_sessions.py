"""Logout, deactivation and a new password close the user's open chat sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat.models import Message, MessageRole, MessageStatus
from chat.sessions import session_tag
from gateway.simulator import Behaviour
from llmsite.asgi import application
from tests.chat.test_consumer_streams import (  # noqa: F401 (fixtures)
    _no_answer_left_running,
    connect,
    frames_until,
    routes,
    send,
    settled,
    upstream,
)

pytestmark = pytest.mark.django_db(transaction=True)


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def cookie_of(client: Client) -> str:
    return client.cookies["sessionid"].value


async def closed_with(communicator: WebsocketCommunicator) -> int | None:
    """The close code the server sent, or None if the socket still answers.

    A close travels through the channel layer (Redis on the second test
    pass), so it may arrive a moment after the change: wait for output first,
    then, if none came, check the socket still answers a ping.
    """
    if await communicator.receive_nothing(timeout=0.5):
        await communicator.send_json_to({"type": "ping"})
    output = await communicator.receive_output(timeout=5)
    if output["type"] == "websocket.close":
        return output.get("code")
    assert json.loads(output["text"]) == {"type": "pong"}
    return None


@pytest.fixture
def alice_here(owner) -> Client:
    return signed_in(owner)


@pytest.fixture
def alice_elsewhere(owner) -> Client:
    return signed_in(owner)


@pytest.fixture
def bob(other_user) -> Client:
    return signed_in(other_user)


async def test_logging_out_closes_that_sessions_sockets_only(
    alice_here, alice_elsewhere, bob
):
    tab = await connect(cookie_of(alice_here))
    second_tab = await connect(cookie_of(alice_here))
    other_device = await connect(cookie_of(alice_elsewhere))
    bobs_tab = await connect(cookie_of(bob))

    response = await sync_to_async(alice_here.post)("/accounts/logout/")

    assert response.status_code == 302
    assert await closed_with(tab) == 4401
    assert await closed_with(second_tab) == 4401
    assert await closed_with(other_device) is None
    assert await closed_with(bobs_tab) is None
    for communicator in (other_device, bobs_tab):
        await communicator.disconnect()


async def test_a_socket_of_a_logged_out_session_cannot_reconnect(alice_here):
    cookie = cookie_of(alice_here)
    tab = await connect(cookie)
    await sync_to_async(alice_here.post)("/accounts/logout/")
    assert await closed_with(tab) == 4401

    again = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"origin", b"http://127.0.0.1"),
            (b"cookie", f"sessionid={cookie}".encode()),
        ],
    )
    connected, code = await again.connect()

    assert (connected, code) == (False, 4401)


async def test_deactivating_a_user_closes_all_their_sockets(
    owner, alice_here, alice_elsewhere, bob
):
    tab = await connect(cookie_of(alice_here))
    other_device = await connect(cookie_of(alice_elsewhere))
    bobs_tab = await connect(cookie_of(bob))

    owner.is_active = False
    await owner.asave()

    assert await closed_with(tab) == 4401
    assert await closed_with(other_device) == 4401
    assert await closed_with(bobs_tab) is None
    await bobs_tab.disconnect()


async def test_changing_the_password_closes_all_their_sockets(
    owner, alice_here, alice_elsewhere, bob
):
    tab = await connect(cookie_of(alice_here))
    other_device = await connect(cookie_of(alice_elsewhere))
    bobs_tab = await connect(cookie_of(bob))

    owner.set_password("a brand new passphrase 42")
    await owner.asave()

    assert await closed_with(tab) == 4401
    assert await closed_with(other_device) == 4401
    assert await closed_with(bobs_tab) is None
    await bobs_tab.disconnect()


async def test_saving_a_user_without_changing_password_or_status_keeps_sockets(
    owner, alice_here
):
    tab = await connect(cookie_of(alice_here))

    owner.first_name = "Alice"
    await owner.asave()
    await sync_to_async(signed_in)(owner)  # a sign-in elsewhere saves last_login

    assert await closed_with(tab) is None
    await tab.disconnect()


async def test_the_close_waits_for_the_commit(owner, alice_here, django_user_model):
    tab = await connect(cookie_of(alice_here))

    def deactivate_then_roll_back() -> None:
        from django.db import transaction

        with pytest.raises(RuntimeError), transaction.atomic():
            django_user_model.objects.filter(pk=owner.pk).first()
            owner.is_active = False
            owner.save()
            raise RuntimeError("rolled back")

    await sync_to_async(deactivate_then_roll_back)()

    assert await closed_with(tab) is None
    await tab.disconnect()


@pytest.mark.usefixtures("routes")
async def test_deactivation_stops_the_users_running_answer(
    owner,
    alice_here,
    upstream,  # noqa: F811
):
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))
    tab = await connect(cookie_of(alice_here))
    await send(tab)
    await frames_until(tab, "delta")

    owner.is_active = False
    await owner.asave()
    frames: list[dict[str, Any]] = []
    while True:
        output = await tab.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            break
        frames.append(output)
    await upstream.wait_for_disconnects(1, timeout=2)
    await settled()

    assert output["code"] == 4401
    [answer] = [m async for m in Message.objects.filter(role=MessageRole.ASSISTANT)]
    assert answer.status == MessageStatus.PARTIAL
    assert answer.meta["stop_reason"] == "stop"


def test_the_session_key_never_travels_in_clear():
    assert session_tag("abc123") != "abc123"
    assert "abc123" not in session_tag("abc123")
    assert session_tag(None) == session_tag("") == ""


async def test_a_close_requested_on_the_event_loop_itself_arrives(alice_here, owner):
    from chat.sessions import end_sockets

    tab = await connect(cookie_of(alice_here))

    end_sockets(owner.pk, "deactivated")
    output = await tab.receive_output(timeout=5)

    assert output == {"type": "websocket.close", "code": 4401}
