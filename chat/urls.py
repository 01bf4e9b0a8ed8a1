"""URLs of the chat page and its JSON API, under /chat/."""

from __future__ import annotations

from django.urls import path

from chat import preset_views, views

app_name = "chat"

urlpatterns = [
    path("", views.chat_page, name="page"),
    path("c/<uuid:conversation_id>/", views.conversation_page, name="conversation"),
    path("export/all.json", views.export_all, name="export-all"),
    path(
        "export/<uuid:conversation_id>.md",
        views.export_conversation,
        {"extension": "md"},
        name="export-markdown",
    ),
    path(
        "export/<uuid:conversation_id>.json",
        views.export_conversation,
        {"extension": "json"},
        name="export-json",
    ),
    path("api/conversations/", views.conversations, name="conversations"),
    path(
        "api/conversations/<uuid:conversation_id>/",
        views.conversation,
        name="conversation-api",
    ),
    path("api/attachments/", views.upload_attachment, name="attachments"),
    path(
        "api/attachments/<uuid:attachment_id>/",
        views.attachment,
        name="attachment",
    ),
    path(
        "api/attachments/<uuid:attachment_id>/thumbnail/",
        views.attachment_thumbnail,
        name="attachment-thumbnail",
    ),
    path("api/presets/", preset_views.preset_list, name="presets"),
    path("api/presets/<int:preset_id>/", preset_views.preset_detail, name="preset-api"),
]
