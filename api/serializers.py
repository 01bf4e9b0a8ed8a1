"""Serializers: the shapes of the JSON answers (and of the schema)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from gateway import usage_export


class TrailStepSerializer(serializers.Serializer):
    """One attempt on (or skip of) an endpoint, in a record's trail."""

    endpoint = serializers.CharField()
    outcome = serializers.ChoiceField(
        choices=["ok", "failed", "skipped", "cancelled", "hedge_lost", "open"]
    )
    started_ms = serializers.FloatField(help_text="From the start of the request.")
    duration_ms = serializers.FloatField()
    reason = serializers.CharField(
        required=False, help_text="Why it failed or was skipped (e.g. http_503)."
    )
    status_code = serializers.IntegerField(required=False, allow_null=True)
    mid_stream = serializers.BooleanField(
        required=False, help_text="It failed after answer text had been sent."
    )


class UsageRecordSerializer(serializers.Serializer):
    """One usage record, as in the JSON pages and the JSON Lines export.

    Reads the raw tuples of `gateway.usage_export.rows`, so the JSON pages,
    CSV and JSON Lines all come from the same shaping code.
    """

    request_id = serializers.UUIDField()
    created_at = serializers.DateTimeField(help_text="When the request started, UTC.")
    user = serializers.CharField(allow_null=True, help_text="Username.")
    api_key = serializers.CharField(
        allow_null=True, help_text="The API key's name (api requests only)."
    )
    source = serializers.ChoiceField(choices=["chat", "api"])
    model = serializers.CharField(help_text="The model name asked for.")
    endpoint = serializers.CharField(
        allow_blank=True, help_text="The endpoint that answered (empty: none did)."
    )
    upstream_model = serializers.CharField(allow_blank=True)
    fallback_hops = serializers.IntegerField(
        min_value=0, help_text="How many endpoints failed over to another."
    )
    fallback_path = serializers.ListField(
        child=serializers.CharField(), help_text="The endpoints that failed over."
    )
    status = serializers.ChoiceField(
        choices=["ok", "error", "cancelled", "rejected", "cached"]
    )
    prompt_tokens = serializers.IntegerField(min_value=0)
    completion_tokens = serializers.IntegerField(min_value=0)
    total_tokens = serializers.IntegerField(min_value=0)
    estimated = serializers.BooleanField(
        help_text="Token counts estimated (the upstream sent none)."
    )
    latency_ms = serializers.FloatField(allow_null=True)
    ttft_ms = serializers.FloatField(
        allow_null=True, help_text="Time to first token, ms."
    )
    cost = serializers.DecimalField(
        max_digits=14,
        decimal_places=6,
        allow_null=True,
        help_text="Exact decimal, as a string; null when the route has no price.",
    )
    error_type = serializers.CharField(allow_blank=True)
    attempts = serializers.IntegerField(min_value=0)
    conversation_id = serializers.UUIDField(
        allow_null=True, help_text="The chat conversation (chat requests only)."
    )
    trail = serializers.ListField(
        child=TrailStepSerializer(),
        help_text=(
            "Every endpoint tried (or skipped), in order, with the outcome and "
            "time of each attempt."
        ),
    )

    def to_representation(self, instance: tuple[Any, ...]) -> dict[str, Any]:
        return usage_export.record(instance)
