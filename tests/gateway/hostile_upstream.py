"""A hostile OpenAI-compatible upstream on a real socket, for the boundary tests.

Each endpoint URL names a mode, ``http://127.0.0.1:<port>/<mode>/v1``, so one
server can pose as many misbehaving endpoints.  It writes raw HTTP/1.1 (no
framework, close-delimited bodies) so that it can send what a well-behaved
server never would: NUL bytes, broken UTF-8, endless streams, keep-alive
comments only, absurd usage numbers.  It echoes the secrets it receives (the
bearer key and the ``X-Org-Token`` header) where they hurt most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

CUT = 500  # where the gateway cuts quoted upstream text

Handler = Callable[["_Exchange"], Awaitable[None]]


@dataclass
class _Exchange:
    """One request and the means to answer it."""

    writer: asyncio.StreamWriter
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    interval: float

    @property
    def key(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")

    @property
    def org_token(self) -> str:
        return self.headers.get("x-org-token", "")

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    async def head(
        self, status: int, content_type: str, length: int | None, *extra: str
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} Whatever",
            f"Content-Type: {content_type}",
            "Connection: close",
            *extra,
        ]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

    async def send(self, status: int, body: bytes, content_type: str) -> None:
        await self.head(status, content_type, len(body))
        self.writer.write(body)
        await self.writer.drain()

    async def send_json(self, status: int, value: Any) -> None:
        await self.send(status, json.dumps(value).encode(), "application/json")

    async def sse_head(self) -> None:
        await self.head(200, "text/event-stream", None)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def event(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def completion(text: str, usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def straddling(secret: str, prefix: str = "") -> str:
    """Filler that puts `secret` across the gateway's cut of quoted text."""
    return prefix + "x" * (CUT - len(prefix) - len(secret) // 2) + secret + " tail"


# --- Modes ------------------------------------------------------------------


async def nul_error(x: _Exchange) -> None:
    message = f"bad\x00request \x1b[31m{x.key}\x1b[0m \ud800 org {x.org_token}\x07"
    await x.send_json(500, {"error": {"message": message}})


async def binary_error(x: _Exchange) -> None:
    noise = bytes(range(256)) * 4
    body = noise + x.key.encode() + b"\x00\xff\xfe" + x.org_token.encode() + noise
    await x.send(502, body, "application/octet-stream")


async def retry_after_inf(x: _Exchange) -> None:
    body = json.dumps({"error": {"message": "slow down"}}).encode()
    await x.head(
        429, "application/json", len(body), "Retry-After: inf", "Retry-After-Ms: nan"
    )
    await x.write(body)


async def key_at_cut(x: _Exchange) -> None:
    # The old code cut at 500 characters first: a key prefix survived.
    await x.send_json(503, {"error": {"message": straddling(x.key)}})


async def key_in_line(x: _Exchange) -> None:
    if not x.stream:
        body = straddling(x.org_token, "not json ").encode()
        await x.send(200, body, "application/json")
        return
    await x.sse_head()
    await x.write(event(chunk({"role": "assistant"})))
    # A JSON string, not an object: quoted in the error with the key across
    # the cut, and the other secret in clear.
    await x.write(event(straddling(x.key, f"{x.org_token} ")))


async def empty_chunks(x: _Exchange) -> None:
    await x.sse_head()
    role = event(chunk({"role": "assistant"}))
    empty = event(chunk({"content": ""}))
    batch = (role + empty) * 50
    while True:
        await x.write(batch)


async def endless_content(x: _Exchange) -> None:
    await x.sse_head()
    batch = (
        event(chunk({"role": "assistant", "content": ""}))
        + event(chunk({"content": " word"})) * 50
    )
    while True:
        await x.write(batch)


async def keepalive_only(x: _Exchange) -> None:
    await x.sse_head()
    while True:
        await x.write(b": keep-alive\n\n")
        await asyncio.sleep(x.interval / 10)


async def drip(x: _Exchange) -> None:
    await x.sse_head()
    await x.write(event(chunk({"role": "assistant", "content": ""})))
    while True:
        await x.write(event(chunk({"content": " drop"})))
        await asyncio.sleep(x.interval)


def _with_usage(usage: Any) -> Handler:
    async def answer(x: _Exchange) -> None:
        if not x.stream:
            await x.send_json(200, completion("Short answer.", usage))
            return
        await x.sse_head()
        await x.write(event(chunk({"role": "assistant", "content": "Short"})))
        await x.write(event(chunk({"content": " answer."}, "stop")))
        await x.write(event({"id": "x", "choices": [], "usage": usage}))
        await x.write(b"data: [DONE]\n\n")

    return answer


async def bad_shapes(x: _Exchange) -> None:
    if not x.stream:
        parts = [{"type": "text", "text": "Hello"}, 5, {"text": 7}, " ignored"]
        choice = {"message": {"content": parts}, "finish_reason": 7}
        await x.send_json(200, {"choices": [choice], "usage": "lots"})
        return
    await x.sse_head()
    for shape in (
        {"choices": 5},
        {"choices": "abc"},
        {"choices": [5]},
        {"choices": [{"delta": 5}]},
        {"choices": [{"delta": {"content": 5}}]},
        {"choices": [{"delta": {"content": ["a", {"text": 5}]}}]},
        {"choices": [{"delta": {"content": "Hello"}, "finish_reason": 7}]},
        {"choices": [{"delta": {"content": " wor\x00ld\ud800"}}], "usage": [1]},
    ):
        await x.write(event(shape))
    await x.write(event(chunk({}, "stop\x00" + "p" * 100)))
    await x.write(b"data: [DONE]\n\n")


async def choices_five(x: _Exchange) -> None:
    await x.send_json(200, {"choices": 5})


async def plain_answer(x: _Exchange) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3}
    await x.send_json(200, completion("A plain answer.", usage))


