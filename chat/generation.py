"""Running answers: owned by the server, watched by any number of sockets.

An answer is an asyncio task in the web process that started it, registered
here by conversation. Sockets are listeners: the one that asked, a reloaded
page, a second tab. Frames reach local listeners by a direct call (never
through the channel layer); the answer so far plus coalesced deltas reach a
socket served by another process through the channel layer, one message per
frame and only for such extra listeners.

Life of an answer:

- ``start()`` checks ownership, claims the conversation and a per-user slot
  (chat.leases), plans the turn without storing anything and starts the task.
- Once the gateway admits the request (its rate limits and budget said yes),
  the question and a placeholder answer (status streaming, with the usage
  record's request id) are stored, and only then does the ``start`` frame go
  out. A request refused before that (rate limit, budget, context too large,
  no endpoint) leaves the conversation as it was: the asker gets an ``error``
  frame with ``refused: true`` and keeps the text.
- Deltas are coalesced: at most one ``delta`` frame per CHAT_FRAME_INTERVAL_MS.
- While no text flows (a failover, a retry's wait, a rate limit's wait) a
  ``status`` frame says what is happening. The latest one is kept until text
  flows again, so a socket that joins meanwhile sees it in its ``start``.
- ``stop`` cancels the task at once: the upstream request is closed, the
  partial answer is stored as partial with its (cancelled) usage record.
- When the last listener leaves, the answer keeps streaming for
  CHAT_RESUME_GRACE_SECONDS so a reload or a dropped connection can resume it,
  then it is cancelled as if stopped. With a grace of 0 it is cancelled at once.
- At the end the placeholder answer is updated, the claims are released and
  the last frame (``done`` or ``error``) goes to every listener.
- On SIGTERM (llmsite.shutdown) answers run on for the grace period, then
  are stopped with the reason ``shutdown``; new ones are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from chat import actions, attachments, conversation_settings, errors, frames, leases
from chat.conf import chat_settings
from chat.conversation_settings import ConversationSettings
from chat.errors import ChatError
from chat.models import MessageStatus
from chat.protocol import Edit, Regenerate, Send
from gateway import accounting, limits, router, sanitize, service
from gateway.models import UsageRecord
from llmsite.shutdown import RETRY_AFTER_SECONDS, shutdown

logger = logging.getLogger(__name__)

GROUP_PREFIX = "chat.conv."
# How long a stop sent to another process waits for that process to confirm.
STOP_ACK_SECONDS = 2.0
# The router builds status lines from endpoint names; a line is one sentence.
STATUS_CHARS = 300

T = TypeVar("T")
R = TypeVar("R")

# What the first step of an answer gives: its planned turn and its claims.
Prepared = tuple[actions.Turn, leases.Lease]


def group_name(conversation_id: uuid.UUID) -> str:
    """The channel-layer group of the sockets showing a conversation."""
    return f"{GROUP_PREFIX}{conversation_id.hex}"


def encode(frame: dict[str, Any]) -> str:
    """Serialise a frame once, whatever the number of listeners."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class Listener(Protocol):
    """A socket that receives an answer's frames."""

    channel_name: str

    async def deliver(self, text: str) -> None:
        """Send one encoded frame to the browser."""


