"""Upstream HTTP to OpenAI-compatible endpoints: pooled clients, SSE, one error type.

Everything here works on an immutable `EndpointConfig` snapshot, so the
streaming path never touches the ORM.  Each endpoint gets a small set of
`httpx.AsyncClient` objects used round-robin (one client with a large pool
degrades, encode/httpx#3215), created lazily per event loop and kept for the
life of the process.

Every failure is an `APIClientError`.  Its class and `permanent` flag are all
that retries and fallback look at:

- transient (retry here, then fail over): `APITimeoutError`,
  `APIConnectionError`, `APIServerError`, `APIRateLimitError`,
  `APIResponseError`;
- `APIEndpointError` (401, 403, 404, ...): this endpoint cannot serve the
  request (key, model name); no retry, but the next route may;
- `APIRequestError` (400, 413, 422, ...): the request itself is wrong;
  ``permanent``, never retried and never failed over.

Messages never contain the API key or the extra header values, and upstream
bodies are cut to `BODY_EXCERPT_CHARS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
from django.conf import settings

from gateway import crypto, transport_policy

BODY_EXCERPT_CHARS = 500
# Error bodies are only read this far: enough for any JSON error message.
ERROR_BODY_LIMIT = 64 * 1024
# One SSE line or event larger than this is garbage, not a token.
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
# After [DONE] the rest of the body (the last chunk marker) is read so that the
# connection goes back to the pool instead of being closed.
DRAIN_LIMIT = 64 * 1024
USER_AGENT = "llmsite-gateway"

logger = logging.getLogger("gateway.client")
REDACTED = "[redacted]"


# --- Errors -----------------------------------------------------------------


class APIClientError(Exception):
    """A failed upstream request; `permanent` means the request itself is wrong."""

    # Whether another attempt on the same endpoint can help.
    retryable: ClassVar[bool] = True
    # The short reason reported in fallback hops and usage records.
    reason: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status_code: int | None = None,
        permanent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status_code = status_code
        self.permanent = permanent
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f" (HTTP {self.status_code})" if self.status_code else ""
        return f"{self.endpoint}: {self.message}{status}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, endpoint={self.endpoint!r}, "
            f"status_code={self.status_code!r}, permanent={self.permanent!r}, "
            f"retry_after={self.retry_after!r})"
        )

    @property
    def may_fail_over(self) -> bool:
        """Whether the next route may be tried after this error."""
        return not self.permanent


class APITimeoutError(APIClientError):
    """The endpoint did not connect, answer or send the next chunk in time."""

    reason = "timeout"


class APIConnectionError(APIClientError):
    """The connection failed or was dropped, before or during the response."""

    reason = "connection_error"


class APIServerError(APIClientError):
    """The endpoint answered with a 5xx (or reported an error mid-stream)."""

    reason = "server_error"


class APIRateLimitError(APIClientError):
    """The endpoint answered 429; `retry_after` says when to come back, if known."""

    reason = "rate_limited"


class APIResponseError(APIClientError):
    """The endpoint answered something that is not a valid completion."""

    reason = "malformed_response"


class APIEndpointError(APIClientError):
    """This endpoint refuses the request (bad key, unknown model, wrong URL)."""

    retryable = False
    reason = "endpoint_rejected"


class APIRequestError(APIClientError):
    """A 4xx caused by the request itself: never retried, never failed over."""

    retryable = False
    reason = "request_rejected"

    def __init__(self, message: str, *, endpoint: str, **kwargs: Any) -> None:
        kwargs.setdefault("permanent", True)
        super().__init__(message, endpoint=endpoint, **kwargs)


# --- Endpoint snapshot --------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _decrypt(ciphertext: str) -> str:
    # Keyed by ciphertext, so a rotated or edited key is a new entry, and the
    # Fernet work is done once per key instead of once per request.
    return crypto.decrypt(ciphertext)


@dataclass(frozen=True, eq=False)
class EndpointConfig:
    """An immutable snapshot of an Endpoint row, safe to use without the ORM."""

    id: int | None
    name: str
    base_url: str
    api_key: str = field(default="", repr=False)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_retries: int = 3
    backoff_multiplier: float = 2.0
    failure_threshold: int = 3
    cooldown_seconds: float = 60.0
    supports_stream_usage: bool = True
    allow_plain_http: bool = False
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    enabled: bool = True
    # Breaker state as loaded with the routes; the breaker itself is shared.
    consecutive_failures: int = 0
    disabled_until: datetime | None = None
    chat_url: str = field(init=False, repr=False)
    models_url: str = field(init=False, repr=False)
    # What the pooled clients depend on: a change builds new clients.
    pool_fingerprint: tuple[Any, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        base = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", base)
        object.__setattr__(self, "chat_url", base + "/chat/completions")
        object.__setattr__(self, "models_url", base + "/models")
        object.__setattr__(
            self,
            "pool_fingerprint",
            (
                base,
                self.api_key,
                self.timeout,
                self.connect_timeout,
                self.extra_headers,
            ),
        )

    @classmethod
    def from_model(cls, endpoint: Any) -> EndpointConfig:
        """Snapshot a `gateway.models.Endpoint` row."""
        encrypted = getattr(endpoint, "api_key_encrypted", None)
        try:
            api_key = _decrypt(encrypted) if encrypted else ""
        except crypto.DecryptionError:
            # The endpoint then answers 401 and the router fails over; one
            # unreadable key must not break every model that uses it.
            logger.error("cannot decrypt the API key of endpoint %s", endpoint.name)
            api_key = ""
        try:
            headers = endpoint.extra_headers or {}
        except crypto.DecryptionError:
            logger.error(
                "cannot decrypt the extra headers of endpoint %s", endpoint.name
            )
            headers = {}
        return cls(
            id=endpoint.pk,
            name=endpoint.name,
            base_url=endpoint.base_url,
            api_key=api_key,
            timeout=float(endpoint.timeout),
            connect_timeout=float(endpoint.connect_timeout),
            extra_headers=tuple(sorted((str(k), str(v)) for k, v in headers.items())),
            max_retries=max(1, int(endpoint.max_retries)),
            backoff_multiplier=float(endpoint.backoff_multiplier),
            failure_threshold=max(1, int(endpoint.failure_threshold)),
            cooldown_seconds=float(endpoint.cooldown_seconds),
            supports_stream_usage=bool(endpoint.supports_stream_usage),
            allow_plain_http=bool(getattr(endpoint, "allow_plain_http", False)),
            rpm_limit=endpoint.rpm_limit,
            tpm_limit=endpoint.tpm_limit,
            enabled=bool(endpoint.enabled),
            consecutive_failures=int(endpoint.consecutive_failures),
            disabled_until=endpoint.disabled_until,
        )

    def redact(self, text: str) -> str:
        """Remove this endpoint's secrets from a text meant for logs or users."""
        for secret in self._secrets():
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _secrets(self) -> Iterator[str]:
        # Short header values ("1", "true") are not secrets and would mangle text.
        if self.api_key:
            yield self.api_key
        for _, value in self.extra_headers:
            if len(value) >= 8:
                yield value

    def request_headers(self) -> dict[str, str]:
        """The headers every request to this endpoint carries."""
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.extra_headers)
        return headers


