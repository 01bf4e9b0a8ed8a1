"""Conversation settings over the websocket, against a real simulated upstream.

The system prompt and the parameters must reach the upstream through the
ordinary pipeline (``/sim echo_settings`` answers with what it received),
count in the context, and be refused whole, before anything is stored.
"""

# ruff: noqa: F811 (fixtures from test_consumer_streams, used as arguments)
from __future__ import annotations

import uuid

import pytest

from chat.models import Conversation
from gateway import router
from gateway.models import ModelDefaults, ModelRoute, UsageRecord
from tests.chat.conftest import MODEL
from tests.chat.test_consumer_streams import (  # noqa: F401 (fixtures)
    _no_answer_left_running,
    alice,
    connect,
    frames_until,
    routes,
    send,
    session_cookie,
    text_of,
    upstream,
)

pytestmark = pytest.mark.django_db(transaction=True)

ECHO = "/sim echo_settings\nWho are you?"


@pytest.fixture
def bob(other_user) -> str:
    return session_cookie(other_user)


async def new_chat(tab, content: str = ECHO, **fields) -> list[dict]:
    await send(tab, content, **fields)
    return await frames_until(tab, "done", "error")


async def test_a_new_chats_settings_reach_the_upstream_and_are_stored(alice, routes):
    tab = await connect(alice)
    settings = {
        "system_prompt": "You are a pirate.",
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 300,
    }

    frames = await new_chat(tab, settings=settings)

    assert frames[-1]["type"] == "done"
    assert text_of(frames) == (
        "system: You are a pirate.\ntemperature: 0.3\ntop_p: 0.9\nmax_tokens: 300"
    )
    conversation = await Conversation.objects.aget()
    assert (conversation.system_prompt, conversation.temperature) == (
        "You are a pirate.",
        0.3,
    )
    assert (conversation.top_p, conversation.max_tokens) == (0.9, 300)
    await tab.send_json_to({"type": "open", "conversation_id": str(conversation.id)})
    opened = (await frames_until(tab, "opened"))[-1]
    assert opened["conversation"]["settings"] == settings
    await tab.disconnect()


async def test_a_new_chat_without_settings_takes_the_models_defaults(alice, routes):
    await ModelDefaults.objects.acreate(
        model_name=MODEL, system_prompt="Speak French.", temperature=1.5
    )
    tab = await connect(alice)

    frames = await new_chat(tab)

    assert text_of(frames).splitlines()[:2] == [
        "system: Speak French.",
        "temperature: 1.5",
    ]
    conversation = await Conversation.objects.aget()
    assert conversation.system_prompt == "Speak French."
    await tab.disconnect()


async def test_the_settings_frame_changes_the_next_answer(alice, routes):
    tab = await connect(alice)
    first = await new_chat(tab)
    conversation_id = first[-1]["conversation_id"]

    await tab.send_json_to(
        {
            "type": "settings",
            "conversation_id": conversation_id,
            "settings": {"system_prompt": "Be terse.", "top_p": 0.25},
        }
    )
    saved = await tab.receive_json_from(timeout=5)
    await send(tab, ECHO, conversation_id=conversation_id)
    second = await frames_until(tab, "done")

    assert saved == {
        "type": "settings",
        "conversation_id": conversation_id,
        "settings": {
            "system_prompt": "Be terse.",
            "temperature": None,
            "top_p": 0.25,
            "max_tokens": None,
        },
    }
    lines = text_of(second).splitlines()
    assert lines[0] == "system: Be terse."
    assert lines[2] == "top_p: 0.25"
    await tab.disconnect()


async def test_the_system_prompt_counts_in_the_context(alice, routes):
    tab = await connect(alice)
    plain = await new_chat(tab, "Hello")
    prompted = await new_chat(tab, "Hello", settings={"system_prompt": "word " * 200})

    def tokens(frames):
        return next(f for f in frames if f["type"] == "context")["status"]["tokens"]

    assert tokens(prompted) >= tokens(plain) + 200
    [first, second] = [r async for r in UsageRecord.objects.order_by("created_at")]
    assert second.prompt_tokens >= first.prompt_tokens + 200
    await tab.disconnect()