class Generation:
    """One answer being written, and the sockets watching it."""

    def __init__(
        self,
        registry: GenerationRegistry,
        user: Any,
        turn: actions.Turn,
        lease: leases.Lease,
    ) -> None:
        self.registry = registry
        self.user_id: int = user.pk
        self.conversation_id: uuid.UUID = turn.conversation.id
        # Every frame names its conversation; converted once.
        self._cid = str(self.conversation_id)
        self.turn = turn
        # Known once the turn is stored (the gateway admitted the request).
        self.conversation: dict[str, Any] | None = None
        self.user_message: dict[str, Any] | None = None
        self.origin: Listener | None = None
        self.model = turn.model
        self.history = turn.history
        self.lease = lease
        # The usage record's request id, so a stopped answer finds its record.
        self.request_id = uuid.uuid4()
        # What every listener has been sent, and what waits for the next frame.
        self.sent: list[str] = []
        self.seq = 0
        self._outbox: list[str | dict[str, Any]] = []
        self._dirty = asyncio.Event()
        self._closing = False
        self._lock = asyncio.Lock()
        self.endpoint: str | None = None
        self.context: dict[str, Any] | None = None
        self.hops: list[dict[str, Any]] = []
        self.cached = False
        # The status line shown while no text flows, None while it does.
        self.status: dict[str, Any] | None = None
        self.local: set[Listener] = set()
        self.remote: set[str] = set()
        self.stop_reason: str | None = None
        self._rejected: service.Rejected | None = None
        # What is left of the asker's rate limits once counted, by (scope,
        # kind): the browser shows "N requests left this minute" when low.
        self.rate_limits: dict[tuple[str, str], dict[str, Any]] = {}
        self._streaming = False
        self._grace: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None

    # Listeners ---------------------------------------------------------------

    def start_frame(self) -> dict[str, Any]:
        """The frame that opens the answer on a socket: everything so far."""
        return {
            "type": "start",
            "conversation_id": self._cid,
            "conversation": self.conversation,
            "user_message": self.user_message,
            "model": self.model,
            "text": "".join(self.sent),
            "seq": self.seq,
            "endpoint": self.endpoint,
            "context": self.context,
            "hops": self.hops,
            "cached": self.cached,
            "status": self.status,
        }

    def start_texts(self) -> list[str]:
        """The start frame, its long answer so far split into chunks to fit."""
        frame = self.start_frame()
        return frames.split_frame(
            frame,
            holder=frame,
            field="text",
            chunk={"conversation_id": self._cid, "message_id": None},
        )

    async def attach(self, listener: Listener) -> None:
        """Add a socket in this process; it first gets the answer so far."""
        async with self._lock:
            if self.turn.committed:
                for text in self.start_texts():
                    await listener.deliver(text)
            self.local.add(listener)
            self._keep()

    async def attach_remote(self, channel: str) -> None:
        """Add a socket served by another process, through the channel layer."""
        async with self._lock:
            if self.turn.committed:
                for text in self.start_texts():
                    if not await self.registry.send_remote(channel, text):
                        return
            self.remote.add(channel)
            self._keep()

    def detach(self, listener: Listener) -> None:
        """A socket in this process left."""
        self.local.discard(listener)
        self._maybe_abandoned()

    def detach_remote(self, channel: str) -> None:
        """A socket in another process left."""
        self.remote.discard(channel)
        self._maybe_abandoned()

    def _keep(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _maybe_abandoned(self) -> None:
        if self.local or self.remote or self._grace is not None:
            return
        if shutdown.draining:
            # The server closes every socket as it shuts down; the answer is
            # still stored, within the shutdown's grace period.
            return
        grace = chat_settings().resume_grace
        if grace <= 0:
            self.stop("disconnect")
        else:
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(grace, self.stop, "disconnect")

    # Control -----------------------------------------------------------------

    def stop(self, reason: str = "stop") -> None:
        """Cancel the upstream request now; the partial answer is kept."""
        self._keep()
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._streaming and self.task is not None:
            self.task.cancel()

    def run(self) -> asyncio.Task[None]:
        """Start streaming in a task of its own, owned by the registry."""
        self.task = asyncio.create_task(
            self._run(), name=f"chat-answer-{self.conversation_id}"
        )
        self._pump = asyncio.create_task(self._pump_frames())
        shutdown.track(self.task, lambda: self.stop("shutdown"))
        return self.task

    async def wait(self) -> None:
        """Return once the answer is stored and its last frame sent."""
        if self.task is not None:
            await asyncio.shield(self.task)

    # Streaming -----------------------------------------------------------------

    async def _run(self) -> None:
        done: service.Done | None = None
        error: ChatError | None = None
        self._streaming = True
        try:
            if self.stop_reason is None:
                caller = service.Caller(
                    user_id=self.user_id,
                    conversation_id=self.conversation_id,
                    request_id=self.request_id,
                    on_admitted=self._commit,
                    on_limits=self._on_limits,
                )
                events = service.stream_chat(
                    caller, self.model, self.history, self.turn.params
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        if not isinstance(event, service.Fallback | service.Status):
                            # Admission may not have been asked (a cached
                            # answer in degraded mode): an answer is coming.
                            # Fallbacks and statuses say no such thing: until
                            # admission their frames wait in the outbox.
                            await self._commit()
                        if isinstance(event, service.Delta):
                            self.status = None
                            self._push_text(event.text)
                        elif isinstance(event, service.Started):
                            self._on_started(event)
                        elif isinstance(event, service.Fallback):
                            self._on_fallback(event)
                        elif isinstance(event, service.Status):
                            self._on_status(event)
                        elif isinstance(event, service.Done):
                            done = event
        except service.Rejected as exc:
            error = errors.from_service(exc.code, exc.message, exc.retry_after)
            self._rejected = exc
        except ChatError as exc:
            # Storing the turn on admission refused it (deleted meanwhile).
            error = exc
        except asyncio.CancelledError:
            # Our own stop: the service has closed the upstream request and
            # written the usage record as cancelled. Go on to store the answer.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.stop_reason = self.stop_reason or "stop"
        except Exception:
            logger.exception("answer in conversation %s failed", self.conversation_id)
            error = ChatError(
                "internal_error",
                "Something went wrong on our side while writing the answer. "
                "Your message is saved; try again.",
            )
        finally:
            self._streaming = False
        await self._finish(done, error)

    def _on_limits(self, states: Any) -> None:
        for state in states:
            self.rate_limits[(state.scope, state.kind)] = state.to_dict()

    async def _commit(self) -> None:
        """The gateway admitted the request: store the turn, tell the sockets."""
        if self.turn.committed:
            return
        await self.registry.commit_turn(self.turn, self.request_id)
        assert self.turn.user_message is not None
        self.conversation = actions.conversation_dict(self.turn.conversation)
        self.user_message = actions.message_dict(self.turn.user_message)
        async with self._lock:
            for text in self.start_texts():
                await self._broadcast(text)
        # Frames held back until now (fallbacks before the first answer).
        self._dirty.set()
        if not self.turn.is_new_conversation:
            # A new conversation's id is first told by the start frame just
            # sent: no other socket can be showing it. Skipping the group send
            # matters in a burst, where the in-memory channel layer walks every
            # channel and group on each send and on the receive it wakes.
            await self.registry.announce(self)

    def _push_text(self, text: str) -> None:
        if not text:
            return
        if self._outbox and isinstance(self._outbox[-1], str):
            self._outbox[-1] += text
        else:
            self._outbox.append(text)
        self._dirty.set()

    def _push_frame(self, frame: dict[str, Any]) -> None:
        self._outbox.append(frame)
        self._dirty.set()

    def _on_started(self, event: service.Started) -> None:
        # The router starts a route once its first text has come: it flows.
        self.status = None
        self.endpoint = event.endpoint
        self.cached = event.cached
        self.context = event.context.to_dict() if event.context is not None else None
        self._push_frame(
            {
                "type": "context",
                "conversation_id": self._cid,
                "endpoint": self.endpoint,
                "cached": self.cached,
                "status": self.context,
            }
        )

    def _on_fallback(self, event: service.Fallback) -> None:
        hop = hop_dict(event.hop)
        self.hops.append(hop)
        self._push_frame({"type": "fallback", "conversation_id": self._cid, **hop})

    def _on_status(self, event: service.Status) -> None:
        self.status = status_dict(event)
        self._push_frame(
            {"type": "status", "conversation_id": self._cid, **self.status}
        )

    async def _pump_frames(self) -> None:
        # The only sender while streaming, so frames keep their order.
        interval = chat_settings().frame_interval
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._flush()
            if self._closing:
                return
            await asyncio.sleep(interval)

    async def _flush(self) -> None:
        if not self.turn.committed:
            return
        async with self._lock:
            items, self._outbox = self._outbox, []
            for item in items:
                if not isinstance(item, str):
                    await self._broadcast(encode(item))
                    continue
                # A cached answer comes as one delta: cut it to fit frames.
                for piece in frames.split_delta(item):
                    self.sent.append(piece)
                    self.seq += 1
                    frame = {
                        "type": "delta",
                        "conversation_id": self._cid,
                        "seq": self.seq,
                        "text": piece,
                    }
                    await self._broadcast(encode(frame))

    async def _broadcast(self, text: str) -> None:
        for listener in list(self.local):
            try:
                await listener.deliver(text)
            except Exception:
                # A socket that cannot take a frame is gone; the others go on.
                logger.debug("dropping a listener of %s", self.conversation_id)
                self.local.discard(listener)
        for channel in list(self.remote):
            if not await self.registry.send_remote(channel, text):
                self.remote.discard(channel)

    async def _finish(self, done: service.Done | None, error: ChatError | None) -> None:
        self._closing = True
        self.status = None
        self._dirty.set()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await self._pump
        if not self.turn.committed:
            await self._refused(error)
            return
        assert self.turn.answer_id is not None
        saved = None
        # The done frame's budget_remaining, when no Done carries it.
        record_budget: dict[str, Any] = {}
        try:
            answer, error = self._answer(done, error)
            answer.usage_id = await self._usage_id(done)
            if done is None and self._rejected is None and answer.usage_id:
                # Stopped (or failed inside the service): no Done carries the
                # usage, but the cancelled record does.
                record_budget = await self._from_record(answer)
            saved = await self.registry.save_answer(
                self.conversation_id, self.turn.answer_id, answer
            )
        except Exception:
            logger.exception("storing the answer of %s failed", self.conversation_id)
            error = ChatError(
                "internal_error",
                "The answer could not be stored. Your message is saved; try again.",
            )
            answer = actions.Answer(
                content="".join(self.sent), status=MessageStatus.ERROR, model=self.model
            )
        finally:
            await self.registry.forget(self)
        conversation_id = self._cid
        budget: dict[str, Any] = record_budget
        if done is not None:
            budget = {"budget_remaining": done.budget_remaining}
        budget["rate_limits"] = list(self.rate_limits.values())
        if error is not None:
            frame = error.frame(conversation_id=conversation_id, answer=saved, **budget)
        else:
            frame = {
                "type": "done",
                "conversation_id": conversation_id,
                "answer": saved,
                **answer.meta,
                **budget,
            }
        # A long answer is split: its beginning goes in chunk frames.
        texts = frames.message_frames(frame, saved) if saved else [encode(frame)]
        async with self._lock:
            for text in texts:
                await self._broadcast(text)
            self.local.clear()
            self.remote.clear()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    async def _usage_id(self, done: service.Done | None) -> int | None:
        """The id of this answer's usage record, once the gateway has stored it."""
        try:
            if done is not None:
                return await done.recorded()
            if self._rejected is not None:
                return await self._rejected.recorded()
            # Stopped, or failed inside the service: the record was queued on
            # this loop under the request id this answer chose.
            await accounting.flush()
            return await database_sync_to_async(self._record_id)()
        except Exception:
            # The answer is worth keeping without its link to the record.
            logger.exception("no usage record for the answer in %s", self._cid)
            return None

    async def _from_record(self, answer: actions.Answer) -> dict[str, Any]:
        """Fill a Done-less answer from its usage record; the budget left.

        Returns ``{"budget_remaining": ...}`` (None: no limit), or nothing when
        the record cannot be read.
        """
        try:
            record = await database_sync_to_async(
                UsageRecord.objects.filter(pk=answer.usage_id).first
            )()
            if record is None:
                return {}
            answer.endpoint_id = record.endpoint_id
            answer.endpoint_name = record.endpoint_name
            answer.completion_tokens = record.completion_tokens
            meta = answer.meta
            meta["endpoint"] = record.endpoint_name or meta.get("endpoint")
            meta["usage"] = {
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "estimated": record.tokens_estimated,
            }
            if record.upstream_model:
                meta["upstream_model"] = record.upstream_model
            if record.latency_ms is not None:
                meta["latency_ms"] = round(record.latency_ms, 1)
            if record.ttft_ms is not None:
                meta["ttft_ms"] = round(record.ttft_ms, 1)
            if record.attempts:
                meta["attempts"] = record.attempts
            states = await accounting.abudget_status(self.user_id)
            left = [s.remaining for s in states if s.remaining is not None]
            return {"budget_remaining": min(left) if left else None}
        except Exception:
            logger.exception("reading the usage record of %s failed", self._cid)
            return {}

    async def _refused(self, error: ChatError | None) -> None:
        # Nothing was stored: the asker keeps the text, the conversation (if
        # any) is as it was, and the claims are given back.
        await self.registry.forget(self)
        if self._rejected is not None:
            rejected = self._rejected
            error = errors.from_service(
                rejected.code, rejected.message, rejected.retry_after, refused=True
            )
        elif error is None:
            if self.stop_reason is not None:
                error = ChatError(
                    "stopped", "Stopped before the answer began; nothing was sent."
                )
            else:
                error = ChatError(
                    "internal_error", "Something went wrong on our side; try again."
                )
        extra: dict[str, Any] = {
            "request": self.turn.kind,
            "refused": True,
            "rate_limits": list(self.rate_limits.values()),
        }
        if not self.turn.is_new_conversation:
            extra["conversation_id"] = self._cid
        text = encode(error.frame(**extra))
        async with self._lock:
            await self._broadcast(text)
            self.local.clear()
            self.remote.clear()
        self._keep()

    def _record_id(self) -> int | None:
        return (
            UsageRecord.objects.filter(request_id=self.request_id)
            .values_list("id", flat=True)
            .first()
        )

    def _answer(
        self, done: service.Done | None, error: ChatError | None
    ) -> tuple[actions.Answer, ChatError | None]:
        text = "".join(self.sent)
        meta: dict[str, Any] = {
            "endpoint": self.endpoint,
            "hops": self.hops,
            "cached": self.cached,
            "context": self.context,
            "stopped": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
        }
        answer = actions.Answer(
            content=text, status=MessageStatus.COMPLETE, model=self.model
        )
        if done is not None:
            answer.content = done.text or text
            answer.endpoint_id = done.endpoint_id
            answer.endpoint_name = done.endpoint or ""
            answer.completion_tokens = done.completion_tokens
            meta.update(
                endpoint=done.endpoint,
                upstream_model=done.upstream_model,
                usage={
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "estimated": done.tokens_estimated,
                },
                latency_ms=round(done.latency_ms, 1),
                ttft_ms=None if done.ttft_ms is None else round(done.ttft_ms, 1),
                attempts=done.attempts,
                cached=done.cached,
                finish_reason=done.finish_reason,
            )
            if done.context is not None:
                meta["context"] = done.context.to_dict()
            if done.error is not None:
                error = errors.from_service(
                    done.error.code,
                    done.error.message,
                    done.error.retry_after,
                    partial=bool(answer.content),
                )
        if error is not None:
            answer.status = (
                MessageStatus.PARTIAL if answer.content else MessageStatus.ERROR
            )
            meta["error"] = {
                "code": error.code,
                "message": error.message,
                "retry_after": error.retry_after,
            }
        elif self.stop_reason is not None:
            answer.status = MessageStatus.PARTIAL
        answer.meta = meta
        return answer, error


def hop_dict(hop: router.Hop) -> dict[str, Any]:
    """What the browser shows about a fallback: from where, why, to where."""
    return {
        "from": hop.endpoint,
        "to": hop.to_endpoint,
        "reason": hop.reason,
        "status_code": hop.status_code,
        "message": hop.message,
        "mid_stream": hop.mid_stream,
    }


def status_dict(status: router.Status) -> dict[str, Any]:
    """What the browser shows while an answer waits: a sentence, and its parts."""
    seconds = status.seconds
    return {
        "kind": status.kind,
        "text": sanitize.clean_text(status.text, limit=STATUS_CHARS),
        "endpoint": status.endpoint,
        "to_endpoint": status.to_endpoint,
        "seconds": None if seconds is None else round(seconds, 1),
    }


def prepare_for(
    user: Any, request: Send | Regenerate | Edit
) -> Callable[[str], tuple[actions.Turn, leases.Lease]]:
    """The synchronous first step of an answer: check, claim, plan the turn.

    Nothing is stored here: the turn is stored once the gateway admits it.

    Ownership is checked before anything is claimed, so a busy conversation of
    another user looks exactly like a missing one.
    """

    def prepare(owner: str) -> tuple[actions.Turn, leases.Lease]:
        build: Callable[[], actions.Turn]
        model = request.model
        if isinstance(request, Send):
            if request.conversation_id is None:
                conversation_id = uuid.uuid4()
            else:
                conversation_id = actions.owned_conversation(
                    user, request.conversation_id
                ).id

            def build() -> actions.Turn:
                return actions.plan_send(
                    user,
                    request.conversation_id,
                    request.content,
                    request.model,
                    new_id=conversation_id,
                    settings=_new_settings(request),
                )

        elif isinstance(request, Regenerate):
            conversation_id = actions.owned_conversation(
                user, request.conversation_id
            ).id

            def build() -> actions.Turn:
                return actions.plan_regenerate(user, conversation_id, model)

        else:
            conversation_id = actions.conversation_of_message(user, request.message_id)

            def build() -> actions.Turn:
                return actions.plan_edit(
                    user, request.message_id, request.content, model
                )

        limit = chat_settings().max_concurrent_generations
        lease = leases.claim(user.pk, conversation_id, limit, owner)
        try:
            # max_tokens is checked against the routes when the user chose it.
            chosen = isinstance(request, Send) and request.settings is not None
            turn = _with_settings(build(), max_tokens=chosen)
            # Images: the new uploads checked, and every image of the history
            # put into the messages sent upstream.
            attachments.prepare(user, turn, getattr(request, "attachments", ()))
            # The gateway reads the user's limits and budgets when it admits
            # the request; read them here, in this thread hop, so that it finds
            # them cached instead of queuing two more behind other answers.
            limits.caller_limits(user.pk, None)
            accounting.caller_budgets(user.pk, None)
            return turn, lease
        except BaseException:
            leases.release(lease)
            raise

    return prepare


def prepare_all(
    items: list[tuple[int, Callable[[str], Prepared], str]],
) -> list[Prepared | Exception]:
    """Run the first steps of several answers (`prepare_for`) in one thread hop.

    Their askers' limits and budgets are read first, in one query each for
    all of them, where each step would otherwise read its own: at a burst of
    starts those reads were most of the database thread's work per start.
    Returns each step's turn and claims, or the exception that refused it.
    """
    users = [user_id for user_id, _, _ in items]
    try:
        limits.read_users_limits(users)
        accounting.read_users_budgets(users)
    except Exception:
        # Each step reads its own asker's, and fails alone if it must.
        logger.exception("reading the limits of %d askers failed", len(users))
    results: list[Prepared | Exception] = []
    for _, prepare, owner in items:
        try:
            results.append(prepare(owner))
        except Exception as exc:
            results.append(exc)
    return results


def _new_settings(request: Send) -> ConversationSettings | None:
    """A new conversation's settings: the ones sent, else the model's defaults."""
    if request.conversation_id is not None:
        return None
    if request.settings is not None:
        return request.settings
    return conversation_settings.model_defaults(request.model)


def _with_settings(turn: actions.Turn, *, max_tokens: bool) -> actions.Turn:
    """Check the conversation's settings against the model; its params go along.

    A system prompt too large for every route of the model is refused here,
    before anything is sent or stored. ``max_tokens`` is checked against the
    routes only when the user has just chosen it (a new conversation's
    ``settings``; the ``settings`` frame checks its own): otherwise the router
    caps it at each route's limit, so a model's defaults or a change of model
    never lock a conversation.
    """
    settings = ConversationSettings.of(turn.conversation)
    conversation_settings.check_for_model(settings, turn.model, max_tokens=max_tokens)
    turn.params = settings.params()
    return turn


async def check_model(model: str) -> None:
    """Refuse a model name no enabled route serves, before anything is stored."""
    # The router keeps route snapshots in memory: no query per message.
    if not await router.load_routes(model):
        raise ChatError("unknown_model", f"The model {model[:80]!r} is not available.")


class Batches(Generic[T, R]):
    """Calls of a synchronous ORM function, gathered: one thread hop per batch.

    ``store`` takes a list of items and returns, in order, each item's result
    or the exception that refused it. An item that comes while a batch is
    being stored goes into the next one, so nothing waits on a timer.
    """

    def __init__(self, store: Callable[[list[T]], list[R | Exception]]) -> None:
        self._store = store
        self._pending: list[tuple[T, asyncio.Future[R | Exception]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def run(self, item: T) -> R:
        """Store one item with whatever else is waiting; its result, or raise."""
        outcome: asyncio.Future[R | Exception] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append((item, outcome))
        if self._worker is None or self._worker.done():
            # A fresh context: the batch must not run on the executor of the
            # one request that happened to start it.
            self._worker = asyncio.create_task(
                self._work(), context=contextvars.Context()
            )
        try:
            result = await asyncio.shield(outcome)
        except asyncio.CancelledError:
            # Stopped meanwhile: whether the item was stored must be known
            # before the caller goes on.
            await asyncio.wait([outcome])
            raise
        if isinstance(result, Exception):
            raise result
        return result

    async def _work(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await database_sync_to_async(self._store)(
                    [item for item, _ in batch]
                )
            except Exception as exc:
                results = [exc] * len(batch)
            for (_, outcome), result in zip(batch, results, strict=True):
                outcome.set_result(result)


class GenerationRegistry:
    """The answers running in this process, by conversation."""

    def __init__(self, layer_alias: str = "default") -> None:
        self.layer_alias = layer_alias
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self._running: dict[uuid.UUID, Generation] = {}
        self._layer: Any = None
        self._channel: str | None = None
        self._control: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._prepares: Batches[
            tuple[int, Callable[[str], Prepared], str], Prepared
        ] = Batches(prepare_all)
        self._commits: Batches[tuple[actions.Turn, uuid.UUID], None] = Batches(
            actions.commit_turns
        )
        self._saves: Batches[
            tuple[uuid.UUID, int, actions.Answer], dict[str, Any] | None
        ] = Batches(actions.save_answers)

    async def _ready(self) -> None:
        # Per event loop: a test suite runs many loops in one process.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._reset()
            self._layer = get_channel_layer(self.layer_alias)
        if self._layer is not None and self._channel is None:
            # The default prefix on purpose: channels_redis reads every
            # channel of one prefix with a single blocking pop per process;
            # a prefix of our own would wait behind the sockets' pop.
            self._channel = await self._layer.new_channel()
            self._control = asyncio.create_task(self._receive_control())

    async def aclose(self) -> None:
        """Stop the control receiver and the claim renewer of this event loop.

        A process runs one loop and never needs it; a test suite runs a loop
        per test, and a receiver left waiting on the channel layer when its
        loop ends holds the layer's receive state for the next loop.
        """
        tasks = [t for t in (self._control, self._renewer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None
        self._reset()

    @property
    def channel(self) -> str:
        """This process's channel for control messages from other processes."""
        return self._channel or ""

    def get(self, conversation_id: uuid.UUID) -> Generation | None:
        """The answer running here for a conversation, if any."""
        return self._running.get(conversation_id)

    def running(self) -> list[Generation]:
        """Every answer running in this process."""
        return list(self._running.values())

    # Starting ------------------------------------------------------------------

    async def start(
        self,
        user: Any,
        prepare: Callable[[str], tuple[actions.Turn, leases.Lease]],
        listener: Listener | None,
    ) -> Generation:
        """Plan the turn (``prepare``) and start answering it."""
        if shutdown.draining:
            raise ChatError(
                "server_restarting",
                "The server is restarting. Nothing was sent; your text is still "
                "here. Send it again in a few seconds.",
                retry_after=RETRY_AFTER_SECONDS,
            )
        await self._ready()
        turn, lease = await self._prepares.run((user.pk, prepare, self.channel))
        generation = Generation(self, user, turn, lease)
        generation.origin = listener
        self._running[generation.conversation_id] = generation
        if listener is not None:
            await generation.attach(listener)
        generation.run()
        self._ensure_renewer()
        return generation

    async def commit_turn(self, turn: actions.Turn, request_id: uuid.UUID) -> None:
        """Store an admitted turn (`actions.commit_turns`), batched with others.

        One thread hop and one transaction per batch rather than per answer:
        at a burst of starts, the hops onto Django's single database thread
        were what made the first token wait.
        """
        await self._commits.run((turn, request_id))

    async def save_answer(
        self, conversation_id: uuid.UUID, answer_id: int, answer: actions.Answer
    ) -> dict[str, Any] | None:
        """Store how an answer ended (`actions.save_answers`), batched with others.

        Answers started in a burst end in one too.
        """
        return await self._saves.run((conversation_id, answer_id, answer))

    async def announce(self, generation: Generation) -> None:
        """Tell other tabs showing the conversation that an answer began."""
        # They join the stream themselves.
        origin = generation.origin
        if self._layer is None:
            return
        with contextlib.suppress(Exception):
            await self._layer.group_send(
                group_name(generation.conversation_id),
                {
                    "type": "chat.started",
                    "conversation_id": str(generation.conversation_id),
                    "origin": origin.channel_name if origin is not None else "",
                },
            )

    async def forget(self, generation: Generation) -> None:
        """Unregister a finished answer and release its claims."""
        if self._running.get(generation.conversation_id) is generation:
            del self._running[generation.conversation_id]
        try:
            await sync_to_async(leases.release)(generation.lease)
        except Exception:
            # The claims expire on their own after CHAT_LEASE_SECONDS.
            logger.exception(
                "releasing the claims of %s failed", generation.conversation_id
            )

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        while self._running:
            await asyncio.sleep(leases.renew_seconds())
            current = [g.lease for g in self._running.values()]
            try:
                await sync_to_async(leases.renew)(current)
            except Exception:
                logger.exception("renewing answer claims failed")

    # Joining, leaving, stopping --------------------------------------------------

    async def attach(
        self, conversation_id: uuid.UUID, listener: Listener
    ) -> str | None:
        """Join a running answer; say where it runs.

        Returns "" when it runs in this process, the channel of the process
        running it otherwise, and None when no answer is running.
        """
        await self._ready()
        generation = self._running.get(conversation_id)
        if generation is not None:
            await generation.attach(listener)
            return ""
        if self._layer is None:
            return None
        owner = await sync_to_async(leases.owner_of)(conversation_id)
        if not owner or owner == self._channel:
            return None
        sent = await self._send_control(
            owner,
            {
                "type": "chat.attach",
                "conversation_id": str(conversation_id),
                "reply_to": listener.channel_name,
            },
        )
        return owner if sent else None

    async def detach(
        self, conversation_id: uuid.UUID, listener: Listener, owner: str
    ) -> None:
        """Leave an answer joined with attach()."""
        if not owner:
            generation = self._running.get(conversation_id)
            if generation is not None:
                generation.detach(listener)
            return
        await self._send_control(
            owner,
            {
                "type": "chat.detach",
                "conversation_id": str(conversation_id),
                "channel": listener.channel_name,
            },
        )

    async def stop(self, user_id: int, conversation_id: uuid.UUID) -> bool:
        """Stop the user's answer in a conversation, wherever it runs."""
        await self._ready()
        generation = self._running.get(conversation_id)
        if generation is not None:
            if generation.user_id != user_id:
                return False
            generation.stop("stop")
            return True
        if self._layer is None:
            return False
        owner = await sync_to_async(leases.owner_of)(conversation_id)
        if not owner or owner == self._channel:
            return False
        # Stopped only if the process running it says so: its answer may have
        # ended meanwhile, or the process died with its claim still held.
        token = uuid.uuid4().hex
        reply: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks[token] = reply
        try:
            sent = await self._send_control(
                owner,
                {
                    "type": "chat.stop",
                    "conversation_id": str(conversation_id),
                    "user_id": user_id,
                    "reply_to": self._channel,
                    "token": token,
                },
            )
            if not sent:
                return False
            return await asyncio.wait_for(reply, STOP_ACK_SECONDS)
        except TimeoutError:
            return False
        finally:
            self._acks.pop(token, None)

    # Channel layer -------------------------------------------------------------

    async def send_remote(self, channel: str, text: str) -> bool:
        """Send one encoded frame to a socket of another process."""
        return await self._send_control(channel, {"type": "chat.frame", "text": text})

    async def _send_control(self, channel: str, message: dict[str, Any]) -> bool:
        try:
            await self._layer.send(channel, message)
        except ChannelFull:
            return False
        except Exception:
            logger.exception("channel layer send failed")
            return False
        return True

    async def _receive_control(self) -> None:
        while True:
            try:
                message = await self._layer.receive(self._channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("receiving chat control messages failed")
                await asyncio.sleep(1)
                continue
            try:
                await self._on_control(message)
            except Exception:
                logger.exception("chat control message %r failed", message.get("type"))

    async def _on_control(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "chat.stop_ack":
            reply = self._acks.get(str(message.get("token")))
            if reply is not None and not reply.done():
                reply.set_result(message.get("stopped") is True)
            return
        conversation_id = uuid.UUID(message["conversation_id"])
        generation = self._running.get(conversation_id)
        if kind == "chat.stop":
            stopped = (
                generation is not None and message.get("user_id") == generation.user_id
            )
            if stopped:
                assert generation is not None
                generation.stop("stop")
            if isinstance(message.get("reply_to"), str):
                await self._send_control(
                    message["reply_to"],
                    {
                        "type": "chat.stop_ack",
                        "token": str(message.get("token")),
                        "stopped": stopped,
                    },
                )
            return
        if generation is None:
            if kind == "chat.attach":
                # It ended meanwhile: the page reloads the stored answer.
                await self._send_control(
                    message["reply_to"],
                    {"type": "chat.ended", "conversation_id": str(conversation_id)},
                )
            return
        if kind == "chat.attach":
            await generation.attach_remote(message["reply_to"])
        elif kind == "chat.detach":
            generation.detach_remote(message["channel"])


registry = GenerationRegistry()
