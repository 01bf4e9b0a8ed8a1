"""Graceful shutdown of a web process: finish what runs, refuse what is new.

On SIGTERM a web process:

1. stops accepting new work: new chat answers are refused with
   ``server_restarting`` (the browser keeps the text), new ``/v1`` requests get
   503 with Retry-After;
2. lets the work in flight (chat answers, ``/v1`` requests plain and streamed)
   finish for up to SHUTDOWN_GRACE_SECONDS;
3. then cuts the rest the way a stop or a client disconnect does: the partial
   answer is stored, the usage record written as cancelled and the
   reservation settled;
4. writes the usage records still queued, and lets the server exit.

The logic lives in `Shutdown`, which tests drive without a server. Work
registers itself with `shutdown.track()` (chat.generation does for answers,
`GracefulApp` for every HTTP request). The hooks per server are thin:

- uvicorn sends the ASGI lifespan ``shutdown`` only after its connections
  have closed, and closes websockets (1012) at once; `GracefulApp` chains its
  SIGTERM/SIGINT handler at lifespan startup so the grace period starts with
  the signal, and drains at lifespan shutdown. Do not set uvicorn's
  ``--timeout-graceful-shutdown`` below the grace.
- daphne (Twisted's asyncio reactor) has no lifespan; `install_daphne_hook()`
  adds a "before shutdown" trigger whose Deferred is the drain. daphne's own
  trigger cancels every application instance at the same moment, so
  `GracefulApp` runs each HTTP request in a shielded task that the drain, not
  the cancellation, ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

logger = logging.getLogger("llmsite.shutdown")

# After the cut, how long the cancelled work may take to store what it has.
CANCEL_WAIT_SECONDS = 5.0
# What /v1 and the chat tell clients to wait before trying again.
RETRY_AFTER_SECONDS = 5

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def grace_seconds() -> float:
    """How long work in flight may run on after SIGTERM."""
    return float(getattr(settings, "SHUTDOWN_GRACE_SECONDS", 20.0))


class Shutdown:
    """The work in flight in this process, and whether it still takes more."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Accept work again and forget what was tracked (tests)."""
        self.deadline: float | None = None
        self._work: dict[asyncio.Future[Any], Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._cut_done = False

    @property
    def draining(self) -> bool:
        """True once shutdown has begun: no new work is accepted."""
        return self.deadline is not None

    def track(self, task: asyncio.Future[Any], cancel: Callable[[], None]) -> None:
        """Register work in flight; ``cancel`` ends it cleanly at the deadline."""
        self._work[task] = cancel
        task.add_done_callback(self._untrack)
        if self._cut_done:
            # Started after the cut (the drain is still waiting): end it too.
            cancel()

    def _untrack(self, task: asyncio.Future[Any]) -> None:
        self._work.pop(task, None)

    def in_flight(self) -> int:
        """How many tracked pieces of work have not finished."""
        return len(self._work)

    def begin(self, grace: float | None = None) -> None:
        """Stop accepting work; cut what still runs once the grace has passed."""
        if self.deadline is not None:
            return
        grace = grace_seconds() if grace is None else max(0.0, grace)
        self.deadline = time.monotonic() + grace
        logger.info(
            "Shutting down: %d request(s) in flight get up to %.0f s to finish",
            len(self._work),
            grace,
        )
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(grace, self.cut)

    def remaining(self) -> float:
        """Seconds left of the grace period (0 before shutdown has begun)."""
        if self.deadline is None:
            return 0.0
        return max(0.0, self.deadline - time.monotonic())

    def cut(self) -> None:
        """End every piece of work still running, each in its clean way."""
        self._cut_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        work = list(self._work.items())
        if work:
            logger.warning("Grace period over: cutting %d request(s)", len(work))
        for task, cancel in work:
            if task.done():
                continue
            try:
                cancel()
            except Exception:
                logger.exception("cutting a request at shutdown failed")

    async def drain(self, grace: float | None = None) -> None:
        """Begin, wait for the work in flight, cut the rest, write the records."""
        self.begin(grace)
        loop = asyncio.get_running_loop()
        mine = [t for t in self._work if t.get_loop() is loop]
        if mine:
            await asyncio.wait(mine, timeout=self.remaining())
        self.cut()
        mine = [t for t in self._work if t.get_loop() is loop]
        if mine:
            _, late = await asyncio.wait(mine, timeout=CANCEL_WAIT_SECONDS)
            if late:
                logger.error("%d request(s) did not end after the cut", len(late))
        await _write_pending_records()
        logger.info("Shutdown complete: usage records written")


async def _write_pending_records() -> None:
    # Imported here: the gateway's modules need Django set up.
    from gateway import accounting, api, service

    # Closing a stream and settling a cancelled reservation run in tasks of
    # their own, started as the requests end: they queue the last records.
    for _ in range(3):
        closing = [*api._closing, *service._finalisers]
        if not closing:
            break
        await asyncio.wait(closing, timeout=CANCEL_WAIT_SECONDS)
    try:
        await accounting.flush()
        await asyncio.to_thread(accounting.close_writer)
    except Exception:
        logger.exception("writing the queued usage records at shutdown failed")


shutdown = Shutdown()


# --- ASGI -------------------------------------------------------------------------


def _refusal_body() -> bytes:
    return json.dumps(
        {
            "error": {
                "message": "The server is restarting; retry in a few seconds.",
                "type": "server_error",
                "param": None,
                "code": "server_restarting",
            }
        }
    ).encode()


_CUT_EVENT = (
    b"data: "
    + json.dumps(
        {
            "error": {
                "message": "The server restarted; the answer was cut short.",
                "type": "server_error",
                "param": None,
                "code": "server_restarting",
            }
        },
        separators=(",", ":"),
    ).encode()
    + b"\n\ndata: [DONE]\n\n"
)


async def _send_503(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _refusal_body()})


