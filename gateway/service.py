"""The one path every chat request takes, from the chat page and from /v1 alike.

    caller → requests/min → router ⇄ admit hook (tokens/min, budget reservation,
    endpoint limits) → upstream → settle + exactly one usage record

`stream_chat()` is an async generator of the router's `Started`, `Delta`,
`Fallback` and `Status` events and a final `Done`; `complete_chat()` returns
the `Done` of a plain request. A request refused before any answer text
raises `Rejected` (code, a sentence for people, retry_after). Every request,
whatever happens to it, leaves exactly one usage record:

- ok / cached: the answer arrived (cached: degraded mode served a kept one);
- error: upstream failed, before or after some text;
- cancelled: the caller went away (task cancelled, generator closed), with
  the tokens generated so far; the upstream request is closed first;
- rejected: refused by a rate limit, a budget, an unknown model or a
  conversation too large for every route.

Budgets are reserved before anything is sent upstream, in the router's
`admit` hook as the first route is about to be tried: the prompt as the router
fitted it to that route's window, plus the output the route allows (max_tokens
is set when the caller gave none, so no route can produce more than it
reserved). Doing it there counts and fits the conversation once, not twice.
When a budget has room for the prompt but not the whole output, the request
reserves what is left instead (down to the prompt plus
GATEWAY_BUDGET_MIN_OUTPUT_TOKENS) and the router lowers max_tokens to it and
cuts the answer there: a budget is spent to its last tokens, never past them.
The same hook counts the prompt against the caller's tokens per minute,
applies each endpoint's own rpm/tpm and budgets, and tops the reservation up
when a fallback route needs more (a bigger window keeps more history, or a
mid-stream failover resends the partial answer). Requests per minute are
counted before the router, so even a request no endpoint ever sees is.

The record is handed to the accounting's group commit when the request ends
and written within milliseconds, off the request's critical path: `Done` and
`Rejected` go out at once, and `await done.recorded()` gives the record's id
once it is stored (the chat page links its message to it). Shutdown writes
whatever is still queued.

Use it with `contextlib.aclosing`:

    async with aclosing(service.stream_chat(caller, "gpt-4o", messages)) as events:
        async for event in events:
            ...
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.utils import timezone

from gateway import accounting, limits, router
from gateway.accounting import BudgetExhausted, Reservation, UsageEntry, Written
from gateway.client import APIClientError, APIContextLengthError, EndpointConfig
from gateway.context import ContextStatus, ContextWindowExceeded
from gateway.models import RouteKind, UsageSource, UsageStatus
from gateway.router import (
    AllEndpointsUnavailable,
    Delta,
    Fallback,
    Finished,
    ModelNotFound,
    RouterResult,
    Started,
    Status,
    Usage,
)

__all__ = [
    "Caller",
    "Delta",
    "Done",
    "ErrorInfo",
    "Event",
    "Fallback",
    "RejectCode",
    "Rejected",
    "Started",
    "Status",
    "complete_chat",
    "embed",
    "stream_chat",
]

logger = logging.getLogger("gateway.service")


# --- Public types -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a user, optionally through one of their API keys."""

    user_id: int | None
    api_key_id: int | None = None
    source: str = UsageSource.CHAT
    # chat.Conversation's id, kept on the usage record.
    conversation_id: uuid.UUID | None = None
    # The usage record's id-to-be; callers that need to find the record of a
    # stopped request choose it. A Caller then serves one request only.
    request_id: uuid.UUID | None = None
    # Awaited once the caller's limits and budget have admitted the request,
    # before anything goes upstream: the chat stores the question only then,
    # so a refused request leaves nothing behind.
    on_admitted: Callable[[], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )
    # Called with what is left of the caller's rate limits each time they are
    # counted (requests, then tokens), refused or not: /v1 turns it into
    # OpenAI's x-ratelimit-* headers at no extra cache round trip.
    on_limits: Callable[[Sequence[limits.LimitState]], None] | None = field(
        default=None, compare=False, repr=False
    )


