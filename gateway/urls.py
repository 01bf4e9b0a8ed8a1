"""The OpenAI-compatible API, mounted under /v1/."""

from __future__ import annotations

from django.urls import path

from gateway import api

app_name = "gateway"

urlpatterns = [
    path("models", api.list_models, name="models"),
    path("chat/completions", api.chat_completions, name="chat-completions"),
]