class GracefulApp:
    """ASGI wrapper: tracks HTTP requests, refuses new /v1 ones, runs lifespan."""

    def __init__(self, app: Any, controller: Shutdown | None = None) -> None:
        self.app = app
        self.controller = controller or shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                chain_signal_handlers(self.controller)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.controller.drain()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        controller = self.controller
        path = scope.get("path", "")
        if controller.draining and path.startswith("/v1/"):
            await _send_503(send)
            return
        cut = asyncio.Event()
        response: dict[str, Any] = {"started": False, "complete": False, "sse": False}
        # The tasks waiting in receive() now, and those the cut cancelled.
        receiving: set[asyncio.Task[Any]] = set()
        cut_off: set[asyncio.Task[Any]] = set()

        async def guarded_receive() -> dict[str, Any]:
            # The cut looks like the client leaving: Django then cancels the
            # view, and the gateway closes upstream and writes the record. A
            # receive waiting when the cut comes is cancelled by it and answers
            # a disconnect; racing each receive against the cut instead would
            # cost two tasks per call.
            if cut.is_set():
                return {"type": "http.disconnect"}
            task = asyncio.current_task()
            assert task is not None
            receiving.add(task)
            try:
                return await receive()
            except asyncio.CancelledError:
                # Only the cut's own cancellation becomes a disconnect; any
                # other (Django ending the request) goes on as a cancellation.
                if task in cut_off and task.uncancel() == 0:
                    return {"type": "http.disconnect"}
                raise
            finally:
                receiving.discard(task)
                cut_off.discard(task)

        def cut_now() -> None:
            if cut.is_set():
                return
            cut.set()
            for task in receiving:
                cut_off.add(task)
                task.cancel()

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        response["sse"] = value.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get(
                "more_body", False
            ):
                response["complete"] = True
            await send(message)

        async def end_if_cut() -> None:
            if not cut.is_set() or response["complete"]:
                return
            with contextlib.suppress(Exception):
                if not response["started"]:
                    # A plain request cut before its answer: say why.
                    await _send_503(send)
                else:
                    # Cut mid-stream: end the body properly, with the reason.
                    body = _CUT_EVENT if response["sse"] else b""
                    await send({"type": "http.response.body", "body": body})

        inner = asyncio.ensure_future(self.app(scope, guarded_receive, tracking_send))
        controller.track(inner, cut_now)
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The server gave up on the request (daphne does so for every one
            # at shutdown): let the drain end it, then leave.
            if not controller.draining:
                cut_now()
            await asyncio.wait({inner})
            await end_if_cut()
            raise
        await end_if_cut()


def chain_signal_handlers(controller: Shutdown) -> None:
    """Start the grace period on SIGTERM/SIGINT, then let the server's handler run.

    uvicorn installs its handlers with signal.signal before it loads the app,
    and only runs the lifespan shutdown once its connections are closed.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous) or getattr(previous, "_llmsite_chained", False):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(controller.begin)
            previous(signum, frame)

        handler._llmsite_chained = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


def install_daphne_hook(controller: Shutdown | None = None) -> bool:
    """Drain before Twisted's reactor shuts down, when running under daphne."""
    if "daphne.server" not in sys.modules:
        return False
    from twisted.internet import defer, reactor

    controller = controller or shutdown

    def before_shutdown() -> defer.Deferred[None]:
        controller.begin()
        return defer.Deferred.fromFuture(asyncio.ensure_future(controller.drain()))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    return True
