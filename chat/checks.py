"""System checks for the chat settings."""

from __future__ import annotations

from django.core.checks import Error, Tags, register

from chat.conf import chat_settings


@register(Tags.compatibility)
def check_chat_settings(app_configs: object = None, **kwargs: object) -> list[Error]:
    """Limits that would make the chat unusable are configuration errors."""
    current = chat_settings()
    errors = []
    for name, value, minimum in (
        ("CHAT_MAX_MESSAGE_CHARS", current.max_message_chars, 1),
        ("CHAT_MAX_CONCURRENT_GENERATIONS", current.max_concurrent_generations, 1),
        ("CHAT_FRAME_INTERVAL_MS", current.frame_interval * 1000, 1),
        ("CHAT_RESUME_GRACE_SECONDS", current.resume_grace, 0),
    ):
        if value < minimum:
            errors.append(
                Error(
                    f"{name} must be at least {minimum}, got {value:g}.",
                    id="chat.E001",
                )
            )
    return errors
