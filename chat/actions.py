"""The chat's reads and writes: small functions that check ownership themselves.

Every function takes the user and refuses (ChatError ``not_found``) anything
that is not theirs, so the consumer and the views cannot forget the check.
Write paths are atomic. All of this is synchronous ORM code; async callers
wrap it with ``database_sync_to_async``.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.dispatch import receiver
from django.utils import timezone

from chat import attachments, frames, leases
from chat.errors import ChatError, busy_switching, not_found
from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import tokens
from gateway.context import ContextMessage
from gateway.models import ModelRoute, RouteKind
from gateway.signals import requests_abandoned

TITLE_CHARS = 60
LIST_LIMIT = 50
# Messages read at a time while filling a page of history.
PAGE_BATCH = 50


@dataclass(slots=True)
class Turn:
    """A question to answer, planned without writing anything.

    Nothing is stored until the gateway admits the request (`commit_turn`): a
    refused send leaves no conversation, no question and no error answer, and
    a refused regenerate or edit leaves the previous answer in place.
    """

    conversation: Conversation
    # "send", "regenerate" or "edit".
    kind: str
    content: str
    model: str
    history: list[ContextMessage] = field(default_factory=list)
    # The question: an existing message for regenerate and edit; for send it
    # exists once the turn is committed.
    user_message: Message | None = None
    is_new_conversation: bool = False
    # The placeholder answer, once committed.
    answer_id: int | None = None
    # New uploads sent with the question, bound to it when it is stored.
    attachment_ids: list[uuid.UUID] = field(default_factory=list)
    # Sampling parameters for the upstream request body (the conversation's
    # temperature, top_p, max_tokens that are set).
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.answer_id is not None


def available_models() -> list[str]:
    """Model names a user can pick: enabled chat routes on enabled endpoints."""
    return list(
        ModelRoute.objects.filter(
            enabled=True, endpoint__enabled=True, kind=RouteKind.CHAT
        )
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
    """What the page needs to show one message, footer included.

    Its ``versions`` come from `with_versions` (one version when not given).
    """
    versions = getattr(message, "versions", None) or {
        "index": 1,
        "count": 1,
        "prev": None,
        "next": None,
    }
    return {
        "id": message.id,
        "parent_id": message.parent_id,
        "versions": versions,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "model": message.model_name,
        "endpoint": message.endpoint_name,
        "token_count": message.token_count,
        "created_at": message.created_at.isoformat(),
        "meta": message.meta,
        "attachments": attachments.of_message(message),
    }


def with_versions(messages: list[Message]) -> list[Message]:
    """Give each message its place among its siblings, in one query.

    ``versions`` is {``index`` (1-based), ``count``, ``prev``, ``next``}: the
    ids of the versions before and after it (None at either end), siblings
    taken in creation order. Regenerated answers and edited questions are
    siblings: same parent, same role.
    """
    if not messages:
        return messages
    parents = {m.parent_id for m in messages}
    under = Q(parent_id__in=[p for p in parents if p is not None])
    if None in parents:
        under |= Q(parent__isnull=True)
    rows = (
        Message.objects.filter(
            conversation_id__in={m.conversation_id for m in messages}
        )
        .filter(under, role__in={m.role for m in messages})
        .order_by("created_at", "id")
        .values_list("conversation_id", "parent_id", "role", "id")
    )
    # The first questions of different conversations all have no parent.
    siblings: dict[tuple[uuid.UUID, int | None, str], list[int]] = defaultdict(list)
    for conversation_id, parent_id, role, message_id in rows:
        siblings[(conversation_id, parent_id, role)].append(message_id)
    for message in messages:
        key = (message.conversation_id, message.parent_id, message.role)
        ids = siblings.get(key) or [message.id]
        index = ids.index(message.id) if message.id in ids else 0
        message.versions = {  # type: ignore[attr-defined]
            "index": index + 1,
            "count": len(ids),
            "prev": ids[index - 1] if index > 0 else None,
            "next": ids[index + 1] if index + 1 < len(ids) else None,
        }
    return messages


def owned_conversation(user: Any, conversation_id: uuid.UUID) -> Conversation:
    """Return the user's conversation, or refuse as if it did not exist."""
    try:
        return Conversation.objects.get(id=conversation_id, user=user)
    except Conversation.DoesNotExist:
        raise not_found() from None


