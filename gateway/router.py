"""Routing one chat request over a model's routes: retries, fallback, breaker, cache.

`stream_chat()` and `complete_chat()` take a public model name and the
conversation, and walk the model's routes by priority:

1. skip an endpoint whose circuit is open, or half-open with its one trial
   taken by another request, or that rests after a 429 (`gateway.resting`);
   skip a route whose window cannot hold the system prompt and newest turn
   (`gateway.context`); skip an endpoint that `admit` says is saturated.
   Each skip is a hop with its reason, and a step of the trail.
2. fail over first, retry last: while later routes remain, a route gets one
   attempt (plus its endpoint's `retries_before_failover`), so a transient
   error (5xx, connection, timeout) moves on at once.  When every route has
   been tried, the retries with tenacity's exponential backoff
   (`backoff_multiplier` * 2^n, plus jitter, capped at GATEWAY_MAX_BACKOFF)
   go to the last route that may still answer, up to its `max_retries`
   attempts (`_Call.last_resort`).  A 429 never counts against the breaker:
   with a Retry-After shorter than the next route's expected latency it is
   waited out in place, otherwise the request fails over and the endpoint
   rests until then; when nothing else can answer, a rest or Retry-After up
   to GATEWAY_MAX_RETRY_AFTER is waited out.  An `APIEndpointError` fails
   over at once; a permanent error (the request is wrong) ends the call.
   Streams are retried only before their first token.
3. a route with `hedge_after_ms` races the next route when its first token
   is that late: the first to answer wins, the other is cancelled and stays
   on the trail as `hedge_lost`.
4. a stream that fails after tokens flowed continues on the next route, with
   the partial answer as an assistant message and an instruction to continue,
   so the caller gets one answer and a `Fallback` event.
5. when every route failed and nothing was sent yet, the last good answer to
   the exact same conversation (`gateway.response_cache`) is served, flagged
   as cached; otherwise the call ends with `AllEndpointsUnavailable`.

While no answer flows, `Status` events say what is happening (a failover, a
retry's wait, a rate-limit wait, a hedge), for the chat's status line and
`/v1`; every result keeps its `trail` of attempts and skips.

Bounds (the client enforces the byte, chunk and idle ones, see
`gateway.client`):

- the whole call, retries, backoff and fallbacks included, ends within
  GATEWAY_REQUEST_MAX_SECONDS (default 600) of its start: no retry or route is
  started past it, and the client stops reading at it (`APIDeadlineError`);
- the answer text of each route is counted as it streams (in steps, with the
  route's tokenizer or estimate) and cut when it exceeds the request's
  max_tokens (capped at the route's max_output_tokens) by a quarter plus 16
  tokens: the stream is closed and the result ends with finish_reason
  "length" and `limit_reason` "max_tokens".  A plain answer is cut the same way;
- when `admit` grants less output than asked (`OutputCap`: a budget's last
  tokens), max_tokens is lowered to it on every route and the answer is cut
  exactly there, with no slack, and `limit_reason` "budget";
- upstream usage numbers are taken only when they are integers (not bool),
  >= 0, the prompt within 8 times our own count plus 1024 (or the window) and
  the completion within the output allowance; otherwise we count and flag
  the usage as estimated;
- content that is not a string, choices that are not objects and the like are
  ignored rather than trusted; answer text loses NUL and lone surrogates.

How a bound ends a call: before any text, a timeout or a stream bound (idle,
bytes or chunks before content) is a transient error, retried and failed over
like any timeout.  After text, the same errors fail over mid-stream like a
dropped connection (the next route continues the answer).  The deadline is
never retried or failed over: the call ends with `APIDeadlineError`, keeping
the partial text.  The output cut is not an error at all.

Routes are read with one query and kept as snapshots for
GATEWAY_ROUTE_CACHE_SECONDS (default 1 s; 0 reads them on every call);
everything after works on snapshots, and the breaker writes only on failures
and recoveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from tenacity import AsyncRetrying, RetryCallState
from tenacity.stop import stop_base

from gateway import breaker, response_cache, resting, sanitize, tokens
from gateway import client as upstream
from gateway.client import (
    APIClientError,
    APIDeadlineError,
    APIEmptyStreamError,
    APIRateLimitError,
    EndpointConfig,
)
from gateway.context import (
    ContextMessage,
    ContextStatus,
    ContextWindowExceeded,
    fit_context,
)
from gateway.models import Endpoint, ModelRoute, RouteKind

logger = logging.getLogger("gateway.router")

CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off. Continue it exactly where it stopped, "
    "without repeating anything and without mentioning the interruption."
)
# When nothing better is known, how long callers are told to wait.
DEFAULT_RETRY_AFTER = 10.0
# Parameters the router sets itself.
_RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})
DEFAULT_REQUEST_MAX_SECONDS = 600.0
# An answer is cut past its max_tokens by this fraction plus this many tokens:
# our count is an estimate for most models and must not cut an honest answer.
OUTPUT_SLACK_RATIO = 0.25
OUTPUT_SLACK_TOKENS = 16
# The answer text is counted again after at least this many new characters.
MIN_COUNT_STEP_CHARS = 16
# No honest token is longer: a plain answer is cut to this before counting.
MAX_CHARS_PER_TOKEN = 32
# Upstream prompt counts above our own times this (plus the slack), and
# above the route's window, are not believed.
PROMPT_USAGE_FACTOR = 8
PROMPT_USAGE_SLACK = 1024
FINISH_REASON_CHARS = 40


@dataclass(frozen=True, slots=True)
class OutputCap:
    """What `admit` returns to take a route with at most `tokens` of output.

    A budget with room for the prompt but not the whole answer: the request
    goes on with max_tokens lowered to this, and the answer is cut at it
    exactly (no slack), since these tokens are all that was reserved.
    """

    tokens: int


# True: take the route; False: skip it; OutputCap: take it with less output.
Admit = Callable[[EndpointConfig, int], Awaitable["bool | OutputCap"]]
Message = ContextMessage | Mapping[str, Any]


# --- Routes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """A snapshot of one ModelRoute and its endpoint."""

    id: int | None
    model_name: str
    upstream_model: str
    priority: int
    context_window: int
    max_output_tokens: int
    endpoint: EndpointConfig
    input_price_per_1k: Decimal | None = None
    output_price_per_1k: Decimal | None = None
    # Race the next route after this long without a first token (None: off).
    hedge_after_ms: int | None = None
    # RouteKind: "chat" or "embedding".
    kind: str = RouteKind.CHAT
    # The upstream model takes image content parts.
    accepts_images: bool = False

    @classmethod
    def from_model(cls, route: ModelRoute) -> Route:
        """Snapshot a ModelRoute whose endpoint was loaded with it."""
        return cls(
            id=route.pk,
            model_name=route.model_name,
            upstream_model=route.upstream_model,
            priority=route.priority,
            context_window=route.context_window,
            max_output_tokens=route.max_output_tokens,
            endpoint=EndpointConfig.from_model(route.endpoint),
            input_price_per_1k=route.input_price_per_1k,
            output_price_per_1k=route.output_price_per_1k,
            hedge_after_ms=route.hedge_after_ms,
            kind=route.kind,
            accepts_images=route.accepts_images,
        )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal | None:
        """The price of some tokens on this route, or None when it has no prices."""
        if self.input_price_per_1k is None and self.output_price_per_1k is None:
            return None
        total = (self.input_price_per_1k or Decimal(0)) * prompt_tokens + (
            self.output_price_per_1k or Decimal(0)
        ) * completion_tokens
        return (total / 1000).quantize(Decimal("0.000001"))


# Route snapshots per model name, kept for GATEWAY_ROUTE_CACHE_SECONDS: the
# query and its thread hop cost more than the rest of the engine together
# (bench/engine_overhead.py).  Writes through the ORM and breaker transitions
# seen by this process drop them at once; other processes' within the TTL.
_routes: dict[tuple[str, str], tuple[float, list[Route]]] = {}
_MAX_CACHED_MODELS = 1024
# The read under way per model name: callers that miss the cache together
# share it. Without it, every request that came while the database thread was
# busy read the routes again (hundreds of reads per second in a burst).
_reading: dict[tuple[str, str], asyncio.Task[list[Route]]] = {}


async def load_routes(
    model_name: str, *, kind: str = RouteKind.CHAT, fresh: bool = False
) -> list[Route]:
    """The usable routes of a public model name, in the order they are tried.

    Only routes of `kind`: a chat never goes to an embedding model, nor the
    other way round.
    """
    ttl = float(getattr(settings, "GATEWAY_ROUTE_CACHE_SECONDS", 1.0))
    key = (kind, model_name)
    if ttl <= 0 or fresh:
        return await _read_routes(key, ttl)
    cached = _routes.get(key)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    reading = _reading.get(key)
    if reading is None or reading.get_loop() is not asyncio.get_running_loop():
        # A fresh context: the read must not run on the executor of the one
        # request that happened to start it.
        reading = asyncio.get_running_loop().create_task(
            _read_routes(key, ttl), context=contextvars.Context()
        )
        if len(_reading) >= _MAX_CACHED_MODELS:
            _reading.clear()
        _reading[key] = reading
        reading.add_done_callback(
            lambda done: _reading.pop(key) if _reading.get(key) is done else None
        )
    return await asyncio.shield(reading)


async def _read_routes(key: tuple[str, str], ttl: float) -> list[Route]:
    kind, model_name = key
    queryset = (
        ModelRoute.objects.filter(
            model_name=model_name, kind=kind, enabled=True, endpoint__enabled=True
        )
        .select_related("endpoint")
        .order_by("priority", "endpoint__priority", "id")
    )
    routes = [Route.from_model(route) async for route in queryset]
    # Unknown names are not kept: anyone can send any model name.
    if ttl > 0 and routes:
        if len(_routes) >= _MAX_CACHED_MODELS:
            _routes.clear()
        _routes[key] = (time.monotonic() + ttl, routes)
    return routes


def forget_routes(**kwargs: Any) -> None:
    """Drop the route snapshots, so the next call reads the database."""
    _routes.clear()
    # A read begun before the change may return what it replaced.
    _reading.clear()


for _model in (Endpoint, ModelRoute):
    post_save.connect(forget_routes, sender=_model, dispatch_uid="router-forget")
    post_delete.connect(forget_routes, sender=_model, dispatch_uid="router-forget")
setting_changed.connect(forget_routes, dispatch_uid="router-forget")


# --- Results and events --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of a request; `estimated` when any part was counted by us."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.estimated or other.estimated,
        )


@dataclass(frozen=True, slots=True)
class Hop:
    """One endpoint that did not (or not fully) answer, and why."""

    endpoint: str
    endpoint_id: int | None
    reason: str
    to_endpoint: str | None = None
    error_type: str | None = None
    status_code: int | None = None
    message: str = ""
    attempts: int = 0
    # True when the endpoint failed after tokens had been sent.
    mid_stream: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for UsageRecord.fallback_hops and the UI."""
        return {
            "endpoint": self.endpoint,
            "endpoint_id": self.endpoint_id,
            "reason": self.reason,
            "to_endpoint": self.to_endpoint,
            "error_type": self.error_type,
            "status_code": self.status_code,
            "message": self.message,
            "attempts": self.attempts,
            "mid_stream": self.mid_stream,
        }


