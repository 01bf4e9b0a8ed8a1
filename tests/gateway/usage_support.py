"""Helpers for the accounting tests: a fake upstream, routes, thread connections."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from asgiref.sync import SyncToAsync, async_to_sync
from django.db import connections

from gateway import accounting, limits, service
from gateway.models import Endpoint, ModelRoute

REPLY = ["Hello", " there", ",", " how", " can", " I", " help", "?"]


@dataclass
class Behaviour:
    """How one fake endpoint answers."""

    status: int = 200
    retry_after: str | None = None
    words: list[str] = field(default_factory=lambda: list(REPLY))
    # Upstream usage to report; None: no usage chunk (we estimate).
    usage: dict[str, int] | None = field(
        default_factory=lambda: {"prompt_tokens": 11, "completion_tokens": 8}
    )
    # Report exactly what the request may produce: its max_tokens as the
    # completion and `prompt_tokens` as the prompt.
    usage_from_request: int | None = None
    # Fail the connection after this many words.
    drop_after: int | None = None
    # Hold the stream after this many words until `release` is set.
    pause_after: int | None = None


class FakeUpstream:
    """Several OpenAI-compatible endpoints, one per host name."""

    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.open_streams = 0
        self.closed_streams = 0
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    def behaviour(self, host: str) -> Behaviour:
        return self.behaviours.setdefault(host, Behaviour())

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def requests_to(self, host: str) -> list[dict[str, Any]]:
        return [body for to, body in self.requests if to == host]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        host = request.url.host
        self.requests.append((host, body))
        behaviour = self.behaviour(host)
        if behaviour.status != 200:
            headers = (
                {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
            )
            return httpx.Response(
                behaviour.status,
                json={"error": {"message": f"upstream says {behaviour.status}"}},
                headers=headers,
            )
        usage = behaviour.usage
        if behaviour.usage_from_request is not None:
            usage = {
                "prompt_tokens": behaviour.usage_from_request,
                "completion_tokens": body.get("max_tokens") or 0,
            }
        words = behaviour.words
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            payload = {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            if usage is not None:
                payload["usage"] = {
                    **usage,
                    "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                }
            return httpx.Response(200, json=payload)
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_SSE(self, behaviour, body, usage),
        )


class _SSE(httpx.AsyncByteStream):
    def __init__(
        self,
        upstream: FakeUpstream,
        behaviour: Behaviour,
        body: dict[str, Any],
        usage: dict[str, int] | None,
    ) -> None:
        self.upstream = upstream
        self.behaviour = behaviour
        self.body = body
        self.usage = usage
        self.closed = False

    @staticmethod
    def event(data: Any) -> bytes:
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self.event(
            {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "model": self.body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    async def __aiter__(self):
        upstream, behaviour = self.upstream, self.behaviour
        upstream.open_streams += 1
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            for index, word in enumerate(behaviour.words):
                if behaviour.drop_after is not None and index == behaviour.drop_after:
                    raise httpx.ReadError("connection reset by peer")
                if behaviour.pause_after is not None and index == behaviour.pause_after:
                    upstream.paused.set()
                    await upstream.release.wait()
                yield self.chunk({"content": word})
            yield self.chunk({}, "stop")
            if self.usage is not None and self.body.get("stream_options"):
                total = self.usage["prompt_tokens"] + self.usage["completion_tokens"]
                yield self.event(
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion.chunk",
                        "model": self.body["model"],
                        "choices": [],
                        "usage": {**self.usage, "total_tokens": total},
                    }
                )
            yield b"data: [DONE]\n\n"
        finally:
            upstream.open_streams -= 1

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.closed_streams += 1


def make_route(
    name: str,
    *,
    model_name: str = "chat-model",
    upstream_model: str = "gpt-4o-mini",
    priority: int = 10,
    max_output_tokens: int = 100,
    context_window: int = 4000,
    prices: tuple[str, str] | None = ("0.15", "0.60"),
    **endpoint_fields: Any,
) -> ModelRoute:
    """An endpoint at https://<name>.test/v1 and its route for `model_name`."""
    endpoint = Endpoint.objects.create(
        name=name,
        base_url=f"https://{name}.test/v1",
        max_retries=1,
        **endpoint_fields,
    )
    return ModelRoute.objects.create(
        model_name=model_name,
        endpoint=endpoint,
        upstream_model=upstream_model,
        priority=priority,
        max_output_tokens=max_output_tokens,
        context_window=context_window,
        input_price_per_1k=Decimal(prices[0]) if prices else None,
        output_price_per_1k=Decimal(prices[1]) if prices else None,
    )


def forget_process_state() -> None:
    """Per-process caches that a previous test's rows must not leak through."""
    accounting.forget_budgets()
    limits._caller_limits.clear()


def close_thread_connections() -> None:
    """Close connections opened by the usage writer and asgiref's sync thread.

    Both threads outlive a test; PostgreSQL will not drop the test database
    while they hold a connection to it.
    """
    accounting.close_writer()
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


async def _one_request(caller: Any, model_name: str, messages: list[dict]) -> Any:
    async with aclosing(service.stream_chat(caller, model_name, messages)) as events:
        async for event in events:
            if isinstance(event, service.Done):
                return event
    raise AssertionError("the stream ended without Done")


def fire_concurrently(
    caller: Any, model_name: str, messages: list[dict], *, threads: int, each: int
) -> list[Any]:
    """`threads` threads, each with its own loop and database connection, each
    running `each` streamed requests at once; every Done or exception."""

    def worker() -> list[Any]:
        async def burst() -> list[Any]:
            outcomes = await asyncio.gather(
                *(_one_request(caller, model_name, messages) for _ in range(each)),
                return_exceptions=True,
            )
            await accounting.flush()
            return outcomes

        try:
            # async_to_sync runs the ORM work of sync_to_async in this thread,
            # so every worker races on a connection of its own.
            return async_to_sync(burst)()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(worker) for _ in range(threads)]
        return [outcome for job in jobs for outcome in job.result()]
