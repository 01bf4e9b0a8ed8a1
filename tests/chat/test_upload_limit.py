"""An image upload's body is cut off while it is read, once over the limit."""

from __future__ import annotations

import json

import pytest

from chat.upload_limit import ENVELOPE_BYTES, UPLOAD_PATH, UploadSizeLimit

LIMIT = 1024


@pytest.fixture(autouse=True)
def _small_limit(settings):
    settings.CHAT_IMAGE_MAX_BYTES = LIMIT


class App:
    """Reads the whole body like Django's handler, then answers 201."""

    def __init__(self) -> None:
        self.read = 0
        self.called = False

    async def __call__(self, scope, receive, send):
        self.called = True
        while True:
            message = await receive()
            self.read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app, *, path=UPLOAD_PATH, length=None, chunks=(b"",)):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = []

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    await UploadSizeLimit(app)(scope, receive, send)
    return sent


async def test_a_declared_length_over_the_limit_is_refused_unread():
    app = App()

    sent = await call(app, length=LIMIT + ENVELOPE_BYTES + 1)

    assert not app.called
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_large"


async def test_a_body_growing_over_the_limit_is_cut_off_while_read():
    app = App()
    chunk = b"x" * 4096

    sent = await call(app, chunks=[chunk] * 100)

    assert sent[0]["status"] == 413
    assert app.read <= LIMIT + ENVELOPE_BYTES + len(chunk)


async def test_a_small_upload_and_other_paths_pass():
    assert (await call(App(), length=10, chunks=[b"x" * 10]))[0]["status"] == 201
    big = b"x" * (LIMIT + ENVELOPE_BYTES + 1)
    other = await call(App(), path="/chat/api/conversations/", chunks=[big])
    assert other[0]["status"] == 201
