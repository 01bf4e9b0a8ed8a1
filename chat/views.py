"""The chat page and the small JSON API behind its sidebar."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.utils.dateparse import parse_datetime
from django.utils.http import content_disposition_header
from django.views.decorators.http import (
    require_GET,
    require_http_methods,
    require_POST,
)

from chat import actions, attachments, budget, conversation_settings, export
from chat.conf import chat_settings
from chat.errors import ChatError
from chat.generation import registry
from chat.models import Conversation
from gateway import limits
from gateway.models import MAX_TOKENS_LIMIT
from gateway.usage_export import aiter_chunks
from llmsite.pages import with_policy

ERROR_STATUS = {
    "not_found": 404,
    "too_large": 400,
    "invalid": 400,
    "too_many_uploads": 429,
}


def _page_context(request: HttpRequest, conversation_id: str | None) -> dict[str, Any]:
    models = actions.available_models()
    return {
        "config": {
            "conversation_id": conversation_id,
            "models": models,
            "default_model": models[0] if models else None,
            "max_message_chars": chat_settings().max_message_chars,
            # Per model: context window, output limit, defaults (the picker,
            # the settings panel); the limits the panel checks before sending.
            "model_info": conversation_settings.model_info(),
            "max_system_prompt_chars": chat_settings().max_system_prompt_chars,
            "max_tokens_limit": MAX_TOKENS_LIMIT,
            "budget": budget.remaining_today(request.user),
            "rate_limits": [
                state.to_dict()
                for state in limits.caller_limit_states(request.user.pk, None)
            ],
            "socket_path": "/ws/chat/",
            "urls": {
                "page": "/chat/",
                "conversations": "/chat/api/conversations/",
                "export": "/chat/export/",
                "attachments": "/chat/api/attachments/",
                "presets": "/chat/api/presets/",
            },
            # Models whose every route takes images: the page offers attaching.
            "image_models": sorted(attachments.models_taking_images()),
            "images": {
                "max_bytes": attachments.max_bytes(),
                "max_per_message": chat_settings().max_images_per_message,
            },
        },
    }


@login_required
@require_GET
def chat_page(request: HttpRequest) -> HttpResponse:
    """The chat page, on a new conversation."""
    return with_policy(render(request, "chat/page.html", _page_context(request, None)))


@login_required
@require_GET
def conversation_page(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """The chat page, showing one of the user's conversations."""
    if not Conversation.objects.filter(id=conversation_id, user=request.user).exists():
        raise Http404("No such conversation.")
    context = _page_context(request, str(conversation_id))
    return with_policy(render(request, "chat/page.html", context))


def _api_error(exc: ChatError) -> JsonResponse:
    return JsonResponse(
        {"error": {"code": exc.code, "message": exc.message}},
        status=ERROR_STATUS.get(exc.code, 400),
    )


def _api(view: Callable[..., Any]) -> Callable[..., Any]:
    # JSON views answer 401 rather than redirecting to the login page.
    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = await request.auser()
        if not user.is_authenticated:
            return JsonResponse(
                {"error": {"code": "unauthenticated", "message": "Sign in again."}},
                status=401,
            )
        try:
            return await view(request, user, *args, **kwargs)
        except ChatError as exc:
            return _api_error(exc)

    return wrapper


@require_GET
@_api
async def conversations(request: HttpRequest, user: Any) -> JsonResponse:
    """The user's conversations, newest first; ``q`` searches titles and messages."""
    query = request.GET.get("q", "")[:200]
    before: datetime | None = None
    if raw := request.GET.get("before"):
        before = parse_datetime(raw)
        if before is None:
            raise ChatError("invalid", "before must be an ISO 8601 date and time.")
    page = await sync_to_async(actions.list_conversations)(user, query, before)
    return JsonResponse(page)


