"""Conversations and their messages."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from gateway.models import Endpoint, UsageRecord


class SamplingSettings(models.Model):
    """Sampling for a conversation's answers; null: the model's default.

    Ranges are checked by chat.conversation_settings.
    """

    temperature = models.FloatField(null=True, blank=True)
    top_p = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        abstract = True


class Conversation(SamplingSettings):
    """A user's chat thread; only its owner may read or write it."""

    # Random ids: a conversation's URL reveals nothing about others.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    # Renamed by its owner: the title is no longer made from the first question.
    title_set_by_hand = models.BooleanField(default=False)
    model_name = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [
            # The sidebar: one user's conversations, newest first.
            models.Index(
                fields=["user", "-updated_at"], name="conversation_user_recent"
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {str(self.id)[:8]}"


class MessageRole(models.TextChoices):
    SYSTEM = "system", "System"
    USER = "user", "User"
    ASSISTANT = "assistant", "Assistant"


class MessageStatus(models.TextChoices):
    COMPLETE = "complete", "Complete"
    PARTIAL = "partial", "Partial"
    ERROR = "error", "Error"
    # An answer being written: stored when the gateway admits the request,
    # updated when it ends. One left behind by a dead process is shown (and
    # marked) as interrupted, with Retry.
    STREAMING = "streaming", "Being written"
    INTERRUPTED = "interrupted", "Interrupted"


class Message(models.Model):
    """One turn of a conversation: a node of its tree of versions.

    A conversation is a tree: regenerate adds an answer under the same
    question, edit adds a question under the same parent. The messages shown
    (and sent upstream) are one path from a root to a leaf, marked ``active``
    so reading it is one indexed filter; the path is always in creation order.
    """

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    # None for a first question (and its edits).
    parent = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="children",
    )
    active = models.BooleanField(
        default=True, help_text="On the path of the conversation shown."
    )
    # Switching to a version reopens the branch last shown below it: the child
    # shown most recently.
    shown_at = models.DateTimeField(default=timezone.now)
    role = models.CharField(max_length=16, choices=MessageRole.choices)
    content = models.TextField(blank=True)
    token_count = models.PositiveIntegerField(null=True, blank=True)
    pinned = models.BooleanField(
        default=False, help_text="Kept in context for as long as possible."
    )
    importance = models.SmallIntegerField(
        default=0, help_text="Higher is kept longer when the context window is full."
    )
    status = models.CharField(
        max_length=16, choices=MessageStatus.choices, default=MessageStatus.COMPLETE
    )
    model_name = models.CharField(max_length=200, blank=True)
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    endpoint_name = models.CharField(max_length=100, blank=True)
    usage = models.OneToOneField(
        UsageRecord, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # The usage record's request id of the answer being written: how a
    # process that finds the request abandoned finds its message.
    request_id = models.UUIDField(null=True, blank=True, editable=False)
    # What the UI shows under an answer: hops, tokens, latency, error text.
    meta = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            # Loading a conversation in order.
            models.Index(
                fields=["conversation", "created_at"], name="message_conv_time"
            ),
            # Paging and the context history: the shown path only.
            models.Index(
                fields=["conversation", "created_at", "id"],
                name="message_conv_shown",
                condition=models.Q(active=True),
            ),
            # The versions of a conversation's first question.
            models.Index(
                fields=["conversation"],
                name="message_conv_roots",
                condition=models.Q(parent__isnull=True),
            ),
            # Marking the answers of abandoned requests interrupted.
            models.Index(
                fields=["request_id"],
                name="message_request_id",
                condition=models.Q(request_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # A new message without a parent continues the path shown, as a new
        # question does; the chat's own writes name the parent themselves.
        if self._state.adding and self.parent_id is None and self.active:
            self.parent = (
                Message.objects.filter(
                    conversation_id=self.conversation_id, active=True
                )
                .order_by("-created_at", "-id")
                .first()
            )
        super().save(*args, **kwargs)


class Attachment(models.Model):
    """An image a user uploaded, stored in the database, bound to one question.

    The bytes live in the database (not on a disk one web process has), so
    any process serves them. An upload is unbound (``message`` empty) until
    the question it was sent with is stored; unbound ones older than a day
    are deleted (chat.attachments.purge_stale).
    """

    # Random ids: an image's URL reveals nothing about others.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_attachments",
    )
    message = models.ForeignKey(
        Message,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="attachments",
    )
    # Set by the server from the decoded image, never from the client.
    content_type = models.CharField(max_length=32)
    data = models.BinaryField()
    thumbnail = models.BinaryField()
    thumbnail_content_type = models.CharField(max_length=32)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    size = models.PositiveIntegerField(help_text="Bytes stored (after re-encoding).")
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            # Deleting stale uploads: unbound ones older than a day.
            models.Index(
                fields=["created_at"],
                name="attachment_unbound_age",
                condition=models.Q(message__isnull=True),
            ),
            # Counting one user's pending uploads.
            models.Index(
                fields=["owner", "created_at"],
                name="attachment_owner_unbound",
                condition=models.Q(message__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.content_type} {self.width}x{self.height} ({self.size} bytes)"


class Preset(SamplingSettings):
    """A user's own saved settings, picked for a new conversation."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="presets"
    )
    name = models.CharField(max_length=100)
    # Blank: the preset suits any model.
    model_name = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "name"], name="preset_unique_user_name"
            ),
        ]

    def __str__(self) -> str:
        return self.name
