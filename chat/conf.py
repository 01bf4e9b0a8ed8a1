"""The chat app's settings, with their defaults, read once and re-read on change."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, float] = {
    # Longest user message, in characters.
    "CHAT_MAX_MESSAGE_CHARS": 32_000,
    # Answers one user may have streaming at once, across all web processes.
    "CHAT_MAX_CONCURRENT_GENERATIONS": 2,
    # Deltas are coalesced into one websocket frame per this many milliseconds.
    "CHAT_FRAME_INTERVAL_MS": 40,
    # How long an answer keeps streaming after its last socket went away, so a
    # reload or a dropped connection can resume it; 0 cancels at once.
    "CHAT_RESUME_GRACE_SECONDS": 10,
    # How long a conversation stays claimed by a web process that stopped
    # renewing the claim (it died); renewed every third of it.
    "CHAT_LEASE_SECONDS": 15,
    # Largest frame the server sends, in bytes of UTF-8: history is paged and
    # long texts split to stay under it. Daphne refuses frames over 1 MiB.
    "CHAT_MAX_SEND_FRAME_BYTES": 256 * 1024,
    # Images one message may carry (chat.attachments).
    "CHAT_MAX_IMAGES_PER_MESSAGE": 4,
    # Largest image upload, in bytes, and most pixels, checked before decoding.
    "CHAT_IMAGE_MAX_BYTES": 5 * 1024 * 1024,
    "CHAT_IMAGE_MAX_PIXELS": 40_000_000,
    # Longest system prompt of a conversation or preset, in characters.
    "CHAT_MAX_SYSTEM_PROMPT_CHARS": 16_000,
    # Presets one user may keep.
    "CHAT_MAX_PRESETS": 50,
}


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """The chat settings in effect."""

    max_message_chars: int
    max_concurrent_generations: int
    frame_interval: float
    resume_grace: float
    lease_seconds: float
    max_send_frame_bytes: int
    max_images_per_message: int = 4
    image_max_bytes: int = 5 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    max_system_prompt_chars: int = 16_000
    max_presets: int = 50

    @property
    def max_frame_chars(self) -> int:
        """Longest websocket frame accepted, leaving room for JSON escaping."""
        # A control character costs six characters once escaped (\u0001).
        return self.max_message_chars * 6 + 4096


@cache
def chat_settings() -> ChatSettings:
    """Return the chat settings, read from django.conf.settings."""

    def read(name: str) -> float:
        return getattr(settings, name, DEFAULTS[name])

    return ChatSettings(
        max_message_chars=int(read("CHAT_MAX_MESSAGE_CHARS")),
        max_concurrent_generations=int(read("CHAT_MAX_CONCURRENT_GENERATIONS")),
        frame_interval=read("CHAT_FRAME_INTERVAL_MS") / 1000,
        resume_grace=float(read("CHAT_RESUME_GRACE_SECONDS")),
        lease_seconds=float(read("CHAT_LEASE_SECONDS")),
        # Below a few KiB a frame could not hold a message's footer.
        max_send_frame_bytes=max(16 * 1024, int(read("CHAT_MAX_SEND_FRAME_BYTES"))),
        max_images_per_message=int(read("CHAT_MAX_IMAGES_PER_MESSAGE")),
        image_max_bytes=int(read("CHAT_IMAGE_MAX_BYTES")),
        image_max_pixels=int(read("CHAT_IMAGE_MAX_PIXELS")),
        max_system_prompt_chars=int(read("CHAT_MAX_SYSTEM_PROMPT_CHARS")),
        max_presets=int(read("CHAT_MAX_PRESETS")),
    )


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: object) -> None:
    # Tests change these with override_settings; the next read sees the change.
    if setting in DEFAULTS:
        chat_settings.cache_clear()
