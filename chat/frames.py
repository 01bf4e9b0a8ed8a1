"""Server-to-browser frames that never exceed CHAT_MAX_SEND_FRAME_BYTES.

Daphne refuses (and never delivers) websocket messages over 1 MiB, and a
conversation or an answer can be far larger. So history goes out in pages
(`actions.message_page`), and a text too long for one frame, an old message,
a stored answer or the answer so far, is split: ``chunk`` frames carry its
beginning, in order, and the frame that would have held it carries the rest.
The browser puts the chunks in front of that text (see chat/PROTOCOL.md).
"""

from __future__ import annotations

import json
from typing import Any

from chat.conf import chat_settings

# Room for a chunk frame's own fields (type, conversation id, message id).
_CHUNK_OVERHEAD = 256
# A frame whose other fields leave less room than this for its text gets its
# message's footer (meta) trimmed instead: it is shown, not needed.
_MIN_TEXT_ROOM = 4 * 1024


def encode(frame: dict[str, Any]) -> str:
    """Serialise a frame as it goes on the wire."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def size(text: str) -> int:
    """Bytes of a serialised frame on the wire (UTF-8)."""
    # surrogatepass: an old stored text with a lone surrogate must still be sized.
    return len(text.encode("utf-8", "surrogatepass"))


def limit() -> int:
    """The largest frame the server sends, in bytes."""
    return chat_settings().max_send_frame_bytes


def _json_size(text: str) -> int:
    # The size of the text as a JSON string literal, quotes included.
    return size(json.dumps(text, ensure_ascii=False))


def split_text(text: str, room: int) -> list[str]:
    """Cut text into pieces whose JSON string form is at most `room` bytes."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        # A character costs 1 to 12 bytes escaped: start optimistic, then shrink
        # in proportion to the overshoot.
        length = min(len(text) - start, room)
        while length > 1:
            cost = _json_size(text[start : start + length])
            if cost <= room:
                break
            length = max(1, min(length - 1, length * room // cost))
        pieces.append(text[start : start + length])
        start += length
    return pieces or [""]


def _split_tail(text: str, tail_room: int, room: int) -> tuple[list[str], str]:
    """The head of text in pieces of `room`, and a tail that fits `tail_room`."""
    if _json_size(text) <= tail_room:
        return [], text
    # The tail is taken from the end, so every head piece can be full size.
    # Every character costs at least one byte, so the tail is at most that long.
    low, high = max(0, len(text) - tail_room), len(text)
    while low < high:
        middle = (low + high) // 2
        if _json_size(text[middle:]) <= tail_room:
            high = middle
        else:
            low = middle + 1
    return split_text(text[:low], room), text[low:]


def _slim_meta(message: dict[str, Any]) -> None:
    # Context ids lists grow with the conversation; the footer needs the counts.
    meta = message.get("meta")
    if isinstance(meta, dict):
        context = meta.get("context")
        slim = {k: v for k, v in meta.items() if k != "context"}
        if isinstance(context, dict):
            slim["context"] = {
                k: v
                for k, v in context.items()
                if k not in ("dropped_ids", "compressed_ids")
            }
        message["meta"] = slim


def split_frame(
    frame: dict[str, Any],
    *,
    holder: dict[str, Any],
    field: str,
    chunk: dict[str, Any],
) -> list[str]:
    """Encode a frame, splitting ``holder[field]`` into chunk frames if too big.

    `holder` is a dict inside `frame` (or the frame itself) whose `field` is
    the long text; `chunk` names what the chunks belong to (conversation id,
    message id or ``start``). The frame is changed in place.
    """
    cap = limit()
    text = encode(frame)
    if size(text) <= cap:
        return [text]
    value = holder.get(field) or ""
    holder[field] = ""
    room = cap - size(encode(frame))
    if room < _MIN_TEXT_ROOM:
        _slim_meta(holder)
        for key in ("context", "hops"):
            # done frames repeat the answer's footer at their top level.
            if key in frame and frame is not holder:
                frame[key] = None
        room = cap - size(encode(frame))
    chunk_room = cap - size(encode({**chunk, "type": "chunk", "text": ""}))
    head, tail = _split_tail(value, max(room, 1), max(chunk_room, 1))
    holder[field] = tail
    texts = [encode({"type": "chunk", **chunk, "text": piece}) for piece in head]
    texts.append(encode(frame))
    return texts


def message_frames(frame: dict[str, Any], message: dict[str, Any]) -> list[str]:
    """A frame holding one message (a page of one, done, error), split to fit."""
    return split_frame(
        frame,
        holder=message,
        field="content",
        chunk={
            "conversation_id": frame.get("conversation_id"),
            "message_id": message.get("id"),
        },
    )


def split_delta(text: str) -> list[str]:
    """Answer text coalesced into one delta, cut so each delta frame fits."""
    room = limit() - _CHUNK_OVERHEAD
    if len(text) * 12 + 2 <= room:
        return [text]
    return split_text(text, room)


def page_frames(frame: dict[str, Any]) -> list[str]:
    """An ``opened`` or ``history`` page; a page of one long message is split."""
    messages = frame["messages"]
    if len(messages) == 1:
        return message_frames(frame, messages[0])
    # Pages of several messages were filled to fit (actions.message_page).
    return [encode(frame)]
