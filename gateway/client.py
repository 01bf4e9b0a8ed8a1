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
  `APIResponseError` (and its `APIStreamLimitError`);
- `APIDeadlineError`: the whole request ran out of time
  (GATEWAY_REQUEST_MAX_SECONDS); never retried, the router ends the call;
- `APIEndpointError` (401, 403, 404, ...): this endpoint cannot serve the
  request (key, model name); no retry, but the next route may;
- `APIRequestError` (400, 413, 422, ...): the request itself is wrong;
  ``permanent``, never retried and never failed over.

Upstream text never reaches a message unsanitized: every error is built with
the endpoint's snapshot, and `APIClientError` runs its message through
`gateway.sanitize.clean_text` (control characters dropped, the API key and
every extra header value redacted, then cut to `MESSAGE_CHARS`).

Bounds on what an upstream sends, each a setting (per stream):

- GATEWAY_MAX_SSE_EVENT_BYTES: one SSE line or event;
- GATEWAY_MAX_RESPONSE_BYTES: a plain body (and a JSON body to a stream);
- GATEWAY_MAX_BYTES_BEFORE_CONTENT / GATEWAY_MAX_CHUNKS_BEFORE_CONTENT: what
  may arrive before the first chunk with content (role-only and empty chunks);
- GATEWAY_MAX_STREAM_BYTES: the whole streamed body, a backstop for output
  that is not text (the router counts text tokens against max_tokens);
- time, per endpoint: ``connect_timeout`` to connect; ``first_token_timeout``
  until a stream's first chunk with content; ``timeout`` between chunks with
  content after it, so SSE comments and empty chunks do not keep a stream
  alive (time the caller takes to consume a chunk is not the endpoint's and
  not counted); ``request_timeout`` for a whole attempt (a plain answer, or a
  whole stream).  Each raises `APITimeoutError`;
- the caller's deadline (the router's GATEWAY_REQUEST_MAX_SECONDS).

The time bounds are enforced by one timer per stream, re-armed only when it
fires, so a chunk with content costs one clock read.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.utils
import functools
import itertools
import json
import logging
import math
import ssl
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
from django.conf import settings

from gateway import crypto, sanitize, transport_policy

BODY_EXCERPT_CHARS = 500
# An error message: our own words plus the upstream's excerpt.
MESSAGE_CHARS = BODY_EXCERPT_CHARS + 60
# Error bodies are only read this far: enough for any JSON error message.
ERROR_BODY_LIMIT = 64 * 1024
# OpenAI's error code for a prompt over the window, which local servers copy.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# Defaults of the bounds (see the settings of the same names).
# One SSE line or event larger than this is garbage, not a token.
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
MAX_BYTES_BEFORE_CONTENT = 1024 * 1024
MAX_CHUNKS_BEFORE_CONTENT = 1000
MAX_STREAM_BYTES = 64 * 1024 * 1024
# A model list longer than this is cut: no real endpoint serves more.
MAX_MODELS = 1000
# A Retry-After beyond this is taken as this (a day).
MAX_RETRY_AFTER = 86400.0
# After [DONE] the rest of the body (the last chunk marker) is read so that the
# connection goes back to the pool instead of being closed.
DRAIN_LIMIT = 64 * 1024
DRAIN_SECONDS = 1.0
USER_AGENT = "llmsite-gateway"

