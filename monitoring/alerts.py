"""Alerts: recorded once per transition, delivered by the monitor with retries.

The gateway's signals arrive in whichever process caused the transition (the
monitor, or a web process whose breaker opened or whose budget ran low). The
receivers here only write an AlertEvent and one AlertDelivery per channel,
which is cheap and never raises into the sender. The active monitor delivers
them (`deliver_due`), so a slow mail server or webhook never holds up a chat
request, and a failed delivery is retried with backoff, surviving restarts.

Transports follow healthchecks' `hc/api/transports.py`: each raises
`TransportError` with a `permanent` flag, and only transient errors are retried.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from asgiref.sync import async_to_sync, sync_to_async
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.dispatch import receiver
from django.template.loader import render_to_string
from django.utils import timezone

from gateway.models import Budget, Endpoint, EndpointStatus
from gateway.signals import budget_threshold_crossed, endpoint_status_changed
from monitoring import conf
from monitoring.models import (
    AlertChannel,
    AlertDelivery,
    AlertEvent,
    AlertKind,
    ChannelKind,
    DeliveryStatus,
)

logger = logging.getLogger(__name__)

SETTINGS_EMAIL = "settings:email"
SETTINGS_WEBHOOK = "settings:webhook"
# A claimed delivery whose monitor died mid-send is tried again after this.
CLAIM_SECONDS = 300
DELIVERIES_PER_STEP = 50
USER_AGENT = "llmsite-monitor"
ENDPOINT_KINDS = {AlertKind.ENDPOINT_DOWN, AlertKind.ENDPOINT_RECOVERED}


# --- Recording ---------------------------------------------------------------------


def endpoint_alert_kind(old_status: str, new_status: str) -> str | None:
    """Which alert a status change deserves: down, recovered, or none.

    Connected and slow are both up: moving between them, or out of unknown
    into either, is not news.
    """
    down = EndpointStatus.DISCONNECTED
    if new_status == down and old_status != down:
        return AlertKind.ENDPOINT_DOWN
    if old_status == down and new_status in {
        EndpointStatus.CONNECTED,
        EndpointStatus.SLOW,
    }:
        return AlertKind.ENDPOINT_RECOVERED
    return None


def channel_keys(kind: str) -> list[str]:
    """The channels an alert of this kind goes to right now."""
    keys = []
    if conf.get("ALERT_EMAILS"):
        keys.append(SETTINGS_EMAIL)
    if conf.get("ALERT_WEBHOOK_URL"):
        keys.append(SETTINGS_WEBHOOK)
    channels = AlertChannel.objects.filter(enabled=True)
    if kind in ENDPOINT_KINDS:
        channels = channels.filter(endpoint_events=True)
    else:
        channels = channels.filter(budget_events=True)
    keys += [f"channel:{pk}" for pk in channels.values_list("pk", flat=True)]
    return keys


def record_event(
    kind: str,
    title: str,
    payload: Mapping[str, Any],
    *,
    endpoint: Endpoint | None = None,
    budget: Budget | None = None,
    dedupe_key: str = "",
    channels: list[str] | None = None,
) -> AlertEvent | None:
    """Record an alert and its deliveries; None if this transition was recorded."""
    keys = channel_keys(kind) if channels is None else channels
    now = timezone.now()
    try:
        with transaction.atomic():
            event = AlertEvent.objects.create(
                kind=kind,
                created_at=now,
                title=title[:300],
                endpoint=endpoint,
                budget=budget,
                payload=dict(payload),
                dedupe_key=dedupe_key,
            )
            AlertDelivery.objects.bulk_create(
                [
                    AlertDelivery(event=event, channel_key=key, next_attempt_at=now)
                    for key in keys
                ]
            )
    except IntegrityError:
        if dedupe_key and AlertEvent.objects.filter(dedupe_key=dedupe_key).exists():
            return None
        raise
    logger.info("Alert: %s (%d channels)", title, len(keys))
    return event


def public_url(url: str) -> str:
    """A URL without credentials, query or fragment, safe to put in an alert."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def endpoint_payload(
    endpoint: Endpoint, old_status: str, new_status: str, reason: str, error: str
) -> dict[str, Any]:
    """The endpoint part of an alert; never the API key or extra headers."""
    return {
        "id": endpoint.pk,
        "name": endpoint.name,
        "base_url": public_url(endpoint.base_url),
        "status": new_status,
        "previous_status": old_status,
        "reason": reason,
        "error": error[:500],
        "latency_ms": endpoint.last_latency_ms,
        "probe_failures": endpoint.probe_failures,
        "last_checked_at": _iso(endpoint.last_checked_at),
        "disabled_until": _iso(endpoint.disabled_until),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@receiver(endpoint_status_changed, dispatch_uid="monitoring.alerts.endpoint")
def on_endpoint_status_changed(
    sender: object,
    *,
    endpoint: Endpoint,
    old_status: str,
    new_status: str,
    reason: str = "",
    **kwargs: Any,
) -> None:
    """Record an alert when an endpoint goes down or recovers."""
    try:
        kind = endpoint_alert_kind(old_status, new_status)
        if kind is None:
            return
        word = "is down" if kind == AlertKind.ENDPOINT_DOWN else "has recovered"
        error = str(kwargs.get("error") or "")
        record_event(
            kind,
            f"Endpoint “{endpoint.name}” {word} ({new_status})",
            {
                "event": kind,
                "at": timezone.now().isoformat(),
                "endpoint": endpoint_payload(
                    endpoint, old_status, new_status, reason, error
                ),
            },
            endpoint=endpoint if endpoint.pk else None,
        )
    except Exception:
        # The sender is a probe round or a chat request: never break it.
        logger.exception(
            "Could not record an alert for endpoint %s", getattr(endpoint, "pk", None)
        )


def _budget_target(budget: Budget) -> str:
    if budget.user_id:
        return f"user {budget.user}"
    if budget.api_key_id:
        return f"API key “{budget.api_key.name}”"
    if budget.endpoint_id:
        return f"endpoint “{budget.endpoint.name}”"
    return "everyone"


@receiver(budget_threshold_crossed, dispatch_uid="monitoring.alerts.budget")
def on_budget_threshold_crossed(
    sender: object,
    *,
    counter: Any,
    level: str,
    used: int,
    limit: int,
    resets_at: datetime | None = None,
    **kwargs: Any,
) -> None:
    """Record an alert when a budget reaches its warning level or runs out."""
    try:
        budget = kwargs.get("budget") or counter.budget
        kind = (
            AlertKind.BUDGET_EXHAUSTED
            if level == "exhausted"
            else AlertKind.BUDGET_WARNING
        )
        percent = round(100 * used / limit) if limit else 100
        name = budget.name or f"{budget.get_period_display().split(' ')[0]} budget"
        target = _budget_target(budget)
        if kind == AlertKind.BUDGET_EXHAUSTED:
            headline = "is exhausted"
        else:
            headline = f"reached {percent} %"
        record_event(
            kind,
            f"Budget “{name}” for {target} {headline} ({used:,} of {limit:,} tokens)",
            {
                "event": kind,
                "at": timezone.now().isoformat(),
                "budget": {
                    "id": budget.pk,
                    "name": name,
                    "scope": budget.scope,
                    "target": target,
                    "period": budget.period,
                    "level": level,
                    "used_tokens": used,
                    "token_limit": limit,
                    "percent": percent,
                    "resets_at": _iso(resets_at),
                },
            },
            budget=budget,
            dedupe_key=f"budget:{counter.pk}:{level}",
        )
    except Exception:
        logger.exception("Could not record a budget alert")


# --- Transports --------------------------------------------------------------------


class TransportError(Exception):
    """A failed delivery; `permanent` means retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class Transport:
    """Sends one alert to one place."""

    async def send(self, event: AlertEvent) -> None:
        raise NotImplementedError


class EmailTransport(Transport):
    """Mail through Django's mail backend (EMAIL_URL)."""

    def __init__(self, recipients: list[str]) -> None:
        self.recipients = recipients

    async def send(self, event: AlertEvent) -> None:
        subject, body = render_email(event)
        try:
            # Off the ORM's thread: an SMTP server can take EMAIL_TIMEOUT.
            await sync_to_async(send_mail, thread_sensitive=False)(
                subject, body, None, self.recipients, fail_silently=False
            )
        except smtplib.SMTPRecipientsRefused as exc:
            raise TransportError(
                f"recipients refused: {', '.join(exc.recipients)}", permanent=True
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise TransportError(f"mail failed: {type(exc).__name__}: {exc}") from exc


def render_email(event: AlertEvent) -> tuple[str, str]:
    """The subject and plain-text body of an alert mail."""
    subject = f"[llmsite] {event.title}"
    body = render_to_string(
        "monitoring/alert_email.txt",
        {
            "event": event,
            "endpoint": event.payload.get("endpoint"),
            "budget": event.payload.get("budget"),
        },
    )
    return subject, body


class WebhookTransport(Transport):
    """A JSON POST of the alert's payload."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.transport = transport

    async def send(self, event: AlertEvent) -> None:
        payload = {"title": event.title, **event.payload}
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0))
        try:
            async with httpx.AsyncClient(
                timeout=timeout, transport=self.transport, follow_redirects=False
            ) as client:
                response = await client.post(
                    self.url, json=payload, headers={"User-Agent": USER_AGENT}
                )
        except httpx.TimeoutException as exc:
            raise TransportError(f"no answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            # httpx messages can quote the URL, and webhook URLs carry tokens.
            message = str(exc).replace(self.url, "[webhook]")
            raise TransportError(f"{type(exc).__name__}: {message}"[:300]) from exc
        status = response.status_code
        if 200 <= status < 300:
            return
        transient = status >= 500 or status in {408, 425, 429}
        raise TransportError(f"HTTP {status}", permanent=not transient)


def transport_for(
    channel_key: str, channels: Mapping[int, AlertChannel]
) -> Transport | None:
    """The transport a delivery's channel key names, or None if it is gone."""
    timeout = float(conf.get("ALERT_WEBHOOK_TIMEOUT"))
    if channel_key == SETTINGS_EMAIL:
        recipients = list(conf.get("ALERT_EMAILS"))
        return EmailTransport(recipients) if recipients else None
    if channel_key == SETTINGS_WEBHOOK:
        url = str(conf.get("ALERT_WEBHOOK_URL"))
        return WebhookTransport(url, timeout=timeout) if url else None
    prefix, _, pk = channel_key.partition(":")
    channel = channels.get(int(pk)) if prefix == "channel" and pk.isdigit() else None
    if channel is None or not channel.enabled:
        return None
    if channel.kind == ChannelKind.EMAIL:
        return EmailTransport(channel.addresses)
    return WebhookTransport(channel.target.strip(), timeout=timeout)


# --- Delivery ----------------------------------------------------------------------


@dataclass
class Attempt:
    """One claimed delivery and how sending it went."""

    delivery: AlertDelivery
    transport: Transport | None
    error: str = ""
    permanent: bool = False


def claim_deliveries(
    now: datetime | None = None, *, limit: int = DELIVERIES_PER_STEP
) -> list[Attempt]:
    """Claim due deliveries with a compare-and-set on their next attempt time."""
    now = now or timezone.now()
    due = list(
        AlertDelivery.objects.filter(
            status=DeliveryStatus.PENDING, next_attempt_at__lte=now
        )
        .select_related("event")
        .order_by("next_attempt_at", "id")[:limit]
    )
    if not due:
        return []
    channel_ids = [
        int(d.channel_key.partition(":")[2])
        for d in due
        if d.channel_key.startswith("channel:") and d.channel_key[8:].isdigit()
    ]
    channels = AlertChannel.objects.in_bulk(channel_ids)
    claimed = []
    lease = now + timedelta(seconds=CLAIM_SECONDS)
    for delivery in due:
        won = AlertDelivery.objects.filter(
            pk=delivery.pk,
            status=DeliveryStatus.PENDING,
            next_attempt_at=delivery.next_attempt_at,
        ).update(next_attempt_at=lease)
        if won == 1:
            transport = transport_for(delivery.channel_key, channels)
            claimed.append(Attempt(delivery, transport))
    return claimed


async def send_attempt(attempt: Attempt) -> Attempt:
    """Send one claimed delivery; failures are kept on the attempt, never raised."""
    if attempt.transport is None:
        return attempt
    try:
        await attempt.transport.send(attempt.delivery.event)
    except TransportError as exc:
        attempt.error, attempt.permanent = exc.message, exc.permanent
    except Exception as exc:
        logger.exception("Alert delivery %s failed unexpectedly", attempt.delivery.pk)
        attempt.error = f"unexpected error: {type(exc).__name__}"
    return attempt


def save_attempts(attempts: list[Attempt], now: datetime | None = None) -> None:
    """Write the outcome of each attempt, scheduling a retry with backoff."""
    now = now or timezone.now()
    max_attempts = max(1, int(conf.get("ALERT_MAX_ATTEMPTS")))
    base = float(conf.get("ALERT_RETRY_SECONDS"))
    for attempt in attempts:
        delivery = attempt.delivery
        tries = delivery.attempts + 1
        rows = AlertDelivery.objects.filter(pk=delivery.pk)
        if attempt.transport is None:
            rows.update(status=DeliveryStatus.SKIPPED, next_attempt_at=now)
        elif not attempt.error:
            rows.update(
                status=DeliveryStatus.SENT, attempts=tries, sent_at=now, last_error=""
            )
        elif attempt.permanent or tries >= max_attempts:
            rows.update(
                status=DeliveryStatus.FAILED,
                attempts=tries,
                next_attempt_at=now,
                last_error=attempt.error[:500],
            )
            logger.error(
                "Alert “%s” via %s failed for good after %d attempt(s): %s",
                delivery.event.title,
                delivery.channel_key,
                tries,
                attempt.error,
            )
        else:
            delay = base * 2 ** (tries - 1)
            rows.update(
                attempts=tries,
                next_attempt_at=now + timedelta(seconds=delay),
                last_error=attempt.error[:500],
            )
            logger.warning(
                "Alert “%s” via %s failed (attempt %d of %d), retrying in %g s: %s",
                delivery.event.title,
                delivery.channel_key,
                tries,
                max_attempts,
                delay,
                attempt.error,
            )


async def deliver_due(*, limit: int = DELIVERIES_PER_STEP) -> bool:
    """Send the alerts that are due; True if there were any."""
    attempts = await sync_to_async(claim_deliveries)(limit=limit)
    if not attempts:
        return False
    await asyncio.gather(*(send_attempt(a) for a in attempts))
    await sync_to_async(save_attempts)(attempts)
    return True


def send_test(channel: AlertChannel) -> str:
    """Send a test alert to one channel now; the error, or "" on success."""
    event = AlertEvent(
        kind=AlertKind.TEST,
        created_at=timezone.now(),
        title=f"Test alert for channel “{channel.name}”",
        payload={"event": AlertKind.TEST, "at": timezone.now().isoformat()},
    )
    transport = transport_for(f"channel:{channel.pk}", {channel.pk: channel})
    if transport is None:
        return "the channel is disabled"
    attempt = Attempt(AlertDelivery(event=event), transport)
    async_to_sync(send_attempt)(attempt)
    return attempt.error


def prune(now: datetime | None = None) -> int:
    """Delete alert history older than MONITOR_RETENTION_DAYS; how many events."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=int(conf.get("MONITOR_RETENTION_DAYS")))
    old = AlertEvent.objects.filter(created_at__lt=cutoff).exclude(
        deliveries__status=DeliveryStatus.PENDING
    )
    return old.delete()[1].get(AlertEvent._meta.label, 0)
