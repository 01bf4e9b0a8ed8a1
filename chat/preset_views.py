"""The JSON views of a user's presets, under /chat/api/presets/.

Like the sidebar's views: signed-in users only (401 otherwise), CSRF checked
on writes by Django's middleware, and another user's preset answers 404
exactly like a missing one.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_http_methods

from chat import presets
from chat.errors import ChatError
from chat.views import _api
from gateway import inbound

# A preset is a name, a model and settings: far below this.
MAX_BODY_BYTES = 256 * 1024


@require_http_methods(["GET", "POST"])
@_api
async def preset_list(request: HttpRequest, user: Any) -> JsonResponse:
    """GET: the user's presets. POST {"name", "model", "settings"}: save one."""
    if request.method == "GET":
        found = await sync_to_async(presets.list_presets)(user)
        return JsonResponse({"presets": found})
    if len(request.body) > MAX_BODY_BYTES:
        raise ChatError("too_large", "That preset is too large.")
    try:
        # Depth bounded before parsing; NUL, lone surrogates and NaN refused.
        body = inbound.loads(request.body or b"{}", what="The request body")
    except inbound.InboundError as exc:
        raise ChatError("invalid", exc.message) from None
    if not isinstance(body, dict):
        raise ChatError("invalid", "The request body must be a JSON object.")
    preset = await sync_to_async(presets.create)(user, body)
    return JsonResponse({"preset": preset}, status=201)


@require_http_methods(["DELETE"])
@_api
async def preset_detail(
    request: HttpRequest, user: Any, preset_id: int
) -> JsonResponse:
    """DELETE: remove one of the user's presets."""
    await sync_to_async(presets.delete)(user, preset_id)
    return JsonResponse({"deleted": preset_id})
