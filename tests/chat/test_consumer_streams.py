"""Answers over the websocket, end to end against a real simulated upstream.

Stop and disconnect must close the upstream request (the simulator counts the
streams its client abandoned), every answer leaves exactly one usage record,
and an answer survives its socket: a reconnect or a second tab sees it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.urls import path

from chat.consumers import ChatConsumer
from chat.generation import GenerationRegistry, registry
from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import accounting, router
from gateway import client as upstream_client
from gateway.models import Endpoint, ModelRoute, UsageRecord, UsageStatus
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens
from llmsite.asgi import application
from tests.chat.conftest import MODEL

pytestmark = pytest.mark.django_db(transaction=True)

TOKENS = 40
FULL_ANSWER = "".join(generated_tokens(TOKENS))


@pytest.fixture
def upstream():
    """A simulated upstream on its own thread: primary under /e/1, fallback /e/2."""
    server = SimulatedUpstream(
        behaviour=Behaviour(completion_tokens=TOKENS, tokens_per_second=100)
    )
    with server.run_in_thread():
        yield server


@pytest.fixture
def routes(upstream, settings):
    settings.RATE_LIMIT_RPM = 1000
    for priority, name in enumerate(("primary", "fallback"), start=1):
        endpoint = Endpoint.objects.create(
            name=name,
            base_url=upstream.base_url_for(f"/e/{priority}"),
            priority=priority,
            timeout=5,
            max_retries=1,
        )
        ModelRoute.objects.create(
            model_name=MODEL,
            endpoint=endpoint,
            upstream_model="sim-small",
            priority=priority,
        )
    router.forget_routes()


@pytest.fixture(autouse=True)
async def _no_answer_left_running():
    """Each test ends with its answers stored, so none leaks into the next."""
    yield
    for generation in registry.running():
        generation.stop()
        await generation.wait()
    await registry.aclose()
    await upstream_client.aclose_all()


@pytest.fixture
async def other_process() -> AsyncIterator[GenerationRegistry]:
    """The answers of a second web process, sharing the channel layer."""
    other = GenerationRegistry()
    yield other
    for generation in other.running():
        generation.stop()
        await generation.wait()
    await other.aclose()


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def alice(owner) -> str:
    return session_cookie(owner)


async def connect(cookie: str, app: Any = application) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(
        app,
        "/ws/chat/",
        headers=[
            (b"host", b"127.0.0.1"),
            (b"origin", b"http://127.0.0.1"),
            (b"cookie", f"sessionid={cookie}".encode()),
        ],
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def frames_until(
    communicator: WebsocketCommunicator, *types: str
) -> list[dict[str, Any]]:
    """Every frame up to and including the first of one of `types`."""
    received = []
    while True:
        frame = await communicator.receive_json_from(timeout=10)
        received.append(frame)
        if frame["type"] in types:
            return received


def text_of(frames: list[dict[str, Any]]) -> str:
    """The answer as a browser rebuilds it: start's text, then the deltas."""
    text = ""
    for frame in frames:
        if frame["type"] == "start":
            text = frame["text"]
        elif frame["type"] == "delta":
            text += frame["text"]
    return text


async def send(communicator, content: str = "Tell me something.", **fields) -> None:
    await communicator.send_json_to(
        {"type": "send", "conversation_id": None, "content": content, "model": MODEL}
        | fields
    )


async def records() -> list[UsageRecord]:
    return [r async for r in UsageRecord.objects.order_by("created_at")]


async def answers() -> list[Message]:
    return [
        m
        async for m in Message.objects.filter(role=MessageRole.ASSISTANT).order_by(
            "created_at"
        )
    ]


async def settled() -> None:
    """Wait until every running answer is stored."""
    async with asyncio.timeout(5):
        for generation in registry.running():
            await generation.wait()