# What became of one attempt (or skip) in a request's trail.
OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"
CANCELLED = "cancelled"
HEDGE_LOST = "hedge_lost"
# Not yet known: the attempt is streaming.
OPEN = "open"


@dataclass(slots=True)
class Attempt:
    """One step of a request's trail: an attempt on an endpoint, or a skip.

    Times are milliseconds from the start of the request.  A lost hedge keeps
    the prompt tokens it was sent: the upstream may bill them.
    """

    endpoint: str
    endpoint_id: int | None
    started_ms: float
    outcome: str = OPEN
    duration_ms: float = 0.0
    reason: str = ""
    status_code: int | None = None
    mid_stream: bool = False
    prompt_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for UsageRecord.trail."""
        data: dict[str, Any] = {
            "endpoint": self.endpoint,
            "endpoint_id": self.endpoint_id,
            "outcome": self.outcome,
            "started_ms": round(self.started_ms, 1),
            "duration_ms": round(self.duration_ms, 1),
        }
        if self.reason:
            data["reason"] = self.reason
        if self.status_code is not None:
            data["status_code"] = self.status_code
        if self.mid_stream:
            data["mid_stream"] = True
        if self.prompt_tokens is not None:
            data["prompt_tokens"] = self.prompt_tokens
        return data


@dataclass(frozen=True, slots=True)
class Segment:
    """The part of an answer one route produced, and its tokens."""

    route: Route
    text: str
    usage: Usage

    @property
    def cost(self) -> Decimal | None:
        return self.route.cost(self.usage.prompt_tokens, self.usage.completion_tokens)


class RouterError(Exception):
    """A request the router could not place on any route."""

    reason = "router_error"


class ModelNotFound(RouterError):
    """No enabled route serves this model name."""

    reason = "model_not_found"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        super().__init__(f"Unknown model {model_name!r}.")


class AllEndpointsUnavailable(RouterError):
    """Every route failed or was skipped; `retry_after` says when to try again."""

    reason = "all_endpoints_unavailable"

    def __init__(
        self,
        model_name: str,
        *,
        retry_after: float,
        hops: Sequence[Hop] = (),
        last_failure: Hop | None = None,
    ) -> None:
        self.model_name = model_name
        self.retry_after = retry_after
        self.hops = list(hops)
        # The last failure says why, in the upstream's own (cleaned) words.
        why = ""
        if last_failure is not None:
            why = f" (last: {last_failure.endpoint}: {last_failure.message})"
        super().__init__(
            f"Every endpoint for {model_name!r} is unavailable{why}; "
            f"retry in {retry_after:.0f} s."
        )


@dataclass(slots=True)
class RouterResult:
    """The outcome of one routed request."""

    model_name: str
    endpoint_id: int | None = None
    endpoint: str | None = None
    upstream_model: str | None = None
    route: Route | None = None
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0
    hops: list[Hop] = field(default_factory=list)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cached: bool = False
    context: ContextStatus | None = None
    # APIClientError, RouterError or ContextWindowExceeded; `text` keeps what
    # was received before it.
    error: Exception | None = None
    # The consumer stopped reading (stop button, disconnect) before the end.
    stopped: bool = False
    segments: list[Segment] = field(default_factory=list)
    # The upstream body of a plain (non-streaming) answer, for pass-through.
    raw: dict[str, Any] | None = None
    # The gateway's own bound that ended the answer ("max_tokens"), if any.
    limit_reason: str | None = None
    # Every attempt and skip, in order.
    trail: list[Attempt] = field(default_factory=list)
    # How old a cached (degraded-mode) answer is, in seconds.
    cached_age_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.stopped

    @property
    def status(self) -> str:
        """One of gateway.models.UsageStatus's values."""
        if self.error is not None:
            return "error"
        if self.stopped:
            return "cancelled"
        return "cached" if self.cached else "ok"

    @property
    def error_type(self) -> str:
        return type(self.error).__name__ if self.error is not None else ""

    @property
    def cost(self) -> Decimal | None:
        """The price of every segment, or None when no route has prices."""
        costs = [s.cost for s in self.segments if s.cost is not None]
        return sum(costs, Decimal(0)) if costs else None


@dataclass(frozen=True, slots=True)
class Started:
    """An endpoint began answering (again after a mid-stream Fallback)."""

    endpoint: str | None
    endpoint_id: int | None
    upstream_model: str | None
    context: ContextStatus | None
    cached: bool = False


@dataclass(frozen=True, slots=True)
class Delta:
    """New answer text; `chunk` is the upstream chunk it came from (read-only)."""

    text: str
    chunk: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Fallback:
    """An endpoint was skipped or failed and the call moved on."""

    hop: Hop


# Kinds of Status.
FAILOVER = "failover"
RETRY = "retry"
RATE_LIMIT_WAIT = "rate_limit_wait"
HEDGE = "hedge"