logger = logging.getLogger("gateway.client")
REDACTED = sanitize.REDACTED


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
        endpoint: str | EndpointConfig,
        status_code: int | None = None,
        permanent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        # The one way into a message: whatever upstream text it quotes is
        # cleaned and redacted (with the snapshot's secrets) before the cut.
        if isinstance(endpoint, str):
            name, secrets = endpoint, ()
        else:
            name, secrets = endpoint.name, endpoint.secrets
        message = sanitize.clean_text(message, secrets=secrets, limit=MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.endpoint = name
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


class APIDeadlineError(APITimeoutError):
    """The whole request ran out of time (GATEWAY_REQUEST_MAX_SECONDS)."""

    retryable = False
    reason = "request_deadline"


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


class APIStreamLimitError(APIResponseError):
    """The endpoint sent more than a bound allows (bytes, chunks, idle time)."""

    reason = "stream_limit"


class APIEmptyStreamError(APIResponseError):
    """The endpoint accepted a stream and ended it without a single chunk.

    The llama.cpp server (llama-cpp-python) answers this way when the request
    fails once its 200 is sent: a prompt over its context window, mostly.
    Asking again brings the same end, so it is not retried; another route may
    still answer.
    """

    retryable = False
    reason = "empty_stream"


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


class APIContextLengthError(APIRequestError):
    """The endpoint's own count of the prompt exceeds its context window.

    Our count is an estimate for most local models, so a prompt fitted here
    can still be too long there; the endpoint's error code says so.
    """

    reason = "context_length_exceeded"


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
    # Between chunks once a stream has begun (the Endpoint's `timeout`).
    timeout: float = 60.0
    connect_timeout: float = 5.0
    first_token_timeout: float = 30.0
    # One attempt in all: a plain answer, or a whole stream.
    request_timeout: float = 120.0
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_retries: int = 3
    retries_before_failover: int = 0
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
    # Rate-limit rest after a 429 (see gateway.router), and the last probe's
    # latency, the router's guess of how fast this endpoint answers.
    resting_until: datetime | None = None
    last_latency_ms: float | None = None
    chat_url: str = field(init=False, repr=False)
    embeddings_url: str = field(init=False, repr=False)
    models_url: str = field(init=False, repr=False)
    # What the pooled clients depend on: a change builds new clients.
    pool_fingerprint: tuple[Any, ...] = field(init=False, repr=False)
    # What never appears in a message: the key and every extra header value.
    secrets: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        base = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", base)
        object.__setattr__(self, "chat_url", base + "/chat/completions")
        object.__setattr__(self, "embeddings_url", base + "/embeddings")
        object.__setattr__(self, "models_url", base + "/models")
        object.__setattr__(
            self,
            "pool_fingerprint",
            (
                base,
                self.api_key,
                self.request_timeout,
                self.connect_timeout,
                self.extra_headers,
            ),
        )
        object.__setattr__(
            self,
            "secrets",
            sanitize.secrets_of(self.api_key, (v for _, v in self.extra_headers)),
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
            first_token_timeout=float(endpoint.first_token_timeout),
            request_timeout=float(endpoint.request_timeout),
            extra_headers=tuple(sorted((str(k), str(v)) for k, v in headers.items())),
            max_retries=max(1, int(endpoint.max_retries)),
            retries_before_failover=max(0, int(endpoint.retries_before_failover)),
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
            resting_until=endpoint.resting_until,
            last_latency_ms=endpoint.last_latency_ms,
        )

    def redact(self, text: str) -> str:
        """Remove this endpoint's secrets from a text meant for logs or users."""
        return sanitize.redact(text, self.secrets)

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
        # httpx's read timeout restarts with every byte; the stricter stream
        # timers (first token, between chunks) are `_Watchdog`'s.  A plain
        # answer arrives in one piece at the end, so reads may take as long as
        # the whole attempt.  Waiting for a free connection is queueing, not a
        # dead endpoint.
        timeout = httpx.Timeout(config.request_timeout, connect=config.connect_timeout)
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
            raise APIEndpointError(f"refused: {refused}", endpoint=config)
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


def _excerpt(config: EndpointConfig, text: str | bytes) -> str:
    """Upstream text to quote in a message: cleaned, redacted, then cut."""
    return sanitize.clean_text(text, secrets=config.secrets, limit=BODY_EXCERPT_CHARS)


# LiteLLM passes its provider's headers on under this prefix: a provider's
# Retry-After reaches us only as llm_provider-retry-after.
PROVIDER_HEADER_PREFIX = "llm_provider-"


def parse_retry_after(
    headers: httpx.Headers, *, now: float | None = None
) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP date) or retry-after-ms.

    The endpoint's own headers win over those it forwards from its provider.
    """
    for prefix in ("", PROVIDER_HEADER_PREFIX):
        millis = headers.get(f"{prefix}retry-after-ms")
        if millis:
            with contextlib.suppress(ValueError):
                return _seconds(float(millis) / 1000)
        value = headers.get(f"{prefix}retry-after")
        if value:
            return _retry_after_value(value, now)
    return None


def _retry_after_value(value: str, now: float | None) -> float | None:
    value = value.strip()
    try:
        return _seconds(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return _seconds(when.timestamp() - current)


def _seconds(value: float) -> float:
    # "inf", "nan" and 1e400 are numbers to float(), not waits.
    if not math.isfinite(value):
        raise ValueError(value)
    return min(max(0.0, value), MAX_RETRY_AFTER)


# Error types that say the key was refused, whatever the status: LiteLLM
# without a database answers a key that is not its master key with a 400
# "No connected db." of this type.
_KEY_REFUSED_TYPES = frozenset({"no_db_connection"})


@dataclass(frozen=True, slots=True)
class _ErrorBody:
    """What an error body says, as far as it is OpenAI-style JSON."""

    message: str
    type: str | None = None
    code: str | None = None


def _string(value: Any) -> str | None:
    # Only a string names a type or code; anything else would not even hash.
    return value if isinstance(value, str) else None


def _error_body(body: bytes) -> _ErrorBody:
    """The upstream's own error message, type and code."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _ErrorBody(text)
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _ErrorBody(
                error["message"], _string(error.get("type")), _string(error.get("code"))
            )
        if isinstance(error, str):
            return _ErrorBody(error)
        if isinstance(data.get("detail"), str):
            return _ErrorBody(data["detail"])
    return _ErrorBody(text)