def open_conversation(
    user: Any,
    conversation_id: uuid.UUID,
    *,
    running: bool = False,
    room: int | None = None,
) -> dict[str, Any]:
    """The conversation and its newest messages, for the ``opened`` frame.

    As many of the newest messages as fit in `room` bytes (the frame limit by
    default); ``more`` says whether older ones are left for ``history``.
    An answer being written is left out (the ``start`` frame that follows
    brings it); one still marked so while no process runs it (its process
    died: ``running`` is False and the conversation's claim is gone) is
    marked and shown as interrupted, so the user can retry it.
    """
    conversation = owned_conversation(user, conversation_id)
    stuck = list(
        conversation.messages.filter(status=MessageStatus.STREAMING).values_list(
            "id", flat=True
        )
    )
    hidden: list[int] = []
    if stuck:
        if running or leases.owner_of(conversation_id) is not None:
            hidden = stuck
        else:
            mark_interrupted(answer_ids=stuck)
    header = {
        "type": "opened",
        "conversation_id": str(conversation.id),
        "conversation": {
            **conversation_dict(conversation),
            "settings": _settings_dict(conversation),
        },
        "more": False,
        "messages": [],
    }
    room = (frames.limit() if room is None else room) - frames.size(
        frames.encode(header)
    )
    messages, more = _page(conversation, None, room, hidden)
    return {**header, "messages": messages, "more": more}


def _settings_dict(conversation: Conversation) -> dict[str, Any]:
    # The fields of chat.conversation_settings.ConversationSettings.
    return {
        "system_prompt": conversation.system_prompt,
        "temperature": conversation.temperature,
        "top_p": conversation.top_p,
        "max_tokens": conversation.max_tokens,
    }


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
    # An answer being written comes with its ``start`` frame, never here.
    hidden = list(
        conversation.messages.filter(status=MessageStatus.STREAMING).values_list(
            "id", flat=True
        )
    )
    messages, more = _page(conversation, before, room, hidden)
    return {**header, "messages": messages, "more": more}


def _page(
    conversation: Conversation, before: int | None, room: int, hidden: list[int]
) -> tuple[list[dict[str, Any]], bool]:
    """Newest messages (before a message) that fit in room bytes, oldest first.

    A page always holds at least one message, however long: the frame then
    goes out in chunks (chat.frames).
    """
    rows = attachments.with_attachments(
        conversation.messages.filter(active=True).order_by("-created_at", "-id")
    )
    if hidden:
        rows = rows.exclude(id__in=hidden)
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
        batch = with_versions(list(rows[offset : offset + PAGE_BATCH]))
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