async def long_plain(x: _Exchange) -> None:
    await x.send_json(200, completion(" word" * 20_000))


async def deep_json(x: _Exchange) -> None:
    nested = b"[" * 20_000 + b"]" * 20_000
    if not x.stream:
        await x.send(200, nested, "application/json")
        return
    await x.sse_head()
    await x.write(b"data: " + nested + b"\n\n")


async def bad_models(x: _Exchange) -> None:
    ids: list[Any] = [
        "ok-model",
        "nul\x00model\x1b[2J",
        5,
        {"id": f"key-{x.key}"},
        {"id": None},
        "m" * 1000,
    ]
    await x.send_json(200, {"data": ids + [f"filler-{n}" for n in range(5000)]})


MODES: dict[str, Handler] = {
    "bad_models": bad_models,
    "nul_error": nul_error,
    "binary_error": binary_error,
    "key_at_cut": key_at_cut,
    "retry_after_inf": retry_after_inf,
    "key_in_line": key_in_line,
    "empty_chunks": empty_chunks,
    "endless_content": endless_content,
    "keepalive_only": keepalive_only,
    "drip": drip,
    "usage_huge": _with_usage({"prompt_tokens": 2**40, "completion_tokens": 2**40}),
    "usage_float": _with_usage({"prompt_tokens": 12.5, "completion_tokens": 3.0}),
    "usage_string": _with_usage({"prompt_tokens": "12", "completion_tokens": "3"}),
    "usage_negative": _with_usage({"prompt_tokens": -5, "completion_tokens": -1}),
    "usage_bool": _with_usage({"prompt_tokens": True, "completion_tokens": True}),
    "usage_not_object": _with_usage(5),
    "choices_five": choices_five,
    "bad_shapes": bad_shapes,
    "plain_answer": plain_answer,
    "long_plain": long_plain,
    "deep_json": deep_json,
}


class HostileUpstream:
    """The server: `async with HostileUpstream() as server: server.url(mode)`."""

    def __init__(self, *, interval: float = 0.5) -> None:
        # The pace of `drip` and (a tenth of it) `keepalive_only`.
        self.interval = interval
        self.server: asyncio.Server | None = None
        self.port = 0
        # Connections being answered now; a closed request brings it to 0.
        self.active = 0
        self.requests: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    async def __aenter__(self) -> HostileUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        # Handlers stuck in an endless mode end when their socket closes.
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.server.wait_closed()

    async def wait_idle(self, seconds: float = 3.0) -> bool:
        """Whether every connection ended within `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        return self.active == 0

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.active += 1
        self._idle.clear()
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            _, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            raw = await reader.readexactly(length) if length else b""
            body = json.loads(raw) if raw else {}
            mode = path.strip("/").split("/", 1)[0]
            self.requests.append(mode)
            exchange = _Exchange(writer, path, headers, body, self.interval)
            await MODES[mode](exchange)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway hung up: what the bounds are for
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
