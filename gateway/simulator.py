"""A simulated OpenAI-compatible upstream for the offline demo, tests and benchmarks.

It serves ``GET /v1/models``, ``POST /v1/chat/completions`` (plain and SSE
streaming) and ``POST /v1/embeddings`` under any path prefix, so ``/e/17/v1/models``
works too and one process can pose as many endpoints. It is plain asyncio with h11
and never imports Django.

An embeddings request gets one unit vector per input that depends only on the
text (16 numbers unless ``dimensions`` says otherwise; base64 of float32s when
``encoding_format`` is base64) and ``usage.prompt_tokens``. It honours the latency
and the status, drop, stall and malformed faults like a plain chat answer, from the
script, the prefix, the header and ``/sim`` lines in its first input.

How a chat request is answered (later steps override earlier ones field by field):

1. the next ``Behaviour`` queued with ``script()`` (chat requests only), else the
   behaviour set for the request's path prefix, else the process default;
2. the ``X-Sim-Behaviour`` header, a JSON object of ``Behaviour`` fields;
3. ``/sim`` directive lines in the last user message, one or more per message::

       /sim fault=status status=503 retry_after=1
       /sim reply="<img src=x onerror=alert(1)>"
       /sim tps=20 ttft=0.5 tokens=200
       /sim echo
       /sim images                                # report the image parts received
       /sim echo_settings                         # the system prompt and sampling
       /sim fault=status status=503 times=1       # only the first such request
       /sim fault=drop after=3 prefix=/e/1        # only under /e/1/v1/...
       /sim context_window=2048 no_stream_usage=1 bare_role_chunk=1  # llama.cpp

   A directive line starts with ``/sim`` and holds shell-quoted ``key=value``
   pairs. Keys are ``Behaviour`` field names or the aliases ``status``
   (fault_status), ``after`` (fault_after_tokens), ``tps`` (tokens_per_second)
   and ``tokens`` (completion_tokens); a bare ``echo`` means ``echo=true``;
   a bare ``images`` answers with the image parts of the last user message
   (``Received 1 image: image/png 1234 bytes.``: count, media type and the
   decoded size of each ``data:`` URL, or ``url`` for a link); a bare
   ``echo_settings`` answers with the system prompt and the temperature,
   top_p and max_tokens received, one per line;
   ``fault=none`` clears a fault; in ``reply`` a literal ``\\n`` is a newline.
   ``times=N`` applies the line to the first N requests carrying the same message
   (so a retry or a regenerate succeeds) and ``prefix=/p`` only to requests under
   that path prefix. Directive lines are never echoed. A malformed directive or
   header is answered with a 400 error naming the problem.

``GET /v1/models`` honours the latency and the status, drop, stall and malformed
faults of the prefix or default behaviour and of the header, so a prefix can pose as
a slow or broken endpoint for health probes.

Control endpoints, under any prefix (the prefix scopes ``behaviour``), unauthenticated:
``GET|POST /_sim/behaviour`` (POST replaces it with a JSON object of fields, unset
fields take their defaults), ``POST /_sim/script`` (a JSON list of such objects),
``POST /_sim/reset`` (initial behaviour, empty script) and ``GET /_sim/stats``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http
import itertools
import json
import logging
import math
import re
import shlex
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import h11

__all__ = [
    "BEHAVIOUR_HEADER",
    "DEFAULT_MODELS",
    "FAULTS",
    "Behaviour",
    "Directive",
    "Fault",
    "RecordedRequest",
    "SimulatedUpstream",
    "Stats",
    "embedding_vector",
    "estimate_prompt_tokens",
    "generated_tokens",
    "parse_directives",
    "split_tokens",
]

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("sim-small", "sim-large", "sim-embed")
Fault = Literal["status", "drop", "malformed", "stall", "reject_stream_options"]
FAULTS: frozenset[str] = frozenset(get_args(Fault))
BEHAVIOUR_HEADER = "x-sim-behaviour"
REDACTED = "[redacted]"

_MAX_HEAD_BYTES = 64 * 1024
_MAX_BODY_BYTES = 16 * 1024 * 1024
_MAX_COMPLETION_TOKENS = 100_000
_EMBEDDING_DIMENSIONS = 16
_MAX_RECORDED_BODY_BYTES = 1024 * 1024
# Unpaced streams are written in batches of this many chunks, so a slow reader
# holds back the writer instead of the whole reply piling up in memory.
_CHUNKS_PER_WRITE = 256
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key"}
)
_ROUTES = (
    ("/v1/chat/completions", "chat"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/models", "models"),
    ("/_sim/behaviour", "behaviour"),
    ("/_sim/script", "script"),
    ("/_sim/reset", "reset"),
    ("/_sim/stats", "stats"),
)
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_CONTROL_ROUTES = frozenset({"behaviour", "script", "reset", "stats"})
_JSON_HEADERS = (
    ("content-type", "application/json"),
    ("server", "llmsite-simulator"),
)
_SSE_HEADERS = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("server", "llmsite-simulator"),
)
# Word pieces carry their leading whitespace, so joining them gives the text back.
_TOKEN_RE = re.compile(r"\s*\S{1,6}|\s+")
_MALFORMED_SSE = "data: {this is not json\n\n"
# How LiteLLM reports its provider dropping a stream: an error event, no [DONE].
_ERROR_EVENT = (
    b'data: {"error": {"message": "litellm.APIConnectionError: Connection error.", '
    b'"type": null, "param": null, "code": "500"}}\n\n'
)
_MALFORMED_BODY = b'{"object": "chat.completion", "choices": [{"message": '


@dataclass(frozen=True)
class Behaviour:
    """How the simulated upstream answers a request."""

    latency: float = 0.0  # seconds before response headers
    ttft: float = 0.0  # seconds from headers to the first chunk
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    completion_tokens: int = 64  # length of the generated reply
    reply: str | None = None  # fixed answer text instead of the generated one
    echo: bool = False  # answer with the last user message
    images: bool = False  # answer with a report of the image parts received
    # Answer with the system prompt and the sampling parameters received.
    echo_settings: bool = False
    fault: Fault | None = None
    fault_status: int = 500
    retry_after: float | None = None  # seconds, sent as Retry-After
    fault_after_tokens: int = 0  # where drop, malformed and stall strike
    # Wire quirks of the LiteLLM proxy, each on its own:
    # Retry-After forwarded from its provider as llm_provider-retry-after(-ms).
    provider_retry_after: bool = False
    # Error bodies give the status as a string code: "code": "429".
    string_error_code: bool = False
    # Chunks leave out system_fingerprint, logprobs and finish_reason until the
    # last, and carry no "usage": null; a plain answer has no fingerprint,
    # refusal or logprobs.
    sparse_chunks: bool = False
    # The usage chunk repeats an empty choice instead of "choices": [].
    usage_chunk_with_choice: bool = False
    # A drop ends the stream with an error event (code "500") and no [DONE]
    # instead of cutting the connection.
    drop_as_error_event: bool = False
    # The llama.cpp server's ways (llama-cpp-python): no usage on a stream even
    # when asked for, a first chunk whose delta has a role and no content key,
    # and a prompt over this many (estimated) tokens refused with a 400
    # context_length_exceeded, or as a stream, a 200 with no chunk at all.
    no_stream_usage: bool = False
    bare_role_chunk: bool = False
    context_window: int = 0  # 0: no window

    def __post_init__(self) -> None:
        for name in ("latency", "ttft", "tokens_per_second"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if not 0 <= self.completion_tokens <= _MAX_COMPLETION_TOKENS:
            raise ValueError(f"completion_tokens must be 0..{_MAX_COMPLETION_TOKENS}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(sorted(FAULTS))}")
        if not 400 <= self.fault_status <= 599:
            raise ValueError("fault_status must be 400..599")
        if self.retry_after is not None and not (
            math.isfinite(self.retry_after) and self.retry_after >= 0
        ):
            raise ValueError("retry_after must be a finite number >= 0")
        if self.fault_after_tokens < 0:
            raise ValueError("fault_after_tokens must be >= 0")
        if self.context_window < 0:
            raise ValueError("context_window must be >= 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Behaviour:
        """Build a behaviour from field names (or aliases); unset fields default."""
        return cls().with_overrides(data)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Behaviour:
        """Return a copy with the given fields (names or aliases) replaced."""
        changes = {}
        for key, value in overrides.items():
            name = _ALIASES.get(key, key)
            if name not in _FIELD_KINDS:
                raise ValueError(f"unknown behaviour field {key!r}")
            changes[name] = _coerce(name, value)
        return dataclasses.replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


_FIELD_KINDS = {
    "latency": "float",
    "ttft": "float",
    "tokens_per_second": "float",
    "completion_tokens": "int",
    "reply": "text",
    "echo": "bool",
    "images": "bool",
    "echo_settings": "bool",
    "fault": "fault",
    "fault_status": "int",
    "retry_after": "optional_float",
    "fault_after_tokens": "int",
    "provider_retry_after": "bool",
    "string_error_code": "bool",
    "sparse_chunks": "bool",
    "usage_chunk_with_choice": "bool",
    "drop_as_error_event": "bool",
    "no_stream_usage": "bool",
    "bare_role_chunk": "bool",
    "context_window": "int",
}
_ALIASES = {
    "status": "fault_status",
    "after": "fault_after_tokens",
    "tps": "tokens_per_second",
    "tokens": "completion_tokens",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(name: str, value: Any) -> Any:
    """Convert a JSON or directive value to the type of the named field."""
    kind = _FIELD_KINDS[name]
    if kind == "text":
        if value is None or isinstance(value, str):
            return value
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif kind == "fault":
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        if isinstance(value, str):
            return value
    elif kind == "optional_float" and (
        value is None or (isinstance(value, str) and value.lower() in ("", "none"))
    ):
        return None
    elif not isinstance(value, bool):
        try:
            if kind == "int":
                number = float(value) if isinstance(value, float) else int(value)
                if isinstance(number, float) and not number.is_integer():
                    raise ValueError
                return int(number)
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"bad value for {name}: {value!r}")


@dataclass(frozen=True)
class Directive:
    """One ``/sim`` line from a user message."""

    line: str
    overrides: Mapping[str, Any]
    times: int | None = None
    prefix: str | None = None


def parse_directives(text: str) -> tuple[list[Directive], str]:
    """Split message text into its ``/sim`` directives and the remaining text."""
    directives = []
    kept = []
    for line in text.split("\n"):
        stripped = line.strip()
        if not (stripped == "/sim" or stripped.startswith(("/sim ", "/sim\t"))):
            kept.append(line)
            continue
        try:
            words = shlex.split(stripped[4:])
        except ValueError as exc:
            raise ValueError(f"bad /sim directive {stripped!r}: {exc}") from None
        overrides: dict[str, Any] = {}
        times = prefix = None
        for word in words:
            key, sep, value = word.partition("=")
            try:
                if not sep:
                    if key not in ("echo", "images", "echo_settings"):
                        raise ValueError(f"expected key=value, got {word!r}")
                    overrides[key] = True
                elif key == "times":
                    times = int(value)
                    if times < 1:
                        raise ValueError("times must be >= 1")
                elif key == "prefix":
                    prefix = "/" + value.strip("/") if value.strip("/") else ""
                else:
                    name = _ALIASES.get(key, key)
                    if name not in _FIELD_KINDS:
                        raise ValueError(f"unknown key {key!r}")
                    if name == "reply":
                        value = value.replace("\\n", "\n")
                    overrides[name] = _coerce(name, value)
            except ValueError as exc:
                raise ValueError(f"bad /sim directive {stripped!r}: {exc}") from None
        try:
            Behaviour.from_mapping(overrides)
        except ValueError as exc:
            raise ValueError(f"bad /sim directive {stripped!r}: {exc}") from None
        directives.append(Directive(stripped, overrides, times, prefix))
    return directives, "\n".join(kept).strip()


def image_report(messages: list[dict[str, Any]]) -> str:
    """Describe the image parts of the last user message: count, type, bytes."""
    content = next(
        (m.get("content") for m in reversed(messages) if m.get("role") == "user"), None
    )
    found = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str):
            found.append("unreadable")
            continue
        header, comma, data = url.partition(",")
        if url.startswith("data:") and comma and header.endswith(";base64"):
            media = header[5 : -len(";base64")]
            try:
                size = len(base64.b64decode(data, validate=True))
            except ValueError:
                found.append(f"{media} bad base64")
                continue
            found.append(f"{media} {size} bytes")
        else:
            found.append("url")
    noun = "image" if len(found) == 1 else "images"
    if not found:
        return "Received 0 images."
    return f"Received {len(found)} {noun}: {'; '.join(found)}."


_INTRO = (
    "Here is a simulated answer from the **llmsite** upstream. "
    "It is deterministic, so tests and demos can rely on it.\n\n"
)
_CODE = '```python\ndef greet(name):\n    return f"Hello, {name}!"\n```\n\n'
_PARAGRAPHS = (
    "The gateway streams each token to the browser as soon as it arrives. "
    "Usage is recorded once per request, and budgets settle to the real count.\n\n",
    "- Retries honour `Retry-After`.\n- Fallback names the endpoint that answered."
    "\n- Long conversations are trimmed to fit the context window.\n\n",
    "When an endpoint fails, the router tries the next one in priority order. "
    "The system prompt is always kept, and the oldest turns go first.\n\n",
)


def split_tokens(text: str) -> list[str]:
    """Split text into word-piece tokens that join back into the same text."""
    return _TOKEN_RE.findall(text)


_INTRO_TOKENS = tuple(split_tokens(_INTRO))
_CODE_TOKENS = tuple(split_tokens(_CODE))
_PARAGRAPH_TOKENS = tuple(tuple(split_tokens(p)) for p in _PARAGRAPHS)


def generated_tokens(count: int) -> list[str]:
    """Return the default reply of exactly ``count`` tokens, Markdown with code."""
    tokens = list(_INTRO_TOKENS)
    if count >= len(tokens) + len(_CODE_TOKENS):
        tokens += _CODE_TOKENS
    paragraphs = itertools.cycle(_PARAGRAPH_TOKENS)
    while len(tokens) < count:
        tokens += next(paragraphs)
    del tokens[count:]
    return tokens


def settings_echo(payload: Mapping[str, Any]) -> str:
    """What ``/sim echo_settings`` answers: the system prompt and the sampling."""
    messages = payload.get("messages") or []
    system = "\n".join(
        _message_text(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    )
    lines = [f"system: {system or '(none)'}"]
    for name in ("temperature", "top_p", "max_tokens"):
        value = payload.get(name)
        lines.append(f"{name}: {'(none)' if value is None else value}")
    return "\n".join(lines)


def _message_text(content: Any) -> str:
    """Return the text of a message's content, string or list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Estimate prompt tokens cheaply: a quarter of the characters, plus 4 a message."""
    return sum(len(_message_text(m.get("content"))) // 4 + 4 for m in messages)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error_body(message: str, type_: str, code: str | None, param: Any = None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return _dumps({"error": error})


class _BadRequest(Exception):
    """A request the simulator refuses with a 400 error."""


def _requested_model(payload: Any) -> str:
    """The model a request body names; a 400 unless it is an object that has one."""
    if not isinstance(payload, dict):
        raise _BadRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("You must provide a model parameter.")
    return model


@dataclass
class Stats:
    """Counters for what the simulated upstream has served."""

    requests: int = 0  # API requests, control endpoints excluded
    chat_requests: int = 0
    connections: int = 0  # accepted so far; keep-alive keeps this low
    open_connections: int = 0
    open_streams: int = 0
    streams_completed: int = 0
    # Responses abandoned by the client before their end, plain or streamed.
    client_disconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the simulated upstream received it, secrets redacted."""

    method: str
    path: str
    headers: Mapping[str, str]
    json: Any  # the parsed body; None when absent, not JSON or over 1 MiB


class SimulatedUpstream:
    """An OpenAI-compatible server with scripted latency, pacing and faults."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: Behaviour | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        api_key: str | None = None,
        max_recorded: int = 256,
    ) -> None:
        self.host = host
        self.port = port
        self.models = tuple(models)
        self.api_key = api_key
        self._initial = behaviour or Behaviour()
        self._default = self._initial
        self._by_prefix: dict[str, Behaviour] = {}
        self._script: deque[Behaviour] = deque()
        self._directive_uses: dict[tuple[str, str], int] = {}
        # Behaviour and records are shared with the thread that drives a server
        # started by run_in_thread().
        self._lock = threading.Lock()
        self._recorded: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._stats = Stats()
        self._server: asyncio.Server | None = None
        self._connections: set[_HTTPConnection] = set()
        self._all_closed: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)
        created = int(time.time())
        self._models_body = _dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": created,
                        "owned_by": "simulator",
                    }
                    for model in self.models
                ],
            }
        )

    # Lifecycle

    async def start(self) -> None:
        """Start listening; ``port`` then holds the bound port."""
        if self._server is not None:
            raise RuntimeError("the simulated upstream is already running")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HTTPConnection(self),
            self.host,
            self.port,
            reuse_address=True,
            # Benchmarks open hundreds of connections at once.
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection, ending any response."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self._connections:
            self._all_closed = asyncio.get_running_loop().create_future()
            tasks = [
                task for conn in list(self._connections) if (task := conn.shutdown())
            ]
            await asyncio.gather(*tasks, return_exceptions=True)
            # Aborted transports report connection_lost on a later loop turn.
            await asyncio.wait([self._all_closed], timeout=5)
            self._all_closed = None
        await server.wait_closed()

    def _forget(self, conn: _HTTPConnection) -> None:
        self._connections.discard(conn)
        self._stats.open_connections -= 1
        if not self._connections and self._all_closed is not None:
            _resolve_future(self._all_closed)

    async def __aenter__(self) -> SimulatedUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[SimulatedUpstream]:
        """Run the server on its own event loop in a daemon thread."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name="simulated-upstream", daemon=True
        )
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    @property
    def root_url(self) -> str:
        """The server's URL without any path, e.g. ``http://127.0.0.1:9100``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:9100/v1``."""
        return f"{self.root_url}/v1"

    def base_url_for(self, prefix: str) -> str:
        """The OpenAI base URL of the endpoint posed under a path prefix."""
        prefix = prefix.strip("/")
        return f"{self.root_url}/{prefix}/v1" if prefix else self.base_url

    # Scripting, safe to call from any thread

    @property
    def behaviour(self) -> Behaviour:
        """The process default behaviour."""
        return self._default

    def set_behaviour(self, behaviour: Behaviour, prefix: str = "") -> None:
        """Set the default behaviour, or the one for a path prefix such as /e/17."""
        prefix = _normalise_prefix(prefix)
        with self._lock:
            if prefix:
                self._by_prefix[prefix] = behaviour
            else:
                self._default = behaviour

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next chat requests, one each, in order."""
        with self._lock:
            self._script.extend(behaviours)

    def reset(self) -> None:
        """Restore the initial behaviour and forget scripts and directive counts."""
        with self._lock:
            self._default = self._initial
            self._by_prefix.clear()
            self._script.clear()
            self._directive_uses.clear()

    # Observation, safe to call from any thread

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The most recent API requests received, oldest first."""
        with self._lock:
            return list(self._recorded)

    @property
    def scripted(self) -> int:
        """How many scripted behaviours are still queued."""
        return len(self._script)

    # A bounded wait is the point of this test helper, hence its own timeout.
    async def wait_for_disconnects(
        self,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Wait until ``count`` responses in all were abandoned by their client."""
        deadline = time.monotonic() + timeout
        while self._stats.client_disconnects < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(self._disconnect_timeout_message(count))
            # Polling keeps this usable from any loop or thread.
            await asyncio.sleep(0.005)

    def wait_for_disconnects_sync(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` responses in all were abandoned by their client."""
        deadline = time.monotonic() + timeout
        while self._stats.client_disconnects < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(self._disconnect_timeout_message(count))
            time.sleep(0.005)

    def _disconnect_timeout_message(self, count: int) -> str:
        seen = self._stats.client_disconnects
        return f"expected {count} client disconnects, saw {seen}"

    # Request handling

    async def _dispatch(
        self, conn: _HTTPConnection, request: h11.Request, body: bytes
    ) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("latin-1")
        path = target.partition("?")[0]
        route = _route(path)
        if route is None:
            conn.send_error(404, f"Unknown path {path}.", "invalid_request_error", None)
            return
        name, prefix = route
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        if name in _CONTROL_ROUTES:
            self._control(conn, name, method, prefix, body)
            return
        self._stats.requests += 1
        payload: Any = None
        parsed = False
        if body:
            try:
                payload = json.loads(body)
                parsed = True
            except ValueError:
                pass
        self._record(
            method,
            path,
            headers,
            payload if len(body) <= _MAX_RECORDED_BODY_BYTES else None,
        )
        if self.api_key is not None and not self._authorised(headers):
            conn.send_error(
                401,
                "Incorrect or missing API key.",
                "invalid_request_error",
                "invalid_api_key",
            )
        elif name == "models":
            if method != "GET":
                conn.send_error(405, "Use GET.", "invalid_request_error", None)
            else:
                await self._models(conn, prefix, headers)
        elif method != "POST":
            conn.send_error(405, "Use POST.", "invalid_request_error", None)
        else:
            self._stats.chat_requests += 1
            if not parsed:
                conn.send_error(
                    400,
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    "invalid_json",
                )
                return
            try:
                if name == "embeddings":
                    await self._embeddings(conn, prefix, headers, payload)
                else:
                    await self._chat(conn, prefix, headers, payload)
            except _BadRequest as exc:
                conn.send_error(
                    400, str(exc), "invalid_request_error", "invalid_request"
                )

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.api_key

    def _record(
        self, method: str, path: str, headers: Mapping[str, str], payload: Any
    ) -> None:
        safe = {k: REDACTED if k in _SECRET_HEADERS else v for k, v in headers.items()}
        with self._lock:
            self._recorded.append(RecordedRequest(method, path, safe, payload))

    def _control(
        self, conn: _HTTPConnection, name: str, method: str, prefix: str, body: bytes
    ) -> None:
        allowed = {"stats": "GET", "script": "POST", "reset": "POST"}.get(name)
        if allowed and method != allowed:
            conn.send_error(405, f"Use {allowed}.", "invalid_request_error", None)
            return
        if name == "stats":
            conn.send_json(200, self._stats.as_dict())
            return
        if name == "reset":
            self.reset()
            conn.send_json(200, {"behaviour": self._default.as_dict()})
            return
        if name == "behaviour" and method == "GET":
            with self._lock:
                current = self._by_prefix.get(prefix, self._default)
            conn.send_json(200, current.as_dict())
            return
        if name == "behaviour" and method != "POST":
            conn.send_error(405, "Use GET or POST.", "invalid_request_error", None)
            return
        try:
            data = json.loads(body or b"{}")
            if name == "script":
                if not isinstance(data, list) or not all(
                    isinstance(item, dict) for item in data
                ):
                    raise ValueError("expected a JSON list of objects")
                self.script(*(Behaviour.from_mapping(item) for item in data))
                conn.send_json(200, {"queued": self.scripted})
                return
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            behaviour = Behaviour.from_mapping(data)
        except ValueError as exc:
            conn.send_error(400, str(exc), "invalid_request_error", "invalid_behaviour")
            return
        self.set_behaviour(behaviour, prefix)
        conn.send_json(200, behaviour.as_dict())

    def _resolve(
        self,
        prefix: str,
        headers: Mapping[str, str],
        user_text: str | None = None,
        *,
        consume_script: bool = False,
    ) -> tuple[Behaviour, str]:
        """Work out the behaviour for one request and the user text without /sim."""
        with self._lock:
            if consume_script and self._script:
                behaviour = self._script.popleft()
            else:
                behaviour = self._by_prefix.get(prefix, self._default)
        raw = headers.get(BEHAVIOUR_HEADER)
        if raw:
            try:
                overrides = json.loads(raw)
                if not isinstance(overrides, dict):
                    raise ValueError("expected a JSON object")
                behaviour = behaviour.with_overrides(overrides)
            except ValueError as exc:
                raise _BadRequest(f"Bad X-Sim-Behaviour header: {exc}") from None
        if user_text is None:
            return behaviour, ""
        try:
            directives, text = parse_directives(user_text)
            for directive in directives:
                if self._directive_applies(directive, prefix, user_text):
                    behaviour = behaviour.with_overrides(directive.overrides)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        return behaviour, text

    def _directive_applies(self, directive: Directive, prefix: str, text: str) -> bool:
        if directive.prefix is not None and directive.prefix != prefix:
            return False
        if directive.times is None:
            return True
        key = (text, directive.line)
        with self._lock:
            used = self._directive_uses.get(key, 0)
            if used >= directive.times:
                return False
            if len(self._directive_uses) >= 10_000:
                self._directive_uses.clear()
            self._directive_uses[key] = used + 1
        return True

    async def _models(
        self, conn: _HTTPConnection, prefix: str, headers: Mapping[str, str]
    ) -> None:
        try:
            behaviour, _ = self._resolve(prefix, headers)
        except _BadRequest as exc:
            conn.send_error(400, str(exc), "invalid_request_error", "invalid_request")
            return
        if not await self._prelude(conn, behaviour) or await self._plain_fault(
            conn, behaviour
        ):
            return
        conn.send_response(200, _JSON_HEADERS, self._models_body)

    def _unknown_model(self, conn: _HTTPConnection, model: str) -> bool:
        """Answer 404 for a model this upstream does not serve; True when it did."""
        if not self.models or model in self.models:
            return False
        conn.send_error(
            404,
            f"The model `{model}` does not exist.",
            "invalid_request_error",
            "model_not_found",
        )
        return True

    async def _chat(
        self,
        conn: _HTTPConnection,
        prefix: str,
        headers: Mapping[str, str],
        payload: Any,
    ) -> None:
        model = _requested_model(payload)
        messages = payload.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise _BadRequest("messages must be a non-empty list of objects.")
        if self._unknown_model(conn, model):
            return
        user_text = next(
            (
                _message_text(m.get("content"))
                for m in reversed(messages)
                if m.get("role") == "user"
            ),
            "",
        )
        behaviour, text = self._resolve(prefix, headers, user_text, consume_script=True)
        if not await self._prelude(conn, behaviour):
            return
        if behaviour.fault == "reject_stream_options" and "stream_options" in payload:
            conn.send_error(
                400,
                "Unrecognized request argument supplied: stream_options",
                "invalid_request_error",
                None,
                param="stream_options",
            )
            return
        if behaviour.context_window and self._over_window(
            conn, behaviour.context_window, payload
        ):
            return
        if behaviour.images:
            tokens = split_tokens(image_report(messages))
        elif behaviour.echo_settings:
            tokens = split_tokens(settings_echo(payload))
        elif behaviour.echo:
            tokens = split_tokens(text)
        elif behaviour.reply is not None:
            tokens = split_tokens(behaviour.reply)
        else:
            tokens = generated_tokens(behaviour.completion_tokens)
        finish_reason = "stop"
        max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
        if type(max_tokens) is int and 0 < max_tokens < len(tokens):
            tokens = tokens[:max_tokens]
            finish_reason = "length"
        prompt_tokens = estimate_prompt_tokens(messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        completion_id = f"chatcmpl-sim{next(self._ids):08x}"
        if payload.get("stream") is True:
            stream_options = payload.get("stream_options")
            include_usage = (
                isinstance(stream_options, dict)
                and bool(stream_options.get("include_usage"))
                and not behaviour.no_stream_usage
            )
            await self._stream(
                conn,
                behaviour,
                completion_id,
                model,
                tokens,
                finish_reason,
                usage if include_usage else None,
            )
            return
        # A plain answer arrives when a stream of the same reply would have ended.
        generation = behaviour.ttft
        if behaviour.tokens_per_second and len(tokens) > 1:
            generation += (len(tokens) - 1) / behaviour.tokens_per_second
        if generation and not await conn.pause(generation):
            self._stats.client_disconnects += 1
            return
        if await self._plain_fault(conn, behaviour):
            return
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_simulator",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(tokens),
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        if behaviour.sparse_chunks:
            del body["system_fingerprint"], body["choices"][0]["logprobs"]
            del body["choices"][0]["message"]["refusal"]
        conn.send_response(
            200, (*_JSON_HEADERS, ("x-request-id", completion_id)), _dumps(body)
        )

    def _over_window(
        self, conn: _HTTPConnection, window: int, payload: Mapping[str, Any]
    ) -> bool:
        """Refuse a prompt over the window as llama.cpp does; True when refused."""
        prompt = estimate_prompt_tokens(payload["messages"])
        max_tokens = payload.get("max_tokens")
        completion = max_tokens if type(max_tokens) is int else 0
        if prompt < window:
            return False
        if payload.get("stream") is True:
            # Its error comes after the 200: the stream just ends, empty.
            conn.start_stream(200, _SSE_HEADERS)
            conn.end_stream(b"")
            return True
        conn.send_error(
            400,
            f"This model's maximum context length is {window} tokens. However, "
            f"you requested {prompt + completion} tokens ({prompt} in the "
            f"messages, {completion} in the completion). Please reduce the "
            "length of the messages or completion.",
            "invalid_request_error",
            "context_length_exceeded",
            param="messages",
        )
        return True

    async def _embeddings(
        self,
        conn: _HTTPConnection,
        prefix: str,
        headers: Mapping[str, str],
        payload: Any,
    ) -> None:
        """Deterministic unit vectors from each input; /sim lines in the first."""
        model = _requested_model(payload)
        inputs = payload.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise _BadRequest("input must be a string or a non-empty list.")
        dimensions = payload.get("dimensions", _EMBEDDING_DIMENSIONS)
        if type(dimensions) is not int or not 1 <= dimensions <= 4096:
            raise _BadRequest("dimensions must be an integer from 1 to 4096.")
        if self._unknown_model(conn, model):
            return
        first = inputs[0] if isinstance(inputs[0], str) else ""
        behaviour, _ = self._resolve(prefix, headers, first, consume_script=True)
        if not await self._prelude(conn, behaviour) or await self._plain_fault(
            conn, behaviour
        ):
            return
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        prompt_tokens = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            prompt_tokens += (
                len(item) if isinstance(item, list) else len(split_tokens(item))
            )
            vector = embedding_vector(text, dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": base64.b64encode(
                        struct.pack(f"<{dimensions}f", *vector)
                    ).decode()
                    if as_base64
                    else vector,
                }
            )
        body = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        conn.send_response(200, _JSON_HEADERS, _dumps(body))

    async def _prelude(self, conn: _HTTPConnection, behaviour: Behaviour) -> bool:
        """Wait out the latency and answer a status fault; False when done."""
        if behaviour.latency and not await conn.pause(behaviour.latency):
            self._stats.client_disconnects += 1
            return False
        if behaviour.fault == "status":
            status = behaviour.fault_status
            headers = list(_JSON_HEADERS)
            if behaviour.retry_after is not None:
                prefix = "llm_provider-" if behaviour.provider_retry_after else ""
                seconds = str(math.ceil(behaviour.retry_after))
                millis = str(round(behaviour.retry_after * 1000))
                headers.append((f"{prefix}retry-after", seconds))
                headers.append((f"{prefix}retry-after-ms", millis))
            if status == 429:
                error = ("Rate limit reached (simulated).", "rate_limit_error")
                code = "rate_limit_exceeded"
            elif status >= 500:
                error = (f"Simulated server error {status}.", "server_error")
                code = "server_error"
            else:
                error = (f"Simulated error {status}.", "invalid_request_error")
                code = "simulated_error"
            if behaviour.string_error_code:
                code = str(status)
            conn.send_response(status, headers, _error_body(*error, code))
            return False
        return True

    async def _plain_fault(self, conn: _HTTPConnection, behaviour: Behaviour) -> bool:
        """Apply drop, stall or malformed to a plain response; True when applied."""
        if behaviour.fault == "drop":
            conn.close()
        elif behaviour.fault == "stall":
            await conn.pause(None)
            self._stats.client_disconnects += 1
        elif behaviour.fault == "malformed":
            conn.send_response(200, _JSON_HEADERS, _MALFORMED_BODY)
        else:
            return False
        return True

    async def _stream(
        self,
        conn: _HTTPConnection,
        behaviour: Behaviour,
        completion_id: str,
        model: str,
        tokens: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
    ) -> None:
        sparse = behaviour.sparse_chunks
        head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{json.dumps(model)},'
            + ("" if sparse else '"system_fingerprint":"fp_simulator",')
            + '"choices":['
        )
        # OpenAI sends "usage":null on every chunk once usage was asked for.
        tail = ',"usage":null}\n\n' if usage is not None and not sparse else "}\n\n"

        def chunk(delta: str, finish: str = "null") -> str:
            if sparse:
                ending = "" if finish == "null" else f',"finish_reason":{finish}'
                return f'{head}{{"index":0,"delta":{delta}{ending}}}]{tail}'
            return (
                f'{head}{{"index":0,"delta":{delta},"logprobs":null,'
                f'"finish_reason":{finish}}}]{tail}'
            )

        fault = behaviour.fault
        strike = (
            behaviour.fault_after_tokens
            if fault in ("drop", "stall", "malformed")
            else -1
        )
        interval = (
            1 / behaviour.tokens_per_second if behaviour.tokens_per_second else 0.0
        )
        loop = asyncio.get_running_loop()
        pending: list[str] = []

        async def flush() -> bool:
            data = "".join(pending).encode()
            pending.clear()
            conn.send_data(data)
            return await conn.drain()

        conn.start_stream(200, (*_SSE_HEADERS, ("x-request-id", completion_id)))
        self._stats.open_streams += 1
        try:
            if behaviour.ttft and not await conn.pause(behaviour.ttft):
                self._stats.client_disconnects += 1
                return
            first_at = loop.time()
            for index in range(len(tokens) + 1):
                if index == strike:
                    if fault == "malformed":
                        pending.append(_MALFORMED_SSE)
                    elif not await flush():
                        self._stats.client_disconnects += 1
                        return
                    elif fault == "drop" and behaviour.drop_as_error_event:
                        if conn.end_stream(_ERROR_EVENT) and await conn.drain():
                            self._stats.streams_completed += 1
                        return
                    elif fault == "drop":
                        conn.close()
                        return
                    else:
                        await conn.pause(None)
                        self._stats.client_disconnects += 1
                        return
                if index and interval and index < len(tokens):
                    delay = first_at + index * interval - loop.time()
                    if delay > 0 and not (await flush() and await conn.pause(delay)):
                        self._stats.client_disconnects += 1
                        return
                if index == 0:
                    role = '{"role":"assistant"}'
                    if not behaviour.bare_role_chunk:
                        role = '{"role":"assistant","content":""}'
                    pending.append(chunk(role))
                if index < len(tokens):
                    pending.append(chunk(f'{{"content":{json.dumps(tokens[index])}}}'))
                    if len(pending) >= _CHUNKS_PER_WRITE and not await flush():
                        self._stats.client_disconnects += 1
                        return
            pending.append(chunk("{}", f'"{finish_reason}"'))
            if usage is not None:
                choice = (
                    '{"index":0,"delta":{}}'
                    if behaviour.usage_chunk_with_choice
                    else ""
                )
                pending.append(
                    f'{head}{choice}],"usage":'
                    f"{json.dumps(usage, separators=(',', ':'))}}}\n\n"
                )
            pending.append("data: [DONE]\n\n")
            data = "".join(pending).encode()
            if conn.end_stream(data) and await conn.drain():
                self._stats.streams_completed += 1
            else:
                self._stats.client_disconnects += 1
        finally:
            self._stats.open_streams -= 1


