"""Health of the gateway (liveness, readiness, metrics) and each user's usage page."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    JsonResponse,
)
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from llmsite.pages import with_policy
from monitoring import conf, metrics, usage

logger = logging.getLogger(__name__)

# User ids in ?user= are digits; anything longer is not one.
MAX_ID_DIGITS = 18

# Each readiness check gets this long; a load balancer polls every few seconds.
CHECK_SECONDS = 2.0


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers. Touches nothing else."""
    return HttpResponse("ok\n", content_type="text/plain")


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _cache() -> None:
    key = f"readyz:{uuid.uuid4().hex}"
    await cache.aset(key, "1", timeout=10)
    if await cache.aget(key) != "1":
        raise RuntimeError("the cache did not keep a value")
    await cache.adelete(key)


async def _channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "readyz.ping":
        raise RuntimeError("the channel layer returned another message")


async def _check(name: str, check: object) -> tuple[str, str]:
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            await check  # type: ignore[misc]
    except TimeoutError:
        logger.warning("Readiness: %s did not answer in %g s", name, CHECK_SECONDS)
        return name, "timeout"
    except Exception as exc:
        logger.warning("Readiness: %s failed: %s", name, exc)
        return name, f"error: {type(exc).__name__}"
    return name, "ok"


@never_cache
@require_GET
async def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: the database, the cache and the channel layer all answer."""
    results = dict(
        await asyncio.gather(
            _check("database", sync_to_async(_database)()),
            _check("cache", _cache()),
            _check("channel_layer", _channel_layer()),
        )
    )
    ready = all(value == "ok" for value in results.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": results},
        status=200 if ready else 503,
    )


def _authorised(request: HttpRequest) -> bool:
    token = str(conf.get("METRICS_TOKEN") or "")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if token and scheme.lower() == "bearer" and given.strip():
        return hmac.compare_digest(given.strip().encode(), token.encode())
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@never_cache
@require_GET
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for a bearer token (METRICS_TOKEN) or a staff login."""
    if not _authorised(request):
        response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE)


def may_see_everyones_usage(user: Any) -> bool:
    """Staff who may read usage records in the admin may see any user's page."""
    return bool(
        user.is_active and user.is_staff and user.has_perm("gateway.view_usagerecord")
    )


@never_cache
@login_required
@require_GET
def usage_page(request: HttpRequest) -> HttpResponse:
    """The signed-in user's usage: today, this month, budgets, limits.

    Staff see any user's with ?user=<id>; anyone else asking for another
    user's page is refused.
    """
    raw = request.GET.get("user", "")
    subject = request.user
    if raw:
        if not raw.isdigit() or len(raw) > MAX_ID_DIGITS:
            return HttpResponseBadRequest("user must be a user id.")
        if int(raw) != request.user.pk:
            if not may_see_everyones_usage(request.user):
                raise PermissionDenied
            subject = get_object_or_404(get_user_model(), pk=int(raw))
    own = subject.pk == request.user.pk
    context = {
        **usage.user_usage(subject.pk, own=own),
        "subject": subject,
        "own": own,
    }
    return with_policy(render(request, "monitoring/usage_page.html", context))
