"""Refusals that leave nothing behind, answers cut by a shutdown or a crash.

A refused send must not create a conversation or an error answer; a refused
regenerate or edit must keep what was there. An answer in flight at shutdown
is finished or cut cleanly with its record; one whose process died shows as
interrupted, and a stop for an answer nobody runs says so.
"""

# The fixtures are shared with test_consumer_streams, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import uuid

import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.core.cache import cache

from chat import actions, leases
from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import accounting
from gateway.models import Budget, BudgetCounter, BudgetScope, UsageStatus
from gateway.signals import requests_abandoned
from gateway.simulator import Behaviour
from llmsite.shutdown import shutdown
from tests.chat.conftest import ASSISTANT, USER
from tests.chat.test_consumer_streams import (  # noqa: F401 (fixtures)
    _no_answer_left_running,
    alice,
    answers,
    connect,
    frames_until,
    other_process,
    records,
    routes,
    send,
    text_of,
    upstream,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _accepting():
    """Every test starts and ends with a process that accepts work."""
    shutdown.reset()
    yield
    shutdown.reset()


async def user_budget(user, limit: int) -> Budget:
    budget = await sync_to_async(Budget.objects.create)(
        scope=BudgetScope.USER, user=user, token_limit=limit
    )
    accounting.forget_budgets()
    return budget


async def reserved(budget: Budget) -> int:
    counters = [c async for c in BudgetCounter.objects.filter(budget=budget)]
    return sum(c.reserved_tokens for c in counters)


# --- Refusals ---------------------------------------------------------------------


async def test_a_send_refused_by_the_budget_creates_no_conversation(
    alice, routes, owner
):
    await user_budget(owner, 1)
    tab = await connect(alice)

    await send(tab, "Will this be kept?")
    [error] = await frames_until(tab, "error")

    assert error["code"] == "budget_exhausted"
    assert (error["request"], error["refused"]) == ("send", True)
    assert "conversation_id" not in error
    assert "your text is still here" in error["message"]
    assert not await Conversation.objects.aexists()
    assert not await Message.objects.aexists()
    await accounting.flush()
    assert [r.status for r in await records()] == [UsageStatus.REJECTED]
    await tab.disconnect()


async def test_many_refused_sends_leave_no_trace_in_the_conversation_list(
    alice, routes, settings
):
    settings.RATE_LIMIT_RPM = 1
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "done")

    for _ in range(5):
        await send(tab, "again")
        [error] = await frames_until(tab, "error")
        assert error["code"] == "rate_limited"

    assert await Conversation.objects.acount() == 1
    assert await Message.objects.acount() == 2
    await tab.disconnect()


async def test_a_refused_regenerate_keeps_the_previous_answer(alice, routes, owner):
    tab = await connect(alice)
    await send(tab)
    first = await frames_until(tab, "done")
    conversation_id = first[0]["conversation_id"]
    await user_budget(owner, 1)

    await tab.send_json_to({"type": "regenerate", "conversation_id": conversation_id})
    [error] = await frames_until(tab, "error")

    assert (error["code"], error["request"]) == ("budget_exhausted", "regenerate")
    assert error["conversation_id"] == conversation_id
    [answer] = await answers()
    assert (answer.id, answer.status) == (first[-1]["answer"]["id"], "complete")
    assert answer.content == text_of(first)
    await tab.disconnect()


async def test_a_refused_edit_keeps_the_question_and_its_answer(alice, routes, owner):
    tab = await connect(alice)
    await send(tab, "the original question")
    first = await frames_until(tab, "done")
    question_id = first[0]["user_message"]["id"]
    await user_budget(owner, 1)

    await tab.send_json_to(
        {"type": "edit", "message_id": question_id, "content": "rewritten"}
    )
    [error] = await frames_until(tab, "error")

    assert (error["code"], error["request"]) == ("budget_exhausted", "edit")
    question = await Message.objects.aget(id=question_id)
    assert question.content == "the original question"
    assert [a.id for a in await answers()] == [first[-1]["answer"]["id"]]
    await tab.disconnect()


async def test_a_busy_conversation_refuses_without_storing_the_question(
    alice, routes, upstream
):
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))
    tab = await connect(alice)
    await send(tab)
    started = await frames_until(tab, "delta")
    conversation_id = started[0]["conversation_id"]

    await send(tab, "and meanwhile?", conversation_id=conversation_id)
    frames = await frames_until(tab, "error")

    assert frames[-1]["code"] == "busy"
    assert not await Message.objects.filter(content="and meanwhile?").aexists()
    await tab.disconnect()


# --- Shutdown ---------------------------------------------------------------------


async def test_a_send_while_shutting_down_is_refused_with_the_text_kept(alice, routes):
    tab = await connect(alice)
    shutdown.begin(grace=30)

    await send(tab, "during a deploy")
    [error] = await frames_until(tab, "error")

    assert (error["code"], error["request"]) == ("server_restarting", "send")
    assert error["retry_after"] > 0
    assert "your text is still here" in error["message"]
    assert not await Conversation.objects.aexists()
    assert await records() == []
    await tab.disconnect()


async def test_an_answer_in_flight_finishes_within_the_grace(alice, routes, upstream):
    upstream.set_behaviour(Behaviour(completion_tokens=20, tokens_per_second=100))
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "delta")

    await asyncio.wait_for(shutdown.drain(grace=10), 10)

    [answer] = await answers()
    assert answer.status == MessageStatus.COMPLETE
    assert [r.status for r in await records()] == [UsageStatus.OK]
    await tab.disconnect()