# Markdown that a title shows as plain text: images and links keep their text;
# headings, quotes, list markers, emphasis and code marks go.
_TITLE_MARKUP = [
    (re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1"),
    (re.compile(r"<(https?://[^>\s]+)>"), r"\1"),
    (
        re.compile(r"^\s{0,3}(?:#{1,6}\s+|>\s*|[-*+]\s+(?:\[[ xX]\]\s+)?|\d+[.)]\s+)+"),
        "",
    ),
    (re.compile(r"(\*{1,3}|~~)(\S(?:.*?\S)?)\1"), r"\2"),
    # Underscores inside a word (snake_case) are not emphasis.
    (re.compile(r"(?<!\w)(_{1,3})(\S(?:.*?\S)?)\1(?!\w)"), r"\2"),
    (re.compile(r"`+"), ""),
]
_TITLE_SKIPPED = re.compile(r"^\s*(?:/sim(?:\s.*)?|`{3,}.*|~{3,}.*|[-*_=\s]*)$")


def title_from(content: str) -> str:
    """A conversation title from its first question's first line of text.

    Simulator lines (``/sim ...``), code fences and rules are skipped, and
    Markdown markup is taken off, so the title reads as plain text; it is
    cut at TITLE_CHARS.
    """
    line = ""
    for raw in content.splitlines():
        if _TITLE_SKIPPED.match(raw):
            continue
        line = raw
        for pattern, replacement in _TITLE_MARKUP:
            line = pattern.sub(replacement, line)
        line = " ".join(line.split())
        if line:
            break
    if len(line) <= TITLE_CHARS:
        return line
    return line[: TITLE_CHARS - 1].rstrip() + "…"


def _history(
    conversation: Conversation, before: Message | None = None
) -> list[ContextMessage]:
    # Failed, empty and unfinished answers are shown to the user but never
    # sent upstream. Ids, pins and importance let context fitting choose what
    # to leave out, and the page mark which messages were left out.
    history = _system(conversation)
    rows = (
        conversation.messages.filter(active=True)
        .exclude(
            status__in=[
                MessageStatus.ERROR,
                MessageStatus.STREAMING,
                MessageStatus.INTERRUPTED,
            ]
        )
        .exclude(role=MessageRole.ASSISTANT, content="")
    )
    if before is not None:
        rows = rows.filter(_before_q(before))
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


def _system(conversation: Conversation) -> list[ContextMessage]:
    # The system prompt goes first, and is always kept when fitting.
    if not conversation.system_prompt:
        return []
    return [ContextMessage("system", conversation.system_prompt, pinned=True)]


def _before_q(message: Message) -> Q:
    return Q(created_at__lt=message.created_at) | Q(
        created_at=message.created_at, id__lt=message.id
    )


def _after_q(message: Message) -> Q:
    return Q(created_at__gt=message.created_at) | Q(
        created_at=message.created_at, id__gt=message.id
    )


def _touch(conversation: Conversation, model: str, now: datetime) -> None:
    conversation.model_name = model
    conversation.updated_at = now
    conversation.save(update_fields=["model_name", "updated_at", "title"])


def plan_send(
    user: Any,
    conversation_id: uuid.UUID | None,
    content: str,
    model: str,
    *,
    new_id: uuid.UUID | None = None,
    settings: Any = None,
) -> Turn:
    """A new question, after the last message shown (a new conversation: None).

    A new conversation takes `settings` (chat.conversation_settings), its
    system prompt first in the history sent upstream.
    """
    question = ContextMessage(MessageRole.USER, content)
    if conversation_id is None:
        now = timezone.now()
        conversation = Conversation(
            id=new_id or uuid.uuid4(),
            user=user,
            title=title_from(content),
            model_name=model,
            created_at=now,
            updated_at=now,
        )
        if settings is not None:
            settings.apply(conversation)
        history = [*_system(conversation), question]
        return Turn(
            conversation, "send", content, model, history, is_new_conversation=True
        )
    conversation = owned_conversation(user, conversation_id)
    history = [*_history(conversation), question]
    return Turn(conversation, "send", content, model, history)


def plan_regenerate(user: Any, conversation_id: uuid.UUID, model: str | None) -> Turn:
    """Answer the last question shown again, as a new version of its answer."""
    conversation = owned_conversation(user, conversation_id)
    last_user = (
        conversation.messages.filter(role=MessageRole.USER, active=True)
        .order_by("-created_at", "-id")
        .first()
    )
    if last_user is None:
        raise ChatError(
            "nothing_to_regenerate", "There is no question to answer again."
        )
    model = model or conversation.model_name or last_user.model_name
    history = [*_history(conversation, before=last_user), _context(last_user)]
    return Turn(
        conversation,
        "regenerate",
        last_user.content,
        model,
        history,
        user_message=last_user,
    )


def plan_edit(user: Any, message_id: int, content: str, model: str | None) -> Turn:
    """Answer a rewritten question; stored once admitted, as a new version."""
    try:
        message = Message.objects.select_related("conversation").get(
            id=message_id, conversation__user=user
        )
    except Message.DoesNotExist:
        raise not_found() from None
    if message.role != MessageRole.USER:
        raise ChatError("invalid", "Only your own messages can be edited.")
    if not message.active:
        raise ChatError(
            "invalid",
            "That version is not the one shown any more; open the conversation "
            "again to edit it.",
        )
    conversation = message.conversation
    model = model or conversation.model_name or message.model_name
    rewritten = _context(message)
    rewritten.content = content
    history = [*_history(conversation, before=message), rewritten]
    return Turn(conversation, "edit", content, model, history, user_message=message)


def _context(message: Message) -> ContextMessage:
    return ContextMessage(
        message.role,
        message.content,
        id=message.id,
        pinned=message.pinned,
        importance=message.importance,
    )


@transaction.atomic
def commit_turn(turn: Turn, request_id: uuid.UUID) -> None:
    """Store the question and a placeholder answer: the gateway admitted it.

    The placeholder (status streaming) carries the request id of the usage
    record, so an answer whose process dies can be found and offered again.
    """
    now = timezone.now()
    conversation = turn.conversation
    if turn.is_new_conversation:
        conversation.created_at = conversation.updated_at = now
        conversation.save(force_insert=True)
    else:
        # Deleted since the turn was planned: nothing to answer into.
        locked = (
            Conversation.objects.select_for_update()
            .filter(id=conversation.id, user_id=conversation.user_id)
            .first()
        )
        if locked is None:
            raise not_found()
        conversation = turn.conversation = locked
        if not conversation.title:
            conversation.title = title_from(turn.content)
        _touch(conversation, turn.model, now)
    tokens_in = tokens.count_text(turn.content, turn.model)
    shown = conversation.messages.filter(active=True)
    if turn.kind == "send":
        # The path shown goes on from its last message; a new conversation
        # has none yet.
        parent = (
            None
            if turn.is_new_conversation
            else shown.order_by("-created_at", "-id").first()
        )
        question = Message.objects.create(
            conversation=conversation,
            parent=parent,
            role=MessageRole.USER,
            content=turn.content,
            token_count=tokens_in,
            model_name=turn.model,
            created_at=now,
            shown_at=now,
        )
        turn.history[-1].id = question.id
    else:
        assert turn.user_message is not None
        question = turn.user_message
        if not shown.filter(id=question.id).exists():
            # Deleted, or another version shown since the turn was planned.
            raise not_found()
        if turn.kind == "regenerate":
            # The answers shown below the question stay, as earlier versions.
            shown.filter(_after_q(question)).update(active=False)
        else:
            # The rewrite is a new version of the question: the old one and
            # the branch that followed it stay, no longer shown.
            shown.filter(Q(id=question.id) | _after_q(question)).update(active=False)
            # The title follows the first question, unless its owner chose one.
            if not conversation.title_set_by_hand and question.parent_id is None:
                conversation.title = title_from(turn.content)
                conversation.save(update_fields=["title"])
            question = Message.objects.create(
                conversation=conversation,
                parent_id=question.parent_id,
                role=MessageRole.USER,
                content=turn.content,
                token_count=tokens_in,
                model_name=turn.model,
                pinned=question.pinned,
                importance=question.importance,
                created_at=now,
                shown_at=now,
            )
            # The images of the question edited come along to its new version.
            attachments.carry_over(turn.user_message, question)
            turn.history[-1].id = question.id
    # The first question of a new conversation is its only version, which
    # is what message_dict says of a message without versions.
    turn.user_message = (
        question if turn.is_new_conversation else with_versions([question])[0]
    )
    attachments.bind(turn, question)
    answer = _placeholder(turn, question, request_id, now)
    answer.save(force_insert=True)
    turn.answer_id = answer.id


def _placeholder(
    turn: Turn, question: Message, request_id: uuid.UUID, now: datetime
) -> Message:
    """The answer's message, unsaved: empty and streaming until it ends."""
    return Message(
        conversation=turn.conversation,
        parent=question,
        role=MessageRole.ASSISTANT,
        content="",
        status=MessageStatus.STREAMING,
        model_name=turn.model,
        request_id=request_id,
        created_at=now,
        shown_at=now,
    )


def commit_turns(
    turns: list[tuple[Turn, uuid.UUID]],
) -> list[Exception | None]:
    """`commit_turn` for several turns in one transaction; each fails alone.

    Answers admitted together start in one round trip: one transaction, and a
    savepoint per turn so that a refused one (its conversation deleted
    meanwhile) leaves the others stored. First questions of new conversations
    are stored together (`_commit_new_conversations`). Returns each turn's
    refusal, or None.
    """
    outcomes: dict[int, Exception | None] = {}
    try:
        with transaction.atomic():
            fresh = [item for item in turns if _starts_conversation(item[0])]
            if fresh:
                try:
                    with transaction.atomic():
                        _commit_new_conversations(fresh)
                except Exception:
                    # One of them is refused: store each on its own below.
                    for turn, _ in fresh:
                        turn.answer_id = None
                else:
                    outcomes.update((id(turn), None) for turn, _ in fresh)
            for turn, request_id in turns:
                if id(turn) in outcomes:
                    continue
                try:
                    commit_turn(turn, request_id)
                except Exception as exc:
                    turn.answer_id = None
                    outcomes[id(turn)] = exc
                else:
                    outcomes[id(turn)] = None
    except Exception as exc:
        # The transaction itself failed: nothing of the batch is stored.
        for turn, _ in turns:
            turn.answer_id = None
        return [exc] * len(turns)
    return [outcomes[id(turn)] for turn, _ in turns]


def _starts_conversation(turn: Turn) -> bool:
    return turn.is_new_conversation and turn.kind == "send" and not turn.attachment_ids


def _commit_new_conversations(turns: list[tuple[Turn, uuid.UUID]]) -> None:
    """`commit_turn` for first questions without images, in three queries.

    In a burst of new chats, the inserts one by one (and the reads that
    `Message.save` and `attachments.bind` make for any message) were most of
    the database thread's time. Nothing is read here: a new conversation has
    no path to continue from, and a question sent without uploads has no
    images. The caller's savepoint takes everything back if one insert fails.
    """
    now = timezone.now()
    conversations = [turn.conversation for turn, _ in turns]
    for conversation in conversations:
        conversation.created_at = conversation.updated_at = now
    Conversation.objects.bulk_create(conversations)
    questions = [
        Message(
            conversation=turn.conversation,
            parent=None,
            role=MessageRole.USER,
            content=turn.content,
            token_count=tokens.count_text(turn.content, turn.model),
            model_name=turn.model,
            created_at=now,
            shown_at=now,
        )
        for turn, _ in turns
    ]
    Message.objects.bulk_create(questions)
    answers = [
        _placeholder(turn, question, request_id, now)
        for (turn, request_id), question in zip(turns, questions, strict=True)
    ]
    Message.objects.bulk_create(answers)
    for (turn, _), question, answer in zip(turns, questions, answers, strict=True):
        attachments.known_to_have_none(question)
        turn.history[-1].id = question.id
        turn.user_message = question
        turn.answer_id = answer.id


def switch_version(
    user: Any, conversation_id: uuid.UUID, message_id: int
) -> dict[str, Any]:
    """Show another version of a message, and the branch last shown below it.

    Returns the ``opened`` frame of the path now shown. Refused (``busy``)
    while the conversation is being answered: the answer continues the path
    it was asked on.
    """
    with transaction.atomic():
        conversation = (
            Conversation.objects.select_for_update()
            .filter(id=conversation_id, user=user)
            .first()
        )
        if conversation is None:
            raise not_found()
        target = conversation.messages.filter(id=message_id).first()
        if target is None:
            raise not_found()
        if leases.owner_of(conversation.id) is not None:
            raise busy_switching()
        if not target.active:
            _show_branch(conversation, target)
    return open_conversation(user, conversation_id)


def _show_branch(conversation: Conversation, target: Message) -> None:
    shown = conversation.messages.filter(active=True)
    if target.parent_id is None:
        shown.update(active=False)
    else:
        parent = shown.filter(id=target.parent_id).first()
        if parent is None:
            raise ChatError(
                "invalid",
                "That version is not under the conversation shown; open the "
                "conversation again.",
            )
        shown.filter(_after_q(parent)).update(active=False)
    # Below the target, follow the child shown last at every level: children
    # are always newer than their parent, so one read finds the whole branch.
    below: dict[int | None, list[tuple[datetime, int]]] = defaultdict(list)
    rows = conversation.messages.filter(_after_q(target)).values_list(
        "parent_id", "shown_at", "id"
    )
    for parent_id, shown_at, message_id in rows:
        below[parent_id].append((shown_at, message_id))
    path = [target.id]
    while below.get(path[-1]):
        path.append(max(below[path[-1]])[1])
    conversation.messages.filter(id__in=path).update(
        active=True, shown_at=timezone.now()
    )


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
    conversation_id: uuid.UUID, answer_id: int, answer: Answer
) -> dict[str, Any] | None:
    """Store how the answer ended in its placeholder; None if it was deleted."""
    now = timezone.now()
    if not _store_answer(answer_id, answer):
        return None
    Conversation.objects.filter(id=conversation_id).update(updated_at=now)
    return message_dict(with_versions([Message.objects.get(id=answer_id)])[0])


