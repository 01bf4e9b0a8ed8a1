from __future__ import annotations

from django.apps import AppConfig


class LlmsiteConfig(AppConfig):
    name = "llmsite"
    verbose_name = "llmsite"

    def ready(self) -> None:
        from llmsite import checks  # noqa: F401  (registers the system checks)
