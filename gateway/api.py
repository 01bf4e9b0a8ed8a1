"""The OpenAI-compatible API for programs under /v1/.

`GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/chat/completions` and
`POST /v1/embeddings`. Any other path under /v1/ is a 404, and a known path
asked with the wrong method a 405, both with OpenAI's JSON error body.

The views only authenticate, parse and format: every completion goes through
`gateway.service` like a chat message does, so programs get the same limits,
budgets, fallback and exactly one usage record (source "api", with the key).

Errors use OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`,
so the official SDKs raise their usual exceptions. A streamed request is read
up to its first token before the response starts: a refusal then still gets
its own status code (429, 404, ...) and the headers can say which endpoint
answered; an error after that ends the stream with an error event.

What the gateway did is said in the data as well as in X-LLMSite-* headers,
because SDKs keep unknown fields but drop headers and SSE comments: a plain
answer's body and a stream's first, final and fallback chunks carry an
`llmsite` object (the endpoint that answered, every fallback hop, whether the
answer came from the degraded-mode cache and how old it is). A status line the
router sends once the stream has begun (a mid-stream failover, a retry wait)
arrives as `llmsite.status` on a chunk with an empty delta, which every
OpenAI client accepts and renders as nothing.

Answers and refusals carry OpenAI's x-ratelimit-{limit,remaining,reset}-
{requests,tokens} headers for the tightest of the caller's per-minute limits,
from the counts the pipeline makes anyway (no extra cache round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

from django.core.exceptions import RequestDataTooBig
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from gateway import inbound, limits, sanitize, service, wire
from gateway.limits import LimitState, LocalTTLCache
from gateway.models import ApiKey, ModelRoute, UsageSource
from gateway.service import Caller, Delta, Done, Fallback, RejectCode, Rejected

logger = logging.getLogger("gateway.api")

# A parsed request body (chat completion, embeddings).
T = TypeVar("T")

View = Callable[..., Awaitable[HttpResponse]]

# How often a key's last_used_at is written, at most.
_TOUCH_INTERVAL = timedelta(minutes=1)

_ERROR_TYPES = {
    RejectCode.RATE_LIMITED: "rate_limit_error",
    RejectCode.BUDGET_EXHAUSTED: "insufficient_quota",
    RejectCode.ALL_ENDPOINTS_UNAVAILABLE: "server_error",
    RejectCode.UPSTREAM_ERROR: "server_error",
}
_ERROR_PARAMS = {
    RejectCode.MODEL_NOT_FOUND: "model",
    RejectCode.CONTEXT_TOO_LARGE: "messages",
}
# An input too long for the embedding model, not a conversation.
_EMBEDDING_ERROR_PARAMS = {**_ERROR_PARAMS, RejectCode.CONTEXT_TOO_LARGE: "input"}


# --- Errors -----------------------------------------------------------------------


def error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """An error in OpenAI's shape."""
    return {
        "error": {"message": message, "type": error_type, "code": code, "param": param}
    }


