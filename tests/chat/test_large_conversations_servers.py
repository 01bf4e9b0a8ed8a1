"""A several-MiB conversation opens over a real websocket on daphne and uvicorn.

Daphne refuses websocket messages over 1 MiB and drops the connection when
the application sends one; these tests run each server as a subprocess on
its own SQLite database, sign in with a session row made for the occasion
and read the whole conversation back, page by page, with the `websockets`
client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
CAP = 256 * 1024

_SETUP = """
import json, django
django.setup()
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from chat.models import Conversation, Message

user = get_user_model().objects.create_user("alice", password="x" * 20)
conversation = Conversation.objects.create(user=user, title="Big", model_name="m")
texts = []
for i in range(48):
    unit = f"Message {i}: caf\\u00e9 \\U0001f600 \\"quoted\\"\\t\\\\ line\\n"
    size = 900_000 if i == 20 else 32_000
    texts.append((unit * (size // len(unit) + 1))[:size])
    Message.objects.create(
        conversation=conversation,
        role="user" if i % 2 == 0 else "assistant",
        content=texts[-1],
    )
session = SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.create()
print(json.dumps({"session": session.session_key, "conversation": str(conversation.id),
                  "texts": texts}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A migrated SQLite database holding Alice, her session and a big conversation."""
    data = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "llmsite.settings",
        "DATA_DIR": str(data),
        "DATABASE_URL": f"sqlite:///{data / 'db.sqlite3'}",
        "SECRET_KEY": "large-conversation-test-key-" + "x" * 30,
        "REDIS_URL": "",
        "LOG_LEVEL": "WARNING",
    }
    run = {"cwd": ROOT, "env": env, "check": True, "timeout": 240}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], **run
    )
    made = subprocess.run(
        [sys.executable, "-c", _SETUP], capture_output=True, text=True, **run
    )
    yield {"env": env, **json.loads(made.stdout)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not start listening within 30 s")


SERVERS = {
    "daphne": lambda port: [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "llmsite.asgi:application",
    ],
    "uvicorn": lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "llmsite.asgi:application",
    ],
}


async def read_conversation(port: int, site: dict[str, Any]) -> tuple[list, int, int]:
    """Open the conversation and page back to its start; (messages, pages, largest)."""
    chunks: dict[Any, str] = {}
    largest = 0
    conversation_id = site["conversation"]
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/chat/",
        additional_headers={
            "Cookie": f"sessionid={site['session']}",
            "Origin": f"http://127.0.0.1:{port}",
        },
        max_size=None,
    ) as ws:

        async def page(request: dict[str, Any], kind: str) -> dict[str, Any]:
            nonlocal largest
            await ws.send(json.dumps(request))
            while True:
                raw = await asyncio.wait_for(ws.recv(), 20)
                largest = max(largest, len(raw.encode()))
                frame = json.loads(raw)
                if frame["type"] == "chunk":
                    key = frame["message_id"]
                    chunks[key] = chunks.get(key, "") + frame["text"]
                    continue
                assert frame["type"] == kind, frame
                for message in frame["messages"]:
                    message["content"] = (
                        chunks.pop(message["id"], "") + (message["content"])
                    )
                return frame

        frame = await page(
            {"type": "open", "conversation_id": conversation_id}, "opened"
        )
        messages, pages = frame["messages"], 1
        while frame["more"]:
            request = {
                "type": "history",
                "conversation_id": conversation_id,
                "before": messages[0]["id"],
            }
            frame = await page(request, "history")
            messages = frame["messages"] + messages
            pages += 1
    assert chunks == {}
    return messages, pages, largest


@pytest.mark.timeout(180)
@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_several_mib_conversation_opens_over_a_real_websocket(site, server):
    assert sum(len(t.encode()) for t in site["texts"]) > 2 * MIB
    port = free_port()
    process = serve(SERVERS[server](port), site["env"], port)
    try:
        messages, pages, largest = asyncio.run(read_conversation(port, site))
    finally:
        process.terminate()
        process.wait(timeout=30)

    assert [m["content"] for m in messages] == site["texts"]
    assert pages > 5
    assert largest <= CAP