# --- Client pool ------------------------------------------------------------


@dataclass(frozen=True)
class PoolLimits:
    """How many clients and connections one endpoint gets in one process."""

    clients: int = 4
    max_connections: int = 100
    max_keepalive: int = 20

    @classmethod
    def from_settings(cls) -> PoolLimits:
        """The limits from GATEWAY_CLIENTS_PER_ENDPOINT and friends."""
        return cls(
            clients=getattr(settings, "GATEWAY_CLIENTS_PER_ENDPOINT", cls.clients),
            max_connections=getattr(
                settings, "GATEWAY_MAX_CONNECTIONS", cls.max_connections
            ),
            max_keepalive=getattr(settings, "GATEWAY_MAX_KEEPALIVE", cls.max_keepalive),
        )

    def per_client(self) -> list[httpx.Limits]:
        """Split the endpoint's totals over its clients (each keeps at least one)."""
        count = max(1, min(self.clients, self.max_connections))
        limits = []
        for index in range(count):
            connections = self.max_connections // count + (
                index < self.max_connections % count
            )
            keepalive = self.max_keepalive // count + (
                index < self.max_keepalive % count
            )
            limits.append(
                httpx.Limits(
                    max_connections=connections,
                    # A client that may keep no connection reconnects every time.
                    max_keepalive_connections=max(1, keepalive),
                )
            )
        return limits


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~17 ms); every client shares one.
    return httpx.create_ssl_context()


