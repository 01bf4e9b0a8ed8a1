"""GET /api/me/: the caller, their rate limits and budgets, and what is left."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from api.views.base import ApiView
from api.views.budgets import state_row
from api.views.caller import caller_of
from gateway.accounting import budget_status
from gateway.limits import LimitState, caller_limit_states

KINDS = ("requests", "tokens")


class KeySerializer(serializers.Serializer):
    """The API key the request came with."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="Its first characters, never the key.")


class LimitSerializer(serializers.Serializer):
    """One per-minute limit; limit and remaining are null when there is none."""

    scope = serializers.CharField(
        allow_null=True, help_text="Whose limit: user or key; null when no limit."
    )
    limit = serializers.IntegerField(allow_null=True, help_text="Per minute.")
    remaining = serializers.IntegerField(allow_null=True)
    reset_seconds = serializers.FloatField(
        help_text="Seconds until the whole allowance is free again."
    )
    unlimited = serializers.BooleanField()


class RateLimitsSerializer(serializers.Serializer):
    """The tightest limit of each kind, and every limit that applies."""

    requests = LimitSerializer(help_text="Requests this minute.")
    tokens = LimitSerializer(help_text="Tokens this minute.")
    each = LimitSerializer(many=True)


class MyBudgetSerializer(serializers.Serializer):
    """A budget that applies to the caller; limit and left null when unlimited."""

    id = serializers.IntegerField()
    scope = serializers.CharField()
    holder = serializers.CharField()
    period = serializers.CharField()
    period_start = serializers.DateTimeField()
    resets_at = serializers.DateTimeField()
    limit = serializers.IntegerField(allow_null=True)
    used = serializers.IntegerField()
    reserved = serializers.IntegerField()
    left = serializers.IntegerField(allow_null=True)
    percent_used = serializers.FloatField(allow_null=True)
    exhausted = serializers.BooleanField()


class MeSerializer(serializers.Serializer):
    """The caller and what they have left."""

    username = serializers.CharField()
    is_staff = serializers.BooleanField()
    api_key = KeySerializer(allow_null=True, help_text="Null through the browser.")
    rate_limits = RateLimitsSerializer()
    budgets = MyBudgetSerializer(many=True)


NO_LIMIT = {
    "scope": None,
    "limit": None,
    "remaining": None,
    "reset_seconds": 0.0,
    "unlimited": True,
}


def limit_row(state: LimitState) -> dict[str, Any]:
    return {
        "scope": state.scope,
        "limit": state.limit,
        "remaining": state.remaining,
        "reset_seconds": round(state.resets_in, 3),
        "unlimited": False,
    }


def rate_limits(states: list[LimitState]) -> dict[str, Any]:
    """The tightest limit of each kind (the one that refuses first) and all."""
    body: dict[str, Any] = {}
    for kind in KINDS:
        mine = [s for s in states if s.kind == kind]
        tightest = min(mine, key=lambda s: (s.remaining, -s.resets_in), default=None)
        body[kind] = limit_row(tightest) if tightest is not None else NO_LIMIT
    body["each"] = [limit_row(s) for s in states]
    return body


class MeView(ApiView):
    """The caller, their per-minute limits and budgets, and what is left of each."""

    pagination_class = None
    filter_backends: list = []

    @extend_schema(
        responses={200: MeSerializer},
        summary="Me: limits and budgets left",
        description="Requests and tokens left this minute (the tightest of the "
        "user's and the key's limits, and each one), and every budget that "
        "applies with what is left and when it resets.",
        operation_id="me",
    )
    def get(self, request: Request) -> Response:
        caller = caller_of(request)
        now = timezone.now()
        key = caller.api_key
        body = {
            "username": caller.username,
            "is_staff": caller.is_staff,
            "api_key": (
                {"id": key.pk, "name": key.name, "prefix": key.prefix}
                if key is not None
                else None
            ),
            "rate_limits": rate_limits(
                caller_limit_states(
                    caller.user_id, caller.api_key_id, now=now.timestamp()
                )
            ),
            "budgets": [
                state_row(s)
                for s in budget_status(caller.user_id, caller.api_key_id, now)
            ],
        }
        return Response(MeSerializer(body).data)
