from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self) -> None:
        # Connects the settings-reset and session receivers and registers the
        # system checks.
        from chat import checks, conf, sessions  # noqa: F401
