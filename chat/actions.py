"""The chat's reads and writes: small functions that check ownership themselves.

Every function takes the user and refuses (ChatError ``not_found``) anything
that is not theirs, so the consumer and the views cannot forget the check.
Write paths are atomic. All of this is synchronous ORM code; async callers
wrap it with ``database_sync_to_async``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from chat import frames
from chat.errors import ChatError, not_found
from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import tokens
from gateway.context import ContextMessage
from gateway.models import ModelRoute

TITLE_CHARS = 60
LIST_LIMIT = 50
# Messages read at a time while filling a page of history.
PAGE_BATCH = 50


@dataclass(slots=True)
class Turn:
    """A user message ready to be answered, with the conversation to send upstream."""

    conversation: Conversation
    user_message: Message
    model: str
    history: list[ContextMessage] = field(default_factory=list)


def available_models() -> list[str]:
    """Model names a user can pick: enabled routes on enabled endpoints."""
    return list(
        ModelRoute.objects.filter(enabled=True, endpoint__enabled=True)
        .order_by("model_name")
        .values_list("model_name", flat=True)
        .distinct()
    )


def conversation_dict(conversation: Conversation) -> dict[str, Any]:
    """What the sidebar and the socket say about a conversation."""
    return {
        "id": str(conversation.id),
        "title": str(conversation),
        "model": conversation.model_name,
        "updated_at": conversation.updated_at.isoformat(),
    }


def message_dict(message: Message) -> dict[str, Any]:
    """What the page needs to show one message, footer included."""
    return {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "model": message.model_name,
        "endpoint": message.endpoint_name,
        "token_count": message.token_count,
        "created_at": message.created_at.isoformat(),
        "meta": message.meta,
    }


def owned_conversation(user: Any, conversation_id: uuid.UUID) -> Conversation:
    """Return the user's conversation, or refuse as if it did not exist."""
    try:
        return Conversation.objects.get(id=conversation_id, user=user)
    except Conversation.DoesNotExist:
        raise not_found() from None


def open_conversation(
    user: Any, conversation_id: uuid.UUID, *, room: int | None = None
) -> dict[str, Any]:
    """The conversation and its newest messages, for the ``opened`` frame.

    As many of the newest messages as fit in `room` bytes (the frame limit by
    default); ``more`` says whether older ones are left for ``history``.
    """
    conversation = owned_conversation(user, conversation_id)
    header = {
        "type": "opened",
        "conversation_id": str(conversation.id),
        "conversation": conversation_dict(conversation),
        "more": False,
        "messages": [],
    }
    room = (frames.limit() if room is None else room) - frames.size(
        frames.encode(header)
    )
    messages, more = _page(conversation, None, room)
    return {**header, "messages": messages, "more": more}


def message_page(
    user: Any, conversation_id: uuid.UUID, before: int, *, room: int | None = None
) -> dict[str, Any]:
    """The messages before `before`, newest first up to `room` bytes, in order."""
    conversation = owned_conversation(user, conversation_id)
    header = {
        "type": "history",
        "conversation_id": str(conversation.id),
        "more": False,
        "messages": [],
    }
    room = (frames.limit() if room is None else room) - frames.size(
        frames.encode(header)
    )
    messages, more = _page(conversation, before, room)
    return {**header, "messages": messages, "more": more}