@require_http_methods(["PATCH", "DELETE"])
@_api
async def conversation(
    request: HttpRequest, user: Any, conversation_id: uuid.UUID
) -> JsonResponse:
    """Rename (PATCH {"title": ...}) or delete (DELETE) one conversation."""
    if request.method == "DELETE":
        # A running answer is stopped and stored first, so nothing writes to
        # the conversation once it is gone.
        running = registry.get(conversation_id)
        if running is not None and running.user_id == user.pk:
            running.stop("stop")
            await running.wait()
        await sync_to_async(actions.delete)(user, conversation_id)
        return JsonResponse({"deleted": str(conversation_id)})
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise ChatError("invalid", "The request body must be JSON.") from None
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str):
        raise ChatError("invalid", "title must be text.")
    renamed = await sync_to_async(actions.rename)(user, conversation_id, title)
    return JsonResponse({"conversation": renamed})


# --- Export: files to download; a link, so a signed-out visitor is sent to sign in.

EXPORTS = {
    "md": ("text/markdown; charset=utf-8", export.document_markdown),
    "json": ("application/json", export.document_json),
}


def _download(response: HttpResponse, name: str) -> HttpResponse:
    response["Content-Disposition"] = content_disposition_header(True, name)
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_GET
def export_conversation(
    request: HttpRequest, conversation_id: uuid.UUID, extension: str
) -> HttpResponse:
    """One of the user's conversations as a Markdown or JSON file."""
    content_type, render_file = EXPORTS[extension]
    try:
        conversation, messages = export.owned(request.user, conversation_id)
    except ChatError:
        raise Http404("No such conversation.") from None
    response = HttpResponse(
        render_file(conversation, messages), content_type=content_type
    )
    return _download(response, export.filename(conversation, extension))


@login_required
@require_GET
def export_all(request: HttpRequest) -> StreamingHttpResponse:
    """All the user's conversations as one JSON file, streamed."""
    body: Any = export.stream_all(request.user)
    if isinstance(request, ASGIRequest):
        # One piece per step in the request's sync thread, never all at once.
        body = aiter_chunks(body)
    response = StreamingHttpResponse(body, content_type="application/json")
    return _download(response, "llmsite-conversations.json")


# --- Images ---------------------------------------------------------------------


@require_POST
@_api
async def upload_attachment(request: HttpRequest, user: Any) -> JsonResponse:
    """Store an image (multipart field ``file``) for the next message; its id."""

    def store() -> dict[str, Any]:
        # The body itself is bounded while it is read (chat.upload_limit).
        upload = request.FILES.get("file")
        if upload is None:
            raise ChatError("invalid", "Choose an image to upload (field “file”).")
        if upload.size is None or upload.size > attachments.max_bytes():
            raise attachments.too_large(upload.size)
        data = upload.read(attachments.max_bytes() + 1)
        return attachments.describe(attachments.store_upload(user, data))

    described = await sync_to_async(store)()
    return JsonResponse({"attachment": described}, status=201)


def _image_response(data: bytes, content_type: str) -> HttpResponse:
    response = HttpResponse(data, content_type=content_type)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Disposition"] = "inline"
    # An id always names the same bytes; only its owner may see them.
    response["Cache-Control"] = "private, max-age=86400"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


@require_http_methods(["GET", "DELETE"])
@_api
async def attachment(
    request: HttpRequest, user: Any, attachment_id: uuid.UUID
) -> HttpResponse:
    """The full image (GET), or remove an upload not sent yet (DELETE)."""
    if request.method == "DELETE":
        await sync_to_async(attachments.remove_upload)(user, attachment_id)
        return JsonResponse({"deleted": str(attachment_id)})
    data, content_type = await sync_to_async(attachments.owned)(
        user, attachment_id, thumbnail=False
    )
    return _image_response(data, content_type)


@require_GET
@_api
async def attachment_thumbnail(
    request: HttpRequest, user: Any, attachment_id: uuid.UUID
) -> HttpResponse:
    """The image's small thumbnail."""
    data, content_type = await sync_to_async(attachments.owned)(
        user, attachment_id, thumbnail=True
    )
    return _image_response(data, content_type)
