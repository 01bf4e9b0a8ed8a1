"""An answer running in process A, resumed and stopped from sockets on B."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.scale_out.deployment import MODEL
from tests.servers import ChatTab, ask, needs_postgres_and_redis

pytestmark = needs_postgres_and_redis


def answer_seen(frames: list[dict[str, Any]]) -> str:
    """The answer text a page builds from a `start` frame and the deltas after it."""
    [start] = [f for f in frames if f["type"] == "start"]
    text, seq = start["text"], start["seq"]
    for frame in frames:
        if frame["type"] == "delta":
            assert frame["seq"] == seq + 1, "a delta went missing"
            seq = frame["seq"]
            text += frame["text"]
    return text


def test_an_answer_left_on_a_is_resumed_through_b_and_stored_once(deployment):
    d = deployment
    tab = ChatTab(d.a, d.cookie)
    # About four seconds of answer: the socket closes a moment into it.
    conversation_id = ask(tab, MODEL, "Tell me a story.\n/sim tps=40 tokens=160")
    tab.close()

    resumed = ChatTab(d.b, d.cookie)
    resumed.send({"type": "open", "conversation_id": conversation_id})
    frames = resumed.until("done", timeout=20)
    resumed.close()

    [start] = [f for f in frames if f["type"] == "start"]
    # B got what A had streamed so far, then the rest as it came.
    assert start["text"], frames[:3]
    assert any(f["type"] == "delta" for f in frames)
    done = frames[-1]
    assert done["answer"]["status"] == "complete"
    assert not done["stopped"]
    assert answer_seen(frames) == done["answer"]["content"]
    assert done["usage"]["completion_tokens"] == 160

    answers = d.site.sql(
        "SELECT status, content FROM chat_message "
        "WHERE conversation_id = %s AND role = 'assistant'",
        uuid.UUID(conversation_id),
    )
    assert answers == [("complete", done["answer"]["content"])]
    records = d.records("conversation_id = %s", uuid.UUID(conversation_id), count=1)
    assert [(r[1], r[2]) for r in records] == [("ok", "main")]


def test_stop_from_a_socket_on_b_stops_the_answer_streaming_through_a(deployment):
    d = deployment
    tab = ChatTab(d.a, d.cookie)
    # A hundred seconds of answer unless something stops it.
    conversation_id = ask(tab, MODEL, "Go on and on.\n/sim tps=20 tokens=2000")
    other = ChatTab(d.b, d.cookie)
    other.send({"type": "open", "conversation_id": conversation_id})
    other.until("start")

    other.send({"type": "stop", "conversation_id": conversation_id})
    asked = time.monotonic()
    done = tab.until("done", timeout=10)[-1]
    took = time.monotonic() - asked
    seen_on_b = other.until("done", timeout=10)
    tab.close()
    other.close()

    assert took < 3
    assert done["stopped"] and done["stop_reason"] == "stop"
    assert done["answer"]["status"] == "partial"
    assert not [f for f in seen_on_b if f["type"] == "error"], seen_on_b
    assert seen_on_b[-1]["answer"]["id"] == done["answer"]["id"]
    [(status, content, meta)] = d.site.sql(
        "SELECT status, content, meta FROM chat_message "
        "WHERE conversation_id = %s AND role = 'assistant'",
        uuid.UUID(conversation_id),
    )
    assert (status, meta["stop_reason"]) == ("partial", "stop")
    assert 0 < len(content) == len(done["answer"]["content"])
    records = d.records("conversation_id = %s", uuid.UUID(conversation_id), count=1)
    assert [r[1] for r in records] == ["cancelled"]
    assert 0 < records[0][5] < 2000
