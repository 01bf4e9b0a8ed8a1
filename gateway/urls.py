"""The OpenAI-compatible API, mounted under /v1/.

Model names may hold '/' and ':' (``org/model:tag``), hence the path converter.
Anything else under /v1/ gets OpenAI's JSON 404, never Django's HTML page.
"""

from __future__ import annotations

from django.urls import path, re_path

from gateway import api

app_name = "gateway"

urlpatterns = [
    path("models", api.list_models, name="models"),
    path("models/<path:model>", api.retrieve_model, name="model"),
    path("chat/completions", api.chat_completions, name="chat-completions"),
    path("embeddings", api.embeddings, name="embeddings"),
    re_path(r"^(?P<path>.*)$", api.not_found, name="not-found"),
]
