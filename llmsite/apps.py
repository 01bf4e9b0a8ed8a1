from __future__ import annotations

from django.apps import AppConfig


class LlmsiteConfig(AppConfig):
    name = "llmsite"
    verbose_name = "llmsite"

    def ready(self) -> None:
        # Registers the system checks and the login-throttling receivers.
        from llmsite import checks, throttle  # noqa: F401
