"""The floor under llmsite's /v1 figures: a bare Django async proxy.

One async view relays ``POST /v1/chat/completions`` to one upstream, plain or
streamed, and nothing else: no authentication, limits, routing, token
counting, usage records or middleware. It runs on the same server, Django and
httpx as llmsite, with several ``httpx.AsyncClient`` used round-robin (one
client with a large pool degrades, encode/httpx#3215), so what llmsite adds
over it is the gateway's own cost.

    FLOOR_UPSTREAM=http://127.0.0.1:8100/v1 \\
        .venv/bin/uvicorn floor_proxy:application --app-dir bench --port 8200

``compare.py`` starts it next to llmsite; it is not part of the project.
"""

from __future__ import annotations

import itertools
import json
import os

import django
import httpx
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8100/v1")
CLIENTS = 8

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
    SECRET_KEY="floor-proxy-not-secret",
)
django.setup(set_prefix=False)

_clients: list[httpx.AsyncClient] = []
_next = None


def client() -> httpx.AsyncClient:
    """The next client; created on first use, on the server's event loop."""
    global _next
    if _next is None:
        limits = httpx.Limits(max_connections=25, max_keepalive_connections=25)
        _clients.extend(
            httpx.AsyncClient(base_url=UPSTREAM, limits=limits, timeout=30)
            for _ in range(CLIENTS)
        )
        _next = itertools.cycle(_clients).__next__
    return _next()


async def chat_completions(request: HttpRequest) -> HttpResponse:
    headers = {"content-type": "application/json"}
    upstream = client()
    if not json.loads(request.body).get("stream"):
        answer = await upstream.post(
            "/chat/completions", content=request.body, headers=headers
        )
        return HttpResponse(
            answer.content,
            status=answer.status_code,
            content_type="application/json",
        )
    sent = upstream.build_request(
        "POST", "/chat/completions", content=request.body, headers=headers
    )
    answer = await upstream.send(sent, stream=True)

    async def relay():
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        finally:
            await answer.aclose()

    return StreamingHttpResponse(relay(), content_type="text/event-stream")


async def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("v1/chat/completions", chat_completions),
    path("healthz", healthz),
]

application = ASGIHandler()