def status_error(
    config: EndpointConfig, status: int, headers: httpx.Headers, body: bytes
) -> APIClientError:
    """The error for a non-2xx upstream answer."""
    error = _error_body(body)
    detail = _excerpt(config, error.message) or httpx.codes.get_reason_phrase(status)
    kwargs: dict[str, Any] = {"endpoint": config, "status_code": status}
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
    if status in (401, 403, 404, 405, 410) or error.type in _KEY_REFUSED_TYPES:
        return APIEndpointError(f"rejected by endpoint: {detail}", **kwargs)
    if 400 <= status < 500:
        if error.code == CONTEXT_LENGTH_EXCEEDED:
            return APIContextLengthError(f"prompt too long: {detail}", **kwargs)
        return APIRequestError(f"request rejected: {detail}", **kwargs)
    return APIResponseError(f"unexpected HTTP status: {detail}", **kwargs)


def transport_error(config: EndpointConfig, exc: httpx.HTTPError) -> APIClientError:
    """The error for an httpx exception (no response, or a broken one)."""
    detail = _excerpt(config, str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(exc), "waiting")
        return APITimeoutError(f"timed out {phase}", endpoint=config)
    if isinstance(exc, httpx.RemoteProtocolError):
        return APIConnectionError(f"connection dropped: {detail}", endpoint=config)
    if isinstance(exc, httpx.DecodingError):
        return APIResponseError(f"undecodable response: {detail}", endpoint=config)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return APIEndpointError(f"bad endpoint URL: {detail}", endpoint=config)
    return APIConnectionError(f"connection failed: {detail}", endpoint=config)


def _chunk_error(config: EndpointConfig, error: Any) -> APIClientError:
    """The error for an OpenAI-style ``{"error": ...}`` inside a 200 answer."""
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "error")
        code = error.get("code")
    else:
        message, code = str(error), None
    detail = _excerpt(config, message) or "error"
    # LiteLLM writes the status as a string: "code": "429".
    if type(code) is str and code.isascii() and code.isdigit() and len(code) == 3:
        code = int(code)
    status = code if type(code) is int and 400 <= code < 600 else None
    if status == 429 or "rate limit" in detail.lower():
        return APIRateLimitError(
            f"rate limited: {detail}", endpoint=config, status_code=status
        )
    if status is not None and 400 <= status < 500:
        return APIRequestError(
            f"request rejected: {detail}", endpoint=config, status_code=status
        )
    return APIServerError(
        f"upstream error: {detail}", endpoint=config, status_code=status
    )


