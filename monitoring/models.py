"""Health probe history."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from gateway.models import Endpoint, EndpointStatus


class ProbeResult(models.Model):
    """The outcome of one health probe of one endpoint."""

    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.CASCADE, related_name="probe_results"
    )
    checked_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=16, choices=EndpointStatus.choices)
    latency_ms = models.FloatField(null=True, blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-checked_at"]
        indexes = [
            # An endpoint's history page and its uptime over a range.
            models.Index(fields=["endpoint", "-checked_at"], name="probe_endpoint_recent"),
            # Pruning old results.
            models.Index(fields=["checked_at"], name="probe_checked_at"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.status} @ {self.checked_at:%Y-%m-%d %H:%M:%S}"
