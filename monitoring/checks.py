"""System checks for the monitoring settings."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register

from monitoring import conf


@register(Tags.compatibility)
def check_alert_mail(app_configs: object = None, **kwargs: object) -> list:
    """Alert mails that would only reach the console."""
    backend = getattr(settings, "EMAIL_BACKEND", "")
    if conf.get("ALERT_EMAILS") and backend.endswith("console.EmailBackend"):
        return [
            Warning(
                "ALERT_EMAILS is set but mail goes to the console, so nobody "
                "receives the alerts.",
                hint="Set EMAIL_URL, e.g. smtp+tls://user:password@host:587.",
                id="monitoring.W001",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_metrics_token(app_configs: object = None, **kwargs: object) -> list:
    """A short metrics token can be guessed."""
    token = str(conf.get("METRICS_TOKEN") or "")
    if token and len(token) < 24:
        return [
            Warning(
                "METRICS_TOKEN is shorter than 24 characters.",
                hint="Use a long random value, e.g. from `openssl rand -hex 32`.",
                id="monitoring.W002",
            )
        ]
    return []
