"""Frames the server sends stay under the cap, and chunks rebuild the text exactly."""

from __future__ import annotations

import json
import uuid

import pytest

from chat import frames

KIB = 1024
CID = str(uuid.uuid4())
# Characters costing 1 to 6 bytes on the wire: plain, escaped (\n, \"), a
# two-byte é, a four-byte emoji and a six-byte \u0001.
HEAVY = 'plain \n "q" caf\u00e9 \U0001f600 \x01\x02 \\ '


@pytest.fixture(autouse=True)
def small_cap(settings):
    settings.CHAT_MAX_SEND_FRAME_BYTES = 16 * KIB


def rebuild(texts: list[str]) -> tuple[dict, dict[object, str]]:
    """The last frame, with the chunks before it, as the browser joins them."""
    chunks: dict[object, str] = {}
    for text in texts[:-1]:
        chunk = json.loads(text)
        assert chunk["type"] == "chunk"
        chunks[chunk["message_id"]] = (
            chunks.get(chunk["message_id"], "") + chunk["text"]
        )
    return json.loads(texts[-1]), chunks


@pytest.mark.parametrize("text", ["", "a", "x" * 100_000, HEAVY * 3_000])
def test_split_text_pieces_fit_and_join_to_the_text(text):
    pieces = frames.split_text(text, 1_000)

    assert "".join(pieces) == text
    assert all(len(json.dumps(p, ensure_ascii=False).encode()) <= 1_000 for p in pieces)


def test_a_message_frame_that_fits_is_sent_as_it_is():
    frame = {
        "type": "done",
        "conversation_id": CID,
        "answer": {"id": 3, "content": "hi"},
    }

    assert frames.message_frames(frame, frame["answer"]) == [frames.encode(frame)]


@pytest.mark.parametrize("content", ["y" * 100_000, HEAVY * 5_000])
def test_a_long_answer_is_split_into_chunks_under_the_cap(content):
    answer = {"id": 3, "content": content, "meta": {"endpoint": "primary"}}
    frame = {"type": "done", "conversation_id": CID, "answer": answer}

    texts = frames.message_frames(frame, answer)
    done, chunks = rebuild(texts)

    assert len(texts) > 2
    assert max(len(t.encode()) for t in texts) <= 16 * KIB
    assert chunks[3] + done["answer"]["content"] == content
    assert done["answer"]["meta"] == {"endpoint": "primary"}


def test_a_huge_footer_is_trimmed_rather_than_the_frame_overflowing():
    context = {"tokens": 5, "dropped_ids": list(range(10_000)), "dropped_count": 10_000}
    answer = {"id": 9, "content": "z" * 50_000, "meta": {"context": context}}
    frame = {
        "type": "done",
        "conversation_id": CID,
        "answer": answer,
        "context": context,
    }

    texts = frames.message_frames(frame, answer)
    done, chunks = rebuild(texts)

    assert max(len(t.encode()) for t in texts) <= 16 * KIB
    assert chunks[9] + done["answer"]["content"] == "z" * 50_000
    assert done["answer"]["meta"]["context"] == {"tokens": 5, "dropped_count": 10_000}


def test_the_answer_so_far_in_a_start_frame_is_split_with_no_message_id():
    frame = {"type": "start", "conversation_id": CID, "text": HEAVY * 4_000, "seq": 7}

    texts = frames.split_frame(
        frame,
        holder=frame,
        field="text",
        chunk={"conversation_id": CID, "message_id": None},
    )
    start, chunks = rebuild(texts)

    assert max(len(t.encode()) for t in texts) <= 16 * KIB
    assert chunks[None] + start["text"] == HEAVY * 4_000
    assert start["seq"] == 7


def test_a_cached_answer_delta_is_cut_into_frames_that_fit():
    pieces = frames.split_delta(HEAVY * 4_000)

    assert "".join(pieces) == HEAVY * 4_000
    assert len(pieces) > 1
    assert all(
        len(
            frames.encode(
                {"type": "delta", "conversation_id": CID, "seq": 10**9, "text": p}
            ).encode()
        )
        <= 16 * KIB
        for p in pieces
    )
