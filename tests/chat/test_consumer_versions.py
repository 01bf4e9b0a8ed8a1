"""The ``switch`` frame and answer versions over the chat websocket."""

# The fixtures are shared with test_consumer_streams, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from chat import protocol
from chat.errors import ChatError
from chat.models import Message
from gateway.simulator import Behaviour
from tests.chat.test_consumer_streams import (  # noqa: F401 (fixtures)
    _no_answer_left_running,
    alice,
    answers,
    connect,
    frames_until,
    records,
    routes,
    send,
    session_cookie,
    upstream,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def answered_twice(tab) -> tuple[dict, dict]:
    """A conversation whose answer was regenerated: its two done frames."""
    await send(tab)
    first = (await frames_until(tab, "done"))[-1]
    await tab.send_json_to(
        {"type": "regenerate", "conversation_id": first["conversation_id"]}
    )
    second = (await frames_until(tab, "done"))[-1]
    return first, second


async def switch(tab, conversation_id: str, message_id: int) -> None:
    await tab.send_json_to(
        {"type": "switch", "conversation_id": conversation_id, "message_id": message_id}
    )


async def test_switch_shows_the_earlier_answer_with_its_place(alice, routes):
    tab = await connect(alice)
    first, second = await answered_twice(tab)

    await switch(tab, first["conversation_id"], first["answer"]["id"])
    opened = (await frames_until(tab, "opened"))[-1]

    shown = opened["messages"][-1]
    assert shown["id"] == first["answer"]["id"]
    assert shown["versions"] == {
        "index": 1,
        "count": 2,
        "prev": None,
        "next": second["answer"]["id"],
    }
    assert second["answer"]["versions"]["prev"] == first["answer"]["id"]
    await tab.disconnect()


async def test_other_tabs_showing_the_conversation_are_told_to_reload(alice, routes):
    tab = await connect(alice)
    first, _ = await answered_twice(tab)
    other_tab = await connect(alice)
    await other_tab.send_json_to(
        {"type": "open", "conversation_id": first["conversation_id"]}
    )
    await frames_until(other_tab, "opened")

    await switch(tab, first["conversation_id"], first["answer"]["id"])
    await frames_until(tab, "opened")

    assert await other_tab.receive_json_from(timeout=10) == {
        "type": "refresh",
        "conversation_id": first["conversation_id"],
    }
    assert await tab.receive_nothing(timeout=0.3)
    await tab.disconnect()
    await other_tab.disconnect()


async def test_switch_to_another_users_message_is_not_found(alice, routes, other_user):
    bob_tab = await connect(await sync_to_async(session_cookie)(other_user))
    bob_first, _ = await answered_twice(bob_tab)
    tab = await connect(alice)
    await send(tab)
    mine = (await frames_until(tab, "done"))[-1]

    for conversation_id, message_id in [
        (mine["conversation_id"], bob_first["answer"]["id"]),
        (bob_first["conversation_id"], bob_first["answer"]["id"]),
    ]:
        await switch(tab, conversation_id, message_id)
        error = await tab.receive_json_from(timeout=10)
        assert (error["type"], error["code"], error["request"]) == (
            "error",
            "not_found",
            "switch",
        )

    assert not await Message.objects.filter(
        id=bob_first["answer"]["id"], active=True
    ).aexists()
    await tab.disconnect()
    await bob_tab.disconnect()


async def test_switch_while_an_answer_is_written_is_busy(alice, routes, upstream):
    tab = await connect(alice)
    first, _ = await answered_twice(tab)
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=40))
    await tab.send_json_to(
        {"type": "regenerate", "conversation_id": first["conversation_id"]}
    )
    await frames_until(tab, "start")

    await switch(tab, first["conversation_id"], first["answer"]["id"])
    error = (await frames_until(tab, "error"))[-1]

    assert (error["code"], error["request"]) == ("busy", "switch")
    await tab.send_json_to(
        {"type": "stop", "conversation_id": first["conversation_id"]}
    )
    done = (await frames_until(tab, "done"))[-1]
    # The stopped answer is a version too, with its cancelled usage record.
    assert done["answer"]["versions"]["index"] == 3
    kept = await answers()
    assert len(kept) == 3
    assert all(a.usage_id is not None for a in kept)
    await tab.disconnect()


async def test_a_refused_regenerate_leaves_the_answer_shown(alice, routes, settings):
    settings.RATE_LIMIT_RPM = 1
    tab = await connect(alice)
    await send(tab)
    done = (await frames_until(tab, "done"))[-1]

    await tab.send_json_to(
        {"type": "regenerate", "conversation_id": done["conversation_id"]}
    )
    error = (await frames_until(tab, "error"))[-1]

    assert (error["code"], error["refused"]) == ("rate_limited", True)
    assert [(a.id, a.active) for a in await answers()] == [(done["answer"]["id"], True)]
    await tab.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "switch", "message_id": 1},
        {"type": "switch", "conversation_id": "x", "message_id": 1},
        {
            "type": "switch",
            "conversation_id": "3f2b8f8e-6d1c-4a55-9a0e-1f9b5f7c2a10",
            "message_id": True,
        },
        {
            "type": "switch",
            "conversation_id": "3f2b8f8e-6d1c-4a55-9a0e-1f9b5f7c2a10",
            "message_id": 0,
        },
    ],
)
def test_a_malformed_switch_is_invalid(frame):
    with pytest.raises(ChatError) as caught:
        protocol.parse(frame)

    assert caught.value.code == "invalid"