def save_answers(
    answers: list[tuple[uuid.UUID, int, Answer]],
) -> list[dict[str, Any] | Exception | None]:
    """`save_answer` for several answers in one transaction; each fails alone.

    Answers started together end together: one UPDATE each, then the
    conversations touched and the messages read back for all of them at once.
    If the batch fails, each answer is stored on its own.
    """
    try:
        with transaction.atomic():
            now = timezone.now()
            stored = {
                answer_id: conversation_id
                for conversation_id, answer_id, answer in answers
                if _store_answer(answer_id, answer)
            }
            Conversation.objects.filter(id__in=set(stored.values())).update(
                updated_at=now
            )
            messages = with_versions(list(Message.objects.filter(id__in=stored)))
    except Exception:
        return [_save_alone(*item) for item in answers]
    dicts = {message.id: message_dict(message) for message in messages}
    return [dicts.get(answer_id) for _, answer_id, _ in answers]


def _save_alone(
    conversation_id: uuid.UUID, answer_id: int, answer: Answer
) -> dict[str, Any] | Exception | None:
    try:
        return save_answer(conversation_id, answer_id, answer)
    except Exception as exc:
        return exc


def _store_answer(answer_id: int, answer: Answer) -> bool:
    """Write an answer into its placeholder; False if it was deleted."""
    fields = {
        "content": answer.content,
        "status": answer.status,
        "model_name": answer.model,
        "endpoint_id": answer.endpoint_id,
        "endpoint_name": answer.endpoint_name[:100],
        "usage_id": answer.usage_id,
        "token_count": answer.completion_tokens,
        "meta": answer.meta,
    }
    return bool(Message.objects.filter(id=answer_id).update(**fields))