async def test_an_answer_streams_and_is_stored_with_its_usage(alice, routes, owner):
    tab = await connect(alice)

    await send(tab)
    frames = await frames_until(tab, "done")

    start, done = frames[0], frames[-1]
    assert start["type"] == "start"
    assert start["user_message"]["content"] == "Tell me something."
    assert text_of(frames) == FULL_ANSWER
    context = next(f for f in frames if f["type"] == "context")
    assert context["endpoint"] == "primary"
    assert context["status"]["tokens"] > 0
    assert done["endpoint"] == "primary"
    assert done["usage"]["completion_tokens"] == TOKENS
    assert done["latency_ms"] > 0 and done["ttft_ms"] > 0
    assert done["answer"]["status"] == MessageStatus.COMPLETE
    [record] = await records()
    [answer] = await answers()
    assert answer.content == FULL_ANSWER
    assert answer.usage_id == record.id
    assert (record.status, record.user_id) == (UsageStatus.OK, owner.id)
    assert record.conversation_id == uuid.UUID(start["conversation_id"])
    await tab.disconnect()


async def test_deltas_are_coalesced_into_few_frames(alice, routes, upstream, settings):
    settings.CHAT_FRAME_INTERVAL_MS = 100
    upstream.set_behaviour(Behaviour(completion_tokens=TOKENS, tokens_per_second=400))
    tab = await connect(alice)

    await send(tab)
    frames = await frames_until(tab, "done")

    deltas = [f for f in frames if f["type"] == "delta"]
    # 40 tokens over about 100 ms: a frame per 100 ms, not one per token.
    assert 1 <= len(deltas) <= 4
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert text_of(frames) == FULL_ANSWER
    await tab.disconnect()


async def test_stop_closes_the_upstream_request_and_keeps_the_partial_answer(
    alice, routes, upstream
):
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))
    tab = await connect(alice)
    await send(tab)
    frames = await frames_until(tab, "delta")

    await tab.send_json_to(
        {"type": "stop", "conversation_id": frames[0]["conversation_id"]}
    )
    frames += await frames_until(tab, "done")
    await upstream.wait_for_disconnects(1)

    done = frames[-1]
    assert done["stopped"] is True
    assert done["answer"]["status"] == MessageStatus.PARTIAL
    [record] = await records()
    [answer] = await answers()
    assert record.status == UsageStatus.CANCELLED
    assert answer.usage_id == record.id
    assert 0 < len(answer.content) < len("".join(generated_tokens(400)))
    assert answer.content == text_of(frames)
    # No Done from the service: the usage comes from the cancelled record.
    assert record.completion_tokens > 0
    assert done["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "estimated": record.tokens_estimated,
    }
    assert done["endpoint"] == record.endpoint_name == "primary"
    assert "budget_remaining" in done
    assert answer.token_count == record.completion_tokens
    assert answer.endpoint_name == "primary"
    assert answer.endpoint_id == record.endpoint_id
    assert answer.meta["usage"] == done["usage"]
    await tab.disconnect()


async def test_disconnecting_cancels_the_upstream_request_at_once_without_grace(
    alice, routes, upstream, settings
):
    settings.CHAT_RESUME_GRACE_SECONDS = 0
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "delta")

    await tab.disconnect()
    await upstream.wait_for_disconnects(1, timeout=2)

    await settled()
    [record] = await records()
    [answer] = await answers()
    assert record.status == UsageStatus.CANCELLED
    assert answer.status == MessageStatus.PARTIAL
    assert answer.meta["stop_reason"] == "disconnect"
    assert answer.usage_id == record.id


async def test_an_abandoned_answer_is_cancelled_when_the_grace_period_ends(
    alice, routes, upstream, settings
):
    settings.CHAT_RESUME_GRACE_SECONDS = 0.3
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))
    tab = await connect(alice)
    await send(tab)
    await frames_until(tab, "delta")

    await tab.disconnect()
    await asyncio.sleep(0.1)
    assert upstream.stats.client_disconnects == 0
    await upstream.wait_for_disconnects(1, timeout=2)

    await settled()
    assert [r.status for r in await records()] == [UsageStatus.CANCELLED]