def _page(
    conversation: Conversation, before: int | None, room: int
) -> tuple[list[dict[str, Any]], bool]:
    """Newest messages (before a message) that fit in room bytes, oldest first.

    A page always holds at least one message, however long: the frame then
    goes out in chunks (chat.frames).
    """
    rows = conversation.messages.order_by("-created_at", "-id")
    if before is not None:
        anchor = (
            conversation.messages.filter(id=before)
            .values_list("created_at", flat=True)
            .first()
        )
        if anchor is None:
            raise not_found()
        rows = rows.filter(
            Q(created_at__lt=anchor) | Q(created_at=anchor, id__lt=before)
        )
    page: list[dict[str, Any]] = []
    used = 0
    offset = 0
    while True:
        # Batches, so a page of a huge conversation reads only what it sends.
        batch = list(rows[offset : offset + PAGE_BATCH])
        for message in batch:
            item = message_dict(message)
            # One more byte for the comma between messages.
            cost = frames.size(frames.encode(item)) + 1
            if page and used + cost > room:
                page.reverse()
                return page, True
            page.append(item)
            used += cost
        if len(batch) < PAGE_BATCH:
            page.reverse()
            return page, False
        offset += PAGE_BATCH


def conversation_of_message(user: Any, message_id: int) -> uuid.UUID:
    """The id of the user's conversation holding a message."""
    found = (
        Message.objects.filter(id=message_id, conversation__user=user)
        .values_list("conversation_id", flat=True)
        .first()
    )
    if found is None:
        raise not_found()
    return found


def title_from(content: str) -> str:
    """A conversation title made from its first message."""
    words = " ".join(content.split())
    if len(words) <= TITLE_CHARS:
        return words
    return words[: TITLE_CHARS - 1].rstrip() + "…"


def _history(conversation: Conversation) -> list[ContextMessage]:
    # Failed and empty answers are shown to the user but never sent upstream.
    # Ids, pins and importance let context fitting choose what to leave out,
    # and the page mark which messages were left out.
    history: list[ContextMessage] = []
    if conversation.system_prompt:
        history.append(
            ContextMessage("system", conversation.system_prompt, pinned=True)
        )
    rows = conversation.messages.exclude(status=MessageStatus.ERROR).exclude(
        role=MessageRole.ASSISTANT, content=""
    )
    for message in rows:
        history.append(
            ContextMessage(
                message.role,
                message.content,
                id=message.id,
                pinned=message.pinned,
                importance=message.importance,
            )
        )
    return history


def _touch(conversation: Conversation, model: str, now: datetime) -> None:
    conversation.model_name = model
    conversation.updated_at = now
    conversation.save(update_fields=["model_name", "updated_at", "title"])


@transaction.atomic
def start_turn(
    user: Any,
    conversation_id: uuid.UUID | None,
    content: str,
    model: str,
    *,
    new_id: uuid.UUID | None = None,
) -> Turn:
    """Store a new user message, in a new conversation when conversation_id is None."""
    now = timezone.now()
    if conversation_id is None:
        conversation = Conversation.objects.create(
            id=new_id or uuid.uuid4(),
            user=user,
            title=title_from(content),
            model_name=model,
            created_at=now,
            updated_at=now,
        )
    else:
        conversation = owned_conversation(user, conversation_id)
        if not conversation.title:
            conversation.title = title_from(content)
        _touch(conversation, model, now)
    message = Message.objects.create(
        conversation=conversation,
        role=MessageRole.USER,
        content=content,
        token_count=tokens.count_text(content, model),
        model_name=model,
        created_at=now,
    )
    if conversation_id is None:
        # A new conversation holds just this message: no need to read it back.
        history = [ContextMessage(MessageRole.USER, content, id=message.id)]
    else:
        history = _history(conversation)
    return Turn(conversation, message, model, history)


@transaction.atomic
def prepare_regenerate(
    user: Any, conversation_id: uuid.UUID, model: str | None
) -> Turn:
    """Drop the answer after the last user message so it can be asked again."""
    conversation = owned_conversation(user, conversation_id)
    last_user = (
        conversation.messages.filter(role=MessageRole.USER)
        .order_by("-created_at", "-id")
        .first()
    )
    if last_user is None:
        raise ChatError(
            "nothing_to_regenerate", "There is no question to answer again."
        )
    _drop_after(last_user)
    model = model or conversation.model_name or last_user.model_name
    _touch(conversation, model, timezone.now())
    return Turn(conversation, last_user, model, _history(conversation))


