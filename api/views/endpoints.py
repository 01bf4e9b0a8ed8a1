"""GET /api/endpoints/: each enabled endpoint's health, and the overall status."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from api.views.base import ApiView
from api.views.caller import caller_of
from gateway.breaker import BreakerState
from gateway.models import EndpointStatus
from monitoring import dashboard
from monitoring.dashboard import EndpointHealth


class UptimeSerializer(serializers.Serializer):
    """Percent of probes up; null where no probe ran in the window."""

    last_24h = serializers.FloatField(allow_null=True)
    last_7d = serializers.FloatField(allow_null=True)
    last_30d = serializers.FloatField(allow_null=True)


class CircuitSerializer(serializers.Serializer):
    """The circuit breaker: open means the endpoint is skipped until disabled_until."""

    state = serializers.ChoiceField(choices=[s.value for s in BreakerState])
    disabled_until = serializers.DateTimeField(allow_null=True)


class OperatorSerializer(serializers.Serializer):
    """What only operators need (staff only). Never the API key or header values."""

    id = serializers.IntegerField()
    base_url = serializers.CharField()
    priority = serializers.IntegerField()
    timeout = serializers.FloatField()
    rpm_limit = serializers.IntegerField(allow_null=True)
    tpm_limit = serializers.IntegerField(allow_null=True)
    probe_mode = serializers.CharField()
    probe_interval = serializers.IntegerField()
    consecutive_failures = serializers.IntegerField()
    probe_failures = serializers.IntegerField()
    has_api_key = serializers.BooleanField()


class EndpointSerializer(serializers.Serializer):
    """One enabled endpoint's health."""

    name = serializers.CharField()
    status = serializers.ChoiceField(choices=EndpointStatus.choices)
    available = serializers.BooleanField(
        help_text="Can take a request now: circuit not open and not disconnected."
    )
    last_latency_ms = serializers.FloatField(allow_null=True)
    last_checked_at = serializers.DateTimeField(allow_null=True)
    status_changed_at = serializers.DateTimeField(allow_null=True)
    uptime = UptimeSerializer()
    circuit = CircuitSerializer()
    plain_http = serializers.BooleanField(
        help_text="Requests to it travel unencrypted over the network."
    )
    operator = OperatorSerializer(
        required=False, help_text="Staff only: configuration."
    )


class EndpointsSerializer(serializers.Serializer):
    """The overall status and every enabled endpoint's health."""

    status = serializers.ChoiceField(
        choices=[
            dashboard.OVERALL_OK,
            dashboard.OVERALL_DEGRADED,
            dashboard.OVERALL_DOWN,
        ],
        help_text="ok: all connected; degraded: some can take requests; down: none.",
    )
    available = serializers.ListField(
        child=serializers.CharField(),
        help_text="Names of the endpoints that can take requests now.",
    )
    endpoints = EndpointSerializer(many=True)


def endpoint_row(health: EndpointHealth, *, operator: bool) -> dict[str, Any]:
    """One endpoint as the API shows it; configuration only for operators."""
    endpoint = health.endpoint
    row: dict[str, Any] = {
        "name": endpoint.name,
        "status": endpoint.status,
        "available": health.available,
        "last_latency_ms": endpoint.last_latency_ms,
        "last_checked_at": endpoint.last_checked_at,
        "status_changed_at": endpoint.status_changed_at,
        "uptime": {f"last_{w}": v for w, v in health.uptime.items()},
        "circuit": {
            "state": health.circuit,
            "disabled_until": endpoint.disabled_until,
        },
        "plain_http": endpoint.sends_in_clear,
    }
    if operator:
        row["operator"] = {
            "id": endpoint.pk,
            "base_url": endpoint.base_url,
            "priority": endpoint.priority,
            "timeout": endpoint.timeout,
            "rpm_limit": endpoint.rpm_limit,
            "tpm_limit": endpoint.tpm_limit,
            "probe_mode": endpoint.probe_mode,
            "probe_interval": endpoint.probe_interval,
            "consecutive_failures": endpoint.consecutive_failures,
            "probe_failures": endpoint.probe_failures,
            "has_api_key": endpoint.has_api_key,
        }
    return row


class EndpointsView(ApiView):
    """Endpoint health, uptime and circuit state, and the overall status."""

    pagination_class = None
    filter_backends: list = []

    @extend_schema(
        responses={200: EndpointsSerializer},
        summary="Endpoint status",
        description="Every enabled endpoint's health (connected, slow, "
        "disconnected, unknown), uptime over 24 h / 7 d / 30 d from the probes, "
        "circuit state; the overall status and the endpoints available now. "
        "Configuration (base URL, limits) is for staff only.",
        operation_id="endpoints_status",
    )
    def get(self, request: Request) -> Response:
        overview = dashboard.endpoint_overview()
        operator = caller_of(request).is_staff
        body = {
            "status": overview.status,
            "available": overview.available,
            "endpoints": [
                endpoint_row(health, operator=operator) for health in overview.endpoints
            ],
        }
        return Response(EndpointsSerializer(body).data)
