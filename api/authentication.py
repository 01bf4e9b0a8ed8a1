"""Who calls: the browser session, or a personal API key (the keys /v1 uses).

A key acts as its user, with that user's rights: it sees all of the user's
usage (chat and every key's), and a staff user's key sees what staff see. The
raw key is only hashed, never stored, logged or echoed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from gateway.models import ApiKey

# Longer than any key we issue (prefix + 43 characters); anything longer is not
# a key and is refused before it is hashed.
MAX_KEY_LENGTH = 200
# last_used_at is written at most this often per key, as /v1 does.
TOUCH_INTERVAL = timedelta(minutes=1)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return raw.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer llms-...`: an active key of an active user."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        raw = bearer_token(request)
        if raw is None:
            return None
        if not raw or len(raw) > MAX_KEY_LENGTH:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        key = (
            ApiKey.objects.active()
            .select_related("user")
            .filter(key_hash=ApiKey.hash(raw), user__is_active=True)
            .first()
        )
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        _touch(key)
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class SessionAuthentication(authentication.SessionAuthentication):
    """The browser's login; CSRF is checked by DRF for unsafe methods only."""


def _touch(key: ApiKey) -> None:
    now = timezone.now()
    if key.last_used_at is not None and now - key.last_used_at < TOUCH_INTERVAL:
        return
    # Compare-and-set: concurrent requests write the row once.
    stale = ApiKey.objects.filter(pk=key.pk, last_used_at=key.last_used_at)
    stale.update(last_used_at=now)