async def test_a_reconnect_resumes_the_answer_so_far_and_streams_the_rest(
    alice, routes, upstream, settings
):
    settings.CHAT_RESUME_GRACE_SECONDS = 5
    upstream.set_behaviour(Behaviour(completion_tokens=60, tokens_per_second=60))
    first = await connect(alice)
    await send(first)
    before = await frames_until(first, "delta")
    conversation_id = before[0]["conversation_id"]

    await first.disconnect()
    second = await connect(alice)
    await second.send_json_to({"type": "open", "conversation_id": conversation_id})
    frames = await frames_until(second, "done")

    opened, start = frames[0], frames[1]
    assert opened["type"] == "opened"
    assert [m["role"] for m in opened["messages"]] == ["user"]
    assert start["type"] == "start"
    assert start["text"]
    assert text_of(frames) == "".join(generated_tokens(60))
    assert upstream.stats.client_disconnects == 0
    assert [r.status for r in await records()] == [UsageStatus.OK]
    await second.disconnect()


async def test_a_second_tab_sees_the_same_stream(
    alice, routes, owner, make_conversation
):
    conversation = await sync_to_async(make_conversation)(owner)
    asking, watching = await connect(alice), await connect(alice)
    await watching.send_json_to(
        {"type": "open", "conversation_id": str(conversation.id)}
    )
    assert (await watching.receive_json_from())["type"] == "opened"

    await send(asking, conversation_id=str(conversation.id))
    asked = await frames_until(asking, "done")
    watched = await frames_until(watching, "done")

    assert watched[0]["type"] == "start"
    assert text_of(watched) == text_of(asked) == FULL_ANSWER
    assert watched[-1]["answer"]["id"] == asked[-1]["answer"]["id"]
    await asking.disconnect()
    await watching.disconnect()


async def test_a_conversation_answers_one_question_at_a_time(
    alice, routes, upstream, owner, make_conversation
):
    upstream.set_behaviour(Behaviour(completion_tokens=200, tokens_per_second=50))
    conversation = await sync_to_async(make_conversation)(owner)
    tab = await connect(alice)
    await send(tab, conversation_id=str(conversation.id))
    await frames_until(tab, "start")

    await send(tab, "And another thing", conversation_id=str(conversation.id))
    frames = await frames_until(tab, "error")

    assert frames[-1]["code"] == "busy"
    assert await Message.objects.filter(content="And another thing").aexists() is False
    await tab.send_json_to({"type": "stop", "conversation_id": str(conversation.id)})
    assert (await frames_until(tab, "done"))[-1]["stopped"] is True
    await tab.disconnect()


async def test_too_many_answers_at_once_are_refused(alice, routes, upstream, settings):
    settings.CHAT_MAX_CONCURRENT_GENERATIONS = 1
    upstream.set_behaviour(Behaviour(completion_tokens=200, tokens_per_second=50))
    tab = await connect(alice)
    await send(tab)
    first = await frames_until(tab, "start")

    await send(tab, "A second conversation")
    frames = await frames_until(tab, "error")

    assert frames[-1]["code"] == "too_many_generations"
    assert frames[-1]["request"] == "send"
    assert await Conversation.objects.acount() == 1
    await tab.send_json_to(
        {"type": "stop", "conversation_id": first[-1]["conversation_id"]}
    )
    await frames_until(tab, "done")
    await send(tab, "Now there is room")
    assert (await frames_until(tab, "done"))[-1]["answer"]["status"] == "complete"
    await tab.disconnect()


async def test_a_fallback_is_announced_and_recorded(alice, routes, upstream):
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="/e/1")
    tab = await connect(alice)

    await send(tab)
    frames = await frames_until(tab, "done")

    fallback = next(f for f in frames if f["type"] == "fallback")
    assert (fallback["from"], fallback["to"], fallback["status_code"]) == (
        "primary",
        "fallback",
        503,
    )
    done = frames[-1]
    assert done["endpoint"] == "fallback"
    assert done["answer"]["meta"]["hops"][0]["from"] == "primary"
    assert text_of(frames) == FULL_ANSWER
    [record] = await records()
    assert record.endpoint_name == "fallback"
    assert record.fallback_hops[0]["endpoint"] == "primary"
    await tab.disconnect()