@transaction.atomic
def prepare_edit(user: Any, message_id: int, content: str, model: str | None) -> Turn:
    """Change a user message, drop everything after it, and answer it again."""
    try:
        message = Message.objects.select_related("conversation").get(
            id=message_id, conversation__user=user
        )
    except Message.DoesNotExist:
        raise not_found() from None
    if message.role != MessageRole.USER:
        raise ChatError("invalid", "Only your own messages can be edited.")
    conversation = message.conversation
    model = model or conversation.model_name or message.model_name
    _drop_after(message)
    message.content = content
    message.token_count = tokens.count_text(content, model)
    message.model_name = model
    message.save(update_fields=["content", "token_count", "model_name"])
    _touch(conversation, model, timezone.now())
    return Turn(conversation, message, model, _history(conversation))


def _drop_after(message: Message) -> None:
    Message.objects.filter(conversation_id=message.conversation_id).filter(
        Q(created_at__gt=message.created_at)
        | Q(created_at=message.created_at, id__gt=message.id)
    ).delete()


@dataclass(slots=True)
class Answer:
    """How a generation ended, to be stored as the assistant message."""

    content: str
    status: str
    model: str
    endpoint_id: int | None = None
    endpoint_name: str = ""
    usage_id: int | None = None
    completion_tokens: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@transaction.atomic
def save_answer(
    conversation_id: uuid.UUID, user_message_id: int, answer: Answer
) -> dict[str, Any] | None:
    """Store the assistant message; None when its question was deleted meanwhile."""
    conversation = (
        Conversation.objects.select_for_update().filter(id=conversation_id).first()
    )
    if (
        conversation is None
        or not conversation.messages.filter(id=user_message_id).exists()
    ):
        return None
    now = timezone.now()
    message = Message.objects.create(
        conversation=conversation,
        role=MessageRole.ASSISTANT,
        content=answer.content,
        status=answer.status,
        model_name=answer.model,
        endpoint_id=answer.endpoint_id,
        endpoint_name=answer.endpoint_name[:100],
        usage_id=answer.usage_id,
        token_count=answer.completion_tokens,
        meta=answer.meta,
        created_at=now,
    )
    Conversation.objects.filter(id=conversation_id).update(updated_at=now)
    return message_dict(message)


def list_conversations(
    user: Any, query: str = "", before: datetime | None = None, limit: int = LIST_LIMIT
) -> dict[str, Any]:
    """The user's conversations, newest first, optionally matching a search."""
    rows = Conversation.objects.filter(user=user)
    query = query.strip()
    if query:
        in_messages = Message.objects.filter(
            conversation=OuterRef("pk"), content__icontains=query
        )
        rows = rows.filter(Q(title__icontains=query) | Exists(in_messages))
    if before is not None:
        rows = rows.filter(updated_at__lt=before)
    page = list(rows.order_by("-updated_at", "-id")[: limit + 1])
    return {
        "conversations": [conversation_dict(c) for c in page[:limit]],
        "more": len(page) > limit,
    }


def rename(user: Any, conversation_id: uuid.UUID, title: str) -> dict[str, Any]:
    """Give a conversation a new title (blank: its default)."""
    title = " ".join(title.split())
    max_length = Conversation._meta.get_field("title").max_length
    if len(title) > max_length:
        raise ChatError("too_large", f"A title can be at most {max_length} characters.")
    updated = Conversation.objects.filter(id=conversation_id, user=user).update(
        title=title
    )
    if not updated:
        raise not_found()
    return conversation_dict(owned_conversation(user, conversation_id))


def delete(user: Any, conversation_id: uuid.UUID) -> None:
    """Delete a conversation and its messages; its usage records stay."""
    deleted, _ = Conversation.objects.filter(id=conversation_id, user=user).delete()
    if not deleted:
        raise not_found()
