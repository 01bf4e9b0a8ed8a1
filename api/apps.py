from __future__ import annotations

from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The REST API for programs and spreadsheets, thin over gateway and monitoring."""

    name = "api"
    verbose_name = "REST API"

    def ready(self) -> None:
        from api import schema  # noqa: F401  (registers the schema extensions)
