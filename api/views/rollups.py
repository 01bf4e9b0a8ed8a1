"""GET /api/usage/rollups/: usage per hour or day, grouped, from the hourly rollups."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from api.exceptions import ParamForbidden
from api.filters import MAX_ID
from api.permissions import is_staff
from api.views.base import ApiView
from gateway.accounting import (
    ROLLUP_BUCKETS,
    ROLLUP_GROUPS,
    RollupQuery,
    hour_of,
    usage_rollups,
)

DEFAULT_SPAN = {"hour": timedelta(hours=24), "day": timedelta(days=30)}
# The widest range one request may sum: a month of hours, a year of days.
MAX_SPAN = {"hour": timedelta(days=31), "day": timedelta(days=366)}
# Sums of closed hours are shared this long (0: off); see usage_rollups.
CACHE_SECONDS_DEFAULT = 60
# More rows than this means a range or grouping too fine to be useful at once.
MAX_ROWS = 10_000


class RollupParams(serializers.Serializer):
    """The query parameters of the rollups endpoint."""

    bucket = serializers.ChoiceField(
        choices=ROLLUP_BUCKETS, default="hour", help_text="hour or day (UTC)."
    )
    since = serializers.DateTimeField(
        required=False,
        help_text="ISO 8601, UTC unless an offset is given; rounded down to the "
        "bucket. Default: 24 h ago (hour), 30 days ago (day).",
    )
    until = serializers.DateTimeField(
        required=False, help_text="ISO 8601, exclusive. Default: now."
    )
    group_by = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=64,
        help_text="Comma-separated, any of: " + ", ".join(ROLLUP_GROUPS) + ".",
    )
    model = serializers.CharField(
        required=False, max_length=200, help_text="The model name asked for."
    )
    endpoint = serializers.CharField(
        required=False, max_length=100, help_text="An endpoint's id or name."
    )
    user = serializers.CharField(
        required=False,
        max_length=150,
        help_text="A user's id or username (staff; others may name only themselves).",
    )
    api_key = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_ID, help_text="An API key's id."
    )

    def validate_group_by(self, value: str) -> tuple[str, ...]:
        groups = tuple(dict.fromkeys(g.strip() for g in value.split(",") if g.strip()))
        unknown = [g for g in groups if g not in ROLLUP_GROUPS]
        if unknown:
            raise ValidationError(
                f"Unknown group {unknown[0][:20]!r}: use any of "
                + ", ".join(ROLLUP_GROUPS)
                + "."
            )
        return groups

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        bucket = attrs["bucket"]
        until = attrs.get("until") or timezone.now()
        since = attrs.get("since") or until - DEFAULT_SPAN[bucket]
        since = hour_of(since)
        if bucket == "day":
            since = since.replace(hour=0)
        if until <= since:
            raise ValidationError({"until": "until must be after since."})
        if until - since > MAX_SPAN[bucket]:
            days = MAX_SPAN[bucket].days
            raise ValidationError(
                {"since": f"At most {days} days per request with bucket={bucket}."}
            )
        attrs["since"], attrs["until"] = since, until
        attrs.setdefault("group_by", ())
        return attrs


class RollupRow(serializers.Serializer):
    """Usage of one bucket (and group)."""

    start = serializers.DateTimeField(help_text="Start of the hour or day, UTC.")
    model = serializers.CharField(required=False)
    endpoint = serializers.CharField(required=False)
    endpoint_id = serializers.IntegerField(required=False, allow_null=True)
    user = serializers.CharField(required=False)
    user_id = serializers.IntegerField(required=False, allow_null=True)
    key = serializers.CharField(required=False)
    key_id = serializers.IntegerField(required=False, allow_null=True)
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    rejected = serializers.IntegerField()
    cached = serializers.IntegerField()
    estimated = serializers.IntegerField(
        help_text="Requests whose tokens were counted by us, not upstream."
    )
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cost = serializers.DecimalField(max_digits=20, decimal_places=6)
    mean_latency_ms = serializers.FloatField(allow_null=True)
    mean_ttft_ms = serializers.FloatField(allow_null=True)


class Rollups(serializers.Serializer):
    """The rollups of a range."""

    bucket = serializers.CharField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    group_by = serializers.ListField(child=serializers.CharField())
    results = RollupRow(many=True)


def _user_id(value: str) -> int | None:
    """A user's id from their id or username; None when there is no such user."""
    match = Q(username=value)
    if value.isascii() and value.isdigit() and 0 < int(value) <= MAX_ID:
        match |= Q(pk=int(value))
    return get_user_model().objects.filter(match).values_list("pk", flat=True).first()


class UsageRollupsView(ApiView):
    """Usage per hour or day, grouped by any of model, endpoint, user, key."""

    allowed_params = frozenset(RollupParams().fields)
    pagination_class = None
    filter_backends: list = []

    @extend_schema(
        parameters=[RollupParams],
        responses={200: Rollups},
        summary="Usage rollups",
        description="Hourly rollups or daily totals (UTC), grouped by any of "
        "model, endpoint, user and key. Users see their own usage; staff see all.",
        operation_id="usage_rollups",
    )
    def get(self, request: Request) -> Response:
        params = RollupParams(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        user_id = None if is_staff(request) else request.user.pk
        if "user" in data:
            value = data["user"]
            if user_id is None:
                # An unknown user has no usage: -1 matches no row.
                user_id = _user_id(value) or -1
            elif value not in {str(user_id), request.user.get_username()}:
                raise ParamForbidden("user", "You may only see your own usage.")
            # Naming themselves leaves a user's rows their own: no lookup, so a
            # username that is another user's id can never widen them.
        results = usage_rollups(
            RollupQuery(
                since=data["since"],
                until=data["until"],
                bucket=data["bucket"],
                group_by=data["group_by"],
                user_id=user_id,
                api_key_id=data.get("api_key"),
                model_name=data.get("model"),
                endpoint=data.get("endpoint"),
                limit=MAX_ROWS + 1,
            ),
            cache_seconds=getattr(
                settings, "API_ROLLUP_CACHE_SECONDS", CACHE_SECONDS_DEFAULT
            ),
        )
        if len(results) > MAX_ROWS:
            raise ValidationError(
                {
                    "group_by": f"More than {MAX_ROWS:,} rows: narrow the range, "
                    "group by less, or use bucket=day."
                }
            )
        body = {
            "bucket": data["bucket"],
            "since": data["since"],
            "until": data["until"],
            "group_by": list(data["group_by"]),
            "results": results,
        }
        data = Rollups(body).data
        # Only the groups asked for: the serializer fills absent ids with null.
        absent = [f"{g}_id" for g in ROLLUP_GROUPS if g not in body["group_by"]]
        for row in data["results"]:
            for name in absent:
                row.pop(name, None)
        return Response(data)
