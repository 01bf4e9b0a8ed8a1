from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self) -> None:
        # Connects the settings-reset and session receivers, the receiver of
        # abandoned requests (the monitor's sweeper sends it) and the system
        # checks.
        from chat import actions, checks, conf, sessions  # noqa: F401