class RejectCode(StrEnum):
    """Why a request got no answer at all."""

    RATE_LIMITED = "rate_limited"
    BUDGET_EXHAUSTED = "budget_exhausted"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_TOO_LARGE = "context_too_large"
    ALL_ENDPOINTS_UNAVAILABLE = "all_endpoints_unavailable"
    # Upstream called the request itself wrong (a permanent 4xx): not retried.
    INVALID_REQUEST = "invalid_request"
    # Anything else that ended a request before its first token.
    UPSTREAM_ERROR = "upstream_error"

    @property
    def http_status(self) -> int:
        """The status /v1 answers with."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    RejectCode.RATE_LIMITED: 429,
    RejectCode.BUDGET_EXHAUSTED: 429,
    RejectCode.MODEL_NOT_FOUND: 404,
    RejectCode.CONTEXT_TOO_LARGE: 400,
    RejectCode.ALL_ENDPOINTS_UNAVAILABLE: 503,
    RejectCode.INVALID_REQUEST: 400,
    RejectCode.UPSTREAM_ERROR: 502,
}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What went wrong, for people (message) and programs (code, retry_after)."""

    code: str
    message: str
    retry_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retry_after": self.retry_after,
        }


class Rejected(Exception):
    """The request got no answer (its usage record is on its way)."""

    def __init__(
        self,
        code: RejectCode,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: uuid.UUID | None = None,
        record: asyncio.Future[Written] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        self._record = record

    async def recorded(self) -> int | None:
        """The id of this request's usage record, once it is stored."""
        if self._record is None:
            return None
        accounting.hurry()
        return (await asyncio.shield(self._record)).record_id

    @property
    def http_status(self) -> int:
        return self.code.http_status

    @property
    def error(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.retry_after)


@dataclass(frozen=True, slots=True)
class Done:
    """The last event of a request that produced an answer (or part of one)."""

    request_id: uuid.UUID
    # A UsageStatus value: ok, cached, error (with partial text), cancelled.
    status: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    # True when any count is ours rather than upstream's.
    tokens_estimated: bool
    endpoint: str | None
    endpoint_id: int | None
    upstream_model: str | None
    latency_ms: float
    ttft_ms: float | None
    attempts: int
    hops: list[dict[str, Any]]
    cost: Decimal | None
    cached: bool
    context: ContextStatus | None
    # Tokens left in the caller's tightest budget; None: no limit applies.
    budget_remaining: int | None
    error: ErrorInfo | None = None
    # The upstream body of a plain request, for pass-through by /v1.
    raw: dict[str, Any] | None = field(default=None, repr=False)
    # How old a cached answer is, in seconds.
    cached_age_s: float | None = None
    record: asyncio.Future[Written] | None = field(
        default=None, repr=False, compare=False
    )

    async def recorded(self) -> int:
        """The id of this request's usage record, once it is stored."""
        assert self.record is not None
        accounting.hurry()
        return (await asyncio.shield(self.record)).record_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usage(self) -> dict[str, Any]:
        """Token counts in OpenAI's shape, plus whether we estimated them."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.tokens_estimated,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the chat page's done frame."""
        return {
            "request_id": str(self.request_id),
            "status": self.status,
            "finish_reason": self.finish_reason,
            "usage": self.usage(),
            "endpoint": self.endpoint,
            "upstream_model": self.upstream_model,
            "latency_ms": round(self.latency_ms, 1),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "attempts": self.attempts,
            "hops": self.hops,
            "cost": None if self.cost is None else str(self.cost),
            "cached": self.cached,
            "context": None if self.context is None else self.context.to_dict(),
            "budget_remaining": self.budget_remaining,
            "error": None if self.error is None else self.error.to_dict(),
        }


Event = Started | Delta | Fallback | Status | Done


# --- One request ------------------------------------------------------------------

# Finalisers of requests cancelled in the middle of a reservation, which wait
# for it before writing; the loop keeps only weak references to tasks.
_finalisers: set[asyncio.Task[Any]] = set()


def _output_allowance(params: Mapping[str, Any], route: router.Route) -> int:
    asked = params.get("max_completion_tokens") or params.get("max_tokens")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return min(asked, route.max_output_tokens)
    return route.max_output_tokens


def min_output_tokens() -> int:
    """The least answer worth sending when a budget has room for little more."""
    value = getattr(settings, "GATEWAY_BUDGET_MIN_OUTPUT_TOKENS", 16)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 16


def _error_message(error: BaseException) -> str:
    if isinstance(error, APIClientError):
        return error.message
    return str(error) or type(error).__name__


class _Request:
    """The state of one request on its way through the pipeline."""

    def __init__(
        self,
        caller: Caller,
        model_name: str,
        messages: Sequence[Any],
        params: Mapping[str, Any] | None,
        kind: str = RouteKind.CHAT,
    ) -> None:
        self.caller = caller
        self.kind = kind
        self.model_name = model_name
        self.messages = messages
        self.params: dict[str, Any] = dict(params or {})
        self.request_id = caller.request_id or uuid.uuid4()
        self.created_at = timezone.now()
        self.started = time.perf_counter()
        self.ttft_ms: float | None = None
        self.routes: list[router.Route] = []
        self.outputs: dict[int | None, int] = {}
        self.admitted = False
        self.budgets: tuple[accounting.BudgetRef, ...] = ()
        self.reservation = Reservation()
        self.reserved_for_caller = 0
        # Upper bound of tokens already spent by routes that began answering.
        self.committed = 0
        self.last_admitted = 0
        self.endpoint_budgets_held: set[int] = set()
        self.endpoint_charges: dict[int, int] = {}
        # Endpoints skipped at their own rate limit, by id: when every route
        # was, the refusal says whose limit and when it resets.
        self.endpoint_refusals: dict[int | None, limits.Decision] = {}
        self.pending: list[asyncio.Task[Reservation]] = []
        self.charged_tokens = 0
        self.finished = False
        self.pending_at_finish = False

    @property
    def cache_scope(self) -> str:
        # Degraded-mode answers are never served across users.
        if self.caller.user_id is not None:
            return f"user:{self.caller.user_id}"
        return f"key:{self.caller.api_key_id}"

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def mark_first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = self.elapsed_ms()

    # -- admission

    def hold_request(self) -> accounting.HoldRequest:
        """What the hold rows of this request's reservations say about it."""
        caller = self.caller
        return accounting.HoldRequest(
            request_id=self.request_id,
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            conversation_id=caller.conversation_id,
            model_name=self.model_name,
            source=caller.source,
            prompt_tokens=self.charged_tokens,
        )

    async def _reserve(
        self,
        budgets: Sequence[accounting.BudgetRef],
        tokens: int,
        minimum: int | None = None,
        *,
        shrink: bool = True,
    ) -> Reservation:
        """Reserve so that a cancellation cannot lose a reservation once made.

        With `minimum`, as much of `tokens` as the budgets have left, down to
        it (see `accounting.reserve`).
        """
        if not budgets:
            return Reservation(tokens)
        task = asyncio.ensure_future(
            accounting.areserve(
                budgets,
                tokens,
                request=self.hold_request(),
                minimum=minimum,
                shrink=shrink,
            )
        )
        self.pending.append(task)
        try:
            reservation = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Still pending: the finaliser waits for it and settles it.
            raise
        except BaseException:
            self.pending.remove(task)
            raise
        self.pending.remove(task)
        self.reservation.add(reservation)
        return reservation

    async def admit(self) -> None:
        """Before the router: requests per minute, and the model's routes."""
        caller = self.caller
        decision = await limits.check_caller_requests(caller.user_id, caller.api_key_id)
        if caller.on_limits is not None and decision.counters:
            caller.on_limits(decision.states)
        if not decision.allowed:
            raise _Refused(
                RejectCode.RATE_LIMITED, decision.message, decision.retry_after
            )
        self.routes = await router.load_routes(self.model_name, kind=self.kind)
        if not self.routes:
            raise _Refused(
                RejectCode.MODEL_NOT_FOUND, str(ModelNotFound(self.model_name))
            )
        self.budgets = await accounting.acaller_budgets(
            caller.user_id, caller.api_key_id
        )
        if self.kind == RouteKind.EMBEDDING:
            # Nothing is generated: the reservation is the input alone.
            return
        self.outputs = {
            route.endpoint.id: _output_allowance(self.params, route)
            for route in self.routes
        }
        if not (
            self.params.get("max_tokens") or self.params.get("max_completion_tokens")
        ):
            # The router caps this at each route's own max_output_tokens, which
            # is what a route's reservation covers: no route can produce more.
            self.params["max_tokens"] = max(r.max_output_tokens for r in self.routes)

    async def _admit_caller(self, config: EndpointConfig, tokens: int) -> int:
        """The first route to be tried: tokens per minute and the reservation.

        Here rather than before the router because only now is the prompt
        counted, and fitted to this route's window (once, by the router).
        Returns the tokens reserved: fewer than `tokens` when the caller's
        budgets had room for the prompt and only part of the output.
        """
        caller = self.caller
        prompt = max(0, tokens - self.outputs.get(config.id, 0))
        decision = await limits.check_caller_tokens(
            caller.user_id, caller.api_key_id, prompt
        )
        if caller.on_limits is not None and decision.counters:
            caller.on_limits(decision.states)
        if not decision.allowed:
            raise _Refused(
                RejectCode.RATE_LIMITED, decision.message, decision.retry_after
            )
        self.charged_tokens = prompt
        # Less output rather than none: refused only if not even this fits.
        minimum = min(tokens, prompt + min_output_tokens())
        try:
            if accounting.pending():
                # This process's finished requests may still hold their whole
                # reservation: settle them first, so as not to shorten the
                # answer (or refuse it) for tokens that are free already.
                try:
                    reservation = await self._reserve(
                        self.budgets, tokens, minimum, shrink=False
                    )
                    granted = reservation.tokens
                except BudgetExhausted:
                    await accounting.flush()
                    granted = (
                        await self._reserve(self.budgets, tokens, minimum)
                    ).tokens
            else:
                granted = (await self._reserve(self.budgets, tokens, minimum)).tokens
        except BudgetExhausted as exc:
            raise _Refused(
                RejectCode.BUDGET_EXHAUSTED, str(exc), exc.retry_after
            ) from exc
        self.reserved_for_caller = granted
        self.admitted = True
        if caller.on_admitted is not None:
            await caller.on_admitted()
        return granted

    async def admit_endpoint(
        self, config: EndpointConfig, tokens: int
    ) -> bool | router.OutputCap:
        """The router's hook before each route: limits, reservation, budgets.

        Raises _Refused (through the router) when the caller's own tokens per
        minute or budget refuse; returns False to skip a saturated endpoint,
        and an OutputCap when the caller's budget had room for less output.
        """
        decision = limits.check_endpoint(config, tokens)
        if not decision.allowed:
            self.endpoint_refusals[config.id] = decision
            return False
        asked = tokens
        cap: router.OutputCap | None = None
        try:
            if not self.admitted:
                granted = await self._admit_caller(config, tokens)
                if granted < tokens:
                    output = self.outputs.get(config.id, 0) - (tokens - granted)
                    cap = router.OutputCap(output)
                    tokens = granted
            elif self.budgets and self.committed + tokens > self.reserved_for_caller:
                needed = self.committed + tokens
                await self._reserve(self.budgets, needed - self.reserved_for_caller)
                self.reserved_for_caller = needed
            if config.id is not None and config.id not in self.endpoint_budgets_held:
                budgets = await accounting.aendpoint_budgets(config.id)
                if budgets:
                    await self._reserve(budgets, tokens)
                    self.endpoint_budgets_held.add(config.id)
        except BudgetExhausted:
            limits.settle_endpoint(config, asked, 0)
            return False
        except BaseException:
            limits.settle_endpoint(config, asked, 0)
            raise
        if config.id is not None:
            self.endpoint_charges[config.id] = (
                self.endpoint_charges.get(config.id, 0) + asked
            )
        self.last_admitted = tokens
        return cap or True

    def started_answering(self) -> None:
        """A route began to answer: what it was admitted for is now spent."""
        self.committed += self.last_admitted

    # -- the end

    def _identity(self) -> dict[str, Any]:
        """Who asked for what: the fields every entry of this request shares."""
        caller = self.caller
        return {
            "request_id": self.request_id,
            "created_at": self.created_at,
            "source": caller.source,
            "user_id": caller.user_id,
            "api_key_id": caller.api_key_id,
            "conversation_id": caller.conversation_id,
            "model_name": self.model_name,
        }

    def _entry(
        self,
        status: str,
        result: RouterResult | None,
        error: ErrorInfo | None,
        error_type: str = "",
    ) -> UsageEntry:
        usage = result.usage if result is not None else Usage()
        if error is None and result is not None and result.limit_reason:
            # Not an error, but the record says the gateway cut the answer.
            error_type = error_type or "output_limit"
            bound = {"budget": "the budget's last tokens"}.get(
                result.limit_reason, f"its {result.limit_reason}"
            )
            error = ErrorInfo(
                "output_limit", f"answer cut at {bound}: the endpoint went on"
            )
        per_endpoint: dict[int, int] = {}
        for segment in result.segments if result is not None else ():
            endpoint_id = segment.route.endpoint.id
            if endpoint_id is not None:
                per_endpoint[endpoint_id] = (
                    per_endpoint.get(endpoint_id, 0) + segment.usage.total_tokens
                )
        return UsageEntry(
            **self._identity(),
            status=status,
            endpoint_id=result.endpoint_id if result else None,
            endpoint_name=(result.endpoint or "") if result else "",
            upstream_model=(result.upstream_model or "") if result else "",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            tokens_estimated=usage.estimated,
            latency_ms=None if status == UsageStatus.REJECTED else self.elapsed_ms(),
            ttft_ms=self.ttft_ms,
            error_type=error_type or (error.code if error else ""),
            error_message=error.message if error else "",
            attempts=result.attempts if result else 0,
            fallback_hops=[hop.to_dict() for hop in result.hops] if result else [],
            trail=[attempt.to_dict() for attempt in result.trail] if result else [],
            cost=result.cost if result else None,
            settlements=accounting.settlements_for(
                self.reservation, usage.total_tokens, endpoint_used=per_endpoint
            ),
        )

    def _safe_entry(
        self,
        status: str,
        result: RouterResult | None,
        error: ErrorInfo | None,
        error_type: str = "",
    ) -> UsageEntry:
        """The request's entry; if what it holds cannot make one, a minimal one.

        The minimal entry counts the tokens reserved for the caller, so that a
        request whose data is beyond use still has its record and settles.
        """
        try:
            return self._entry(status, result, error, error_type)
        except Exception as exc:
            logger.exception(
                "Usage entry of request %s built from what is known", self.request_id
            )
            used = self.reserved_for_caller
            return UsageEntry(
                **self._identity(),
                status=UsageStatus.ERROR,
                completion_tokens=used,
                tokens_estimated=True,
                latency_ms=self.elapsed_ms(),
                error_type=f"accounting_error:{type(exc).__name__}",
                error_message="The request's usage could not be read; "
                "counted as reserved.",
                settlements=accounting.settlements_for(self.reservation, used),
            )

    async def _settle_limits(self, result: RouterResult | None) -> None:
        used = result.usage.total_tokens if result is not None else 0
        await limits.settle_caller(
            self.caller.user_id, self.caller.api_key_id, self.charged_tokens, used
        )
        for segment in result.segments if result is not None else ():
            config = segment.route.endpoint
            charged = self.endpoint_charges.pop(config.id, 0) if config.id else 0
            limits.settle_endpoint(config, charged, segment.usage.total_tokens)

    async def _after_pending(
        self,
        status: str,
        result: RouterResult | None,
        error: ErrorInfo | None,
        error_type: str,
    ) -> Written:
        for task in self.pending:
            # A reservation the caller's cancellation interrupted: settle it too.
            try:
                reservation = await task
            except Exception:
                continue
            self.reservation.add(reservation)
        self.pending.clear()
        future = accounting.submit_usage(
            self._safe_entry(status, result, error, error_type)
        )
        await self._settle_limits_safely(result)
        accounting.hurry()
        return await asyncio.shield(future)

    async def _settle_limits_safely(self, result: RouterResult | None) -> None:
        try:
            await self._settle_limits(result)
        except Exception:
            # Rate-limit counters expire on their own; the record matters more.
            logger.exception("Limits of request %s not settled", self.request_id)

    async def finish(
        self,
        status: str,
        result: RouterResult | None = None,
        error: ErrorInfo | None = None,
        error_type: str = "",
    ) -> asyncio.Future[Written]:
        """Settle the limits and queue the one record; its future, not awaited.

        The record is queued before anything is awaited, so a caller
        cancelled again meanwhile cannot lose it.
        """
        record = self.queue_record(status, result, error, error_type)
        if not self.pending_at_finish:
            await self._settle_limits_safely(result)
        return record

    def queue_record(
        self,
        status: str,
        result: RouterResult | None = None,
        error: ErrorInfo | None = None,
        error_type: str = "",
    ) -> asyncio.Future[Written]:
        """Queue the one record without awaiting anything; its future."""
        self.finished = True
        self.pending_at_finish = bool(self.pending)
        if self.pending:
            task = asyncio.ensure_future(
                self._after_pending(status, result, error, error_type)
            )
            _finalisers.add(task)
            task.add_done_callback(_finalisers.discard)
            return task
        return accounting.submit_usage(
            self._safe_entry(status, result, error, error_type)
        )

    def finish_in_background(self, status: str, result: RouterResult | None) -> None:
        """The last resort of an exit path that did not finish: record, then limits."""
        if self.finished:
            return
        self.queue_record(status, result)
        if not self.pending_at_finish:
            task = asyncio.ensure_future(self._settle_limits_safely(result))
            _finalisers.add(task)
            task.add_done_callback(_finalisers.discard)

    async def reject(self, refusal: _Refused) -> Rejected:
        """Queue the record of a refused request; the exception to raise."""
        record = await self.finish(
            UsageStatus.REJECTED, None, ErrorInfo(refusal.code, refusal.message)
        )
        return Rejected(
            refusal.code,
            refusal.message,
            retry_after=refusal.retry_after,
            request_id=self.request_id,
            record=record,
        )

    async def failed(self, result: RouterResult) -> Rejected:
        """Queue the record of a request that got no text at all."""
        error = result.error
        assert error is not None
        code, status = _classify(error)
        retry_after = getattr(error, "retry_after", None)
        info = ErrorInfo(code, _error_message(error), retry_after)
        error_type = type(error).__name__
        if (limited := self.endpoints_rate_limited(error, result.hops)) is not None:
            # Nothing went upstream: a refusal, like the caller's own limits.
            info, status = limited, UsageStatus.REJECTED
            code, retry_after = RejectCode.RATE_LIMITED, limited.retry_after
            error_type = code.value
        record = await self.finish(status, result, info, error_type)
        return Rejected(
            code,
            info.message,
            retry_after=retry_after,
            request_id=self.request_id,
            record=record,
        )

    def endpoints_rate_limited(
        self, error: BaseException, hops: Sequence[router.Hop]
    ) -> ErrorInfo | None:
        """When every route was skipped at its endpoint's rate limit: which, until when.

        The router counts that as "unavailable" with a generic wait; the
        limits themselves know when each one has room again.
        """
        if not (
            isinstance(error, AllEndpointsUnavailable)
            and hops
            and self.endpoint_refusals
            and all(hop.reason == "rate_limited_locally" for hop in hops)
        ):
            return None
        refusals = list(self.endpoint_refusals.values())
        waits = [d.retry_after for d in refusals if d.retry_after is not None]
        reasons = "; ".join(d.message.rstrip(".") for d in refusals)
        return ErrorInfo(
            RejectCode.RATE_LIMITED,
            f"Every endpoint for {self.model_name!r} is at its rate limit: {reasons}.",
            min(waits) if waits else None,
        )

    async def done(self, result: RouterResult, *, plain: bool = False) -> Done:
        """Queue the record of an answered request; its Done event."""
        info = None
        if result.error is not None:
            code, _ = _classify(result.error)
            info = ErrorInfo(
                code,
                _error_message(result.error),
                getattr(result.error, "retry_after", None),
            )
        record = await self.finish(result.status, result, info, result.error_type)
        usage = result.usage
        return Done(
            request_id=self.request_id,
            status=result.status,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            tokens_estimated=usage.estimated,
            endpoint=result.endpoint,
            endpoint_id=result.endpoint_id,
            upstream_model=result.upstream_model,
            latency_ms=self.elapsed_ms(),
            ttft_ms=None if plain else self.ttft_ms,
            attempts=result.attempts,
            hops=[hop.to_dict() for hop in result.hops],
            cost=result.cost,
            cached=result.cached,
            cached_age_s=result.cached_age_s,
            context=result.context,
            budget_remaining=self.reservation.remaining_after(usage.total_tokens),
            error=info,
            raw=result.raw,
            record=record,
        )


class _Refused(Exception):
    def __init__(
        self, code: RejectCode, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _classify(error: BaseException) -> tuple[RejectCode, str]:
    """The code and record status of an error that ended a request."""
    if isinstance(error, ModelNotFound):
        return RejectCode.MODEL_NOT_FOUND, UsageStatus.REJECTED
    if isinstance(error, ContextWindowExceeded):
        return RejectCode.CONTEXT_TOO_LARGE, UsageStatus.REJECTED
    if isinstance(error, APIContextLengthError):
        return RejectCode.CONTEXT_TOO_LARGE, UsageStatus.ERROR
    if isinstance(error, AllEndpointsUnavailable):
        return RejectCode.ALL_ENDPOINTS_UNAVAILABLE, UsageStatus.ERROR
    if isinstance(error, APIClientError) and error.permanent:
        return RejectCode.INVALID_REQUEST, UsageStatus.ERROR
    return RejectCode.UPSTREAM_ERROR, UsageStatus.ERROR


# --- Entry points -------------------------------------------------------------------


async def stream_chat(
    caller: Caller,
    model_name: str,
    messages: Sequence[Any],
    params: Mapping[str, Any] | None = None,
) -> AsyncIterator[Event]:
    """Stream one chat request: Started, Delta and Fallback events, then Done.

    `messages` are OpenAI-style dicts or `gateway.context.ContextMessage`s;
    `params` go upstream as they are (temperature, max_tokens, ...). Raises
    `Rejected` when the request gets no text at all; never after a Delta.
    """
    request = _Request(caller, model_name, messages, params)
    stream: router.ChatStream | None = None
    answered = False
    # What the last-resort record says, should a handler below not finish.
    ending = UsageStatus.ERROR
    try:
        try:
            await request.admit()
            stream = router.stream_chat(
                model_name,
                messages,
                params=request.params,
                admit=request.admit_endpoint,
                routes=request.routes,
                cache_scope=request.cache_scope,
            )
            async for event in stream:
                if isinstance(event, Finished):
                    result = event.result
                    if result.error is not None and not answered:
                        raise await request.failed(result)
                    yield await request.done(result)
                    return
                if isinstance(event, Started):
                    request.started_answering()
                elif isinstance(event, Delta):
                    request.mark_first_token()
                    answered = True
                yield event
        except _Refused as refusal:
            if stream is not None:
                await stream.aclose()
            raise await request.reject(refusal) from None
    except (asyncio.CancelledError, GeneratorExit):
        ending = UsageStatus.CANCELLED
        if not request.finished:
            result = None
            if stream is not None:
                # Closing the router's stream closes the upstream request.
                result = await _closed(stream)
            await request.finish(UsageStatus.CANCELLED, result)
        raise
    except Exception as exc:
        if not request.finished:
            logger.exception("Request %s failed", request.request_id)
            result = None
            if stream is not None:
                result = await _closed(stream)
            await request.finish(
                UsageStatus.ERROR,
                result,
                ErrorInfo(RejectCode.UPSTREAM_ERROR, _error_message(exc)),
                type(exc).__name__,
            )
        raise
    finally:
        # Only when a handler above itself failed (or was cancelled) before
        # queueing the record: the request still leaves exactly one.
        request.finish_in_background(ending, _result_of(stream))


async def _closed(stream: router.ChatStream) -> RouterResult | None:
    """Close the router's stream whatever it raises; its result, if any."""
    try:
        await stream.aclose()
    except Exception:
        logger.exception("Closing an upstream stream failed")
    return _result_of(stream)


def _result_of(stream: router.ChatStream | None) -> RouterResult | None:
    try:
        return None if stream is None else stream.result
    except Exception:
        return None


async def complete_chat(
    caller: Caller,
    model_name: str,
    messages: Sequence[Any],
    params: Mapping[str, Any] | None = None,
) -> Done:
    """One plain (not streamed) chat request; raises `Rejected` without an answer."""
    request = _Request(caller, model_name, messages, params)
    return await _plain(
        request,
        lambda: router.plain_chat(
            model_name,
            messages,
            params=request.params,
            admit=request.admit_endpoint,
            routes=request.routes,
            cache_scope=request.cache_scope,
        ),
    )


async def embed(
    caller: Caller,
    model_name: str,
    inputs: Sequence[router.EmbeddingInput],
    params: Mapping[str, Any] | None = None,
) -> Done:
    """Embed some inputs over the model's embedding routes, like a plain chat.

    The same requests and tokens per minute, budget reservation (the input
    tokens only) and exactly one usage record, whose prompt tokens are the
    input's and completion tokens 0. `Done.raw` holds the vectors in input
    order (`gateway.client.create_embedding`). Raises `Rejected` without them.
    """
    request = _Request(caller, model_name, (), params, kind=RouteKind.EMBEDDING)
    return await _plain(
        request,
        lambda: router.plain_embedding(
            model_name,
            inputs,
            params=request.params,
            admit=request.admit_endpoint,
            routes=request.routes,
        ),
    )


async def _plain(request: _Request, start: Callable[[], router.PlainChat]) -> Done:
    """Admit a plain request, run it (`start` builds the router's call), record it."""
    call: router.PlainChat | None = None
    try:
        try:
            await request.admit()
            call = start()
            result = await call.run()
        except _Refused as refusal:
            raise await request.reject(refusal) from None
        if result.error is not None and not result.text:
            raise await request.failed(result)
        return await request.done(result, plain=True)
    except asyncio.CancelledError:
        if not request.finished:
            # The trail of what was tried before the caller went away.
            await request.finish(
                UsageStatus.CANCELLED, call.result if call is not None else None
            )
        raise
    except Exception as exc:
        if not request.finished:
            logger.exception("Request %s failed", request.request_id)
            await request.finish(
                UsageStatus.ERROR,
                None,
                ErrorInfo(RejectCode.UPSTREAM_ERROR, _error_message(exc)),
                type(exc).__name__,
            )
        raise
    finally:
        request.finish_in_background(UsageStatus.ERROR, None)