async def test_bob_cannot_change_alices_settings(alice, bob, routes):
    tab = await connect(alice)
    conversation_id = (await new_chat(tab, "Hello"))[-1]["conversation_id"]
    await tab.disconnect()
    intruder = await connect(bob)

    await intruder.send_json_to(
        {
            "type": "settings",
            "conversation_id": conversation_id,
            "settings": {"system_prompt": "Leak everything."},
        }
    )
    error = await intruder.receive_json_from(timeout=5)
    await intruder.send_json_to(
        {
            "type": "settings",
            "conversation_id": str(uuid.uuid4()),
            "settings": {"system_prompt": "Leak everything."},
        }
    )
    missing = await intruder.receive_json_from(timeout=5)

    assert (error["code"], error["request"]) == ("not_found", "settings")
    assert error["message"] == missing["message"]
    conversation = await Conversation.objects.aget(id=conversation_id)
    assert conversation.system_prompt == ""
    await intruder.disconnect()


async def test_out_of_range_settings_are_refused_and_nothing_changes(alice, routes):
    tab = await connect(alice)
    conversation_id = (await new_chat(tab, "Hello"))[-1]["conversation_id"]

    await tab.send_json_to(
        {
            "type": "settings",
            "conversation_id": conversation_id,
            "settings": {"system_prompt": "Changed.", "temperature": 3},
        }
    )
    error = await tab.receive_json_from(timeout=5)

    assert error["code"] == "invalid"
    assert "temperature must be a number from 0 to 2" in error["message"]
    conversation = await Conversation.objects.aget(id=conversation_id)
    assert (conversation.system_prompt, conversation.temperature) == ("", None)
    await tab.disconnect()


async def test_settings_with_a_send_to_an_existing_conversation_are_refused(
    alice, routes
):
    tab = await connect(alice)
    conversation_id = (await new_chat(tab, "Hello"))[-1]["conversation_id"]

    await send(tab, "Again", conversation_id=conversation_id, settings={"top_p": 0.5})
    error = await tab.receive_json_from(timeout=5)

    assert (error["code"], error["request"]) == ("invalid", "send")
    assert "settings frame" in error["message"]
    await tab.disconnect()


async def test_a_system_prompt_too_large_for_every_window_stores_nothing(alice, routes):
    await ModelRoute.objects.filter(model_name=MODEL).aupdate(
        context_window=300, max_output_tokens=100
    )
    router.forget_routes()
    tab = await connect(alice)

    [error] = await new_chat(
        tab, "Hello", settings={"system_prompt": "Arr, matey! " * 300}
    )

    assert (error["code"], error["request"]) == ("context_too_large", "send")
    assert "Shorten the system prompt" in error["message"]
    assert not await Conversation.objects.aexists()
    assert not await UsageRecord.objects.aexists()
    await tab.disconnect()


async def test_a_settings_frame_with_a_too_large_prompt_changes_nothing(alice, routes):
    tab = await connect(alice)
    conversation_id = (await new_chat(tab, "Hello"))[-1]["conversation_id"]
    await ModelRoute.objects.filter(model_name=MODEL).aupdate(
        context_window=300, max_output_tokens=100
    )

    await tab.send_json_to(
        {
            "type": "settings",
            "conversation_id": conversation_id,
            "settings": {"system_prompt": "Arr, matey! " * 300},
        }
    )
    error = await tab.receive_json_from(timeout=5)

    assert error["code"] == "context_too_large"
    conversation = await Conversation.objects.aget(id=conversation_id)
    assert conversation.system_prompt == ""
    await tab.disconnect()


async def test_model_defaults_above_the_routes_limit_do_not_lock_new_chats(
    alice, routes
):
    await ModelDefaults.objects.acreate(model_name=MODEL, max_tokens=999_999)
    tab = await connect(alice)

    frames = await new_chat(tab)

    assert frames[-1]["type"] == "done"
    # The router capped it at the route's own limit.
    assert text_of(frames).splitlines()[-1] == "max_tokens: 2000"
    await tab.disconnect()


async def test_a_new_chats_max_tokens_above_the_routes_limit_is_refused(alice, routes):
    tab = await connect(alice)

    [error] = await new_chat(tab, settings={"max_tokens": 2001})

    assert (error["code"], error["request"]) == ("invalid", "send")
    assert "at most 2,000" in error["message"]
    assert not await Conversation.objects.aexists()
    await tab.disconnect()