async def test_a_refused_send_stores_nothing_but_its_usage_record(
    alice, routes, settings
):
    settings.RATE_LIMIT_RPM = 1
    tab = await connect(alice)
    await send(tab)
    done = (await frames_until(tab, "done"))[-1]
    conversation_id = done["conversation_id"]

    await send(tab, "Once more", conversation_id=conversation_id)
    frames = await frames_until(tab, "error")

    error = frames[-1]
    assert [f["type"] for f in frames] == ["error"]
    assert error["code"] == "rate_limited"
    assert error["retry_after"] > 0
    # Whose limit, when it resets, and what is left: for the page's note.
    assert re.fullmatch(
        r"Your limit of 1 request per minute is used up; it resets in (59|60) s\. "
        r"Nothing was sent; your text is still here\.",
        error["message"],
    )
    (requests,) = [s for s in done["rate_limits"] if s["kind"] == "requests"]
    assert (requests["scope"], requests["limit"], requests["remaining"]) == (
        "user",
        1,
        0,
    )
    assert error["rate_limits"][0]["remaining"] == 0
    assert (error["request"], error["refused"]) == ("send", True)
    assert "your text is still here" in error["message"]
    assert "answer" not in error
    assert not await Message.objects.filter(content="Once more").aexists()
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    await accounting.flush()
    statuses = [r.status for r in await records()]
    assert statuses == [UsageStatus.OK, UsageStatus.REJECTED]
    await tab.disconnect()


async def test_regenerate_shows_a_new_answer_and_keeps_the_old_one(alice, routes):
    tab = await connect(alice)
    await send(tab)
    first = await frames_until(tab, "done")
    conversation_id = first[0]["conversation_id"]

    await tab.send_json_to({"type": "regenerate", "conversation_id": conversation_id})
    again = await frames_until(tab, "done")

    assert again[0]["user_message"]["id"] == first[0]["user_message"]["id"]
    kept = await answers()
    assert [(a.id, a.active) for a in kept] == [
        (first[-1]["answer"]["id"], False),
        (again[-1]["answer"]["id"], True),
    ]
    assert again[-1]["answer"]["versions"]["index"] == 2
    assert again[-1]["answer"]["versions"]["count"] == 2
    # Each version links to the usage record of the request that wrote it.
    assert sorted(a.usage_id for a in kept) == sorted(r.id for r in await records())
    await tab.disconnect()


async def test_edit_answers_a_new_version_of_the_question(alice, routes, upstream):
    upstream.set_behaviour(Behaviour(echo=True))
    tab = await connect(alice)
    await send(tab, "first version")
    first = await frames_until(tab, "done")

    await tab.send_json_to(
        {
            "type": "edit",
            "message_id": first[0]["user_message"]["id"],
            "content": "second version",
        }
    )
    again = await frames_until(tab, "done")

    assert again[0]["user_message"]["content"] == "second version"
    assert text_of(again) == "second version"
    contents = [
        (m.content, m.active) async for m in Message.objects.order_by("created_at")
    ]
    assert contents == [
        ("first version", False),
        ("first version", False),
        ("second version", True),
        ("second version", True),
    ]
    assert again[0]["user_message"]["versions"] == {
        "index": 2,
        "count": 2,
        "prev": first[0]["user_message"]["id"],
        "next": None,
    }
    await tab.disconnect()


async def test_model_output_travels_as_text(alice, routes):
    tab = await connect(alice)

    await send(tab, '/sim reply="<img src=x onerror=alert(1)>"')
    frames = await frames_until(tab, "done")

    assert text_of(frames) == "<img src=x onerror=alert(1)>"
    await tab.disconnect()


