"""Admin for conversations and messages; list views stay cheap on big tables."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.text import Truncator

from chat.models import Attachment, Conversation, Message, Preset

# Characters of a message shown in lists; the whole text is on its page.
EXCERPT_CHARS = 120


def excerpt(message: Message) -> str:
    """The start of a message on one line, cut at a word; escaped by the admin."""
    return Truncator(" ".join(message.content.split())).chars(EXCERPT_CHARS)


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "status", "short_content", "endpoint_name", "usage")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("created_at", "id")

    @admin.display(description="content")
    def short_content(self, message: Message) -> str:
        return excerpt(message)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "model_name", "updated_at", "created_at")
    list_select_related = ("user",)
    list_filter = ("model_name",)
    search_fields = ("title", "user__username", "=id")
    date_hierarchy = "updated_at"
    show_full_result_count = False
    raw_id_fields = ("user",)
    # Written by the chat, not by hand: when it began and last changed.
    readonly_fields = ("id", "created_at", "updated_at")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "conversation",
        "role",
        "text",
        "status",
        "model_name",
        "token_count",
        "created_at",
    )
    # The conversation column prints the conversation's title: one join, no
    # query per row.
    list_select_related = ("conversation",)
    list_filter = ("role", "status")
    search_fields = ("content", "=conversation__id", "conversation__user__username")
    date_hierarchy = "created_at"
    show_full_result_count = False
    raw_id_fields = ("conversation", "endpoint", "usage")
    readonly_fields = ("created_at",)

    @admin.display(description="text")
    def text(self, message: Message) -> str:
        return excerpt(message)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Messages belong to a user's conversation: only the chat writes them.
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        # The list never shows the footer data. (The text stays: each row's
        # checkbox is labelled with the message's __str__, which quotes it.)
        return super().get_queryset(request).defer("meta")


@admin.register(Attachment)
class AttachmentAdmin(admin.ModelAdmin):
    """Uploaded images, described: their bytes are never read for the list."""

    list_display = (
        "id",
        "owner",
        "content_type",
        "width",
        "height",
        "size",
        "message",
        "created_at",
    )
    list_filter = ("content_type",)
    list_select_related = ("owner", "message")
    search_fields = ("owner__username", "sha256")
    date_hierarchy = "created_at"
    show_full_result_count = False
    fields = (*list_display[1:], "sha256")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Attachment]:
        return super().get_queryset(request).defer("data", "thumbnail")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Preset)
class PresetAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "model_name", "created_at")
    list_select_related = ("user",)
    search_fields = ("name", "user__username")
    raw_id_fields = ("user",)
