"""Parsing and validation of the frames a browser sends on the chat websocket.

See chat/PROTOCOL.md for the whole protocol. Every check here raises
ChatError with a code and a sentence for the person at the keyboard; the
consumer turns it into an ``error`` frame and keeps the socket open.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from chat import conversation_settings
from chat.conf import chat_settings
from chat.conversation_settings import ConversationSettings
from chat.errors import ChatError
from gateway import inbound

MAX_MODEL_NAME = 200
MAX_MESSAGE_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Send:
    """Ask a question, in an existing conversation or (None) a new one."""

    conversation_id: uuid.UUID | None
    content: str
    model: str
    # Ids of the user's own uploads (chat.attachments), sent with the text.
    attachments: tuple[uuid.UUID, ...] = ()
    # A new conversation's settings (None: the model's defaults).
    settings: ConversationSettings | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the answer streaming in a conversation."""

    conversation_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Regenerate:
    """Answer the last user message shown again: a new version of its answer."""

    conversation_id: uuid.UUID
    model: str | None


@dataclass(frozen=True, slots=True)
class Edit:
    """Answer a rewritten user message: a new version of it, with its own branch."""

    message_id: int
    content: str
    model: str | None
    # New uploads added to the rewritten question; its earlier images stay.
    attachments: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True, slots=True)
class Open:
    """Show a conversation, and join its answer if one is streaming."""

    conversation_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class History:
    """Older messages of a conversation, before one the browser already shows."""

    conversation_id: uuid.UUID
    before: int


@dataclass(frozen=True, slots=True)
class Switch:
    """Show another version of a message (and the branch below it)."""

    conversation_id: uuid.UUID
    message_id: int


@dataclass(frozen=True, slots=True)
class Settings:
    """Store a conversation's system prompt and sampling parameters."""

    conversation_id: uuid.UUID
    settings: ConversationSettings


@dataclass(frozen=True, slots=True)
class Ping:
    """Keep an idle connection alive through proxies."""


Request = Send | Stop | Regenerate | Edit | Open | History | Switch | Settings | Ping

FRAME_TYPES = (
    "send",
    "stop",
    "regenerate",
    "edit",
    "open",
    "resume",
    "history",
    "switch",
    "settings",
    "ping",
)


def decode(text: str | None, binary: bytes | None = None) -> dict[str, Any]:
    """Decode one websocket frame into a JSON object, or raise ChatError."""
    if text is None:
        raise ChatError("bad_frame", "Frames must be JSON text, not binary data.")
    limit = chat_settings().max_frame_chars
    if len(text) > limit:
        raise ChatError(
            "too_large",
            f"That frame is {len(text):,} characters; the limit is {limit:,}.",
        )
    try:
        # Depth is bounded before parsing; NUL, lone surrogates and NaN refused.
        data = inbound.loads(text, what="That frame")
    except inbound.InboundError as exc:
        if exc.syntax:
            raise ChatError("bad_json", exc.message) from None
        raise ChatError("invalid", exc.message) from None
    if not isinstance(data, dict):
        raise ChatError("bad_frame", "A frame must be a JSON object with a type.")
    return data


def parse(data: dict[str, Any]) -> Request:
    """Turn a decoded frame into a request, or raise ChatError."""
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        raise ChatError("bad_frame", "A frame must be a JSON object with a type.")
    if kind == "send":
        return Send(
            conversation_id=_conversation_id(data, required=False),
            content=_content(data),
            model=_model(data, required=True),
            attachments=_attachments(data),
            settings=_new_settings(data),
        )
    if kind == "settings":
        return Settings(
            conversation_id=_conversation_id(data),
            settings=conversation_settings.parse(data.get("settings")),
        )
    if kind == "stop":
        return Stop(conversation_id=_conversation_id(data))
    if kind == "regenerate":
        return Regenerate(
            conversation_id=_conversation_id(data), model=_model(data, required=False)
        )
    if kind == "edit":
        return Edit(
            message_id=_message_id(data),
            content=_content(data),
            model=_model(data, required=False),
            attachments=_attachments(data),
        )
    if kind in ("open", "resume"):
        return Open(conversation_id=_conversation_id(data))
    if kind == "history":
        return History(
            conversation_id=_conversation_id(data),
            before=_message_id(data, "before"),
        )
    if kind == "switch":
        return Switch(
            conversation_id=_conversation_id(data), message_id=_message_id(data)
        )
    if kind == "ping":
        return Ping()
    raise ChatError(
        "unknown_type",
        f"Unknown frame type {kind[:40]!r}; expected one of {', '.join(FRAME_TYPES)}.",
    )


def _conversation_id(
    data: dict[str, Any], *, required: bool = True
) -> uuid.UUID | None:
    value = data.get("conversation_id")
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ChatError("invalid", "conversation_id must be a conversation's id.")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ChatError(
            "invalid", "conversation_id must be a conversation's id."
        ) from None


def _new_settings(data: dict[str, Any]) -> ConversationSettings | None:
    value = data.get("settings")
    if value is None:
        return None
    if data.get("conversation_id") is not None:
        raise ChatError(
            "invalid",
            "settings go with the first message of a new conversation; "
            "change an existing one's with a settings frame.",
        )
    return conversation_settings.parse(value)


def _content(data: dict[str, Any]) -> str:
    value = data.get("content")
    if not isinstance(value, str):
        raise ChatError("invalid", "content must be text.")
    if not value.strip():
        raise ChatError("empty_content", "Type a message before sending.")
    limit = chat_settings().max_message_chars
    if len(value) > limit:
        raise ChatError(
            "too_large",
            f"Your message is {len(value):,} characters long; the limit is {limit:,}.",
        )
    return value


def _model(data: dict[str, Any], *, required: bool) -> str | None:
    value = data.get("model")
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ChatError("invalid", "Choose a model.")
    if len(value) > MAX_MODEL_NAME:
        raise ChatError("invalid", "That model name is too long.")
    return value.strip()


def _message_id(data: dict[str, Any], field: str = "message_id") -> int:
    value = data.get(field)
    # bool is an int in Python; true is not a message id. Ids fit a 64-bit key.
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 < value <= MAX_MESSAGE_ID
    ):
        raise ChatError("invalid", f"{field} must be a message's id.")
    return value


def _attachments(data: dict[str, Any]) -> tuple[uuid.UUID, ...]:
    value = data.get("attachments")
    if value is None:
        return ()
    limit = chat_settings().max_images_per_message
    if not isinstance(value, list):
        raise ChatError("invalid", "attachments must be a list of image ids.")
    if len(value) > limit:
        raise ChatError(
            "invalid",
            f"A message can carry at most {limit} images; this one has {len(value)}.",
        )
    try:
        ids = [uuid.UUID(item) for item in value if isinstance(item, str)]
    except ValueError:
        ids = []
    if len(ids) != len(value):
        raise ChatError("invalid", "attachments must be a list of image ids.")
    if len(set(ids)) != len(ids):
        raise ChatError("invalid", "The same image is attached twice.")
    return tuple(ids)
