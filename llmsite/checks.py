"""System checks for dangerous combinations of settings."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register(Tags.compatibility)
def check_shared_state(app_configs: object = None, **kwargs: object) -> list:
    """Per-process backends cannot serve several web processes."""
    messages = []
    several = settings.WEB_CONCURRENCY > 1
    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    if several and layer.endswith("InMemoryChannelLayer"):
        messages.append(
            Error(
                "The in-memory channel layer cannot be shared by several web "
                "processes: resumed streams and second tabs break.",
                hint="Set REDIS_URL, or run one web process (WEB_CONCURRENCY=1).",
                id="llmsite.E001",
            )
        )
    cache = settings.CACHES["default"]["BACKEND"]
    if several and cache.endswith("LocMemCache"):
        messages.append(
            Error(
                "The local-memory cache is per process: rate limits would become "
                "the limit times the number of processes.",
                hint="Set REDIS_URL, or run one web process (WEB_CONCURRENCY=1).",
                id="llmsite.E002",
            )
        )
    if several and settings.DATABASE_ENGINE.endswith("sqlite3"):
        messages.append(
            Warning(
                "SQLite serialises writes; several web processes will queue on it.",
                hint="Set DATABASE_URL to PostgreSQL for more than one process.",
                id="llmsite.W003",
            )
        )
    return messages


@register(Tags.security, deploy=True)
def check_secrets(app_configs: object = None, **kwargs: object) -> list:
    """Secrets that should come from the environment in production."""
    messages = []
    if not settings.DEBUG and settings.SECRET_KEY_FROM_FILE:
        messages.append(
            Warning(
                "SECRET_KEY is read from a file generated in DATA_DIR; every web "
                "process and host must share it.",
                hint="Set SECRET_KEY in the environment for production.",
                id="llmsite.W004",
            )
        )
    if settings.DEBUG and not settings.DATABASE_ENGINE.endswith("sqlite3"):
        messages.append(
            Warning(
                "DEBUG is on with a production database; error pages show settings "
                "and queries.",
                hint="Set DEBUG=false.",
                id="llmsite.W005",
            )
        )
    return messages