# --- SSE ----------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent Events parser: bytes in, (event, data) pairs out.

    Follows the HTML spec: lines end in LF, CRLF or CR; ``data:`` lines of one
    event are joined with newlines; a blank line dispatches; lines starting with
    a colon are comments (keep-alives); ``id`` and ``retry`` are ignored.
    """

    __slots__ = ("_buffer", "_data", "_event", "_size", "_skip_lf", "limit")

    def __init__(self, limit: int = MAX_SSE_EVENT_BYTES) -> None:
        # The largest line or event, in bytes.
        self.limit = limit
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
        if len(self._buffer) > self.limit:
            raise ValueError(f"an SSE line exceeds the {self.limit}-byte limit")
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
            if self._size > self.limit:
                raise ValueError(f"an SSE event exceeds the {self.limit}-byte limit")
            self._data.append(value)
        elif name == b"event":
            self._event = value


def _as_chunks(config: EndpointConfig, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A plain completion (sent to a stream request) as equivalent chunks."""
    found = body.get("choices")
    if not isinstance(found, list):
        raise APIResponseError("the response has no choices", endpoint=config)
    choices = []
    for choice in found:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
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


def has_content(chunk: Mapping[str, Any]) -> bool:
    """Whether a chunk's first choice carries anything besides its role."""
    choices = chunk.get("choices")
    if not choices or type(choices) is not list:
        return False
    choice = choices[0]
    if type(choice) is not dict:
        return False
    delta = choice.get("delta")
    if type(delta) is not dict:
        return False
    if delta.get("content"):
        return True
    # Tool calls, refusals and reasoning are content too, just not text.  A
    # loop, not any(): no generator per chunk on the hot path.
    for key, value in delta.items():  # noqa: SIM110
        if value and key != "role":
            return True
    return False


# --- Requests -------------------------------------------------------------------


