"""Degraded mode: the last good answer per model and exact conversation.

Every complete answer is kept in Django's cache (local memory by default,
Redis when REDIS_URL is set) under a hash of the public model name and the
exact messages sent.  The router reads it only when every route has failed,
and flags what it serves as cached.

Settings: GATEWAY_RESPONSE_CACHE_TTL (seconds, default one day; 0 turns the
cache off), GATEWAY_RESPONSE_CACHE_MAX_BYTES (answers above it are not kept,
default 256 KiB) and GATEWAY_RESPONSE_CACHE_ALIAS (the cache, "default").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.signals import setting_changed
from django.dispatch import receiver

logger = logging.getLogger("gateway.response_cache")

KEY_PREFIX = "gateway:answer:"
DEFAULT_TTL = 24 * 3600
DEFAULT_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class CachedAnswer:
    """A complete answer kept for degraded mode."""

    text: str
    finish_reason: str | None
    endpoint: str
    upstream_model: str
    stored_at: float

    def age_seconds(self, now: float | None = None) -> float:
        """How old the answer is."""
        return max(0.0, (time.time() if now is None else now) - self.stored_at)


def _ttl() -> int:
    return int(getattr(settings, "GATEWAY_RESPONSE_CACHE_TTL", DEFAULT_TTL))


@functools.cache
def _cache() -> Any:
    # Resolved once per process: `caches[alias]` builds a new backend in every
    # asyncio task (Django keeps cache connections per context), which would
    # be one backend per request. The local-memory and Redis backends are safe
    # to share between tasks and threads (a lock; redis-py's pool).
    return caches[getattr(settings, "GATEWAY_RESPONSE_CACHE_ALIAS", "default")]


@receiver(setting_changed)
def _reset_cache(*, setting: str, **kwargs: Any) -> None:
    if setting in {"CACHES", "GATEWAY_RESPONSE_CACHE_ALIAS"}:
        _cache.cache_clear()


def enabled() -> bool:
    """Whether answers are kept at all."""
    return _ttl() > 0


def cache_key(
    model_name: str, messages: Sequence[Mapping[str, Any]], scope: str = ""
) -> str:
    """The key of a conversation: a hash, so any model name or text is safe."""
    digest = hashlib.sha256()
    digest.update(f"{scope}\0{model_name}\0".encode())
    digest.update(
        json.dumps(
            messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8", "surrogatepass")
    )
    return KEY_PREFIX + digest.hexdigest()


async def store(key: str, answer: CachedAnswer) -> bool:
    """Keep an answer; False when it is too large or caching is off."""
    ttl = _ttl()
    limit = int(
        getattr(settings, "GATEWAY_RESPONSE_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES)
    )
    if ttl <= 0 or not answer.text:
        return False
    # Four bytes per character bound UTF-8, so most answers skip the encoding.
    if len(answer.text) * 4 > limit and len(answer.text.encode()) > limit:
        return False
    cache = _cache()
    value = asdict(answer)
    try:
        if isinstance(cache, LocMemCache):
            # In-process and lock-protected: no thread hop needed.
            cache.set(key, value, ttl)
        else:
            await cache.aset(key, value, ttl)
    except Exception:
        # A cache outage must never fail the answer that was just delivered.
        logger.warning("could not store an answer in the response cache", exc_info=True)
        return False
    return True


async def lookup(key: str) -> CachedAnswer | None:
    """The kept answer of a conversation, if any."""
    if _ttl() <= 0:
        return None
    cache = _cache()
    try:
        if isinstance(cache, LocMemCache):
            value = cache.get(key)
        else:
            value = await cache.aget(key)
    except Exception:
        logger.warning("could not read the response cache", exc_info=True)
        return None
    if not isinstance(value, dict):
        return None
    try:
        return CachedAnswer(**value)
    except TypeError:
        return None