class EndpointPool:
    """The clients of one endpoint on one event loop, used round-robin."""

    def __init__(
        self,
        config: EndpointConfig,
        limits: PoolLimits,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.fingerprint = config.pool_fingerprint
        timeout = httpx.Timeout(
            config.timeout,
            connect=config.connect_timeout,
            # Waiting for a free connection is queueing, not a dead endpoint.
            pool=config.timeout,
        )
        self.clients = [
            httpx.AsyncClient(
                http2=True,
                timeout=timeout,
                limits=client_limits,
                headers=config.request_headers(),
                transport=transport,
                verify=_ssl_context(),
                follow_redirects=False,
            )
            for client_limits in limits.per_client()
        ]
        self._next = itertools.cycle(self.clients).__next__
        self.active = 0
        self.retired = False

    def checkout(self) -> httpx.AsyncClient:
        """Take the next client for one request; pair with `checkin()`."""
        self.active += 1
        return self._next()

    def checkin(self) -> None:
        """Return a client; a retired pool closes once its last request ends."""
        self.active -= 1
        if self.retired and self.active == 0:
            _spawn(self.aclose())

    async def aclose(self) -> None:
        """Close every client of this pool."""
        for client in self.clients:
            await client.aclose()


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coro)
    # The loop keeps only weak references to tasks.
    _background.add(task)
    task.add_done_callback(_background.discard)