async def test_another_process_can_join_and_stop_an_answer(
    alice, routes, upstream, owner, make_conversation, settings, other_process
):
    settings.CHAT_RESUME_GRACE_SECONDS = 5
    upstream.set_behaviour(Behaviour(completion_tokens=400, tokens_per_second=50))

    class OtherProcessConsumer(ChatConsumer):
        registry = other_process

    other_app = AuthMiddlewareStack(
        URLRouter([path("ws/chat/", OtherProcessConsumer.as_asgi())])
    )
    conversation = await sync_to_async(make_conversation)(owner)
    here = await connect(alice)
    await send(here, conversation_id=str(conversation.id))
    await frames_until(here, "delta")
    await here.disconnect()

    there = await connect(alice, other_app)
    await there.send_json_to({"type": "open", "conversation_id": str(conversation.id)})
    joined = await frames_until(there, "delta")
    await there.send_json_to({"type": "stop", "conversation_id": str(conversation.id)})
    frames = joined + await frames_until(there, "done")

    assert [f["type"] for f in joined[:2]] == ["opened", "start"]
    assert joined[1]["text"]
    assert frames[-1]["stopped"] is True
    await upstream.wait_for_disconnects(1)
    [answer] = await answers()
    assert answer.content == text_of(frames)
    assert [r.status for r in await records()] == [UsageStatus.CANCELLED]
    await there.disconnect()


@pytest.fixture
def retry_waits(monkeypatch) -> tuple[list[float], asyncio.Event]:
    """The router's retry waits, without jitter: recorded, then held at a gate.

    The waits last until the test opens the gate, so a test sees the chat
    mid-wait; the seconds the router meant to wait are in the list.
    """
    waits: list[float] = []
    gate = asyncio.Event()
    from_settings = router.RetryPolicy.from_settings

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await gate.wait()

    monkeypatch.setattr(
        router.RetryPolicy,
        "from_settings",
        lambda **overrides: from_settings(sleep=sleep, random=lambda: 0.0, **overrides),
    )
    return waits, gate


async def retry_on_fallback(attempts: int = 3) -> None:
    """With every other route tried, the fallback gets `attempts` in all."""
    await Endpoint.objects.filter(name="fallback").aupdate(max_retries=attempts)
    router.forget_routes()


async def test_a_failover_shows_a_status_line_before_the_answer(
    alice, routes, upstream
):
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="/e/1")
    tab = await connect(alice)

    await send(tab)
    frames = await frames_until(tab, "done")

    types = [f["type"] for f in frames]
    status = frames[types.index("status")]
    assert status["text"] == "primary failed (HTTP 503), trying fallback…"
    assert (status["kind"], status["endpoint"], status["to_endpoint"]) == (
        "failover",
        "primary",
        "fallback",
    )
    assert types.index("start") < types.index("status") < types.index("delta")
    assert types.count("status") == 1
    assert text_of(frames) == FULL_ANSWER
    assert frames[-1]["answer"]["status"] == MessageStatus.COMPLETE
    await tab.disconnect()


async def test_with_every_endpoint_down_the_chat_says_so_and_ends_with_an_error(
    alice, routes, upstream, retry_waits
):
    waits, gate = retry_waits
    gate.set()
    await retry_on_fallback()
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503))
    tab = await connect(alice)

    await send(tab)
    frames = await frames_until(tab, "error")

    statuses = [
        (f["kind"], f["text"], f["seconds"]) for f in frames if f["type"] == "status"
    ]
    assert statuses == [
        ("failover", "primary failed (HTTP 503), trying fallback…", None),
        ("retry", "fallback failed (HTTP 503), retrying in 2 s…", 2.0),
        ("retry", "fallback failed (HTTP 503), retrying in 4 s…", 4.0),
    ]
    assert waits == [2.0, 4.0]
    error = frames[-1]
    assert error["code"] == "all_endpoints_unavailable"
    assert error["message"].startswith("No endpoint can answer right now")
    assert error["answer"]["status"] == MessageStatus.ERROR
    assert "delta" not in [f["type"] for f in frames]
    [answer] = await answers()
    assert answer.status == MessageStatus.ERROR
    assert [r.status for r in await records()] == [UsageStatus.ERROR]
    await tab.disconnect()