@dataclass(frozen=True, slots=True)
class Status:
    """What the call is doing while the answer waits: a live status line.

    `text` is one sentence ready to show ("demo-primary failed (HTTP 503),
    trying demo-fallback…"); the other fields say the same for programs.
    """

    kind: str
    text: str
    endpoint: str
    to_endpoint: str | None = None
    seconds: float | None = None
    status_code: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "endpoint": self.endpoint,
            "to_endpoint": self.to_endpoint,
            "seconds": self.seconds,
            "status_code": self.status_code,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event: the complete result, successful or not."""

    result: RouterResult


RouterEvent = Started | Delta | Fallback | Status | Finished


# --- Retry policy -------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts; `sleep` is injectable for tests."""

    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    # Up to this fraction of the backoff is added at random, so that clients
    # failing together do not retry together.
    jitter: float = 0.25
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random

    @classmethod
    def from_settings(cls, **overrides: Any) -> RetryPolicy:
        """GATEWAY_MAX_BACKOFF and GATEWAY_MAX_RETRY_AFTER, plus overrides."""
        values: dict[str, Any] = {
            "max_backoff": float(getattr(settings, "GATEWAY_MAX_BACKOFF", 30.0)),
            "max_retry_after": float(
                getattr(settings, "GATEWAY_MAX_RETRY_AFTER", 60.0)
            ),
        }
        values.update(overrides)
        return cls(**values)

    def retryable(self, exc: BaseException) -> bool:
        """Whether another attempt on the same endpoint may help."""
        if not isinstance(exc, APIClientError) or exc.permanent or not exc.retryable:
            return False
        return exc.retry_after is None or exc.retry_after <= self.max_retry_after

    def wait(self, config: EndpointConfig, attempt: int, exc: BaseException) -> float:
        """Seconds before attempt number `attempt` + 1."""
        if isinstance(exc, APIClientError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        base = min(self.max_backoff, config.backoff_multiplier * 2 ** (attempt - 1))
        return min(self.max_backoff, base * (1 + self.jitter * self.random()))


# --- The call -----------------------------------------------------------------


@dataclass(slots=True)
class _Candidate:
    route: Route
    messages: list[Message]
    status: ContextStatus
    # The half-open lease this request holds, if it is the trial.
    trial: datetime | None
    # Its place in the call's routes (a lost hedge is put back there).
    index: int = 0
    # The call's generation it was fitted for (see `_Call.continue_answer`).
    generation: int = 0
    circuit_opened: bool = False
    # A request counts once against the breaker however often it retried, so
    # one bad minute of a flaky endpoint does not take it out for everyone.
    failure_counted: bool = False
    # Attempts made on this route by this request, and how the last ended.
    attempts: int = 0
    error: APIClientError | None = None
    # Whether it failed after sending text (its messages are stale then).
    mid_stream: bool = False
    # The route that gets the retries when no other route can answer.
    last_resort: bool = False
    # A wait to do (and say) before the next attempt.
    wait: tuple[float, Status] | None = None
    # The attempt in flight.
    attempt: Attempt | None = None


@dataclass(frozen=True, slots=True)
class _Opened:
    """A route that answered: its stream (and chunks read) or its body."""

    candidate: _Candidate
    value: Any


@dataclass(frozen=True, slots=True)
class _Failed:
    """A route that gave up, and the error it ended with."""

    candidate: _Candidate
    error: APIClientError


# How a hop's reason reads in a status line.
_WHY = {
    "timeout": "timed out",
    "connection_error": "connection failed",
    "server_error": "server error",
    "rate_limited": "rate limited",
    "malformed_response": "bad response",
    "stream_limit": "sent too much",
    "endpoint_rejected": "refused the request",
    "request_deadline": "out of time",
}
_SKIPPED_BECAUSE = {
    "circuit_open": "is down",
    "circuit_half_open": "is being tested by another request",
    "resting": "is rate limited",
    "context_window_exceeded": "cannot fit the conversation",
    "rate_limited_locally": "is at its rate limit",
    "hedge_lost": "was slower",
}
# How fast a route is assumed to answer when its probes have not said.
DEFAULT_EXPECTED_LATENCY = 1.0


def _detail(reason: str, status_code: int | None) -> str:
    if status_code:
        return f"HTTP {status_code}"
    return _WHY.get(reason, reason.replace("_", " "))


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _failover_status(hop: Hop) -> Status:
    """The status line of moving from a hop's endpoint to the next."""
    to = hop.to_endpoint or ""
    if hop.mid_stream:
        text = (
            f"{hop.endpoint} stopped mid-answer "
            f"({_detail(hop.reason, hop.status_code)}), continuing on {to}…"
        )
    elif hop.reason in _SKIPPED_BECAUSE:
        text = f"{hop.endpoint} {_SKIPPED_BECAUSE[hop.reason]}, trying {to}…"
    else:
        text = (
            f"{hop.endpoint} failed ({_detail(hop.reason, hop.status_code)}), "
            f"trying {to}…"
        )
    return Status(
        FAILOVER,
        text,
        hop.endpoint,
        to_endpoint=to,
        status_code=hop.status_code,
        reason=hop.reason,
    )


def _wait_status(name: str, error: APIClientError | None, seconds: float) -> Status:
    """The status line of waiting before another attempt on an endpoint."""
    whole = _whole_seconds(seconds)
    if isinstance(error, APIRateLimitError) or error is None:
        return Status(
            RATE_LIMIT_WAIT,
            f"waiting for {name}'s rate limit ({whole} s)…",
            name,
            seconds=seconds,
            status_code=error.status_code if error is not None else None,
            reason="rate_limited",
        )
    return Status(
        RETRY,
        f"{name} failed ({_detail(error.reason, error.status_code)}), "
        f"retrying in {whole} s…",
        name,
        seconds=seconds,
        status_code=error.status_code,
        reason=error.reason,
    )


async def _no_sleep(seconds: float) -> None:
    """Tenacity's sleep: the router waits itself, after saying so."""


def _as_dict(message: Message) -> Mapping[str, Any]:
    return message.to_dict() if isinstance(message, ContextMessage) else message


def _clean_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    if not params:
        return {}
    return {k: v for k, v in params.items() if k not in _RESERVED_PARAMS}


async def _persist_no_stream_usage(config: EndpointConfig) -> None:
    if config.id is not None:
        await Endpoint.objects.filter(id=config.id, supports_stream_usage=True).aupdate(
            supports_stream_usage=False
        )


class _Call:
    """The state of one routed request."""

    kind: str = RouteKind.CHAT

    def __init__(
        self,
        model_name: str,
        messages: Sequence[Message],
        *,
        params: Mapping[str, Any] | None,
        admit: Admit | None,
        policy: RetryPolicy | None,
        cache_scope: str,
    ) -> None:
        self.model_name = model_name
        self.original = list(messages)
        self.messages: list[Message] = self.original
        self.params = _clean_params(params)
        self.admit = admit
        self.policy = policy or RetryPolicy.from_settings()
        self.cache_scope = cache_scope
        self.started = time.perf_counter()
        self.routes: list[Route] = []
        self.index = 0
        self.attempts = 0
        self.hops: list[Hop] = []
        self.pending: list[Hop] = []
        self.retry_hints: list[float] = []
        self.context_error: ContextWindowExceeded | None = None
        self.segments: list[Segment] = []
        self.text_parts: list[str] = []
        self.ttft_ms: float | None = None
        self.result: RouterResult | None = None
        # The route answering now, and what it has sent so far.
        self.current: _Candidate | None = None
        self.last_candidate: _Candidate | None = None
        # Routes tried, in order; routes skipped because they rest.
        self.tried: list[_Candidate] = []
        self.rested: list[Route] = []
        # Bumped when a mid-stream failover changes the messages.
        self.generation = 0
        # Whether the retries of last resort were spent (once per generation).
        self.resorted = False
        self.trail: list[Attempt] = []
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Any = None
        seconds = float(
            getattr(
                settings, "GATEWAY_REQUEST_MAX_SECONDS", DEFAULT_REQUEST_MAX_SECONDS
            )
        )
        self.max_seconds = seconds
        # time.monotonic(), like the client's timers.
        self.deadline = time.monotonic() + seconds
        self.deadline_error: APIDeadlineError | None = None
        # Output counting of the route answering now (see `take_chunk`).
        self.counter: tokens.TokenCounter | None = None
        self.output_limit = 0
        self.counted_parts = 0
        self.counted_tokens = 0
        self.uncounted_chars = 0
        self.count_step = 0
        self.cut = False
        # The most output `admit` granted (OutputCap), for every route after.
        self.output_cap: int | None = None

    # -- time

    def out_of_time(self) -> bool:
        """Whether the whole-request deadline has passed (noting the error once)."""
        if time.monotonic() < self.deadline:
            return False
        if self.deadline_error is None:
            candidate = self.last_candidate
            self.deadline_error = APIDeadlineError(
                f"the request reached its {self.max_seconds:g}-second limit",
                endpoint=(candidate.route.endpoint if candidate else self.model_name),
            )
        return True

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def bounded_wait(self, seconds: float) -> float:
        """A wait cut to the time the request has left."""
        return min(self.seconds_left(), max(0.0, seconds))

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def route_failed(self, failed: _Failed) -> bool:
        """Note a route that gave up (a hop); whether its error ends the call."""
        candidate = failed.candidate
        self.skip(
            candidate.route,
            failed.error.reason,
            error=failed.error,
            attempts=candidate.attempts,
        )
        return self.ended_by(failed.error)

    def ended_by(self, exc: APIClientError) -> bool:
        """Whether an error ends the whole call (no retry, no other route)."""
        if isinstance(exc, APIDeadlineError):
            if self.deadline_error is None:
                self.deadline_error = exc
            return True
        return exc.permanent

    # -- route selection

    async def load(self, routes: Sequence[Route] | None) -> bool:
        """Load the routes; False when the model has none."""
        self.routes = (
            list(routes)
            if routes is not None
            else await load_routes(self.model_name, kind=self.kind)
        )
        return bool(self.routes)

    def skip(
        self,
        route: Route,
        reason: str,
        *,
        error: APIClientError | None = None,
        attempts: int = 0,
        mid_stream: bool = False,
    ) -> None:
        """Note a hop; its destination is filled in when the next route starts."""
        config = route.endpoint
        if not attempts:
            # Attempts are in the trail already; a skip is its own entry.
            self.trail.append(
                Attempt(
                    config.name,
                    config.id,
                    self.elapsed_ms(),
                    outcome=SKIPPED,
                    reason=reason,
                )
            )
        self.pending.append(
            Hop(
                endpoint=config.name,
                endpoint_id=config.id,
                reason=reason,
                error_type=type(error).__name__ if error is not None else None,
                status_code=error.status_code if error is not None else None,
                message=error.message if error is not None else "",
                attempts=attempts,
                mid_stream=mid_stream,
            )
        )
        if error is not None:
            logger.warning(
                "%s: %s on %s after %d attempt(s)%s: %s",
                self.model_name,
                reason,
                config.name,
                attempts,
                " mid-stream" if mid_stream else "",
                error,
            )

    def take_hops(self, to: str | None) -> list[Hop]:
        """The pending hops, now that their destination is known."""
        hops = [replace(hop, to_endpoint=to) if to else hop for hop in self.pending]
        self.pending = []
        self.hops.extend(hops)
        return hops

    async def next_candidate(self) -> _Candidate | None:
        """The next route that may be tried, after noting every skipped one."""
        while self.index < len(self.routes):
            if self.out_of_time():
                return None
            index = self.index
            self.index += 1
            candidate = await self.prepare(self.routes[index], index)
            if candidate is not None:
                return candidate
        return None

    async def prepare(
        self, route: Route, index: int, *, rest_over: bool = False
    ) -> _Candidate | None:
        """A candidate for a route, or None after noting why it is skipped.

        `rest_over`: the caller waited out the route's rate-limit rest.
        """
        config = route.endpoint
        now = timezone.now()
        state = breaker.state(config, now)
        if state is breaker.BreakerState.OPEN:
            self.retry_hints.append(breaker.seconds_until_half_open(config, now))
            self.skip(route, "circuit_open")
            return None
        if not rest_over and (left := resting.seconds_left(config, now)) > 0:
            self.retry_hints.append(left)
            self.rested.append(route)
            self.skip(route, "resting")
            return None
        # A model's first request loads its encoding off the event loop.
        await tokens.ensure_loaded(route.upstream_model)
        try:
            messages, status = self.fit(route)
        except ContextWindowExceeded as exc:
            self.context_error = exc
            self.skip(route, "context_window_exceeded")
            return None
        if self.admit is not None:
            verdict = await self.admit(
                config, status.tokens + self._output_tokens(route)
            )
            if not verdict:
                self.skip(route, "rate_limited_locally")
                return None
            if isinstance(verdict, OutputCap):
                cap = max(0, verdict.tokens)
                self.output_cap = (
                    cap if self.output_cap is None else min(cap, self.output_cap)
                )
        trial = None
        if state is breaker.BreakerState.HALF_OPEN:
            trial = await breaker.claim_trial(config, now)
            # Whoever won, the snapshot's disabled_until is stale now.
            forget_routes()
            if trial is None:
                self.retry_hints.append(breaker.trial_lease(config).total_seconds())
                self.skip(route, "circuit_half_open")
                return None
        return _Candidate(
            route, messages, status, trial, index=index, generation=self.generation
        )

    async def last_resort(self) -> _Candidate | None:
        """Once every route was tried: the one to spend the retries on, if any.

        Failing over is faster than backing off, so routes get one attempt
        (plus their own `retries_before_failover`) while another route can take
        the request.  When none is left, the retries with exponential backoff
        go to the last route that may still answer: the latest tried whose
        error is worth another attempt, else a resting route whose rest ends
        within GATEWAY_MAX_RETRY_AFTER.  Its first wait is set on it.
        """
        if self.resorted or self.out_of_time():
            return None
        self.resorted = True
        policy = self.policy
        for candidate in reversed(self.tried):
            if candidate.generation != self.generation:
                break
            config = candidate.route.endpoint
            error = candidate.error
            if (
                error is None
                or candidate.trial is not None
                or candidate.circuit_opened
                or candidate.mid_stream
                or candidate.attempts >= config.max_retries
                or not policy.retryable(error)
            ):
                continue
            candidate.last_resort = True
            # Tried again, not left: its hop is noted again if it fails again.
            self.pending = [
                hop
                for hop in self.pending
                if hop.endpoint_id != config.id or hop.endpoint != config.name
            ]
            seconds = self.bounded_wait(policy.wait(config, candidate.attempts, error))
            candidate.wait = (seconds, _wait_status(config.name, error, seconds))
            return candidate
        now = timezone.now()
        for route in sorted(
            self.rested, key=lambda r: resting.seconds_left(r.endpoint, now)
        ):
            left = resting.seconds_left(route.endpoint, now)
            if left > policy.max_retry_after or left >= self.seconds_left():
                continue
            candidate = await self.prepare(
                route, self.routes.index(route), rest_over=True
            )
            if candidate is not None:
                candidate.last_resort = True
                candidate.wait = (left, _wait_status(route.endpoint.name, None, left))
                return candidate
        return None

    def fit(self, route: Route) -> tuple[list[Message], ContextStatus]:
        """The messages as sent to a route, fitted to its window, and their size."""
        return fit_context(
            self.messages,
            model=route.upstream_model,
            context_window=route.context_window,
            max_output_tokens=route.max_output_tokens,
        )

    def next_route_latency(self, candidate: _Candidate) -> float:
        """How soon the next usable route is expected to answer (inf: none)."""
        now = timezone.now()
        for route in self.routes[candidate.index + 1 :]:
            config = route.endpoint
            if breaker.state(config, now) is breaker.BreakerState.OPEN:
                continue
            if resting.seconds_left(config, now) > 0:
                continue
            if config.last_latency_ms is not None:
                return config.last_latency_ms / 1000
            return DEFAULT_EXPECTED_LATENCY
        return math.inf

    def _output_tokens(self, route: Route) -> int:
        asked = self.params.get("max_completion_tokens") or self.params.get(
            "max_tokens"
        )
        limit = self._output_limit(route)
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            return min(asked, limit)
        return limit

    def _output_limit(self, route: Route) -> int:
        """The route's max_output_tokens, lowered to what `admit` granted."""
        if self.output_cap is None:
            return route.max_output_tokens
        return min(route.max_output_tokens, self.output_cap)

    def output_allowance(self, route: Route) -> int:
        """The most output tokens a route's answer may have before it is cut."""
        asked = self._output_tokens(route)
        allowance = asked + int(asked * OUTPUT_SLACK_RATIO) + OUTPUT_SLACK_TOKENS
        if self.output_cap is not None:
            # Only these were reserved: no slack past them.
            return min(allowance, self.output_cap)
        return allowance

    @property
    def limit_reason(self) -> str:
        """Which bound a cut answer reached: the budget's, or its max_tokens."""
        return "budget" if self.output_cap is not None else "max_tokens"

    def payload(self, candidate: _Candidate) -> dict[str, Any]:
        """The request body for a route."""
        body = dict(self.params)
        route = candidate.route
        # The window was fitted for this much output; more could not fit
        # (and a budget may have granted less).
        limit = self._output_limit(route)
        for name in ("max_completion_tokens", "max_tokens"):
            asked = body.get(name)
            if isinstance(asked, int) and asked > limit:
                body[name] = limit
        body["model"] = route.upstream_model
        body["messages"] = [_as_dict(m) for m in candidate.messages]
        return body

    # -- attempts

    def attempts_allowed(
        self, candidate: _Candidate, error: BaseException | None
    ) -> int:
        """How many attempts this route gets in all, after `error`."""
        config = candidate.route.endpoint
        if candidate.trial is not None:
            return 1
        if candidate.last_resort:
            return config.max_retries
        allowed = 1 + config.retries_before_failover
        if (
            isinstance(error, APIRateLimitError)
            and error.retry_after is not None
            and error.retry_after <= self.next_route_latency(candidate)
        ):
            # Waiting the rate limit out is quicker than the next route.
            allowed = max(allowed, config.max_retries)
        return allowed

    def route_done(self, candidate: _Candidate, error: BaseException | None) -> bool:
        """After a failed attempt: whether this route gets no more."""
        return (
            candidate.attempts >= self.attempts_allowed(candidate, error)
            # Once this request's failure opened the circuit, fail over now.
            or candidate.circuit_opened
            or self.out_of_time()
        )

    def plan_retry(
        self, candidate: _Candidate, error: APIClientError, seconds: float
    ) -> None:
        """Set the wait (and its status line) before the route's next attempt."""
        name = candidate.route.endpoint.name
        candidate.wait = (seconds, _wait_status(name, error, seconds))
        logger.info(
            "%s: retrying %s in %.1f s after %s", self.model_name, name, seconds, error
        )

    def retrying(self, candidate: _Candidate) -> AsyncRetrying:
        """Tenacity for one route; it only decides, the caller waits (`wait`)."""
        config = candidate.route.endpoint
        policy = self.policy

        def stop(state: RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            return self.route_done(candidate, error)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.bounded_wait(policy.wait(config, candidate.attempts, error))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            assert isinstance(error, APIClientError)
            self.plan_retry(candidate, error, state.upcoming_sleep)

        return AsyncRetrying(
            stop=_StopIf(stop),
            wait=wait,
            retry=_RetryIf(policy.retryable),
            sleep=_no_sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    # -- the trail

    def begin_attempt(self, candidate: _Candidate) -> Attempt:
        """An attempt on a route starts: count it and put it on the trail."""
        config = candidate.route.endpoint
        self.attempts += 1
        candidate.attempts += 1
        self.last_candidate = candidate
        if candidate.attempts == 1:
            self.tried.append(candidate)
        attempt = Attempt(config.name, config.id, self.elapsed_ms())
        self.trail.append(attempt)
        candidate.attempt = attempt
        return attempt

    def end_attempt(
        self,
        attempt: Attempt,
        outcome: str,
        error: BaseException | None = None,
        *,
        mid_stream: bool = False,
    ) -> None:
        """Say how an attempt ended (once; later calls change nothing)."""
        if attempt.outcome != OPEN:
            return
        attempt.outcome = outcome
        attempt.duration_ms = self.elapsed_ms() - attempt.started_ms
        attempt.mid_stream = mid_stream
        if isinstance(error, APIClientError):
            attempt.reason = error.reason
            attempt.status_code = error.status_code
        elif error is not None and outcome == FAILED:
            attempt.reason = type(error).__name__

    def lost_hedge(self, candidate: _Candidate) -> None:
        """A hedged attempt lost the race: it was cancelled, and cost a prompt."""
        attempt = candidate.attempt
        if attempt is not None and attempt.outcome in (OPEN, CANCELLED):
            attempt.outcome = OPEN
            self.end_attempt(attempt, HEDGE_LOST)
            attempt.prompt_tokens = candidate.status.tokens

    def close_trail(self, outcome: str) -> None:
        """End the attempts still open when the call ends."""
        for attempt in self.trail:
            self.end_attempt(attempt, outcome)

    async def failed_attempt(self, candidate: _Candidate, exc: BaseException) -> None:
        """Note a failed attempt: on the trail, on the breaker, as a rest."""
        attempt = candidate.attempt
        if attempt is not None:
            cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            self.end_attempt(attempt, CANCELLED if cancelled else FAILED, exc)
        if not isinstance(exc, APIClientError):
            return
        candidate.error = exc
        if exc.retry_after is not None:
            self.retry_hints.append(exc.retry_after)
        config = candidate.route.endpoint
        if exc.permanent or config.id is None:
            return
        if isinstance(exc, APIRateLimitError):
            # Busy, not down: a 429 never counts against the breaker.  With a
            # Retry-After the endpoint rests, and requests skip it till then.
            if exc.retry_after:
                await resting.rest(config.id, exc.retry_after)
                forget_routes()
            if candidate.trial is not None:
                # It answered, so it is up: the trial closes the circuit.
                await self.succeeded(candidate)
            return
        if isinstance(exc, APIEmptyStreamError):
            # It answered, and the request was what it refused (a prompt over
            # its window): one long prompt must not open the circuit for all.
            if candidate.trial is not None:
                await self.succeeded(candidate)
            return
        if isinstance(exc, APIDeadlineError) and candidate.trial is None:
            # The request's own time ran out (maybe on earlier routes): not a
            # sign of this endpoint's health.  A trial still ends as a failure.
            return
        if candidate.failure_counted and candidate.trial is None:
            return
        candidate.failure_counted = True
        # The snapshot's failure count is stale now.
        forget_routes()
        candidate.circuit_opened = await breaker.record_failure(
            config.id,
            threshold=config.failure_threshold,
            cooldown_seconds=config.cooldown_seconds,
            trial_until=candidate.trial,
        )

    async def succeeded(self, candidate: _Candidate) -> None:
        """Close the breaker when this endpoint had failures on record."""
        config = candidate.route.endpoint
        if config.id is not None and (
            candidate.trial is not None
            or config.consecutive_failures
            or candidate.failure_counted
        ):
            forget_routes()
            await breaker.record_success(config.id)

    # -- results

    def begin(self, candidate: _Candidate) -> None:
        """A route starts answering."""
        self.current = candidate
        self.parts = []
        self.finish_reason = None
        self.usage = None
        route = candidate.route
        self.counter = tokens.counter_for(route.upstream_model)
        self.output_limit = self.output_allowance(route)
        self.counted_parts = 0
        self.counted_tokens = 0
        self.uncounted_chars = 0
        self.count_step = max(MIN_COUNT_STEP_CHARS, self.output_limit // 2)

    def take_chunk(self, chunk: dict[str, Any]) -> Delta | None:
        """Account for one upstream chunk; the Delta to pass on, if any.

        Sets `cut` when the answer has gone past its output allowance.
        """
        choice = _first_choice(chunk)
        text, has_content = _content(choice)
        if choice is not None and choice.get("finish_reason"):
            self.finish_reason = _finish_reason(choice["finish_reason"])
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        if not has_content:
            return None
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000
        self.uncounted_chars += len(text)
        if self.uncounted_chars >= self.count_step:
            text = self._count_output(text)
            if not text:
                return None
        self.parts.append(text)
        self.text_parts.append(text)
        return Delta(text, chunk)

    def _count_output(self, text: str) -> str:
        """Count what came since the last count, `text` included; what to keep.

        Only new text is counted: one pass in all.  The step shrinks with what
        is left, so the cut lands close to the limit; the chunk that crosses
        it keeps only what fits.
        """
        counter = self.counter
        assert counter is not None
        earlier = self.counted_tokens
        if self.counted_parts < len(self.parts):
            earlier += counter.text("".join(self.parts[self.counted_parts :]))
        self.counted_parts = len(self.parts) + 1
        self.uncounted_chars = 0
        self.counted_tokens = earlier + counter.text(text)
        left = self.output_limit - self.counted_tokens
        self.count_step = max(MIN_COUNT_STEP_CHARS, left // 2)
        if left >= 0:
            return text
        self.cut = True
        kept = _truncate(counter, text, max(0, self.output_limit - earlier))
        self.counted_tokens = earlier + counter.text(kept)
        if not kept:
            self.counted_parts = len(self.parts)
        return kept

    def cut_plain(self, candidate: _Candidate, text: str) -> str:
        """A plain answer's text, cut when it exceeds the output allowance."""
        route = candidate.route
        limit = self.output_allowance(route)
        # Counting is linear in the text: no honest answer is longer than this.
        text = text[: limit * MAX_CHARS_PER_TOKEN]
        counter = tokens.counter_for(route.upstream_model)
        if counter.text(text) <= limit:
            return text
        self.cut = True
        return _truncate(counter, text, limit)

    def end_segment(self) -> None:
        """The current route is done, fully or not: record what it produced."""
        if self.current is not None:
            self.segment(
                self.current, "".join(self.parts), self.usage, self._counted_output
            )
            self.current = None

    def _counted_output(self) -> int:
        # Most of the text was counted on the way (for the output bound).
        assert self.counter is not None
        tail = "".join(self.parts[self.counted_parts :])
        return self.counted_tokens + self.counter.text(tail)

    def segment(
        self,
        candidate: _Candidate,
        text: str,
        usage: Any,
        counted: Callable[[], int] | None = None,
    ) -> None:
        """Record what one route produced; count it ourselves if it did not say.

        `counted` gives our count of `text` more cheaply than counting it all.
        """
        self.segments.append(
            Segment(candidate.route, text, self._usage(candidate, text, usage, counted))
        )

    def _usage(
        self,
        candidate: _Candidate,
        text: str,
        usage: Any,
        counted: Callable[[], int] | None,
    ) -> Usage:
        """Upstream's counts when they are believable, else ours (estimated)."""
        route = candidate.route
        ours = candidate.status.tokens
        prompt: int | None = None
        completion: int | None = None
        if isinstance(usage, Mapping):
            prompt = _count(
                usage.get("prompt_tokens"),
                max(
                    ours * PROMPT_USAGE_FACTOR + PROMPT_USAGE_SLACK,
                    route.context_window,
                ),
            )
            completion = _count(
                usage.get("completion_tokens"), self.output_allowance(route)
            )
            if (prompt is None or completion is None) and usage:
                logger.warning(
                    "%s: %s reported unusable usage numbers; counting them here",
                    self.model_name,
                    route.endpoint.name,
                )
        if prompt is not None and completion is not None:
            return Usage(prompt, completion, False)
        if completion is None:
            completion = (
                counted()
                if counted is not None
                else tokens.count_text(text, route.upstream_model)
            )
            if self.cut:
                # The cut kept what fits the allowance; an estimate summed
                # over pieces may round past it, and a budget's cap is exact.
                completion = min(completion, self.output_allowance(route))
        return Usage(ours if prompt is None else prompt, completion, True)

    def unavailable(self) -> Exception:
        """The error for a call that found no route to answer."""
        if self.deadline_error is not None:
            return self.deadline_error
        tried = any(h.reason != "context_window_exceeded" for h in self.hops)
        if self.context_error is not None and not tried:
            return self.context_error
        hints = [h for h in self.retry_hints if h > 0]
        failures = [h for h in (*self.hops, *self.pending) if h.message]
        return AllEndpointsUnavailable(
            self.model_name,
            retry_after=min(hints) if hints else DEFAULT_RETRY_AFTER,
            hops=self.hops,
            last_failure=failures[-1] if failures else None,
        )

    def finish(
        self,
        *,
        candidate: _Candidate | None = None,
        finish_reason: str | None = None,
        error: Exception | None = None,
        stopped: bool = False,
        cached: bool = False,
        cached_age_s: float | None = None,
        raw: dict[str, Any] | None = None,
    ) -> RouterResult:
        """Build the result once; later calls return the same one."""
        if self.result is not None:
            return self.result
        self.take_hops(None)
        if stopped:
            self.close_trail(CANCELLED)
        else:
            self.close_trail(FAILED if error is not None else OK)
        # The endpoint that produced the (last part of the) answer, else the
        # one that failed last.
        route = self.segments[-1].route if self.segments else None
        if route is None and not cached:
            last = candidate or self.last_candidate
            route = last.route if last is not None else None
        usage = Usage()
        for segment in self.segments:
            usage += segment.usage
        self.result = RouterResult(
            model_name=self.model_name,
            endpoint_id=route.endpoint.id if route else None,
            endpoint=route.endpoint.name if route else None,
            upstream_model=route.upstream_model if route else None,
            route=route,
            text="".join(self.text_parts),
            finish_reason=finish_reason,
            usage=usage,
            attempts=self.attempts,
            hops=self.hops,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            ttft_ms=self.ttft_ms,
            cached=cached,
            context=candidate.status if candidate is not None else None,
            error=error,
            stopped=stopped,
            segments=self.segments,
            raw=raw,
            limit_reason=self.limit_reason if self.cut else None,
            trail=self.trail,
            cached_age_s=cached_age_s,
        )
        return self.result

    def continue_answer(self) -> None:
        """Ask the next route to continue the answer from where it stopped."""
        self.generation += 1
        self.resorted = False
        self.messages = [
            *self.original,
            {"role": "assistant", "content": "".join(self.text_parts)},
            {"role": "user", "content": CONTINUE_INSTRUCTION},
        ]

    def settle_stopped(self) -> None:
        """The consumer went away before the end: keep what was produced."""
        if self.result is None:
            self.end_segment()
            self.finish(candidate=self.last_candidate, stopped=True)

    async def remember(self, result: RouterResult) -> None:
        """Keep a complete answer for degraded mode."""
        if (
            result.text
            and result.finish_reason
            and not result.limit_reason
            and response_cache.enabled()
        ):
            await response_cache.store(
                self.cache_key(),
                response_cache.CachedAnswer(
                    text=result.text,
                    finish_reason=result.finish_reason,
                    endpoint=result.endpoint or "",
                    upstream_model=result.upstream_model or "",
                    stored_at=time.time(),
                ),
            )

    async def cached_answer(self) -> response_cache.CachedAnswer | None:
        """The kept answer to this exact conversation, if any."""
        return await response_cache.lookup(self.cache_key())

    def cache_key(self) -> str:
        return response_cache.cache_key(
            self.model_name, [_as_dict(m) for m in self.original], self.cache_scope
        )


class _StopIf(stop_base):
    """A tenacity stop condition on the state of the call."""

    def __init__(self, condition: Callable[[RetryCallState], bool]) -> None:
        self.condition = condition

    def __call__(self, state: RetryCallState) -> bool:
        return self.condition(state)


class _RetryIf:
    """A tenacity retry condition on the attempt's exception."""

    def __init__(self, predicate: Callable[[BaseException], bool]) -> None:
        self.predicate = predicate

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return exc is not None and self.predicate(exc)


def _first_choice(chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
    choices = chunk.get("choices")
    if choices and isinstance(choices, list):
        choice = choices[0]
        if isinstance(choice, Mapping):
            return choice
    return None


def _content(choice: Mapping[str, Any] | None) -> tuple[str, bool]:
    """The text of a chunk's first choice, and whether it carries anything."""
    if choice is None:
        return "", False
    delta = choice.get("delta")
    if not isinstance(delta, Mapping):
        return "", False
    text = delta.get("content")
    if text:
        if type(text) is not str:
            text = _parts_text(text)
        if text:
            if not text.isascii() or "\x00" in text:
                text = sanitize.clean_content(text)
            return text, True
    # Tool calls, refusals and reasoning are content too, just not text.
    return "", any(value for key, value in delta.items() if key != "role")


def _parts_text(content: Any) -> str:
    """The text of content given as a list of parts; "" for anything else."""
    if not isinstance(content, list):
        return ""
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, Mapping) and isinstance(part.get("text"), str)
    )


def _plain_text(message: Any) -> str:
    """The answer text of a plain completion's message, whatever its shape."""
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    text = content if isinstance(content, str) else _parts_text(content)
    return sanitize.clean_content(text) if text else ""


def _truncate(counter: tokens.TokenCounter, text: str, limit: int) -> str:
    """The start of a text that holds at most `limit` tokens (as counted)."""
    if limit <= 0:
        return ""
    if counter.encoding is not None:
        ids = counter.encoding.encode_ordinary(text)[:limit]
        return counter.encoding.decode(ids, errors="ignore")
    kept = text.encode("utf-8", "surrogatepass")[
        : limit * tokens.BYTES_PER_ESTIMATED_TOKEN
    ]
    return kept.decode("utf-8", "ignore")


def _finish_reason(value: Any) -> str | None:
    return sanitize.clean_identifier(value, limit=FINISH_REASON_CHARS) or None


def _count(value: Any, limit: int) -> int | None:
    """A token count from upstream, or None unless it is an int in 0..limit."""
    if type(value) is int and 0 <= value <= limit:
        return value
    return None


# --- Streaming ----------------------------------------------------------------


class ChatStream:
    """The events of one streamed chat request; `result` once it has ended.

    Iterate it for `Started`, `Delta`, `Fallback` and a final `Finished`.  When
    the caller stops early (stop button, disconnect), `aclose()` (or leaving
    `async with`) closes the upstream request, and `result` is still set, with
    `stopped=True`, the partial text and estimated usage.
    """

    __slots__ = ("_call", "_events")

    def __init__(self, call: _Call, events: Any) -> None:
        self._call = call
        self._events = events

    def __aiter__(self) -> ChatStream:
        return self

    def __anext__(self) -> Awaitable[RouterEvent]:
        return self._events.__anext__()

    async def aclose(self) -> None:
        """Stop: close the upstream request and settle the result."""
        await self._events.aclose()
        self._call.settle_stopped()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def result(self) -> RouterResult | None:
        """The result, once the stream has finished or been closed."""
        return self._call.result


def stream_chat(
    model_name: str,
    messages: Sequence[Message],
    *,
    params: Mapping[str, Any] | None = None,
    admit: Admit | None = None,
    routes: Sequence[Route] | None = None,
    policy: RetryPolicy | None = None,
    cache_scope: str = "",
) -> ChatStream:
    """Stream a chat answer over the model's routes.

    `messages` are OpenAI-style dicts or `ContextMessage` objects (pins and
    importance guide context fitting); `params` go upstream as they are (the
    router sets model, messages and stream, and caps max_tokens at the route's
    max_output_tokens).  `routes` skips the query when the caller has them.
    `cache_scope` separates degraded-mode answers, for example per user.
    """
    call = _Call(
        model_name,
        messages,
        params=params,
        admit=admit,
        policy=policy,
        cache_scope=cache_scope,
    )
    return ChatStream(call, _stream_events(call, routes))


async def _stream_events(
    call: _Call, routes: Sequence[Route] | None
) -> AsyncIterator[RouterEvent]:
    stream: Any = None
    try:
        if not await call.load(routes):
            yield Finished(call.finish(error=ModelNotFound(call.model_name)))
            return
        while True:
            candidate = await call.next_candidate() or await call.last_resort()
            if candidate is None:
                break
            for event in _switch_events(call, candidate):
                yield event
            opened: _Opened | None = None
            # Closed at once if the caller goes: a hedge's attempts end with it.
            attempts = contextlib.aclosing(_attempts(call, candidate, _open_stream))
            async with attempts as items:
                async for item in items:
                    if isinstance(item, Status):
                        yield item
                    elif isinstance(item, _Failed):
                        if call.route_failed(item):
                            for hop in call.take_hops(None):
                                yield Fallback(hop)
                            yield Finished(
                                call.finish(candidate=item.candidate, error=item.error)
                            )
                            return
                    else:
                        opened = item
            if opened is None:
                continue
            candidate = opened.candidate
            stream, buffered = opened.value
            for hop in call.take_hops(candidate.route.endpoint.name):
                yield Fallback(hop)
            await call.succeeded(candidate)
            call.begin(candidate)
            route = candidate.route
            yield Started(
                route.endpoint.name,
                route.endpoint.id,
                route.upstream_model,
                candidate.status,
            )
            try:
                for chunk in buffered:
                    delta = call.take_chunk(chunk)
                    if delta is not None:
                        yield delta
                if not call.cut:
                    async for chunk in stream:
                        delta = call.take_chunk(chunk)
                        if delta is not None:
                            yield delta
                        if call.cut:
                            break
            except APIClientError as exc:
                await stream.aclose()
                stream = None
                call.end_segment()
                assert candidate.attempt is not None
                call.end_attempt(candidate.attempt, FAILED, exc, mid_stream=True)
                candidate.mid_stream = True
                await call.failed_attempt(candidate, exc)
                call.skip(
                    route,
                    exc.reason,
                    error=exc,
                    attempts=candidate.attempts,
                    mid_stream=True,
                )
                if call.ended_by(exc):
                    for hop in call.take_hops(None):
                        yield Fallback(hop)
                    yield Finished(call.finish(candidate=candidate, error=exc))
                    return
                call.continue_answer()
                continue
            if call.cut:
                # Past max_tokens: the upstream would go on, so close it now.
                await stream.aclose()
                call.finish_reason = "length"
            stream = None
            call.end_segment()
            result = call.finish(candidate=candidate, finish_reason=call.finish_reason)
            await call.remember(result)
            yield Finished(result)
            return

        error = call.unavailable()
        if not call.text_parts and isinstance(error, AllEndpointsUnavailable):
            answer = await call.cached_answer()
            if answer is not None:
                for hop in call.take_hops(None):
                    yield Fallback(hop)
                yield Started(None, None, answer.upstream_model, None, cached=True)
                call.text_parts.append(answer.text)
                yield Delta(answer.text)
                yield Finished(
                    call.finish(
                        finish_reason=answer.finish_reason,
                        cached=True,
                        cached_age_s=answer.age_seconds(),
                    )
                )
                return
        for hop in call.take_hops(None):
            yield Fallback(hop)
        yield Finished(call.finish(candidate=call.last_candidate, error=error))
    except (GeneratorExit, asyncio.CancelledError):
        raise
    except Exception as exc:
        # A bug, not an upstream failure: the caller sees it, the result says so.
        call.end_segment()
        call.finish(candidate=call.last_candidate, error=exc)
        raise
    finally:
        if stream is not None:
            await stream.aclose()
        call.settle_stopped()


def _switch_events(call: _Call, candidate: _Candidate) -> list[RouterEvent]:
    """The hops that led to a route about to be tried, and their status line.

    A route tried again as the last resort says its own wait instead.
    """
    hops = call.take_hops(candidate.route.endpoint.name)
    events: list[RouterEvent] = [Fallback(hop) for hop in hops]
    if hops and candidate.wait is None:
        events.append(_failover_status(hops[-1]))
    return events


Once = Callable[["_Call", _Candidate], Awaitable[Any]]
# How a plain request is run over its routes (`_complete`, `_embed`).
Runner = Callable[["_Call", Sequence[Route] | None], Awaitable["RouterResult"]]


async def _attempts(
    call: _Call, candidate: _Candidate, once: Once
) -> AsyncIterator[Status | _Opened | _Failed]:
    """Try one route as the policy allows: its statuses, then how it ended.

    Yields a `Status` before each wait (the wait happens here, after the
    caller has shown it), then `_Opened` or `_Failed`; a hedged route may
    yield the `_Failed` of one route and the `_Opened` of another.
    """
    if _hedges(call, candidate):
        async for item in _hedged(call, candidate, once):
            yield item
        return
    if candidate.wait is None:
        # Most requests end at their first attempt: it needs no retry
        # machinery (tenacity costs tens of microseconds per call).
        try:
            value = await once(call, candidate)
        except APIClientError as exc:
            if not call.policy.retryable(exc) or call.route_done(candidate, exc):
                yield _Failed(candidate, exc)
                return
            config = candidate.route.endpoint
            seconds = call.bounded_wait(
                call.policy.wait(config, candidate.attempts, exc)
            )
            call.plan_retry(candidate, exc, seconds)
        else:
            yield _Opened(candidate, value)
            return
    try:
        async for attempt in call.retrying(candidate):
            if candidate.wait is not None:
                seconds, status = candidate.wait
                candidate.wait = None
                if seconds > 0:
                    yield status
                    await call.policy.sleep(seconds)
            with attempt:
                value = await once(call, candidate)
    except APIClientError as exc:
        yield _Failed(candidate, exc)
        return
    yield _Opened(candidate, value)


def _hedges(call: _Call, candidate: _Candidate) -> bool:
    """Whether a route's first attempt races the next route after a delay."""
    return (
        candidate.route.hedge_after_ms is not None
        and candidate.attempts == 0
        and candidate.trial is None
        and not candidate.last_resort
        and candidate.wait is None
    )


async def _hedged(
    call: _Call, first: _Candidate, once: Once
) -> AsyncIterator[Status | _Opened | _Failed]:
    """Start a route; if it has not answered in its hedge delay, race the next.

    The first to answer wins and the other is cancelled (its attempt is on
    the trail as `hedge_lost`, with the prompt tokens it was sent).  When the
    first route wins, the next one is put back in line for a later failover.
    """
    assert first.route.hedge_after_ms is not None
    racing: dict[asyncio.Future[Any], _Candidate] = {
        asyncio.ensure_future(once(call, first)): first
    }
    mark = (call.index, len(call.pending))
    winner: _Opened | None = None
    failures: list[_Failed] = []

    def lost(candidate: _Candidate) -> None:
        call.lost_hedge(candidate)
        if candidate is first:
            call.skip(first.route, "hedge_lost", attempts=first.attempts)
        else:
            # Not tried to the end: it may take a later failover.
            call.index = mark[0]
            del call.pending[mark[1] :]

    try:
        done, _ = await asyncio.wait(racing, timeout=first.route.hedge_after_ms / 1000)
        if not done:
            second = await call.next_candidate()
            if second is not None:
                yield Status(
                    HEDGE,
                    f"{first.route.endpoint.name} is slow, "
                    f"also trying {second.route.endpoint.name}…",
                    first.route.endpoint.name,
                    to_endpoint=second.route.endpoint.name,
                    seconds=first.route.hedge_after_ms / 1000,
                )
                racing[asyncio.ensure_future(once(call, second))] = second
        while racing and winner is None:
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                candidate = racing.pop(future)
                error = future.exception()
                if error is None and winner is None:
                    winner = _Opened(candidate, future.result())
                elif error is None:
                    # Both answered at once: the later one is a loser too.
                    await _discard(future.result())
                    lost(candidate)
                elif isinstance(error, APIClientError):
                    failures.append(_Failed(candidate, error))
                else:
                    raise error
    finally:
        for future in racing:
            future.cancel()
        # Our own cancellation still propagates from here.
        ended = await asyncio.gather(*racing, return_exceptions=True)
        for (_, candidate), value in zip(racing.items(), ended, strict=True):
            await _discard(value)
            if winner is not None:
                lost(candidate)
    for failure in failures:
        yield failure
    if winner is not None:
        call.last_candidate = winner.candidate
        yield winner


async def _discard(value: Any) -> None:
    """Close what a lost attempt opened (a stream; a plain body needs nothing)."""
    if isinstance(value, tuple) and value and hasattr(value[0], "aclose"):
        await value[0].aclose()


async def _open_stream(
    call: _Call, candidate: _Candidate
) -> tuple[Any, list[dict[str, Any]]]:
    """One attempt: open the stream and read it up to its first content."""
    call.begin_attempt(candidate)
    stream = upstream.stream_completion(
        candidate.route.endpoint,
        call.payload(candidate),
        on_stream_usage_rejected=_persist_no_stream_usage,
        deadline=call.deadline,
    )
    buffered: list[dict[str, Any]] = []
    try:
        async for chunk in stream:
            buffered.append(chunk)
            if _content(_first_choice(chunk))[1]:
                break
    except BaseException as exc:
        await stream.aclose()
        await call.failed_attempt(candidate, exc)
        raise
    return stream, buffered


# --- Plain --------------------------------------------------------------------


class PlainChat:
    """One plain (not streamed) chat request; `result` once it has ended.

    `run()` returns the result; when it is cancelled (the caller went away),
    `result` is still set, with `stopped=True` and the trail so far.
    """

    __slots__ = ("_call", "_routes", "_runner")

    def __init__(
        self,
        call: _Call,
        routes: Sequence[Route] | None,
        runner: Runner | None = None,
    ) -> None:
        self._call = call
        self._routes = routes
        self._runner = runner or _complete

    @property
    def result(self) -> RouterResult | None:
        return self._call.result

    async def run(self) -> RouterResult:
        call = self._call
        try:
            return await self._runner(call, self._routes)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                call.settle_stopped()
            elif call.result is None:
                # A bug, not an upstream failure: the result says so.
                call.finish(candidate=call.last_candidate, error=exc)
            raise


def plain_chat(
    model_name: str,
    messages: Sequence[Message],
    *,
    params: Mapping[str, Any] | None = None,
    admit: Admit | None = None,
    routes: Sequence[Route] | None = None,
    policy: RetryPolicy | None = None,
    cache_scope: str = "",
) -> PlainChat:
    """A plain chat request over the model's routes (see `stream_chat`)."""
    call = _Call(
        model_name,
        messages,
        params=params,
        admit=admit,
        policy=policy,
        cache_scope=cache_scope,
    )
    return PlainChat(call, routes)


async def complete_chat(
    model_name: str, messages: Sequence[Message], **options: Any
) -> RouterResult:
    """Get a whole chat answer over the model's routes (options: `plain_chat`)."""
    return await plain_chat(model_name, messages, **options).run()


async def _first_answer(call: _Call, once: Once) -> _Opened | RouterResult | None:
    """Walk the routes as the policy says until one answers a plain request.

    The route that answered (its hops taken, its breaker told); the finished
    result when an error ends the whole call; None when no route answered.
    """
    while True:
        candidate = await call.next_candidate() or await call.last_resort()
        if candidate is None:
            return None
        call.take_hops(candidate.route.endpoint.name)
        opened: _Opened | None = None
        async with contextlib.aclosing(_attempts(call, candidate, once)) as items:
            async for item in items:
                if isinstance(item, _Failed):
                    if call.route_failed(item):
                        return call.finish(candidate=item.candidate, error=item.error)
                elif isinstance(item, _Opened):
                    opened = item
        if opened is not None:
            call.take_hops(opened.candidate.route.endpoint.name)
            await call.succeeded(opened.candidate)
            return opened


async def _complete(call: _Call, routes: Sequence[Route] | None) -> RouterResult:
    if not await call.load(routes):
        return call.finish(error=ModelNotFound(call.model_name))
    answered = await _first_answer(call, _complete_once)
    if isinstance(answered, RouterResult):
        return answered
    if answered is not None:
        candidate, body = answered.candidate, answered.value
        choice = _first_choice(body) or {}
        text = call.cut_plain(candidate, _plain_text(choice.get("message")))
        call.ttft_ms = call.elapsed_ms()
        call.text_parts.append(text)
        call.segment(candidate, text, body.get("usage"))
        finish_reason = (
            "length" if call.cut else _finish_reason(choice.get("finish_reason"))
        )
        result = call.finish(candidate=candidate, finish_reason=finish_reason, raw=body)
        await call.remember(result)
        return result
    error = call.unavailable()
    if isinstance(error, AllEndpointsUnavailable):
        answer = await call.cached_answer()
        if answer is not None:
            call.text_parts.append(answer.text)
            return call.finish(
                finish_reason=answer.finish_reason,
                cached=True,
                cached_age_s=answer.age_seconds(),
            )
    return call.finish(candidate=call.last_candidate, error=error)


async def _complete_once(call: _Call, candidate: _Candidate) -> dict[str, Any]:
    attempt = call.begin_attempt(candidate)
    try:
        body = await upstream.create_completion(
            candidate.route.endpoint, call.payload(candidate), deadline=call.deadline
        )
    except BaseException as exc:
        await call.failed_attempt(candidate, exc)
        raise
    call.end_attempt(attempt, OK)
    return body


# --- Embeddings ---------------------------------------------------------------

# One input to embed: a text, or the token ids of one.
EmbeddingInput = str | Sequence[int]


class _EmbedCall(_Call):
    """An embeddings request: the same policy, with inputs instead of messages.

    Nothing is generated, so a route reserves no output; each input must fit
    the route's window on its own (an embedding model reads one at a time),
    else the route is skipped as `context_window_exceeded`.
    """

    kind = RouteKind.EMBEDDING

    def __init__(
        self,
        model_name: str,
        inputs: Sequence[EmbeddingInput],
        **options: Any,
    ) -> None:
        super().__init__(model_name, (), **options)
        self.inputs = list(inputs)

    def fit(self, route: Route) -> tuple[list[Message], ContextStatus]:
        counter = tokens.counter_for(route.upstream_model)
        sizes = [
            counter.text(item) if isinstance(item, str) else len(item)
            for item in self.inputs
        ]
        longest = max(sizes, default=0)
        if longest > route.context_window:
            raise EmbeddingInputTooLong(
                required=longest, limit=route.context_window, model=route.upstream_model
            )
        total = sum(sizes)
        return [], ContextStatus(
            tokens=total,
            limit=route.context_window,
            window=route.context_window,
            reserved_output=0,
            percent=round(longest * 100 / route.context_window, 1),
            warning=False,
            compressed=False,
            compressed_ids=(),
            dropped_ids=(),
            conversation_tokens=total,
            method=counter.method.value,
        )

    def _output_tokens(self, route: Route) -> int:
        return 0

    def payload(self, candidate: _Candidate) -> dict[str, Any]:
        return {
            **self.params,
            "model": candidate.route.upstream_model,
            "input": self.inputs,
        }


class EmbeddingInputTooLong(ContextWindowExceeded):
    """One input alone is longer than every embedding route's window."""

    def __init__(self, *, required: int, limit: int, model: str) -> None:
        super().__init__(
            required=required,
            limit=limit,
            window=limit,
            reserved_output=0,
            model=model,
        )
        self.args = (
            f"An input has {required:,} tokens, but {model or 'this route'} "
            f"embeds at most {limit:,} at a time.",
        )


def plain_embedding(
    model_name: str,
    inputs: Sequence[EmbeddingInput],
    *,
    params: Mapping[str, Any] | None = None,
    admit: Admit | None = None,
    routes: Sequence[Route] | None = None,
    policy: RetryPolicy | None = None,
) -> PlainChat:
    """An embeddings request over the model's embedding routes.

    Routed like a plain chat (`_attempts`: retries, failover, breaker, rests,
    hedging, trail and hops), without the degraded-mode cache: a vector from
    another request's text would be wrong, not stale. The result's `raw` is
    ``{"vectors": [...], "usage": ...}`` (`gateway.client.create_embedding`).
    """
    call = _EmbedCall(
        model_name,
        inputs,
        params=params,
        admit=admit,
        policy=policy,
        cache_scope="",
    )
    return PlainChat(call, routes, _embed)


async def embed(
    model_name: str, inputs: Sequence[EmbeddingInput], **options: Any
) -> RouterResult:
    """Embed some inputs over the model's routes (options: `plain_embedding`)."""
    return await plain_embedding(model_name, inputs, **options).run()


async def _embed(call: _Call, routes: Sequence[Route] | None) -> RouterResult:
    assert isinstance(call, _EmbedCall)
    if not await call.load(routes):
        return call.finish(error=ModelNotFound(call.model_name))
    answered = await _first_answer(call, _embed_once)
    if isinstance(answered, RouterResult):
        return answered
    if answered is None:
        return call.finish(candidate=call.last_candidate, error=call.unavailable())
    candidate, body = answered.candidate, answered.value
    ours = candidate.status.tokens
    usage = body.get("usage")
    # Upstream's count when believable; an embedding generates nothing.
    prompt = _count(
        usage.get("prompt_tokens") if isinstance(usage, Mapping) else None,
        ours * PROMPT_USAGE_FACTOR + PROMPT_USAGE_SLACK,
    )
    call.ttft_ms = call.elapsed_ms()
    call.segments.append(
        Segment(
            candidate.route,
            "",
            Usage(ours, 0, True) if prompt is None else Usage(prompt, 0, False),
        )
    )
    return call.finish(candidate=candidate, finish_reason="stop", raw=body)


async def _embed_once(call: _Call, candidate: _Candidate) -> dict[str, Any]:
    assert isinstance(call, _EmbedCall)
    attempt = call.begin_attempt(candidate)
    try:
        body = await upstream.create_embedding(
            candidate.route.endpoint,
            call.payload(candidate),
            expected=len(call.inputs),
            deadline=call.deadline,
        )
    except BaseException as exc:
        await call.failed_attempt(candidate, exc)
        raise
    call.end_attempt(attempt, OK)
    return body
