"""Graceful shutdown without a server: the drain, and the ASGI wrapper's rules."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llmsite.shutdown import GracefulApp, Shutdown

pytestmark = pytest.mark.django_db


class Exchange:
    """One HTTP request driven through an ASGI app, as a server would."""

    def __init__(self, path: str = "/v1/chat/completions") -> None:
        self.scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": b"{}"})
        self.sent: list[dict[str, Any]] = []

    def run(self, app: Any) -> asyncio.Future[None]:
        return asyncio.ensure_future(app(self.scope, self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def streaming_app(chunks: int, every: float, log: list[str]):
    """A server-sent-event app that stops when the client leaves."""

    async def app(scope, receive, send):
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def stream():
            for index in range(chunks):
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"data: {index}\n\n".encode(),
                        "more_body": True,
                    }
                )
                await asyncio.sleep(every)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            log.append("finished")

        streaming = asyncio.ensure_future(stream())
        leaving = asyncio.ensure_future(receive())
        await asyncio.wait({streaming, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done():
            # Like Django: the client left, the view is cancelled.
            streaming.cancel()
            log.append(leaving.result()["type"])
        leaving.cancel()

    return app


async def test_a_request_in_flight_finishes_within_the_grace():
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(5, 0.01, log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.01)

    await controller.drain(grace=5)

    assert request.done()
    assert log == ["finished"]
    assert exchange.body.endswith(b"data: [DONE]\n\n")


async def test_a_request_past_the_grace_is_cut_like_a_client_leaving():
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(1000, 0.01, log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.05)

    started = asyncio.get_running_loop().time()
    await controller.drain(grace=0.2)

    assert asyncio.get_running_loop().time() - started < 1
    assert request.done() and request.exception() is None
    assert log == ["http.disconnect"]
    # The stream ends properly, with the reason, rather than being dropped.
    assert exchange.sent[-1].get("more_body", False) is False
    assert b'"code":"server_restarting"' in exchange.body
    assert exchange.body.endswith(b"data: [DONE]\n\n")


async def test_a_server_cancelling_every_request_still_waits_for_the_drain():
    # daphne cancels every application instance when it shuts down.
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(5, 0.02, log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.01)

    controller.begin(grace=5)
    request.cancel()
    await asyncio.wait({request})

    assert log == ["finished"]
    await controller.drain()


async def test_new_v1_requests_get_503_with_retry_after_while_draining():
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(1, 0, log), controller)
    controller.begin(grace=5)
    exchange = Exchange()

    await app(exchange.scope, exchange.receive, exchange.send)

    assert exchange.status == 503
    headers = dict(exchange.sent[0]["headers"])
    assert int(headers[b"retry-after"]) > 0
    assert json.loads(exchange.body)["error"]["code"] == "server_restarting"
    assert log == []


async def test_lifespan_shutdown_drains_the_work_in_flight():
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(5, 0.01, log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.01)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: list[str] = []

    async def reply(message):
        replies.append(message["type"])

    for kind in ("lifespan.startup", "lifespan.shutdown"):
        events.put_nowait({"type": kind})
    await app({"type": "lifespan"}, events.get, reply)

    assert replies == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert controller.draining
    assert request.done() and log == ["finished"]


async def test_work_tracked_after_the_cut_is_cut_at_once():
    controller = Shutdown()
    await controller.drain(grace=0)
    cut: list[bool] = []
    work = asyncio.ensure_future(asyncio.sleep(1))

    controller.track(work, lambda: cut.append(True))

    assert cut == [True]
    work.cancel()


def slow_plain_app(log: list[str]):
    """A plain JSON app that answers after a long wait, unless the client leaves."""

    async def app(scope, receive, send):
        await receive()
        answering = asyncio.ensure_future(asyncio.sleep(60))
        leaving = asyncio.ensure_future(receive())
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        answering.cancel()
        log.append(leaving.result()["type"])

    return app


async def test_a_plain_request_cut_at_the_deadline_gets_503():
    controller, log = Shutdown(), []
    app = GracefulApp(slow_plain_app(log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.01)

    await controller.drain(grace=0.1)

    assert request.done() and log == ["http.disconnect"]
    assert exchange.status == 503
    assert json.loads(exchange.body)["error"]["code"] == "server_restarting"


async def test_a_request_the_server_cancels_is_cut_at_the_deadline_with_its_reason():
    controller, log = Shutdown(), []
    app = GracefulApp(streaming_app(1000, 0.01, log), controller)
    exchange = Exchange()
    request = exchange.run(app)
    await asyncio.sleep(0.02)

    controller.begin(grace=0.1)
    request.cancel()
    await asyncio.wait({request})
    await controller.drain()

    assert log == ["http.disconnect"]
    assert b'"code":"server_restarting"' in exchange.body
    assert exchange.sent[-1].get("more_body", False) is False


async def test_a_receive_the_app_cancels_itself_stays_cancelled_and_leaves_nothing():
    # Django listens for a disconnect while the view runs and cancels that
    # receive once the response is sent: a cancellation that is not the cut
    # must stay one, and no waiting receive may outlive the request.
    outcome: list[str] = []

    async def app(scope, receive, send):
        await receive()
        listening = asyncio.ensure_future(receive())
        await asyncio.sleep(0)
        listening.cancel()
        try:
            await listening
        except asyncio.CancelledError:
            outcome.append("cancelled")
        else:
            outcome.append("returned")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    before = asyncio.all_tasks()
    exchange = Exchange()
    await exchange.run(GracefulApp(app, Shutdown()))
    await asyncio.sleep(0)

    assert outcome == ["cancelled"]
    assert exchange.body == b"ok"
    assert asyncio.all_tasks() <= before
