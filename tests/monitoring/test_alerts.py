"""Alerts: once per transition, by mail and webhook, retried, never leaking keys."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.core import mail

from gateway.models import Budget, BudgetCounter, Endpoint, EndpointStatus
from gateway.signals import budget_threshold_crossed, endpoint_status_changed
from gateway.simulator import Behaviour
from monitoring import alerts, probes
from monitoring.models import (
    AlertChannel,
    AlertDelivery,
    AlertEvent,
    ChannelKind,
    DeliveryStatus,
)
from tests.monitoring.conftest import ENDPOINT_KEY

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

run_round = async_to_sync(probes.run_round)
deliver_due = async_to_sync(alerts.deliver_due)


@pytest.fixture
def alert_settings(fast_monitor, webhook):
    fast_monitor.ALERT_EMAILS = ["ops@example.com"]
    fast_monitor.ALERT_WEBHOOK_URL = webhook.url
    fast_monitor.ALERT_RETRY_SECONDS = 30
    fast_monitor.ALERT_MAX_ATTEMPTS = 3
    return fast_monitor


def probe_round(capture) -> None:
    with capture(execute=True):
        run_round()


def test_an_endpoint_going_down_and_back_alerts_once_each_way(
    upstream,
    make_endpoint,
    alert_settings,
    webhook,
    django_capture_on_commit_callbacks,
):
    alert_settings.MONITOR_DOWN_AFTER = 1
    endpoint = make_endpoint(name="primary", status=EndpointStatus.CONNECTED)
    upstream.set_behaviour(Behaviour(fault="status", fault_status=502), prefix="e/1")

    with time_machine.travel(T0, tick=False) as clock:
        probe_round(django_capture_on_commit_callbacks)
        assert deliver_due() is True
        assert deliver_due() is False

        # Still down on the next rounds: nothing new to say.
        for _ in range(2):
            clock.shift(301)
            probe_round(django_capture_on_commit_callbacks)
            assert deliver_due() is False

        upstream.set_behaviour(Behaviour(), prefix="e/1")
        clock.shift(301)
        probe_round(django_capture_on_commit_callbacks)
        assert deliver_due() is True

    assert [m.subject for m in mail.outbox] == [
        "[llmsite] Endpoint “primary” is down (disconnected)",
        "[llmsite] Endpoint “primary” has recovered (connected)",
    ]
    assert mail.outbox[0].to == ["ops@example.com"]
    assert "HTTP 502" in mail.outbox[0].body or "502" in mail.outbox[0].body
    assert [(p["event"], p["endpoint"]["status"]) for p in webhook.received] == [
        ("endpoint_down", "disconnected"),
        ("endpoint_recovered", "connected"),
    ]
    down = webhook.received[0]
    assert down["title"] == "Endpoint “primary” is down (disconnected)"
    assert down["endpoint"]["name"] == "primary"
    assert down["endpoint"]["id"] == endpoint.pk
    assert down["endpoint"]["previous_status"] == "connected"
    assert down["endpoint"]["reason"] == "probe"
    assert webhook.headers[0]["Content-Type"] == "application/json"
    assert AlertDelivery.objects.filter(status=DeliveryStatus.SENT).count() == 4


def test_an_alert_never_carries_the_endpoint_key(
    make_endpoint, alert_settings, webhook, django_capture_on_commit_callbacks
):
    endpoint = make_endpoint(
        base_url="http://user:hunter2@127.0.0.1:9/v1?key=" + ENDPOINT_KEY,
        extra_headers={"X-Api-Key": "header-secret-value-123"},
    )

    probe_round(django_capture_on_commit_callbacks)
    deliver_due()

    endpoint.refresh_from_db()
    assert endpoint.status == EndpointStatus.DISCONNECTED
    assert len(mail.outbox) == 1 and len(webhook.received) == 1
    sent = json.dumps(webhook.received) + mail.outbox[0].body + mail.outbox[0].subject
    sent += json.dumps(list(AlertEvent.objects.values_list("payload", flat=True)))
    for secret in (ENDPOINT_KEY, "hunter2", "header-secret-value-123"):
        assert secret not in sent
    assert webhook.received[0]["endpoint"]["base_url"] == "http://127.0.0.1:9/v1"


def test_moves_between_connected_and_slow_are_not_alerts(alert_settings):
    assert alerts.endpoint_alert_kind("connected", "slow") is None
    assert alerts.endpoint_alert_kind("slow", "connected") is None
    assert alerts.endpoint_alert_kind("unknown", "connected") is None
    assert alerts.endpoint_alert_kind("unknown", "disconnected") == "endpoint_down"
    assert alerts.endpoint_alert_kind("disconnected", "slow") == "endpoint_recovered"


def test_the_breaker_opening_in_a_web_process_is_alerted_too(
    make_endpoint, alert_settings, webhook
):
    endpoint = make_endpoint(status=EndpointStatus.CONNECTED)
    endpoint_status_changed.send(
        sender=Endpoint,
        endpoint=endpoint,
        old_status="connected",
        new_status="disconnected",
        reason="breaker_open",
    )

    deliver_due()

    assert webhook.received[0]["endpoint"]["reason"] == "breaker_open"
    assert len(mail.outbox) == 1


def test_a_failed_webhook_is_retried_with_backoff_and_mail_is_not_resent(
    alert_settings, webhook, make_endpoint
):
    webhook.replies = [500, 503]
    endpoint = make_endpoint()

    with time_machine.travel(T0, tick=False) as clock:
        endpoint_status_changed.send(
            sender=Endpoint,
            endpoint=endpoint,
            old_status="connected",
            new_status="disconnected",
            reason="probe",
        )
        deliver_due()
        hook = AlertDelivery.objects.get(channel_key="settings:webhook")
        assert (hook.status, hook.attempts, hook.last_error) == (
            "pending",
            1,
            "HTTP 500",
        )
        assert hook.next_attempt_at == T0 + timedelta(seconds=30)
        assert deliver_due() is False

        clock.shift(30)
        deliver_due()
        hook.refresh_from_db()
        assert (hook.attempts, hook.last_error) == (2, "HTTP 503")
        # Doubled: 30 s after the first failure, 60 s after the second.
        assert hook.next_attempt_at == T0 + timedelta(seconds=90)

        clock.shift(60)
        deliver_due()

    hook.refresh_from_db()
    assert (hook.status, hook.attempts, hook.last_error) == ("sent", 3, "")
    assert len(webhook.received) == 3
    assert len(mail.outbox) == 1


def test_a_webhook_that_keeps_failing_is_given_up_and_logged(
    alert_settings, webhook, make_endpoint, caplog
):
    webhook.replies = [500, 500, 500, 500]
    endpoint = make_endpoint()

    with time_machine.travel(T0, tick=False) as clock:
        endpoint_status_changed.send(
            sender=Endpoint,
            endpoint=endpoint,
            old_status="connected",
            new_status="disconnected",
            reason="probe",
        )
        with caplog.at_level(logging.WARNING, logger="monitoring.alerts"):
            for _ in range(5):
                deliver_due()
                clock.shift(3600)

    hook = AlertDelivery.objects.get(channel_key="settings:webhook")
    assert (hook.status, hook.attempts) == ("failed", 3)
    assert len(webhook.received) == 3
    assert "failed for good after 3 attempt(s): HTTP 500" in caplog.text
    assert webhook.url not in caplog.text


def test_a_webhook_refusing_the_alert_is_not_retried(
    alert_settings, webhook, make_endpoint
):
    webhook.replies = [404]
    endpoint = make_endpoint()
    endpoint_status_changed.send(
        sender=Endpoint,
        endpoint=endpoint,
        old_status="connected",
        new_status="disconnected",
        reason="probe",
    )

    deliver_due()

    hook = AlertDelivery.objects.get(channel_key="settings:webhook")
    assert (hook.status, hook.attempts, hook.last_error) == ("failed", 1, "HTTP 404")


def test_an_unreachable_webhook_fails_softly(alert_settings, make_endpoint):
    alert_settings.ALERT_WEBHOOK_URL = "http://127.0.0.1:9/hook?token=s3cret"
    endpoint = make_endpoint()
    endpoint_status_changed.send(
        sender=Endpoint,
        endpoint=endpoint,
        old_status="connected",
        new_status="disconnected",
        reason="probe",
    )

    assert deliver_due() is True

    hook = AlertDelivery.objects.get(channel_key="settings:webhook")
    assert hook.status == "pending" and hook.attempts == 1
    assert hook.last_error.startswith("ConnectError")
    assert "s3cret" not in hook.last_error
    assert len(mail.outbox) == 1


@pytest.fixture
def budget(owner):
    return Budget.objects.create(
        name="alice daily",
        scope="user",
        user=owner,
        period="daily",
        token_limit=10_000,
        warning_percent=80,
    )


def cross(budget: Budget, counter: BudgetCounter, level: str, used: int) -> None:
    budget_threshold_crossed.send(
        sender=Budget,
        counter=counter,
        level=level,
        used=used,
        limit=budget.token_limit,
        resets_at=T0 + timedelta(hours=12),
    )


def test_a_budget_warning_and_exhaustion_alert_once_each(
    budget, alert_settings, webhook
):
    counter = BudgetCounter.objects.create(
        budget=budget, period_start=T0.replace(hour=0), used_tokens=8_100
    )

    cross(budget, counter, "warning", 8_100)
    cross(budget, counter, "warning", 8_100)  # reported twice: alerted once
    cross(budget, counter, "exhausted", 10_050)
    deliver_due()

    # Deliveries run concurrently, so they may arrive in either order.
    assert sorted(m.subject for m in mail.outbox) == [
        "[llmsite] Budget “alice daily” for user alice is exhausted "
        "(10,050 of 10,000 tokens)",
        "[llmsite] Budget “alice daily” for user alice reached 81 % "
        "(8,100 of 10,000 tokens)",
    ]
    received = sorted(webhook.received, key=lambda p: p["budget"]["used_tokens"])
    assert [(p["event"], p["budget"]["used_tokens"]) for p in received] == [
        ("budget_warning", 8_100),
        ("budget_exhausted", 10_050),
    ]
    assert received[0]["budget"]["resets_at"] == "2026-03-03T00:00:00+00:00"
    assert AlertEvent.objects.count() == 2


def test_channels_from_the_admin_get_the_events_they_asked_for(
    fast_monitor, webhook, make_endpoint, budget
):
    AlertChannel.objects.create(
        name="on-call", kind=ChannelKind.EMAIL, target="a@example.com, b@example.com"
    )
    AlertChannel.objects.create(
        name="finance",
        kind=ChannelKind.WEBHOOK,
        target=webhook.url,
        endpoint_events=False,
    )
    AlertChannel.objects.create(
        name="retired", kind=ChannelKind.EMAIL, target="old@example.com", enabled=False
    )
    endpoint = make_endpoint()
    endpoint_status_changed.send(
        sender=Endpoint,
        endpoint=endpoint,
        old_status="unknown",
        new_status="disconnected",
        reason="probe",
    )
    counter = BudgetCounter.objects.create(
        budget=budget, period_start=T0, used_tokens=9_000
    )
    cross(budget, counter, "warning", 9_000)

    deliver_due()

    assert [(m.to, m.subject.split("”")[0]) for m in mail.outbox] == [
        (["a@example.com", "b@example.com"], "[llmsite] Endpoint “endpoint-1"),
        (["a@example.com", "b@example.com"], "[llmsite] Budget “alice daily"),
    ]
    assert [p["event"] for p in webhook.received] == ["budget_warning"]


def test_a_delivery_to_a_channel_deleted_since_is_skipped(
    fast_monitor, webhook, make_endpoint
):
    channel = AlertChannel.objects.create(
        name="temp", kind=ChannelKind.WEBHOOK, target=webhook.url
    )
    endpoint = make_endpoint()
    endpoint_status_changed.send(
        sender=Endpoint,
        endpoint=endpoint,
        old_status="connected",
        new_status="disconnected",
        reason="probe",
    )
    channel.delete()

    deliver_due()

    assert AlertDelivery.objects.get().status == DeliveryStatus.SKIPPED
    assert webhook.received == []


def test_a_broken_receiver_never_breaks_the_sender(fast_monitor, caplog):
    with caplog.at_level(logging.ERROR, logger="monitoring.alerts"):
        endpoint_status_changed.send(
            sender=Endpoint,
            endpoint=None,
            old_status="connected",
            new_status="disconnected",
            reason="probe",
        )

    assert "Could not record an alert for endpoint None" in caplog.text
    assert AlertEvent.objects.count() == 0
