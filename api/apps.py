from __future__ import annotations

from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The REST API for programs and spreadsheets, thin over gateway and monitoring."""

    name = "api"
    verbose_name = "REST API"
    # Nothing is imported at start-up: DRF and drf-spectacular load with the
    # first API view (api/urls.py), and the schema extensions with the schema
    # view (api/views/docs.py) or DEFAULT_SCHEMA_CLASS, before any schema is built.
