"""Encryption at rest for endpoint API keys (Fernet, with key rotation)."""

from __future__ import annotations

import base64
import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

PREFIX = "fernet:"


def _derive_key(secret: str) -> bytes:
    """A Fernet key derived from an arbitrary secret string."""
    digest = hashlib.sha256(b"llmsite.field-encryption:" + secret.encode()).digest()
    return base64.urlsafe_b64encode(digest)


@functools.cache
def _fernet() -> MultiFernet:
    # The first key encrypts; every key decrypts, so keys can be rotated by
    # putting a new one first and re-saving endpoints.
    secrets = list(settings.FIELD_ENCRYPTION_KEYS) or [settings.SECRET_KEY]
    return MultiFernet([Fernet(_derive_key(secret)) for secret in secrets])


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: object) -> None:
    if setting in {"FIELD_ENCRYPTION_KEYS", "SECRET_KEY"}:
        _fernet.cache_clear()


def encrypt(plaintext: str) -> str:
    """Encrypt a secret for storage; the empty string stays empty."""
    if not plaintext:
        return ""
    return PREFIX + _fernet().encrypt(plaintext.encode()).decode()


class DecryptionError(ValueError):
    """A stored secret cannot be decrypted with the configured keys."""


def decrypt(stored: str) -> str:
    """Decrypt a stored secret."""
    if not stored:
        return ""
    if not stored.startswith(PREFIX):
        raise DecryptionError("stored secret is not in the expected format")
    try:
        return _fernet().decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "stored secret cannot be decrypted: FIELD_ENCRYPTION_KEYS or "
            "SECRET_KEY changed since it was saved"
        ) from None