async def test_an_answer_past_the_grace_is_cut_and_kept_with_its_record(
    alice, routes, upstream, owner
):
    budget = await user_budget(owner, 100_000)
    upstream.set_behaviour(Behaviour(completion_tokens=1000, tokens_per_second=40))
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "delta")

    began = asyncio.get_running_loop().time()
    await shutdown.drain(grace=0.3)
    took = asyncio.get_running_loop().time() - began
    frames = await frames_until(tab, "done")

    assert took < 3
    assert frames[-1]["stopped"] is True
    assert frames[-1]["stop_reason"] == "shutdown"
    [answer] = await answers()
    assert answer.status == MessageStatus.PARTIAL
    assert answer.content and answer.content == frames[-1]["answer"]["content"]
    [record] = await records()
    assert record.status == UsageStatus.CANCELLED
    assert answer.usage_id == record.id
    await upstream.wait_for_disconnects(1)
    assert await reserved(budget) == 0
    await tab.disconnect()


async def test_an_answer_keeps_streaming_when_its_socket_closes_at_shutdown(
    alice, routes, upstream, settings
):
    # uvicorn closes every websocket at shutdown; the answer is still stored.
    settings.CHAT_RESUME_GRACE_SECONDS = 0
    upstream.set_behaviour(Behaviour(completion_tokens=30, tokens_per_second=100))
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "delta")

    shutdown.begin(grace=10)
    await tab.disconnect()
    await asyncio.wait_for(shutdown.drain(), 10)

    [answer] = await answers()
    assert answer.status == MessageStatus.COMPLETE
    assert [r.status for r in await records()] == [UsageStatus.OK]


# --- Crashes ----------------------------------------------------------------------


def test_an_answer_left_by_a_dead_process_opens_as_interrupted(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q"), (ASSISTANT, "", MessageStatus.STREAMING)
    )

    opened = actions.open_conversation(owner, conversation.id)

    assert [m["status"] for m in opened["messages"]] == ["complete", "interrupted"]
    assert conversation.messages.last().status == MessageStatus.INTERRUPTED


def test_an_answer_still_claimed_by_a_process_is_left_to_its_start_frame(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q"), (ASSISTANT, "", MessageStatus.STREAMING)
    )
    lease = leases.claim(owner.pk, conversation.id, 2, "specific.other-process")
    try:
        opened = actions.open_conversation(owner, conversation.id)
    finally:
        leases.release(lease)

    assert [m["role"] for m in opened["messages"]] == ["user"]
    assert conversation.messages.last().status == MessageStatus.STREAMING


def test_abandoned_requests_mark_only_their_unfinished_answers(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"))
    lost, finished, elsewhere = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for request_id, status in (
        (lost, MessageStatus.STREAMING),
        (finished, MessageStatus.COMPLETE),
        (elsewhere, MessageStatus.STREAMING),
    ):
        Message.objects.create(
            conversation=conversation,
            role=MessageRole.ASSISTANT,
            status=status,
            request_id=request_id,
        )

    requests_abandoned.send(sender=None, request_ids=[lost, finished])

    statuses = dict(conversation.messages.values_list("request_id", "status"))
    assert statuses == {
        None: MessageStatus.COMPLETE,
        lost: MessageStatus.INTERRUPTED,
        finished: MessageStatus.COMPLETE,
        elsewhere: MessageStatus.STREAMING,
    }


async def test_retry_of_an_interrupted_answer_answers_the_question_again(
    alice, routes, owner, make_conversation
):
    conversation = await sync_to_async(make_conversation)(
        owner, (USER, "q"), (ASSISTANT, "", MessageStatus.INTERRUPTED)
    )
    tab = await connect(alice)

    await tab.send_json_to(
        {"type": "regenerate", "conversation_id": str(conversation.id)}
    )
    frames = await frames_until(tab, "done")

    interrupted, answer = await answers()
    assert interrupted.status == MessageStatus.INTERRUPTED
    assert not interrupted.active
    assert answer.status == MessageStatus.COMPLETE
    assert answer.content == text_of(frames)
    await tab.disconnect()


def test_a_dead_processs_claim_frees_the_conversation_soon(owner, settings):
    settings.CHAT_LEASE_SECONDS = 6
    # Frozen time moves local-memory expiry; Redis keeps its own clock.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "chat-recovery",
        }
    }
    conversation_id = uuid.uuid4()
    with time_machine.travel("2026-01-01 12:00", tick=False) as traveller:
        leases.claim(owner.pk, conversation_id, 2, "specific.dead")
        traveller.shift(5)
        assert leases.owner_of(conversation_id) == "specific.dead"
        traveller.shift(2)
        assert leases.owner_of(conversation_id) is None


# --- Stop across processes ------------------------------------------------------


async def test_a_stop_for_an_answer_no_process_runs_answers_not_running(
    alice, routes, owner, make_conversation, monkeypatch, other_process
):
    monkeypatch.setattr("chat.generation.STOP_ACK_SECONDS", 0.5)
    await other_process._ready()
    conversation = await sync_to_async(make_conversation)(owner, (USER, "q"))
    # The other process holds the claim but runs nothing (it just ended, or
    # it is a process that died with its claim still held).
    await sync_to_async(cache.set)(
        leases.conversation_key(conversation.id), other_process.channel, 30
    )
    tab = await connect(alice)

    await tab.send_json_to({"type": "stop", "conversation_id": str(conversation.id)})
    [error] = await frames_until(tab, "error")

    assert error["code"] == "not_running"
    await sync_to_async(cache.set)(
        leases.conversation_key(conversation.id), "specific.dead!gone", 30
    )
    await tab.send_json_to({"type": "stop", "conversation_id": str(conversation.id)})
    [error] = await frames_until(tab, "error")
    assert error["code"] == "not_running"
    await tab.disconnect()
