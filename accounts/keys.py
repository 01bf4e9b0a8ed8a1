"""A user's own /v1 API keys: list, create (bounded), revoke.

The keys are gateway.models.ApiKey (only a hash and a prefix stored); this
module adds what self-service needs: one user's keys only, and a cap on how
many active ones a user holds.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from gateway.models import ApiKey


class KeyLimitReached(Exception):
    """The user already holds API_KEYS_PER_USER active keys."""

    def __init__(self, limit: int) -> None:
        unit = "key" if limit == 1 else "keys"
        super().__init__(
            f"You already have {limit} active {unit}, the most allowed. "
            "Revoke one you no longer use first."
        )


def own_keys(user: object) -> QuerySet[ApiKey]:
    """The user's keys, newest first, revoked ones included."""
    return ApiKey.objects.filter(user=user).order_by("-created_at", "-pk")


def create_key(user: object, name: str) -> tuple[ApiKey, str]:
    """Create a key named `name`; the raw key is returned once and never stored.

    The user's row is locked while counting, so two requests at once cannot
    both take the last free place.
    """
    limit = settings.API_KEYS_PER_USER
    with transaction.atomic():
        list(
            get_user_model()
            .objects.select_for_update()
            .filter(pk=user.pk)
            .values_list("pk")
        )
        if ApiKey.objects.active().filter(user=user).count() >= limit:
            raise KeyLimitReached(limit)
        return ApiKey.generate(user, name)


def revoke_key(user: object, key_id: int) -> ApiKey:
    """Revoke one of the user's keys (at once, in every check that follows).

    Raises ApiKey.DoesNotExist for another user's key as for a missing one.
    Saving through the ORM sends post_save, which drops this process's cache
    of active keys; other processes drop theirs within
    GATEWAY_POLICY_CACHE_SECONDS.
    """
    with transaction.atomic():
        key = ApiKey.objects.select_for_update().get(pk=key_id, user=user)
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
    return key