def embedding_vector(text: str, dimensions: int = 16) -> list[float]:
    """A unit vector that depends only on the text: equal texts, equal vectors."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    raw = []
    block = b""
    counter = 0
    while len(raw) < dimensions:
        if not block:
            block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
            counter += 1
        raw.append(int.from_bytes(block[:2], "big") / 32767.5 - 1.0)
        block = block[2:]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"/{prefix}" if prefix else ""


def _route(path: str) -> tuple[str, str] | None:
    """Return the route name and the path prefix before it, if the path is known."""
    path = path.rstrip("/")
    for suffix, name in _ROUTES:
        if path.endswith(suffix):
            return name, _normalise_prefix(path[: -len(suffix)])
    return None


def _resolve_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _HTTPConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 framing, flow control, disconnect notice.

    A Protocol rather than asyncio streams: connection_lost and eof_received tell
    a paced or stalled response that its client left at once, without a reader
    task per response.
    """

    def __init__(self, upstream: SimulatedUpstream) -> None:
        self._upstream = upstream
        self._loop = asyncio.get_running_loop()
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES
        )
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._early_bytes = 0
        self.gone = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._upstream._connections.add(self)
        self._upstream._stats.connections += 1
        self._upstream._stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._upstream._forget(self)
        self._wake()

    def eof_received(self) -> bool:
        # Clients we serve never half-close while awaiting a response, so EOF
        # means they left.
        self.gone = True
        self._wake()
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            # Bytes sent ahead of our response are kept for later, within bounds.
            self._early_bytes += len(data)
            if self._early_bytes > _MAX_BODY_BYTES:
                self.abort()
                return
        self._h11.receive_data(data)
        if self._task is None:
            self._process()

    # Request cycle

    def _process(self) -> None:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            kind = type(event)
            if kind is h11.Request:
                self._request = event
                self._body.clear()
                if self._h11.they_are_waiting_for_100_continue:
                    continue_ = h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"
                    )
                    self._write(self._h11.send(continue_))
            elif kind is h11.Data:
                self._body += event.data
                if len(self._body) > _MAX_BODY_BYTES:
                    self._refuse(413, "Request body too large.")
                    return
            elif kind is h11.EndOfMessage:
                assert self._request is not None
                self._early_bytes = 0
                self._task = self._loop.create_task(
                    self._respond(self._request, bytes(self._body))
                )
                self._task.add_done_callback(self._responded)
                return
            else:
                self.close()
                return

    async def _respond(self, request: h11.Request, body: bytes) -> None:
        try:
            await self._upstream._dispatch(self, request, body)
        except Exception:
            logger.exception("Simulated upstream failed on %r", request.target)
            if self._h11.our_state is h11.SEND_RESPONSE and not self.gone:
                self.send_error(500, "Simulator failure.", "server_error", None)
            else:
                self.abort()

    def _responded(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled() or task.exception() is not None:
            self.abort()
            return
        if self.gone or self._transport is None or self._transport.is_closing():
            return
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._request = None
            self._h11.start_next_cycle()
            self._process()
        else:
            self.close()

    def _refuse(self, status: int, message: str) -> None:
        with contextlib.suppress(h11.LocalProtocolError):
            body = _error_body(message, "invalid_request_error", None)
            headers = [*_JSON_HEADERS, ("connection", "close")]
            self.send_response(status, headers, body)
        self.close()

    def shutdown(self) -> asyncio.Task[None] | None:
        """End the connection now; return the response task still running."""
        task = self._task
        if task is not None:
            task.cancel()
        self.abort()
        return task

    # Used by the request handlers

    async def pause(self, delay: float | None) -> bool:
        """Wait ``delay`` seconds (None: until the client leaves); False if it left."""
        deadline = None if delay is None else self._loop.time() + delay
        while not self.gone:
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                return True
            waiter = self._waiter = self._loop.create_future()
            timer = None
            if remaining is not None:
                timer = self._loop.call_later(remaining, _resolve_future, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return False

    async def drain(self) -> bool:
        """Wait until the transport's buffer drains; False if the client left."""
        while self._write_paused and not self.gone:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return not self.gone

    def send_response(
        self, status: int, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        """Send a whole response with a Content-Length."""
        headers = [*headers, ("content-length", str(len(body)))]
        response = h11.Response(
            status_code=status, headers=headers, reason=_REASONS.get(status, b"")
        )
        data = self._h11.send(response)
        if body and not self._head_request():
            data += self._h11.send(h11.Data(data=body))
        self._write(data + self._h11.send(h11.EndOfMessage()))

    def send_json(self, status: int, value: Any) -> None:
        """Send a JSON response."""
        self.send_response(status, _JSON_HEADERS, _dumps(value))

    def send_error(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
    ) -> None:
        """Send an OpenAI-shaped error response."""
        body = _error_body(message, type_, code, param)
        self.send_response(status, _JSON_HEADERS, body)

    def start_stream(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Send response headers for a body of unknown length."""
        response = h11.Response(
            status_code=status, headers=list(headers), reason=_REASONS.get(status, b"")
        )
        self._write(self._h11.send(response))

    def send_data(self, data: bytes) -> None:
        """Send part of a streamed body."""
        if data:
            self._write(self._h11.send(h11.Data(data=data)))

    def end_stream(self, data: bytes) -> bool:
        """Send the last part of a streamed body; False if the client left."""
        if self.gone:
            return False
        out = self._h11.send(h11.Data(data=data)) if data else b""
        self._write(out + self._h11.send(h11.EndOfMessage()))
        return True

    def close(self) -> None:
        """Close the connection once buffered bytes are sent."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close the connection at once, discarding buffered bytes."""
        if self._transport is not None:
            self._transport.abort()

    def _head_request(self) -> bool:
        return self._request is not None and self._request.method == b"HEAD"

    def _write(self, data: bytes) -> None:
        if not self.gone and self._transport is not None:
            self._transport.write(data)

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve_future(self._waiter)
