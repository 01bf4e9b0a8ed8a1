"""A user's conversations as files: one as Markdown or JSON, or all as JSON.

Each part of an export has its own function (the conversation's header, its
settings, one message, an answer's footer), in a JSON and a Markdown flavour,
so what the chat stores next (more settings, answer versions, attachments)
is one function to extend. Ownership is checked by the callers'
``actions.owned_conversation`` or by filtering on the user: another user's
conversation is never read.

The all-conversations export is a generator of text that walks the user's
conversations in batches, one query for a batch of conversations and one for
their messages (with their usage records), so memory stays flat and the
number of queries grows with the batches, not with the conversations.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from chat import actions, attachments
from chat.conversation_settings import ConversationSettings
from chat.models import Conversation, Message, MessageRole
from gateway.models import UsageRecord

FORMAT = "llmsite.conversations"
VERSION = 1
# Conversations read at a time by the all-conversations export.
BATCH = 100
# Messages fetched from the database cursor at a time.
MESSAGE_CHUNK = 500
# Text handed to the server at a time while streaming the export.
FLUSH_CHARS = 64 * 1024
FILENAME_CHARS = 60

ROLE_NAMES = {
    MessageRole.USER: "You",
    MessageRole.ASSISTANT: "Assistant",
    MessageRole.SYSTEM: "System",
}


# --- Reading ---------------------------------------------------------------------


def _messages(conversation_ids: Iterable[uuid.UUID]):
    # Usage records come in the same query: the footer of every answer; the
    # images' descriptions (never their bytes) in one more.
    return attachments.with_attachments(
        Message.objects.filter(conversation_id__in=list(conversation_ids))
        .select_related("usage")
        .order_by("conversation_id", "created_at", "id")
    )


def owned(user: Any, conversation_id: uuid.UUID) -> tuple[Conversation, list[Message]]:
    """One of the user's conversations and its messages; not_found otherwise."""
    conversation = actions.owned_conversation(user, conversation_id)
    return conversation, list(_messages([conversation.id]))


# --- The parts, as JSON ------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def header_json(conversation: Conversation) -> dict[str, Any]:
    """Who the conversation is: id, title, model, times."""
    return {
        "id": str(conversation.id),
        "title": conversation.title,
        "title_set_by_hand": conversation.title_set_by_hand,
        "model": conversation.model_name,
        "created_at": _time(conversation.created_at),
        "updated_at": _time(conversation.updated_at),
    }


def settings_json(conversation: Conversation) -> dict[str, Any]:
    """What the conversation asks of the model besides its messages.

    The system prompt and the sampling parameters; ``null`` is the model's
    default.
    """
    return ConversationSettings.of(conversation).to_dict()


def usage_json(message: Message) -> dict[str, Any] | None:
    """How an answer was made: tokens, time, and the usage record's request id.

    The usage record is the account of the request; an answer whose record
    is gone (deleted by an admin) keeps what its message noted at the time.
    """
    record: UsageRecord | None = message.usage
    meta = message.meta if isinstance(message.meta, dict) else {}
    if record is not None:
        return {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "estimated": record.tokens_estimated,
            "latency_ms": record.latency_ms,
            "ttft_ms": record.ttft_ms,
            "request_id": str(record.request_id),
        }
    noted = meta.get("usage")
    if not isinstance(noted, dict):
        return None
    return {
        "prompt_tokens": noted.get("prompt_tokens"),
        "completion_tokens": noted.get("completion_tokens"),
        "estimated": noted.get("estimated"),
        "latency_ms": meta.get("latency_ms"),
        "ttft_ms": meta.get("ttft_ms"),
        "request_id": str(message.request_id) if message.request_id else None,
    }


def images_json(message: Message) -> list[dict[str, Any]]:
    """A question's images: what they are, and where their owner fetches them."""
    return [attachments.describe(image) for image in message.attachments.all()]