def error_response(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> JsonResponse:
    response = JsonResponse(
        error_body(message, error_type=error_type, code=code, param=param),
        status=status,
    )
    if retry_after is not None:
        # Whole seconds, never 0: clients that honour it must actually wait.
        response["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _rejected_body(
    rejected: Rejected, params: Mapping[RejectCode, str] = _ERROR_PARAMS
) -> dict[str, Any]:
    return error_body(
        rejected.message,
        error_type=_ERROR_TYPES.get(rejected.code, "invalid_request_error"),
        code=str(rejected.code),
        param=params.get(rejected.code),
    )


def _rejected_response(
    rejected: Rejected, params: Mapping[RejectCode, str] = _ERROR_PARAMS
) -> JsonResponse:
    response = JsonResponse(
        _rejected_body(rejected, params), status=rejected.http_status
    )
    if rejected.retry_after is not None:
        response["Retry-After"] = str(max(1, math.ceil(rejected.retry_after)))
    return response


# --- Rate-limit headers -----------------------------------------------------------


def reset_duration(seconds: float) -> str:
    """A duration the way OpenAI writes its resets: 20ms, 1s, 6m0s, 1h0m0s."""
    millis = max(0, round(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, fraction = divmod(millis, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def rate_limit_headers(states: Iterable[LimitState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest of each kind of limit.

    A key's request may be held by the user's limit and the key's own; the one
    with the least left is the one a program must pace itself by.
    """
    states = list(states)
    headers = {}
    for kind in ("requests", "tokens"):
        applying = [state for state in states if state.kind == kind]
        if not applying:
            continue
        tightest = min(applying, key=lambda state: (state.remaining, -state.resets_in))
        headers[f"x-ratelimit-limit-{kind}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = reset_duration(tightest.resets_in)
    return headers


class _LimitStates:
    """What the pipeline last learned of each of the caller's limits."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], LimitState] = {}

    def __call__(self, states: Sequence[LimitState]) -> None:
        for state in states:
            self.states[(state.scope, state.kind)] = state

    def apply(self, response: HttpResponse) -> HttpResponse:
        for name, value in rate_limit_headers(self.states.values()).items():
            response[name] = value
        return response


class BadRequest(Exception):
    """A request body that does not follow the API; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --- Authentication ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """An active API key, as the hot path needs it."""

    api_key_id: int
    user_id: int


# Active keys by hash, so a request costs no query to authenticate. A key
# revoked (or its user deactivated) in another process keeps working here for
# at most GATEWAY_POLICY_CACHE_SECONDS; saves through the ORM in this process
# drop the cache at once. Unknown keys are not cached: anyone can send any.
_keys: LocalTTLCache[KeyOwner] = LocalTTLCache()
# When this process last wrote each key's last_used_at (monotonic seconds), so
# the conditional UPDATE below runs at most once a minute per key and process.
_touched: dict[int, float] = {}
_MAX_TOUCHED = 10_000


@receiver(post_save, sender=ApiKey, dispatch_uid="api-forget-keys")
@receiver(post_delete, sender=ApiKey, dispatch_uid="api-forget-keys")
def forget_keys(**kwargs: Any) -> None:
    """Drop the cached keys, so revocations in this process apply at once."""
    _keys.clear()
    _touched.clear()


def _bearer(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        return None
    return raw.strip()


async def authenticate(request: HttpRequest) -> KeyOwner | None:
    """The active key in the Authorization header, or None."""
    raw = _bearer(request)
    if raw is None:
        return None
    key_hash = ApiKey.hash(raw)
    owner = _keys.get(key_hash)
    if owner is None:
        row = await (
            ApiKey.objects.active()
            .filter(key_hash=key_hash, user__is_active=True)
            .values_list("pk", "user_id")
            .afirst()
        )
        if row is None:
            return None
        owner = KeyOwner(api_key_id=row[0], user_id=row[1])
        _keys.set(key_hash, owner)
    await _touch(owner.api_key_id)
    return owner


async def _touch(api_key_id: int) -> None:
    """Set last_used_at when it is a minute old or more.

    The compare-and-set makes all processes together write a key's row at most
    once a minute; the per-process clock spares even the conditional UPDATE.
    """
    clock = time.monotonic()
    last = _touched.get(api_key_id)
    if last is not None and clock - last < _TOUCH_INTERVAL.total_seconds():
        return
    if len(_touched) >= _MAX_TOUCHED:
        _touched.clear()
    _touched[api_key_id] = clock
    now = timezone.now()
    await (
        ApiKey.objects.filter(pk=api_key_id)
        .filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - _TOUCH_INTERVAL)
        )
        .aupdate(last_used_at=now)
    )


def _unauthorized() -> JsonResponse:
    # The key itself is never repeated: error bodies end up in client logs.
    response = error_response(
        401,
        "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )
    response["WWW-Authenticate"] = 'Bearer realm="llmsite"'
    return response


def allow(*methods: str) -> Callable[[View], View]:
    """Refuse other methods with a 405 in OpenAI's shape (Django's has no body).

    Every /v1 view is also `csrf_exempt`: keys authenticate, never cookies, and
    a POST to a GET-only path must get this 405, not the CSRF page.
    """

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            if request.method not in methods:
                response = error_response(
                    405,
                    f"{request.method} is not allowed on {request.path}; "
                    f"use {' or '.join(methods)}.",
                    code="method_not_allowed",
                )
                response["Allow"] = ", ".join(methods)
                return response
            return await view(request, *args, **kwargs)

        return wrapper

    return decorate


async def _caller_and_body(
    request: HttpRequest, parse: Callable[[bytes], T]
) -> tuple[KeyOwner, T] | HttpResponse:
    """The key's owner and the parsed body, or the error response to send."""
    owner = await authenticate(request)
    if owner is None:
        return _unauthorized()
    try:
        return owner, parse(request.body)
    except RequestDataTooBig:
        return error_response(413, "The request body is too large.")
    except BadRequest as exc:
        return error_response(400, exc.message, param=exc.param)


def _caller(owner: KeyOwner, states: _LimitStates) -> Caller:
    """The pipeline's caller for one /v1 request: the key's owner, source api."""
    return Caller(
        user_id=owner.user_id,
        api_key_id=owner.api_key_id,
        source=UsageSource.API,
        request_id=uuid.uuid4(),
        on_limits=states,
    )


# --- Parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated /v1/chat/completions body."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    # Everything else, passed upstream as it is (temperature, tools, ...).
    params: dict[str, Any]


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a chat completion body; raises BadRequest naming the field.

    The rules are in `gateway.inbound` (JSON itself: depth, NUL, surrogates,
    non-finite numbers) and `gateway.wire` (OpenAI's message shapes and
    parameter types).
    """
    try:
        data = inbound.loads(body)
        if not isinstance(data, dict):
            raise BadRequest("The body must be a JSON object.")
        model = wire.check_model(data.get("model"))
        messages = wire.check_messages(data.get("messages"))
        wire.check_params(data)
    except inbound.InboundError as exc:
        raise BadRequest(exc.message, exc.path) from None
    options = data.get("stream_options") or {}
    params = {
        key: value
        for key, value in data.items()
        if key not in {"model", "messages", "stream", "stream_options", "n"}
        and value is not None
    }
    return ChatRequest(
        model=model,
        messages=messages,
        stream=bool(data.get("stream", False)),
        include_usage=options.get("include_usage") is True,
        params=params,
    )


# --- Formatting -------------------------------------------------------------------


def _completion_id(request_id: uuid.UUID) -> str:
    return f"chatcmpl-{request_id.hex}"


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.total_tokens,
    }


def public_hop(hop: Mapping[str, Any]) -> dict[str, Any]:
    """A fallback hop (`router.Hop.to_dict()`) as the `llmsite` object shows it."""
    return {
        "from": hop.get("endpoint"),
        "to": hop.get("to_endpoint"),
        "reason": hop.get("reason"),
        "status_code": hop.get("status_code"),
        "mid_stream": bool(hop.get("mid_stream")),
    }


def routing_summary(done: Done) -> dict[str, Any]:
    """The `llmsite` object of a finished answer: who answered, and how."""
    summary: dict[str, Any] = {
        "endpoint": done.endpoint,
        "fallbacks": [public_hop(hop) for hop in done.hops],
        "cached": done.cached,
        "attempts": done.attempts,
    }
    if done.cached_age_s is not None:
        # Another process's clock wrote it: never "from the future".
        summary["cached_age_s"] = max(0.0, round(done.cached_age_s, 1))
    return summary


def completion_body(done: Done, model: str, created: int) -> dict[str, Any]:
    """A chat.completion object for a plain answer, with its `llmsite` summary.

    A cached answer's usage stays 0: nothing was generated for this request,
    and `llmsite.cached` says where the text came from.
    """
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    upstream = _first_choice(done.raw)
    upstream_message = upstream.get("message") if upstream else None
    if isinstance(upstream_message, Mapping):
        # Keep what upstream said beyond text (tool calls, refusal).
        message = {**upstream_message, "role": "assistant", "content": done.text}
    return {
        "id": _completion_id(done.request_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": done.finish_reason or "stop",
            }
        ],
        "usage": _usage(done),
        "llmsite": routing_summary(done),
    }


def _first_choice(body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    choices = body.get("choices") if body else None
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        return choices[0]
    return None


def _routing_headers(
    response: HttpResponse,
    endpoint: str | None,
    fallbacks: int,
    cached: bool,
    cached_age_s: float | None = None,
) -> None:
    """Which endpoint answered and whether a fallback happened: never hidden."""
    response["X-LLMSite-Endpoint"] = endpoint or ""
    response["X-LLMSite-Fallbacks"] = str(fallbacks)
    response["X-LLMSite-Cached"] = "true" if cached else "false"
    if cached_age_s is not None:
        response["X-LLMSite-Cached-Age"] = str(max(0, math.floor(cached_age_s)))


class _ChunkWriter:
    """Formats chat.completion.chunk events with our id and public model name."""

    def __init__(self, request_id: uuid.UUID, model: str, created: int) -> None:
        self.id = _completion_id(request_id)
        self.model = model
        self.created = created

    def chunk(
        self,
        delta: Mapping[str, Any] | None,
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        llmsite: dict[str, Any] | None = None,
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if delta is None
            else [
                {
                    "index": 0,
                    "delta": dict(delta),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if usage is not None:
            body["usage"] = usage
        if llmsite is not None:
            body["llmsite"] = llmsite
        return _sse(body)

    def delta(self, event: Delta) -> bytes:
        upstream = _first_choice(event.chunk)
        delta = upstream.get("delta") if upstream else None
        if isinstance(delta, Mapping):
            # Our first chunk carried the role; a failover's new stream repeats it.
            content = {k: v for k, v in delta.items() if k != "role"}
        else:
            content = {}
        content["content"] = event.text
        return self.chunk(content)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _EventStreamResponse(StreamingHttpResponse):
    """A streamed answer whose service generator is closed when the response is.

    Django cancels the streaming task when the client disconnects; if that
    lands while a chunk is being sent rather than inside our iterator, nothing
    would close the iterator until the garbage collector did. Closing it from
    `close()` (which the handler always calls) ends the upstream request now.
    """

    def __init__(self, events: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self._events = events
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        super().close()
        # RuntimeError: the loop is gone, and so is everything it ran.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_aclose_later, self._events)


# Closing tasks in flight; the loop keeps only weak references to tasks.
_closing: set[asyncio.Task[Any]] = set()


def _aclose_later(events: Any) -> None:
    task = asyncio.ensure_future(events.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


@dataclass(slots=True)
class _Opening:
    """What was known when the stream's headers went out."""

    endpoint: str | None = None
    cached: bool = False
    # The hops before the answer began, as `public_hop` shows them.
    fallbacks: list[dict[str, Any]] = field(default_factory=list)

    def take(self, event: service.Event) -> None:
        if isinstance(event, Fallback):
            self.fallbacks.append(public_hop(event.hop.to_dict()))
        elif isinstance(event, service.Started):
            self.endpoint, self.cached = event.endpoint, event.cached

    def summary(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "fallbacks": self.fallbacks,
            "cached": self.cached,
        }


def _status(status: service.Status) -> dict[str, Any]:
    """A router status line for `llmsite.status`, without its empty fields."""
    return {
        key: value
        for key, value in status.to_dict().items()
        if value is not None and value != ""
    }


def _stream_error(
    writer: _ChunkWriter, done: Done | None, include_usage: bool
) -> Iterable[bytes]:
    """The end of a stream that failed after it began: usage, error, [DONE].

    The usage chunk comes first when the client asked for usage, with what
    was counted of the partial answer: an SDK that waits for it still gets it.
    """
    error = done.error if done is not None else None
    if include_usage and done is not None:
        yield writer.chunk(None, usage=_usage(done))
    body = error_body(
        error.message if error else "The answer was interrupted.",
        error_type="server_error",
        code=error.code if error else str(RejectCode.UPSTREAM_ERROR),
    )
    if done is not None:
        # Inside "error": SDKs raise with that object as the exception's body.
        body["error"]["llmsite"] = routing_summary(done)
    yield _sse(body)
    yield _DONE


async def _event_stream(
    events: AsyncGenerator[service.Event, None],
    first: list[service.Event],
    opening: _Opening,
    writer: _ChunkWriter,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: the events read before the response, then the rest.

    The first chunk says who is answering; a fallback or status once the
    stream has begun gets an empty-delta chunk of its own, sent at once; the
    chunk with the finish_reason sums up the whole route of the answer.
    """
    async with aclosing(events):
        yield writer.chunk(
            {"role": "assistant", "content": ""}, llmsite=opening.summary()
        )
        done: Done | None = None
        try:
            for event in first:
                if isinstance(event, Delta):
                    yield writer.delta(event)
                elif isinstance(event, Done):
                    done = event
            if done is None:
                async for event in events:
                    if isinstance(event, Delta):
                        yield writer.delta(event)
                    elif isinstance(event, Fallback):
                        hop = event.hop
                        yield writer.chunk(
                            {},
                            llmsite={
                                "endpoint": hop.to_endpoint,
                                "fallback": public_hop(hop.to_dict()),
                            },
                        )
                    elif isinstance(event, service.Status):
                        yield writer.chunk({}, llmsite={"status": _status(event)})
                    elif isinstance(event, Done):
                        done = event
        except Rejected as rejected:
            yield _sse(_rejected_body(rejected))
            yield _DONE
            return
        except Exception:
            logger.exception("A /v1 stream failed after it started")
            for part in _stream_error(writer, None, include_usage):
                yield part
            return
        if done is None or done.error is not None:
            for part in _stream_error(writer, done, include_usage):
                yield part
            return
        yield writer.chunk(
            {}, done.finish_reason or "stop", llmsite=routing_summary(done)
        )
        if include_usage:
            yield writer.chunk(None, usage=_usage(done))
        yield _DONE


# --- Views ------------------------------------------------------------------------


def _usable_routes(**filters: Any) -> Any:
    return ModelRoute.objects.filter(enabled=True, endpoint__enabled=True, **filters)


def model_object(name: str, kinds: Iterable[str]) -> dict[str, Any]:
    """A model object; `llmsite.kinds` says what it serves (chat, embedding)."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "llmsite",
        "llmsite": {"kinds": sorted(set(kinds))},
    }


async def _with_limit_headers(owner: KeyOwner, response: HttpResponse) -> HttpResponse:
    # Reading models counts against nothing: the headers only read.
    states = _LimitStates()
    states(await limits.acaller_limit_states(owner.user_id, owner.api_key_id))
    return states.apply(response)


@csrf_exempt
@allow("GET")
async def list_models(request: HttpRequest) -> HttpResponse:
    """The public model names a key may ask for, chat and embedding alike."""
    owner = await authenticate(request)
    if owner is None:
        return _unauthorized()
    kinds: dict[str, set[str]] = {}
    rows = (
        _usable_routes()
        .order_by("model_name", "kind")
        .values_list("model_name", "kind")
        .distinct()
    )
    async for name, kind in rows:
        kinds.setdefault(name, set()).add(kind)
    data = [model_object(name, found) for name, found in kinds.items()]
    return await _with_limit_headers(
        owner, JsonResponse({"object": "list", "data": data})
    )


@csrf_exempt
@allow("GET")
async def retrieve_model(request: HttpRequest, model: str) -> HttpResponse:
    """One model a key may ask for (the SDK's `models.retrieve`), else a 404."""
    owner = await authenticate(request)
    if owner is None:
        return _unauthorized()
    kinds = [
        kind
        async for kind in _usable_routes(model_name=model)
        .values_list("kind", flat=True)
        .distinct()
    ]
    if not kinds:
        return error_response(
            404,
            f"The model {sanitize.clean_text(model, limit=200)!r} does not exist "
            "or is not enabled.",
            code="model_not_found",
            param="model",
        )
    return await _with_limit_headers(owner, JsonResponse(model_object(model, kinds)))


@csrf_exempt
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any other path under /v1/: OpenAI's 404, so SDKs raise NotFoundError."""
    return error_response(
        404,
        f"Unknown request URL: {request.method} "
        f"{sanitize.clean_text(request.path, limit=200)}. See the README's API section "
        "for the endpoints this gateway serves.",
        code="unknown_url",
    )


@csrf_exempt
@allow("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    """OpenAI's chat completions, plain or streamed, through the pipeline."""
    asked = await _caller_and_body(request, parse_chat_request)
    if isinstance(asked, HttpResponse):
        return asked
    owner, chat = asked
    states = _LimitStates()
    caller = _caller(owner, states)
    created = int(time.time())
    if not chat.stream:
        try:
            done = await service.complete_chat(
                caller, chat.model, chat.messages, chat.params
            )
        except Rejected as rejected:
            return states.apply(_rejected_response(rejected))
        response = JsonResponse(completion_body(done, chat.model, created))
        _routing_headers(
            response, done.endpoint, len(done.hops), done.cached, done.cached_age_s
        )
        return states.apply(response)
    return states.apply(await _stream(caller, chat, created))


async def _stream(caller: Caller, chat: ChatRequest, created: int) -> HttpResponse:
    # An async generator, whatever the service's annotation says: it has aclose().
    events = cast(
        "AsyncGenerator[service.Event, None]",
        service.stream_chat(caller, chat.model, chat.messages, chat.params),
    )
    # Read up to the first text: a refusal can only come before it, and the
    # endpoint that answers is known by then (the router buffers up to it).
    first: list[service.Event] = []
    opening = _Opening()
    try:
        async for event in events:
            first.append(event)
            opening.take(event)
            if isinstance(event, Delta | Done):
                break
    except Rejected as rejected:
        await events.aclose()
        return _rejected_response(rejected)
    except BaseException:
        # Client gone (the handler cancels the view) or a bug: close upstream.
        await events.aclose()
        raise
    assert caller.request_id is not None
    response = _EventStreamResponse(
        _event_stream(
            events,
            first,
            opening,
            _ChunkWriter(caller.request_id, chat.model, created),
            chat.include_usage,
        ),
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-cache"
    # Proxies such as nginx would otherwise hold tokens back in their buffer.
    response["X-Accel-Buffering"] = "no"
    _routing_headers(response, opening.endpoint, len(opening.fallbacks), opening.cached)
    return response


# --- Embeddings -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated /v1/embeddings body."""

    model: str
    inputs: list[str | list[int]]
    # encoding_format, dimensions, user: passed upstream.
    params: dict[str, Any]


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Validate an embeddings body; raises BadRequest naming the field."""
    try:
        data = inbound.loads(body)
        if not isinstance(data, dict):
            raise BadRequest("The body must be a JSON object.")
        return EmbeddingRequest(
            model=wire.check_model(data.get("model")),
            inputs=wire.check_embedding_input(data.get("input")),
            params=wire.check_embedding_params(data),
        )
    except inbound.InboundError as exc:
        raise BadRequest(exc.message, exc.path) from None


def embedding_body(done: Done, model: str) -> dict[str, Any]:
    """OpenAI's embeddings list, in input order, with the `llmsite` summary."""
    vectors = (done.raw or {}).get("vectors") or []
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {
            "prompt_tokens": done.prompt_tokens,
            "total_tokens": done.prompt_tokens,
        },
        "llmsite": routing_summary(done),
    }


@csrf_exempt
@allow("POST")
async def embeddings(request: HttpRequest) -> HttpResponse:
    """OpenAI's embeddings, through the same limits, budgets and records as chat."""
    asked = await _caller_and_body(request, parse_embedding_request)
    if isinstance(asked, HttpResponse):
        return asked
    owner, parsed = asked
    states = _LimitStates()
    caller = _caller(owner, states)
    try:
        done = await service.embed(caller, parsed.model, parsed.inputs, parsed.params)
    except Rejected as rejected:
        return states.apply(_rejected_response(rejected, _EMBEDDING_ERROR_PARAMS))
    response = JsonResponse(embedding_body(done, parsed.model))
    _routing_headers(response, done.endpoint, len(done.hops), done.cached)
    return states.apply(response)
