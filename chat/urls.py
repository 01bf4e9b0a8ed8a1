"""URLs of the chat page and its JSON API, under /chat/."""

from __future__ import annotations

from django.urls import path

from chat import preset_views, views

app_name = "chat"

urlpatterns = [
    path("", views.chat_page, name="page"),
    path("c/<uuid:conversation_id>/", views.conversation_page, name="conversation"),
    path("api/conversations/", views.conversations, name="conversations"),
    path(
        "api/conversations/<uuid:conversation_id>/",
        views.conversation,
        name="conversation-api",
    ),
    path("api/presets/", preset_views.preset_list, name="presets"),
    path("api/presets/<int:preset_id>/", preset_views.preset_detail, name="preset-api"),
]