def mark_interrupted(
    *, request_ids: list[uuid.UUID] | None = None, answer_ids: list[int] | None = None
) -> int:
    """Mark answers still "being written" as interrupted; how many changed.

    A compare-and-set on the status: an answer that ended meanwhile keeps
    what its process stored.
    """
    rows = Message.objects.filter(status=MessageStatus.STREAMING)
    if request_ids is not None:
        rows = rows.filter(request_id__in=request_ids)
    if answer_ids is not None:
        rows = rows.filter(id__in=answer_ids)
    return rows.update(status=MessageStatus.INTERRUPTED)


@receiver(requests_abandoned)
def _interrupt_abandoned(
    sender: Any, *, request_ids: list[uuid.UUID], **kwargs: Any
) -> None:
    # The sweeper found these requests' process dead and released their
    # reservations: their answers will never be finished.
    mark_interrupted(request_ids=list(request_ids))


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
    by_hand = bool(title)
    if not by_hand:
        # A blank title gives the conversation back its title from the
        # first question shown.
        first = (
            Message.objects.filter(
                conversation_id=conversation_id,
                conversation__user=user,
                role=MessageRole.USER,
                active=True,
            )
            .order_by("created_at", "id")
            .values_list("content", flat=True)
            .first()
        )
        title = title_from(first or "")
    updated = Conversation.objects.filter(id=conversation_id, user=user).update(
        title=title, title_set_by_hand=by_hand
    )
    if not updated:
        raise not_found()
    return conversation_dict(owned_conversation(user, conversation_id))


def delete(user: Any, conversation_id: uuid.UUID) -> None:
    """Delete a conversation and its messages; its usage records stay."""
    deleted, _ = Conversation.objects.filter(id=conversation_id, user=user).delete()
    if not deleted:
        raise not_found()
