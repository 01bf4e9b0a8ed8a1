"""Health probe history, the monitor's lease, and alerts with their deliveries."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models
from django.db.models import Q
from django.utils import timezone

from gateway.models import Budget, Endpoint, EndpointStatus


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
            # An endpoint's history page, its charts, its recent failures, and
            # the rollup of the hours a round touched.
            models.Index(
                fields=["endpoint", "-checked_at"], name="probe_endpoint_recent"
            ),
            # Pruning by age.
            models.Index(fields=["checked_at"], name="probe_checked_at"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.status} @ {self.checked_at:%Y-%m-%d %H:%M:%S}"

    @property
    def ok(self) -> bool:
        return self.status in UP_STATUSES


# Probe outcomes that count as "up" for uptime.
UP_STATUSES = (EndpointStatus.CONNECTED, EndpointStatus.SLOW)


class ProbeRollup(models.Model):
    """Probe outcomes per endpoint and hour, rewritten by the monitor each round.

    Uptime over 30 days and week-long charts read these rows (720 per
    endpoint a month) instead of every probe (8,640 a month at the default
    interval), so the dashboards stay fast with millions of probe results.
    """

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField(help_text="Start of the hour, UTC.")
    probes = models.PositiveIntegerField(default=0)
    up = models.PositiveIntegerField(default=0, help_text="Connected or slow.")
    slow = models.PositiveIntegerField(default=0)
    # Over healthy probes only: a timeout says nothing about speed.
    latency_sum_ms = models.FloatField(default=0)
    latency_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-hour"]
        constraints = [
            # The upsert target; also serves one endpoint's hours over a range.
            models.UniqueConstraint(
                fields=["endpoint", "hour"], name="probe_rollup_one_per_hour"
            ),
        ]
        indexes = [
            # Uptime of every endpoint since a time, and pruning by age.
            models.Index(fields=["hour", "endpoint"], name="probe_rollup_hour"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.endpoint_id} @ {self.hour:%Y-%m-%d %H:00}: {self.up}/{self.probes}"
        )


class EndpointHealth(Endpoint):
    """Endpoints as the monitoring dashboards in the admin see them."""

    class Meta:
        proxy = True
        verbose_name = "endpoint status"
        verbose_name_plural = "endpoint status"


class MonitorLease(models.Model):
    """Which monitor process is the active one, until when.

    The holder renews it on every loop; a standby takes it once it expires.
    """

    name = models.CharField(max_length=50, primary_key=True)
    holder = models.CharField(max_length=200, blank=True)
    acquired_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.holder or 'nobody'} until {self.expires_at:%H:%M:%S}"
        )


class ChannelKind(models.TextChoices):
    EMAIL = "email", "Email"
    WEBHOOK = "webhook", "Webhook (JSON POST)"


class AlertChannel(models.Model):
    """Where alerts go, besides ALERT_EMAILS and ALERT_WEBHOOK_URL in settings."""

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=ChannelKind.choices)
    target = models.CharField(
        max_length=500,
        help_text="Email: addresses separated by commas. Webhook: the URL to POST to.",
    )
    endpoint_events = models.BooleanField(
        default=True, help_text="Endpoints going down and recovering."
    )
    budget_events = models.BooleanField(
        default=True, help_text="Budgets reaching their warning level or exhausted."
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    def clean(self) -> None:
        if self.kind == ChannelKind.EMAIL:
            addresses = self.addresses
            if not addresses:
                raise ValidationError({"target": "Give at least one address."})
            for address in addresses:
                try:
                    validate_email(address)
                except ValidationError:
                    raise ValidationError(
                        {"target": f"{address!r} is not an email address."}
                    ) from None
        elif self.kind == ChannelKind.WEBHOOK:
            parts = urlsplit(self.target.strip())
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValidationError({"target": "Give an http:// or https:// URL."})

    @property
    def addresses(self) -> list[str]:
        return [a.strip() for a in self.target.split(",") if a.strip()]

    @property
    def target_display(self) -> str:
        """The target without secrets: webhook URLs often carry a token."""
        if self.kind == ChannelKind.WEBHOOK:
            parts = urlsplit(self.target.strip())
            return f"{parts.scheme}://{parts.hostname or ''}/…"
        return self.target


class AlertKind(models.TextChoices):
    ENDPOINT_DOWN = "endpoint_down", "Endpoint down"
    ENDPOINT_RECOVERED = "endpoint_recovered", "Endpoint recovered"
    BUDGET_WARNING = "budget_warning", "Budget warning"
    BUDGET_EXHAUSTED = "budget_exhausted", "Budget exhausted"
    TEST = "test", "Test"


class AlertEvent(models.Model):
    """One transition worth telling someone about, recorded once."""

    kind = models.CharField(max_length=32, choices=AlertKind.choices)
    created_at = models.DateTimeField(default=timezone.now)
    title = models.CharField(max_length=300)
    endpoint = models.ForeignKey(
        Endpoint,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="alert_events",
    )
    budget = models.ForeignKey(
        Budget,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="alert_events",
    )
    # The JSON body webhooks receive; mails are written from it too.
    payload = models.JSONField(default=dict)
    # Set when the same transition could be reported twice (a budget counter
    # and level), so the second report is dropped by the database.
    dedupe_key = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["dedupe_key"],
                condition=~Q(dedupe_key=""),
                name="alert_event_dedupe",
            ),
        ]
        indexes = [
            # Pruning old alerts.
            models.Index(fields=["created_at"], name="alert_event_created"),
        ]

    def __str__(self) -> str:
        return self.title


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped (channel gone or disabled)"


class AlertDelivery(models.Model):
    """One alert to one channel, retried with backoff until sent or given up."""

    event = models.ForeignKey(
        AlertEvent, on_delete=models.CASCADE, related_name="deliveries"
    )
    # "settings:email", "settings:webhook" or "channel:<AlertChannel id>":
    # resolved when sending, so a secret URL is never copied here.
    channel_key = models.CharField(max_length=40)
    status = models.CharField(
        max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "alert deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["event", "channel_key"], name="alert_delivery_once"
            ),
        ]
        indexes = [
            # The monitor: pending deliveries whose next attempt is due.
            models.Index(
                fields=["status", "next_attempt_at"], name="alert_delivery_due"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} → {self.channel_key}: {self.status}"