class ClientPools:
    """All upstream clients of the process, per event loop and endpoint.

    httpx clients belong to the loop that created them: Django's async views
    and Channels consumers share one loop, but tests start a loop per test, so
    pools of a closed loop are dropped when the next pool is created.

    Test hook: set `transport` (for example an `httpx.MockTransport`) or use
    `with pools.use_transport(transport):`; pools built afterwards send through
    it instead of the network.
    """

    def __init__(self, limits: PoolLimits | None = None) -> None:
        self._limits = limits
        self._by_loop: dict[asyncio.AbstractEventLoop, dict[Any, EndpointPool]] = {}
        self._transport: httpx.AsyncBaseTransport | None = None

    @property
    def transport(self) -> httpx.AsyncBaseTransport | None:
        return self._transport

    @transport.setter
    def transport(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._transport = transport
        # Pools built for another transport must not serve the next request.
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, loop_pools in self._by_loop.items():
            for pool in loop_pools.values():
                pool.retired = True
                if loop is running and pool.active == 0:
                    _spawn(pool.aclose())
        self._by_loop.clear()

    @contextlib.contextmanager
    def use_transport(self, transport: httpx.AsyncBaseTransport) -> Iterator[None]:
        """Send every request through `transport` inside the block (tests)."""
        previous = self._transport
        self.transport = transport
        try:
            yield
        finally:
            self.transport = previous

    def pool(self, config: EndpointConfig) -> EndpointPool:
        """The pool of an endpoint on the running loop, built on first use."""
        # Every request takes a pool first: the last guard of the HTTPS-only
        # rule against a row that skipped validation. No key is sent in clear.
        refused = transport_policy.plain_http_problem(
            config.base_url, allow_plain_http=config.allow_plain_http
        )
        if refused:
            raise APIEndpointError(f"refused: {refused}", endpoint=config.name)
        loop = asyncio.get_running_loop()
        pools = self._by_loop.get(loop)
        if pools is None:
            self._forget_closed_loops()
            pools = self._by_loop[loop] = {}
        key = (config.id, config.name)
        pool = pools.get(key)
        if pool is not None and pool.fingerprint == config.pool_fingerprint:
            return pool
        if pool is not None:
            # The admin changed the URL, key or timeouts: requests in flight
            # finish on the old clients, which close after the last one.
            pool.retired = True
            if pool.active == 0:
                _spawn(pool.aclose())
        pool = pools[key] = EndpointPool(
            config, self._limits or PoolLimits.from_settings(), self._transport
        )
        return pool

    def _forget_closed_loops(self) -> None:
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            del self._by_loop[loop]

    async def aclose_all(self) -> None:
        """Close the pools of the running loop and forget every other loop's."""
        loop = asyncio.get_running_loop()
        pools = self._by_loop.pop(loop, {})
        self._by_loop.clear()
        for pool in pools.values():
            pool.retired = True
            await pool.aclose()


pools = ClientPools()


async def aclose_all() -> None:
    """Close every upstream client of this process (shutdown, tests)."""
    await pools.aclose_all()


# --- Error mapping ------------------------------------------------------------


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > BODY_EXCERPT_CHARS:
        return text[:BODY_EXCERPT_CHARS] + "…"
    return text


def parse_retry_after(
    headers: httpx.Headers, *, now: float | None = None
) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP date) or retry-after-ms."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _error_message(body: bytes) -> str:
    """The upstream's own error message if the body is OpenAI-style JSON."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(data.get("detail"), str):
            return data["detail"]
    return text


def status_error(
    config: EndpointConfig, status: int, headers: httpx.Headers, body: bytes
) -> APIClientError:
    """The error for a non-2xx upstream answer."""
    detail = config.redact(
        _excerpt(_error_message(body))
    ) or httpx.codes.get_reason_phrase(status)
    kwargs: dict[str, Any] = {"endpoint": config.name, "status_code": status}
    if status == 429:
        return APIRateLimitError(
            f"rate limited: {detail}", retry_after=parse_retry_after(headers), **kwargs
        )
    if status >= 500:
        return APIServerError(
            f"server error: {detail}", retry_after=parse_retry_after(headers), **kwargs
        )
    if status == 408:
        return APITimeoutError(f"request timeout: {detail}", **kwargs)
    if status in (401, 403, 404, 405, 410):
        return APIEndpointError(f"rejected by endpoint: {detail}", **kwargs)
    if 400 <= status < 500:
        return APIRequestError(f"request rejected: {detail}", **kwargs)
    return APIResponseError(f"unexpected HTTP status: {detail}", **kwargs)


def transport_error(config: EndpointConfig, exc: httpx.HTTPError) -> APIClientError:
    """The error for an httpx exception (no response, or a broken one)."""
    detail = config.redact(str(exc)) or type(exc).__name__
    name = config.name
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(exc), "waiting")
        return APITimeoutError(f"timed out {phase}", endpoint=name)
    if isinstance(exc, httpx.RemoteProtocolError):
        return APIConnectionError(f"connection dropped: {detail}", endpoint=name)
    if isinstance(exc, httpx.DecodingError):
        return APIResponseError(f"undecodable response: {detail}", endpoint=name)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return APIEndpointError(f"bad endpoint URL: {detail}", endpoint=name)
    return APIConnectionError(f"connection failed: {detail}", endpoint=name)


def _chunk_error(config: EndpointConfig, error: Any) -> APIClientError:
    """The error for an OpenAI-style ``{"error": ...}`` inside a 200 answer."""
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "error")
        code = error.get("code")
    else:
        message, code = str(error), None
    detail = config.redact(_excerpt(message))
    status = code if isinstance(code, int) and 400 <= code < 600 else None
    if status == 429 or "rate limit" in message.lower():
        return APIRateLimitError(
            f"rate limited: {detail}", endpoint=config.name, status_code=status
        )
    if status is not None and 400 <= status < 500:
        return APIRequestError(
            f"request rejected: {detail}", endpoint=config.name, status_code=status
        )
    return APIServerError(
        f"upstream error: {detail}", endpoint=config.name, status_code=status
    )


# --- SSE ----------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent Events parser: bytes in, (event, data) pairs out.

    Follows the HTML spec: lines end in LF, CRLF or CR; ``data:`` lines of one
    event are joined with newlines; a blank line dispatches; lines starting with
    a colon are comments (keep-alives); ``id`` and ``retry`` are ignored.
    """

    __slots__ = ("_buffer", "_data", "_event", "_size", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event = b""
        self._size = 0
        # A CR ended the last read: an LF at the start of the next one belongs
        # to the same line ending (a CRLF split across reads).
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Parse more bytes; return the events they complete."""
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            self._skip_lf = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_SSE_EVENT_BYTES:
            raise ValueError("an SSE line exceeds the size limit")
        events: list[tuple[bytes, bytes]] = []
        for line in lines:
            self._line(line, events)
        return events

    def flush(self) -> list[tuple[bytes, bytes]]:
        """End of stream: dispatch what is left, even without a final blank line."""
        events: list[tuple[bytes, bytes]] = []
        tail = self._buffer
        self._buffer = b""
        if tail:
            self._line(tail, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[bytes, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event or b"message", b"\n".join(self._data)))
            self._data = []
            self._event = b""
            self._size = 0
            return
        if line[0] == 0x3A:  # ":" starts a comment, used for keep-alives
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value)
            if self._size > MAX_SSE_EVENT_BYTES:
                raise ValueError("an SSE event exceeds the size limit")
            self._data.append(value)
        elif name == b"event":
            self._event = value


def _data_excerpt(data: bytes) -> str:
    return _excerpt(data.decode("utf-8", "replace"))


def _as_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A plain completion (sent to a stream request) as equivalent chunks."""
    choices = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        delta = {k: v for k, v in message.items() if v is not None}
        choices.append(
            {
                "index": choice.get("index", 0),
                "delta": delta,
                "finish_reason": choice.get("finish_reason"),
            }
        )
    chunk = {k: v for k, v in body.items() if k not in ("choices", "usage")}
    chunk["object"] = "chat.completion.chunk"
    chunk["choices"] = choices
    chunks = [chunk]
    if body.get("usage"):
        chunks.append({**chunk, "choices": [], "usage": body["usage"]})
    return chunks


# --- Requests -------------------------------------------------------------------


def _encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def _read_body(
    config: EndpointConfig, response: httpx.Response, limit: int
) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIResponseError(
            f"response of {int(declared)} bytes exceeds the {limit}-byte limit",
            endpoint=config.name,
            status_code=response.status_code,
        )
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise APIResponseError(
                f"response exceeds the {limit}-byte limit",
                endpoint=config.name,
                status_code=response.status_code,
            )
        parts.append(part)
    return b"".join(parts)


async def _error_for(
    config: EndpointConfig, response: httpx.Response
) -> APIClientError:
    try:
        body = await _read_body(config, response, ERROR_BODY_LIMIT)
    except APIClientError:
        body = b""
    return status_error(config, response.status_code, response.headers, body)


def _parse_json(config: EndpointConfig, body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise APIResponseError(
            f"{what} is not JSON: {config.redact(_data_excerpt(body))}",
            endpoint=config.name,
        ) from None


def _max_response_bytes() -> int:
    return getattr(settings, "GATEWAY_MAX_RESPONSE_BYTES", 10 * 1024 * 1024)


async def _fetch(
    config: EndpointConfig,
    method: str,
    url: str,
    content: bytes | None = None,
    *,
    client_pools: ClientPools | None = None,
) -> bytes:
    """Send one plain request and return its body, size-limited; errors mapped."""
    pool = (client_pools or pools).pool(config)
    client = pool.checkout()
    try:
        request = client.build_request(method, url, content=content)
        response = await client.send(request, stream=True)
        try:
            if not response.is_success:
                raise await _error_for(config, response)
            return await _read_body(config, response, _max_response_bytes())
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise transport_error(config, exc) from exc
    finally:
        pool.checkin()


def _completion_object(config: EndpointConfig, raw: bytes) -> dict[str, Any]:
    """A plain completion body as a dict; an OpenAI error object raises."""
    data = _parse_json(config, raw, "the response")
    if not isinstance(data, dict):
        raise APIResponseError(
            "the response is not a JSON object", endpoint=config.name
        )
    if data.get("error") and not data.get("choices"):
        raise _chunk_error(config, data["error"])
    return data


async def create_completion(
    config: EndpointConfig,
    payload: Mapping[str, Any],
    *,
    client_pools: ClientPools | None = None,
) -> dict[str, Any]:
    """POST a non-streaming chat completion and return the parsed body."""
    body = dict(payload)
    body["stream"] = False
    body.pop("stream_options", None)
    raw = await _fetch(
        config, "POST", config.chat_url, _encode(body), client_pools=client_pools
    )
    data = _completion_object(config, raw)
    if not isinstance(data.get("choices"), list):
        raise APIResponseError("the response has no choices", endpoint=config.name)
    return data


# Endpoints (by id and name) seen rejecting stream_options in this process.
_no_stream_usage: set[tuple[int | None, str]] = set()


def asks_stream_usage(config: EndpointConfig) -> bool:
    """Whether a stream to this endpoint asks for a final usage chunk."""
    return config.supports_stream_usage and (config.id, config.name) not in (
        _no_stream_usage
    )


async def stream_completion(
    config: EndpointConfig,
    payload: Mapping[str, Any],
    *,
    on_stream_usage_rejected: Callable[[EndpointConfig], Awaitable[None]] | None = None,
    client_pools: ClientPools | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Stream a chat completion, yielding each parsed chunk.

    The upstream response is closed when the consumer stops iterating, closes
    this generator or is cancelled, so no upstream request outlives its caller.
    A stall longer than the endpoint timeout raises `APITimeoutError`.
    """
    body = dict(payload)
    body["stream"] = True
    include_usage = asks_stream_usage(config)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    else:
        body.pop("stream_options", None)
    pool = (client_pools or pools).pool(config)
    client = pool.checkout()
    response: httpx.Response | None = None
    try:
        try:
            response = await _send_stream(client, config, body)
            if response.status_code == 400 and include_usage:
                raw = await _read_body(config, response, ERROR_BODY_LIMIT)
                await response.aclose()
                if b"stream_options" not in raw and b"include_usage" not in raw:
                    raise status_error(config, 400, response.headers, raw)
                _no_stream_usage.add((config.id, config.name))
                if on_stream_usage_rejected is not None:
                    await on_stream_usage_rejected(config)
                del body["stream_options"]
                response = await _send_stream(client, config, body)
            if not response.is_success:
                raise await _error_for(config, response)
        except httpx.HTTPError as exc:
            raise transport_error(config, exc) from exc
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            # Some servers ignore stream=true and answer in one piece.
            plain = await _plain_as_stream(config, response)
            for chunk in plain:
                yield chunk
            return
        decoder = SSEDecoder()
        finished = False
        iterator = response.aiter_bytes().__aiter__()
        while True:
            try:
                raw = await iterator.__anext__()
            except StopAsyncIteration:
                events = _flush(config, decoder)
                at_eof = True
            except httpx.HTTPError as exc:
                raise transport_error(config, exc) from exc
            else:
                events = _feed(config, decoder, raw)
                at_eof = False
            for event, data in events:
                if data.strip() == b"[DONE]":
                    await _drain(iterator)
                    return
                chunk = _parse_json(config, data, "a stream chunk")
                if not isinstance(chunk, dict):
                    raise APIResponseError(
                        f"a stream chunk is not a JSON object: {_data_excerpt(data)}",
                        endpoint=config.name,
                    )
                if event == b"error" or ("error" in chunk and not chunk.get("choices")):
                    raise _chunk_error(config, chunk.get("error", chunk))
                if not finished:
                    for choice in chunk.get("choices") or ():
                        if isinstance(choice, dict) and choice.get("finish_reason"):
                            finished = True
                yield chunk
            if at_eof:
                if not finished:
                    raise APIConnectionError(
                        "the stream ended before the answer was complete",
                        endpoint=config.name,
                    )
                return
    finally:
        if response is not None:
            await response.aclose()
        pool.checkin()


async def _send_stream(
    client: httpx.AsyncClient, config: EndpointConfig, body: Mapping[str, Any]
) -> httpx.Response:
    request = client.build_request(
        "POST",
        config.chat_url,
        content=_encode(body),
        headers={"Accept": "text/event-stream"},
    )
    return await client.send(request, stream=True)


def _feed(
    config: EndpointConfig, decoder: SSEDecoder, raw: bytes
) -> list[tuple[bytes, bytes]]:
    try:
        return decoder.feed(raw)
    except ValueError as exc:
        raise APIResponseError(str(exc), endpoint=config.name) from None


def _flush(config: EndpointConfig, decoder: SSEDecoder) -> list[tuple[bytes, bytes]]:
    try:
        return decoder.flush()
    except ValueError as exc:
        raise APIResponseError(str(exc), endpoint=config.name) from None


async def _drain(iterator: AsyncIterator[bytes]) -> None:
    # Reading the end of the body lets the connection be reused; a server that
    # keeps talking after [DONE] just gets its connection closed.
    size = 0
    with contextlib.suppress(httpx.HTTPError, StopAsyncIteration):
        while size <= DRAIN_LIMIT:
            size += len(await iterator.__anext__())


async def _plain_as_stream(
    config: EndpointConfig, response: httpx.Response
) -> list[dict[str, Any]]:
    try:
        raw = await _read_body(config, response, _max_response_bytes())
    except httpx.HTTPError as exc:
        raise transport_error(config, exc) from exc
    return _as_chunks(_completion_object(config, raw))


async def list_models(
    config: EndpointConfig, *, client_pools: ClientPools | None = None
) -> list[dict[str, Any]]:
    """GET /models: the models the endpoint offers, as OpenAI model objects."""
    raw = await _fetch(config, "GET", config.models_url, client_pools=client_pools)
    data = _parse_json(config, raw, "the model list")
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise APIResponseError("the model list has no data", endpoint=config.name)
    return [
        item if isinstance(item, dict) else {"id": str(item)}
        for item in items
        if isinstance(item, dict | str)
    ]


@dataclass(frozen=True)
class HealthCheck:
    """The outcome of one health check."""

    ok: bool
    latency_ms: float
    models: tuple[str, ...] = ()
    error: APIClientError | None = None

    @property
    def status_code(self) -> int | None:
        return self.error.status_code if self.error else None


async def health_check(
    config: EndpointConfig, *, client_pools: ClientPools | None = None
) -> HealthCheck:
    """Check an endpoint by listing its models; never raises an `APIClientError`."""
    started = time.perf_counter()
    try:
        models = await list_models(config, client_pools=client_pools)
    except APIClientError as exc:
        return HealthCheck(
            ok=False, latency_ms=(time.perf_counter() - started) * 1000, error=exc
        )
    return HealthCheck(
        ok=True,
        latency_ms=(time.perf_counter() - started) * 1000,
        models=tuple(str(m.get("id", "")) for m in models if m.get("id")),
    )