def message_json(message: Message) -> dict[str, Any]:
    """One message: who said what, when, and for answers how it was made."""
    meta = message.meta if isinstance(message.meta, dict) else {}
    error = meta.get("error")
    return {
        "id": message.id,
        # The tree of versions: a regenerated answer or an edited question is
        # a sibling (same parent) of the earlier versions; `shown` marks the
        # path the chat shows and continues from.
        "parent_id": message.parent_id,
        "shown": message.active,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": _time(message.created_at),
        "model": message.model_name,
        "endpoint": message.endpoint_name,
        "token_count": message.token_count,
        "pinned": message.pinned,
        "images": images_json(message),
        "usage": usage_json(message) if message.role == MessageRole.ASSISTANT else None,
        "fallback": [hop for hop in meta.get("hops") or [] if isinstance(hop, dict)],
        "error": error.get("message") if isinstance(error, dict) else None,
    }


def conversation_json(
    conversation: Conversation, messages: Iterable[Message]
) -> dict[str, Any]:
    """A conversation with its settings and messages, as one JSON object."""
    return {
        **header_json(conversation),
        "settings": settings_json(conversation),
        "messages": [message_json(message) for message in messages],
    }


def _envelope() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": timezone.now().isoformat(),
    }


def document_json(conversation: Conversation, messages: Iterable[Message]) -> str:
    """The JSON file of one conversation."""
    document = {
        **_envelope(),
        "conversations": [conversation_json(conversation, messages)],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


# --- The parts, as Markdown ---------------------------------------------------------

# A code fence line: up to three spaces, then three or more backticks or tildes.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def longest_run(text: str, char: str = "`") -> int:
    """The longest run of `char` in text."""
    runs = re.findall(f"{re.escape(char)}+", text)
    return max((len(run) for run in runs), default=0)


def fenced(text: str, info: str = "") -> str:
    """Text shown verbatim in a code block whose fence nothing in it can close."""
    fence = "`" * max(3, longest_run(text) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


# The start of a raw HTML block that only its own end tag closes (CommonMark
# kinds 1 to 5: <script>, <pre>, <style>, <textarea>, comments, <?, <!X,
# CDATA): left open, it would hide the rest of the file.
_OPEN_HTML = re.compile(
    r"^( {0,3})(<(?:script|pre|style|textarea)(?:[\s>]|$)"
    r"|<!--|<\?|<![A-Za-z]|<!\[CDATA\[)",
    re.IGNORECASE,
)


def contained(text: str) -> str:
    """Text as is, kept from swallowing what follows it in the file.

    A code block left open at its end (an answer stopped mid-block) is
    closed, and a line outside code that would open a raw HTML block ends
    only by its own closing tag gets its ``<`` escaped, so it shows as text.
    """
    lines = text.split("\n")
    open_fence: str | None = None
    for index, line in enumerate(lines):
        match = _FENCE.match(line)
        if open_fence is None and match is None:
            lines[index] = _OPEN_HTML.sub(r"\1\\\2", line)
            continue
        if match is None:
            continue
        fence, rest = match.groups()
        if open_fence is None:
            # A backtick fence's info string cannot hold a backtick.
            if not (fence[0] == "`" and "`" in rest):
                open_fence = fence
        elif (
            fence[0] == open_fence[0]
            and len(fence) >= len(open_fence)
            and not rest.strip()
        ):
            open_fence = None
    text = "\n".join(lines)
    if open_fence is None:
        return text
    return f"{text.rstrip()}\n{open_fence}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def header_markdown(conversation: Conversation) -> str:
    """The title and what the conversation is."""
    title = _one_line(str(conversation)).replace("#", "\\#")
    lines = [f"# {title}", ""]
    if conversation.model_name:
        lines.append(f"- Model: {_one_line(conversation.model_name)}")
    lines.append(f"- Created: {_time(conversation.created_at)}")
    lines.append(f"- Updated: {_time(conversation.updated_at)}")
    return "\n".join(lines)


def settings_markdown(conversation: Conversation) -> str:
    """The sampling parameters set, and the system prompt verbatim."""
    settings = ConversationSettings.of(conversation)
    blocks = [
        f"- {name.replace('_', ' ').capitalize()}: {value}"
        for name, value in settings.params().items()
    ]
    if settings.system_prompt:
        blocks.append("## System prompt\n\n" + fenced(settings.system_prompt, "text"))
    return "\n\n".join(blocks)


def _ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{round(value)} ms"


def footer_markdown(message: Message) -> str:
    """The line under an answer: endpoint, tokens, latency, time to first token."""
    parts: list[str] = []
    if message.endpoint_name:
        parts.append(f"via {_one_line(message.endpoint_name)}")
    usage = usage_json(message)
    if usage is not None:
        approx = "≈" if usage["estimated"] else ""
        parts.append(
            f"{approx}{usage['prompt_tokens']} in · "
            f"{approx}{usage['completion_tokens']} out"
        )
        if latency := _ms(usage["latency_ms"]):
            parts.append(latency)
        if ttft := _ms(usage["ttft_ms"]):
            parts.append(f"first token {ttft}")
    if message.status != "complete":
        parts.append(message.get_status_display().lower())
    if not parts:
        return ""
    # Escaped so that nothing in an endpoint's name turns into markup.
    return "_" + re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", " · ".join(parts)) + "_"


def message_markdown(message: Message) -> str:
    """One message: a heading saying who, then the text as is."""
    who = ROLE_NAMES.get(message.role, message.role)
    heading = f"## {who}"
    if message.role == MessageRole.ASSISTANT and message.model_name:
        heading += f" ({_one_line(message.model_name)})"
    heading += f" · {message.created_at:%Y-%m-%d %H:%M} UTC"
    parts = [heading]
    if message.content:
        parts.append(contained(message.content))
    if images := images_json(message):
        parts.append(
            "\n".join(
                f"- Image: {i['content_type']}, {i['width']} x {i['height']} px"
                for i in images
            )
        )
    meta = message.meta if isinstance(message.meta, dict) else {}
    error = meta.get("error")
    if isinstance(error, dict) and error.get("message"):
        parts.append("> Error: " + _one_line(error["message"]))
    if message.role == MessageRole.ASSISTANT and (footer := footer_markdown(message)):
        parts.append(footer)
    return "\n\n".join(parts)


def document_markdown(conversation: Conversation, messages: Iterable[Message]) -> str:
    """The Markdown file of one conversation: the versions shown, as it reads.

    Earlier versions of answers and questions are in the JSON file.
    """
    blocks = [header_markdown(conversation)]
    if settings := settings_markdown(conversation):
        blocks.append(settings)
    blocks.extend(message_markdown(message) for message in messages if message.active)
    # A rule between messages: their text is as is, the rule says where one ends.
    return "\n\n---\n\n".join(blocks) + "\n"


# --- Files ---------------------------------------------------------------------


def filename(conversation: Conversation, extension: str) -> str:
    """A safe file name made from the title: letters, digits and dashes."""
    stem = slugify(conversation.title, allow_unicode=True)[:FILENAME_CHARS].strip("-_")
    return f"{stem or 'conversation-' + str(conversation.id)[:8]}.{extension}"


def stream_all(user: Any) -> Iterator[str]:
    """Every conversation of the user, as one JSON document, in pieces.

    Conversations go oldest first by creation (a key that does not move while
    the export runs), BATCH at a time; each batch's messages come from one
    query read through a cursor.
    """
    envelope = json.dumps(_envelope(), ensure_ascii=False)
    buffer = [envelope[:-1], ', "conversations": [']
    size = 0
    first = True
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        rows = Conversation.objects.filter(user=user).order_by("created_at", "id")
        if after is not None:
            rows = rows.filter(
                Q(created_at__gt=after[0]) | Q(created_at=after[0], id__gt=after[1])
            )
        batch = list(rows[:BATCH])
        if not batch:
            break
        after = (batch[-1].created_at, batch[-1].id)
        for conversation, messages in _grouped(batch):
            text = json.dumps(
                conversation_json(conversation, messages), ensure_ascii=False
            )
            buffer.append(text if first else "," + text)
            first = False
            size += len(text)
            if size >= FLUSH_CHARS:
                yield "".join(buffer)
                buffer, size = [], 0
        if len(batch) < BATCH:
            break
    buffer.append("]}\n")
    yield "".join(buffer)


def _grouped(
    batch: list[Conversation],
) -> Iterator[tuple[Conversation, list[Message]]]:
    # Messages come ordered by conversation id: group them, then hand the
    # conversations back in the batch's own order.
    by_id: dict[uuid.UUID, list[Message]] = {c.id: [] for c in batch}
    for message in _messages(by_id).iterator(chunk_size=MESSAGE_CHUNK):
        by_id[message.conversation_id].append(message)
    for conversation in batch:
        yield conversation, by_id.pop(conversation.id)
