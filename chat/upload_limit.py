"""Bound an image upload's body while it is read, before Django buffers it.

Django's ASGI handler reads a whole request body (to a temporary file) before
any view runs, so a view's size check comes too late to spare the disk and
the time. This ASGI wrapper refuses an upload to the attachments URL as soon
as its declared length, or the bytes received so far, exceed
``CHAT_IMAGE_MAX_BYTES`` plus room for the multipart envelope.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from chat.attachments import max_bytes, too_large

UPLOAD_PATH = "/chat/api/attachments/"
# The multipart boundary, headers and file name around the image's bytes.
ENVELOPE_BYTES = 16 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _TooLarge(Exception):
    pass


class UploadSizeLimit:
    """ASGI middleware: a 413 for an image upload whose body is too large."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or scope.get("path") != UPLOAD_PATH
        ):
            await self.app(scope, receive, send)
            return
        limit = max_bytes() + ENVELOPE_BYTES
        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length" and (
                not value.isdigit() or int(value) > limit
            ):
                await _refuse(send)
                return
        received = 0

        async def bounded() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, bounded, send)
        except _TooLarge:
            # Django reads the whole body before it answers: nothing was sent.
            await _refuse(send)


async def _refuse(send: Send) -> None:
    error = too_large()
    body = json.dumps({"error": {"code": error.code, "message": error.message}})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
