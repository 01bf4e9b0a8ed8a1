from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "monitoring"

    def ready(self) -> None:
        # Connects the alert receivers to the gateway's signals.
        from monitoring import alerts, checks  # noqa: F401
