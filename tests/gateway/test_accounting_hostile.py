"""Whatever an upstream sends and however a request ends: one record, no hold left.

Each failure kind that once lost records and kept reservations (usage of
2**40, a float, a string, a negative count, a NUL in an error body or a model
name, an exception in the middle of a stream, a cancellation) goes through
gateway.service with a user budget, and must leave exactly one usage record
for its request id, nothing reserved and no hold row. CI runs this file on
SQLite and on PostgreSQL, which refuses NUL in text and overflowing integers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import DatabaseError

from gateway import accounting, client, service
from gateway.models import Budget, BudgetCounter, BudgetHold, BudgetScope, UsageRecord
from gateway.service import Caller, Delta, Done, Rejected
from tests.gateway.usage_support import (
    close_thread_connections,
    forget_process_state,
    make_route,
)

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Say hello."}]
NUL_BODY = b'{"error": {"message": "broken\\u0000 \x00 upstream\x01\x02"}}'


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    yield
    forget_process_state()
    close_thread_connections()


@pytest.fixture
def route(db):
    return make_route("hostile")


@pytest.fixture
def budget(owner):
    return Budget.objects.create(
        scope=BudgetScope.USER, user=owner, token_limit=1_000_000
    )


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[Any], started: asyncio.Event | None) -> None:
        self.chunks = chunks
        self.started = started

    async def __aiter__(self):
        for chunk in self.chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk == "pause":
                assert self.started is not None
                self.started.set()
                await asyncio.Event().wait()
            yield chunk if isinstance(chunk, bytes) else _event(chunk)


def _event(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(content: str | None = None, *, model: str = "m", **extra: Any) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        **extra,
    }


def _usage_chunk(usage: Any) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}


class Hostile:
    """An upstream that answers every request with one scripted misbehaviour."""

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        chunks: list[Any] | None = None,
        plain: dict | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.chunks = chunks or []
        self.plain = plain
        self.started = asyncio.Event()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.status != 200:
            return httpx.Response(self.status, content=self.body)
        if not json.loads(request.content).get("stream"):
            return httpx.Response(200, json=self.plain)
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_Stream(self.chunks, self.started),
        )


def _streamed_with_usage(usage: Any) -> Hostile:
    return Hostile(
        chunks=[
            _chunk("Hello"),
            _chunk(" there"),
            _usage_chunk(usage),
            b"data: [DONE]\n\n",
        ]
    )


def _plain_with_usage(usage: Any) -> Hostile:
    return Hostile(
        plain={
            "id": "c",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


ABSURD_USAGE = {
    "huge": {"prompt_tokens": 2**40, "completion_tokens": 2**40},
    "float": {"prompt_tokens": 11.5, "completion_tokens": 8.25},
    "string": {"prompt_tokens": 11, "completion_tokens": "eight"},
    "string prompt": {"prompt_tokens": "11", "completion_tokens": 8},
    "negative": {"prompt_tokens": -5, "completion_tokens": -7},
    "nested": {"prompt_tokens": {"a": 1}, "completion_tokens": [1, 2]},
}


async def _settled(request_id: uuid.UUID, budget: Budget) -> UsageRecord:
    """The one record of a request, once nothing of it is held any more."""
    await accounting.flush()
    records = await sync_to_async(list)(
        UsageRecord.objects.filter(request_id=request_id)
    )
    assert len(records) == 1, records
    counter = await BudgetCounter.objects.aget(budget=budget)
    assert counter.reserved_tokens == 0
    assert await BudgetHold.objects.acount() == 0
    assert await UsageRecord.objects.acount() == 1
    return records[0]


async def _stream(caller: Caller, model: str = "chat-model") -> list[Any]:
    events = []
    with contextlib.suppress(Rejected, ValueError, TypeError, RuntimeError):
        async with contextlib.aclosing(
            service.stream_chat(caller, model, MESSAGES)
        ) as stream:
            async for event in stream:
                events.append(event)
    return events


def _caller(owner) -> Caller:
    return Caller(owner.pk, request_id=uuid.uuid4())


@pytest.mark.parametrize("kind", list(ABSURD_USAGE))
async def test_absurd_stream_usage_leaves_one_record_and_no_reservation(
    owner, route, budget, kind
):
    caller = _caller(owner)
    hostile = _streamed_with_usage(ABSURD_USAGE[kind])

    with client.pools.use_transport(httpx.MockTransport(hostile.handle)):
        events = await _stream(caller)

    record = await _settled(caller.request_id, budget)
    assert 0 <= record.prompt_tokens <= 2**31 - 1
    assert 0 <= record.completion_tokens <= 2**31 - 1
    counter = await BudgetCounter.objects.aget(budget=budget)
    # The budget counts what the record says, never more.
    assert counter.used_tokens == record.total_tokens
    if events and isinstance(events[-1], Done):
        assert "".join(e.text for e in events if isinstance(e, Delta)) == (
            "Hello there"
        )


@pytest.mark.parametrize("kind", ["huge", "float", "string", "negative"])
async def test_absurd_plain_usage_leaves_one_record_and_no_reservation(
    owner, route, budget, kind
):
    caller = _caller(owner)
    hostile = _plain_with_usage(ABSURD_USAGE[kind])

    with (
        client.pools.use_transport(httpx.MockTransport(hostile.handle)),
        contextlib.suppress(Rejected, ValueError, TypeError),
    ):
        await service.complete_chat(caller, "chat-model", MESSAGES)

    record = await _settled(caller.request_id, budget)
    assert record.prompt_tokens <= 2**31 - 1


@pytest.mark.parametrize("plain", [False, True], ids=["stream", "plain"])
async def test_a_nul_in_an_error_body_is_recorded_without_it(
    owner, route, budget, plain
):
    caller = _caller(owner)
    hostile = Hostile(status=400, body=NUL_BODY)

    with (
        client.pools.use_transport(httpx.MockTransport(hostile.handle)),
        pytest.raises(Rejected),
    ):
        if plain:
            await service.complete_chat(caller, "chat-model", MESSAGES)
        else:
            async with contextlib.aclosing(
                service.stream_chat(caller, "chat-model", MESSAGES)
            ) as stream:
                async for _ in stream:
                    pass

    record = await _settled(caller.request_id, budget)
    assert record.status == "error"
    assert "\x00" not in record.error_message
    assert "\x01" not in record.error_message


async def test_a_nul_in_the_model_name_asked_for_is_recorded_without_it(
    owner, route, budget
):
    caller = _caller(owner)

    # PostgreSQL refuses even to look the name up; /v1 rejects it earlier.
    with contextlib.suppress(Rejected, DatabaseError):
        async with contextlib.aclosing(
            service.stream_chat(caller, "chat\x00model", MESSAGES)
        ) as stream:
            async for _ in stream:
                pass

    await accounting.flush()
    (record,) = await sync_to_async(list)(
        UsageRecord.objects.filter(request_id=caller.request_id)
    )
    assert record.status in {"rejected", "error"}
    assert record.model_name == "chatmodel"


async def test_a_nul_in_the_upstream_model_name_changes_nothing(owner, route, budget):
    caller = _caller(owner)
    hostile = Hostile(
        chunks=[
            _chunk("Hello", model="gpt\x00evil"),
            _usage_chunk({"prompt_tokens": 3, "completion_tokens": 1}),
            b"data: [DONE]\n\n",
        ]
    )

    with client.pools.use_transport(httpx.MockTransport(hostile.handle)):
        events = await _stream(caller)

    record = await _settled(caller.request_id, budget)
    assert isinstance(events[-1], Done)
    assert "\x00" not in record.upstream_model


async def test_an_exception_raised_mid_stream_leaves_one_record(owner, route, budget):
    caller = _caller(owner)
    hostile = Hostile(chunks=[_chunk("Hello"), RuntimeError("the upstream broke")])

    with client.pools.use_transport(httpx.MockTransport(hostile.handle)):
        await _stream(caller)

    record = await _settled(caller.request_id, budget)
    assert record.status in {"error", "ok"}


@pytest.mark.parametrize("after_first_token", [False, True], ids=["before", "after"])
async def test_a_cancellation_leaves_one_cancelled_record(
    owner, route, budget, after_first_token
):
    caller = _caller(owner)
    chunks: list[Any] = [_chunk("Hello")] if after_first_token else []
    hostile = Hostile(chunks=[*chunks, "pause"])

    async def chat() -> None:
        async with contextlib.aclosing(
            service.stream_chat(caller, "chat-model", MESSAGES)
        ) as stream:
            async for _ in stream:
                pass

    with client.pools.use_transport(httpx.MockTransport(hostile.handle)):
        task = asyncio.create_task(chat())
        await asyncio.wait_for(hostile.started.wait(), 5)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    record = await _settled(caller.request_id, budget)
    assert record.status == "cancelled"
    assert record.completion_tokens == (1 if after_first_token else 0)


async def test_an_entry_that_cannot_be_built_still_settles(
    owner, route, budget, monkeypatch
):
    caller = _caller(owner)
    hostile = _streamed_with_usage({"prompt_tokens": 3, "completion_tokens": 2})

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("no entry today")

    monkeypatch.setattr(service._Request, "_entry", broken)
    with client.pools.use_transport(httpx.MockTransport(hostile.handle)):
        events = await _stream(caller)

    assert isinstance(events[-1], Done)
    record = await _settled(caller.request_id, budget)
    assert (record.status, record.tokens_estimated) == ("error", True)
    assert record.error_type == "accounting_error:ValueError"
    counter = await BudgetCounter.objects.aget(budget=budget)
    # Counted as reserved: the most it could have used.
    assert counter.used_tokens == record.completion_tokens > 0