def _encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def _read_body(
    config: EndpointConfig, response: httpx.Response, limit: int
) -> bytes:
    declared = response.headers.get("content-length", "")
    # isascii: "²".isdigit() is true, and int() of it raises; a length longer
    # than 18 digits is too big whatever it says (and int() may refuse it).
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise APIResponseError(
            f"response of {declared[:20]} bytes exceeds the {limit}-byte limit",
            endpoint=config,
            status_code=response.status_code,
        )
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise APIResponseError(
                f"response exceeds the {limit}-byte limit",
                endpoint=config,
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
    except (ValueError, RecursionError):
        raise APIResponseError(
            f"{what} is not JSON: {_excerpt(config, body)}",
            endpoint=config,
        ) from None


def _max_response_bytes() -> int:
    return getattr(settings, "GATEWAY_MAX_RESPONSE_BYTES", 10 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The byte and chunk bounds of one stream, from the settings of these names."""

    # GATEWAY_MAX_SSE_EVENT_BYTES
    event_bytes: int = MAX_SSE_EVENT_BYTES
    # GATEWAY_MAX_BYTES_BEFORE_CONTENT
    bytes_before_content: int = MAX_BYTES_BEFORE_CONTENT
    # GATEWAY_MAX_CHUNKS_BEFORE_CONTENT
    chunks_before_content: int = MAX_CHUNKS_BEFORE_CONTENT
    # GATEWAY_MAX_STREAM_BYTES
    stream_bytes: int = MAX_STREAM_BYTES

    @classmethod
    def from_settings(cls) -> StreamLimits:
        """The limits as configured now."""
        return cls(
            event_bytes=getattr(
                settings, "GATEWAY_MAX_SSE_EVENT_BYTES", MAX_SSE_EVENT_BYTES
            ),
            bytes_before_content=getattr(
                settings, "GATEWAY_MAX_BYTES_BEFORE_CONTENT", MAX_BYTES_BEFORE_CONTENT
            ),
            chunks_before_content=getattr(
                settings, "GATEWAY_MAX_CHUNKS_BEFORE_CONTENT", MAX_CHUNKS_BEFORE_CONTENT
            ),
            stream_bytes=getattr(
                settings, "GATEWAY_MAX_STREAM_BYTES", MAX_STREAM_BYTES
            ),
        )


def deadline_error(config: EndpointConfig) -> APIDeadlineError:
    """The error of a request that reached its whole-request time limit."""
    return APIDeadlineError("the request reached its time limit", endpoint=config)


@contextlib.asynccontextmanager
async def _until(
    config: EndpointConfig, deadline: float | None, *, cap: float | None = None
) -> AsyncIterator[None]:
    """Run the block until `deadline` (time.monotonic()) or for `cap` seconds.

    Reaching the deadline raises `APIDeadlineError` (the whole request is
    over); reaching the cap first raises `APITimeoutError` (this attempt is).
    """
    capped = None if cap is None else time.monotonic() + cap
    limit = (
        deadline
        if capped is None or (deadline is not None and deadline <= capped)
        else capped
    )
    if limit is None:
        yield
        return
    try:
        async with asyncio.timeout(limit - time.monotonic()):
            yield
    except TimeoutError:
        if limit == deadline:
            raise deadline_error(config) from None
        raise APITimeoutError(f"no answer within {cap:g} s", endpoint=config) from None


class _Watchdog:
    """Ends a stream's reads when content is late or the time is up.

    httpx's read timeout restarts with every byte, so keep-alive comments or
    empty chunks would hold a stream open for ever.  This timer counts in
    content instead: the first must come within the endpoint's
    ``first_token_timeout``, each next within its ``timeout`` of the last, and
    the whole stream within its ``request_timeout`` (each an `APITimeoutError`,
    which fails over); the caller's deadline ends the request
    (`APIDeadlineError`).  Content only stores a clock reading; the one timer
    is re-armed when it fires early, and cancels the task only while it waits
    in a read (`task` is set), like `asyncio.timeout` does.
    """

    __slots__ = (
        "attempt_limit",
        "cancelling",
        "config",
        "deadline",
        "expired",
        "fired",
        "first_limit",
        "handle",
        "idle",
        "last_content",
        "seen_content",
        "task",
    )

    def __init__(self, config: EndpointConfig, deadline: float | None) -> None:
        self.config = config
        self.idle = config.timeout
        self.deadline = deadline
        now = time.monotonic()
        self.last_content = now
        self.seen_content = False
        self.first_limit = now + config.first_token_timeout
        self.attempt_limit = now + config.request_timeout
        # The task waiting in a read, while it waits.
        self.task: asyncio.Task[Any] | None = None
        self.expired: APIClientError | None = None
        self.fired = False
        self.cancelling = 0
        self.handle: asyncio.TimerHandle | None = None
        self._arm()

    def content(self) -> None:
        """A chunk with content arrived."""
        self.last_content = time.monotonic()
        if not self.seen_content:
            self.seen_content = True
            # The between-chunks limit may come before the first-token one
            # the timer waits for: re-arm it, once per stream.
            if self.handle is not None:
                self.handle.cancel()
                self._arm()

    def _limit(self) -> float:
        first = self.last_content + self.idle if self.seen_content else self.first_limit
        limit = min(first, self.attempt_limit)
        if self.deadline is not None and self.deadline < limit:
            return self.deadline
        return limit

    def _arm(self) -> None:
        delay = max(0.0, self._limit() - time.monotonic())
        self.handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        now = time.monotonic()
        if now < self._limit():
            self._arm()
            return
        task = self.task
        if self.deadline is not None and now >= self.deadline:
            self.expired = deadline_error(self.config)
        elif now >= self.attempt_limit:
            self.expired = APITimeoutError(
                f"the answer took longer than {self.config.request_timeout:g} s",
                endpoint=self.config,
            )
        elif task is None:
            # Not waiting for the upstream: the caller is slow to take the
            # last chunk (a slow /v1 client), which is not the endpoint's fault.
            self.last_content = now
            self._arm()
            return
        elif self.seen_content:
            self.expired = APITimeoutError(
                f"no content for {self.idle:g} s", endpoint=self.config
            )
        else:
            self.expired = APITimeoutError(
                f"no first token within {self.config.first_token_timeout:g} s",
                endpoint=self.config,
            )
        self.handle = None
        if task is not None and not task.done():
            self.fired = True
            self.cancelling = task.cancelling()
            task.cancel()

    def caused(self, task: asyncio.Task[Any] | None) -> bool:
        """After a CancelledError in a read: whether this timer caused it."""
        if not self.fired or task is None:
            return False
        self.fired = False
        return task.uncancel() <= self.cancelling

    async def run(
        self, task: asyncio.Task[Any] | None, work: Coroutine[Any, Any, Any]
    ) -> Any:
        """Await work that does not yield to the caller, under this timer."""
        if self.expired is not None:
            work.close()
            raise self.expired
        self.task = task
        try:
            return await work
        except BaseException:
            # CancelledError, or whatever httpx made of it.
            if self.caused(task):
                assert self.expired is not None
                raise self.expired from None
            raise
        finally:
            self.task = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def _fetch(
    config: EndpointConfig,
    method: str,
    url: str,
    content: bytes | None = None,
    *,
    client_pools: ClientPools | None = None,
    deadline: float | None = None,
) -> bytes:
    """Send one plain request and return its body, size-limited; errors mapped."""
    pool = (client_pools or pools).pool(config)
    client = pool.checkout()
    try:
        async with _until(config, deadline, cap=config.request_timeout):
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
        raise APIResponseError("the response is not a JSON object", endpoint=config)
    if data.get("error") and not data.get("choices"):
        raise _chunk_error(config, data["error"])
    return data


async def create_completion(
    config: EndpointConfig,
    payload: Mapping[str, Any],
    *,
    client_pools: ClientPools | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """POST a non-streaming chat completion and return the parsed body.

    `deadline` (a `time.monotonic()` value) bounds the whole exchange.
    """
    body = dict(payload)
    body["stream"] = False
    body.pop("stream_options", None)
    raw = await _fetch(
        config,
        "POST",
        config.chat_url,
        _encode(body),
        client_pools=client_pools,
        deadline=deadline,
    )
    data = _completion_object(config, raw)
    if not isinstance(data.get("choices"), list):
        raise APIResponseError("the response has no choices", endpoint=config)
    return data


async def create_embedding(
    config: EndpointConfig,
    payload: Mapping[str, Any],
    *,
    expected: int,
    client_pools: ClientPools | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """POST an embeddings request: ``{"vectors": [...], "usage": ...}``.

    The same bounds and error mapping as `create_completion`. `expected` is
    the number of inputs sent: a body whose `data` does not hold exactly one
    vector per input (each index once), each a non-empty list of finite
    numbers or a base64 string, is an `APIResponseError` (transient: another
    route may do better). The vectors come back in input order; nothing else
    of the upstream body is kept but its `usage`, which the router checks.
    """
    raw = await _fetch(
        config,
        "POST",
        config.embeddings_url,
        _encode(payload),
        client_pools=client_pools,
        deadline=deadline,
    )
    data = _parse_json(config, raw, "the response")
    if not isinstance(data, dict):
        raise APIResponseError("the response is not a JSON object", endpoint=config)
    if data.get("error") and not data.get("data"):
        raise _chunk_error(config, data["error"])
    items = data.get("data")
    if not isinstance(items, list) or len(items) != expected:
        raise APIResponseError(
            f"the response does not hold {expected} embedding(s)", endpoint=config
        )
    vectors: list[list[float] | str | None] = [None] * expected
    for position, item in enumerate(items):
        index = item.get("index", position) if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < expected
            or vectors[index] is not None
            or not _is_vector(vector)
        ):
            raise APIResponseError(
                f"embedding {position} of the response is malformed", endpoint=config
            )
        vectors[index] = vector
    return {"vectors": vectors, "usage": data.get("usage")}


def _is_vector(value: Any) -> bool:
    """A list of finite numbers, or base64 of little-endian float32s."""
    if isinstance(value, str):
        try:
            decoded = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            return False
        return bool(decoded) and len(decoded) % 4 == 0
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(number, int | float)
            and not isinstance(number, bool)
            and math.isfinite(number)
            for number in value
        )
    )


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
    deadline: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Stream a chat completion, yielding each parsed chunk.

    The upstream response is closed when the consumer stops iterating, closes
    this generator or is cancelled, so no upstream request outlives its caller.
    No content for the endpoint timeout raises `APITimeoutError`; reaching
    `deadline` (a `time.monotonic()` value) raises `APIDeadlineError`; the byte
    and chunk bounds (`StreamLimits`) raise `APIStreamLimitError`.
    """
    body = dict(payload)
    body["stream"] = True
    include_usage = asks_stream_usage(config)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    else:
        body.pop("stream_options", None)
    limits = StreamLimits.from_settings()
    pool = (client_pools or pools).pool(config)
    client = pool.checkout()
    response: httpx.Response | None = None
    task = asyncio.current_task()
    watchdog = _Watchdog(config, deadline)
    try:
        try:
            response = await watchdog.run(task, _send_stream(client, config, body))
            if response.status_code == 400 and include_usage:
                raw = await watchdog.run(
                    task, _read_body(config, response, ERROR_BODY_LIMIT)
                )
                await response.aclose()
                if b"stream_options" not in raw and b"include_usage" not in raw:
                    raise status_error(config, 400, response.headers, raw)
                _no_stream_usage.add((config.id, config.name))
                if on_stream_usage_rejected is not None:
                    await on_stream_usage_rejected(config)
                del body["stream_options"]
                response = await watchdog.run(task, _send_stream(client, config, body))
            if not response.is_success:
                raise await watchdog.run(task, _error_for(config, response))
            content_type = response.headers.get("content-type", "")
            if content_type.startswith("application/json"):
                # Some servers ignore stream=true and answer in one piece.
                plain = await watchdog.run(task, _plain_as_stream(config, response))
                for chunk in plain:
                    yield chunk
                return
        except httpx.HTTPError as exc:
            raise transport_error(config, exc) from exc
        decoder = SSEDecoder(limits.event_bytes)
        finished = False
        # Until the first content, a much smaller budget of bytes and chunks.
        seen_content = False
        byte_limit = limits.bytes_before_content
        empty_chunks = 0
        received = 0
        iterator = response.aiter_bytes().__aiter__()
        while True:
            if watchdog.expired is not None:
                raise watchdog.expired
            # Read by whichever task iterates now: a hedged attempt is opened
            # by one task and read to its end by another.
            task = asyncio.current_task()
            watchdog.task = task
            try:
                raw = await iterator.__anext__()
            except StopAsyncIteration:
                events = _flush(config, decoder)
                at_eof = True
            except httpx.HTTPError as exc:
                if watchdog.caused(task):
                    # The timer's cancellation, turned into a read error.
                    assert watchdog.expired is not None
                    raise watchdog.expired from None
                raise transport_error(config, exc) from exc
            except asyncio.CancelledError:
                if watchdog.caused(task):
                    assert watchdog.expired is not None
                    raise watchdog.expired from None
                raise
            else:
                received += len(raw)
                if received > byte_limit:
                    raise _over_bytes(config, byte_limit, seen_content)
                events = _feed(config, decoder, raw)
                at_eof = False
            finally:
                watchdog.task = None
            for event, data in events:
                if data.strip() == b"[DONE]":
                    await _drain(iterator)
                    return
                chunk = _parse_json(config, data, "a stream chunk")
                if not isinstance(chunk, dict):
                    # The message quotes the line; the error cleans and redacts it.
                    raise APIResponseError(
                        "a stream chunk is not a JSON object: "
                        + data.decode("utf-8", "replace"),
                        endpoint=config,
                    )
                if event == b"error" or ("error" in chunk and not chunk.get("choices")):
                    raise _chunk_error(config, chunk.get("error", chunk))
                if has_content(chunk):
                    watchdog.content()
                    if not seen_content:
                        seen_content = True
                        byte_limit = limits.stream_bytes
                elif not seen_content:
                    empty_chunks += 1
                    if empty_chunks > limits.chunks_before_content:
                        raise APIStreamLimitError(
                            f"{empty_chunks} chunks without content, more than "
                            f"the {limits.chunks_before_content} allowed",
                            endpoint=config,
                        )
                if not finished:
                    choices = chunk.get("choices")
                    if type(choices) is list:
                        for choice in choices:
                            if type(choice) is dict and choice.get("finish_reason"):
                                finished = True
                yield chunk
            if at_eof:
                if not received:
                    raise APIEmptyStreamError(
                        "the stream ended before its first chunk (a llama.cpp "
                        "server does this when the prompt exceeds its context "
                        "window)",
                        endpoint=config,
                    )
                if not finished:
                    raise APIConnectionError(
                        "the stream ended before the answer was complete",
                        endpoint=config,
                    )
                return
    finally:
        watchdog.close()
        if response is not None:
            await response.aclose()
        pool.checkin()


def _over_bytes(
    config: EndpointConfig, limit: int, seen_content: bool
) -> APIStreamLimitError:
    if seen_content:
        what = f"the stream exceeds the {limit}-byte limit"
    else:
        what = f"more than {limit} bytes arrived before any content"
    return APIStreamLimitError(what, endpoint=config)


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
        raise APIStreamLimitError(str(exc), endpoint=config) from None


def _flush(config: EndpointConfig, decoder: SSEDecoder) -> list[tuple[bytes, bytes]]:
    try:
        return decoder.flush()
    except ValueError as exc:
        raise APIStreamLimitError(str(exc), endpoint=config) from None


async def _drain(iterator: AsyncIterator[bytes]) -> None:
    # Reading the end of the body lets the connection be reused; a server that
    # keeps talking (or trickling) after [DONE] just gets its connection closed.
    size = 0
    with contextlib.suppress(httpx.HTTPError, StopAsyncIteration, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while size <= DRAIN_LIMIT:
                size += len(await iterator.__anext__())


async def _plain_as_stream(
    config: EndpointConfig, response: httpx.Response
) -> list[dict[str, Any]]:
    raw = await _read_body(config, response, _max_response_bytes())
    return _as_chunks(config, _completion_object(config, raw))


async def list_models(
    config: EndpointConfig, *, client_pools: ClientPools | None = None
) -> list[dict[str, Any]]:
    """GET /models: the models the endpoint offers, as OpenAI model objects.

    Each has a clean ``id`` (a string of at most 200 characters, no control
    characters, no secret); items without one are dropped, and the list is cut
    at `MAX_MODELS`.
    """
    raw = await _fetch(config, "GET", config.models_url, client_pools=client_pools)
    data = _parse_json(config, raw, "the model list")
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise APIResponseError("the model list has no data", endpoint=config)
    models = []
    for item in items:
        found = item.get("id") if isinstance(item, dict) else item
        model_id = sanitize.clean_identifier(found, secrets=config.secrets)
        if model_id:
            models.append(
                {**item, "id": model_id} if isinstance(item, dict) else {"id": model_id}
            )
            if len(models) >= MAX_MODELS:
                break
    return models


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
        models=tuple(m["id"] for m in models),
    )