async def test_a_tab_joining_during_a_wait_sees_the_status_line_then_the_answer(
    alice, routes, upstream, retry_waits, owner, make_conversation
):
    waits, gate = retry_waits
    await retry_on_fallback()
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503))
    conversation = await sync_to_async(make_conversation)(owner)
    asking = await connect(alice)
    await send(asking, conversation_id=str(conversation.id))
    asked = await frames_until(asking, "status")
    while asked[-1]["kind"] != "retry":
        asked += await frames_until(asking, "status")

    joining = await connect(alice)
    await joining.send_json_to(
        {"type": "open", "conversation_id": str(conversation.id)}
    )
    joined = await frames_until(joining, "start")
    upstream.reset()
    gate.set()
    joined += await frames_until(joining, "done")

    assert asked[0]["type"] == "start" and asked[0]["status"] is None
    start = next(f for f in joined if f["type"] == "start")
    assert start["status"]["text"] == "fallback failed (HTTP 503), retrying in 2 s…"
    assert start["status"]["kind"] == "retry"
    assert waits == [2.0]
    assert text_of(joined) == FULL_ANSWER
    assert joined[-1]["endpoint"] == "fallback"
    await frames_until(asking, "done")
    await asking.disconnect()
    await joining.disconnect()


async def first_text_after_send(tab: WebsocketCommunicator) -> float:
    """Seconds from sending a message to its first answer text; reads to done."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await send(tab)
    first: float | None = None
    while True:
        frame = await tab.receive_json_from(timeout=10)
        if frame["type"] == "delta" and first is None:
            first = loop.time() - started
        if frame["type"] in ("done", "error"):
            assert frame["type"] == "done", frame
            assert first is not None
            return first


async def fallback_alone(tab: WebsocketCommunicator) -> float:
    """The fallback's own time to first text, warm, with the primary disabled."""
    await first_text_after_send(tab)
    await Endpoint.objects.filter(name="primary").aupdate(enabled=False)
    router.forget_routes()
    alone = await first_text_after_send(tab)
    await Endpoint.objects.filter(name="primary").aupdate(enabled=True)
    router.forget_routes()
    return alone


@pytest.mark.parametrize(
    ("behaviour", "settings_of_primary", "extra"),
    [
        # A 503 fails over at once, even with retries configured.
        (Behaviour(fault="status", fault_status=503), {"max_retries": 3}, 0.0),
        # A hung primary costs its first-token timeout, no more.
        (
            Behaviour(fault="stall", fault_after_tokens=0),
            {"first_token_timeout": 0.5},
            0.5,
        ),
        # A long Retry-After is not waited out while the fallback can answer.
        (Behaviour(fault="status", fault_status=429, retry_after=60), {}, 0.0),
    ],
    ids=["503", "hung", "429"],
)
async def test_the_fallback_answers_within_its_own_latency_plus_200_ms(
    alice, routes, upstream, behaviour, settings_of_primary, extra
):
    tab = await connect(alice)
    alone = await fallback_alone(tab)
    await Endpoint.objects.filter(name="primary").aupdate(**settings_of_primary)
    router.forget_routes()
    upstream.set_behaviour(behaviour, prefix="/e/1")

    took = await first_text_after_send(tab)

    assert took <= extra + alone + 0.2, (took, alone)
    primary = await Endpoint.objects.aget(name="primary")
    # One failed request: the circuit stays closed and nobody is told it is down.
    assert (primary.disabled_until, primary.status) == (None, "unknown")
    [*_, last] = await records()
    assert last.endpoint_name == "fallback"
    assert [step["endpoint"] for step in last.trail] == ["primary", "fallback"]
    await tab.disconnect()
