"""The degraded-mode answer cache: one backend per process, whatever the task."""

from __future__ import annotations

import asyncio
import contextvars

from django.core.cache.backends.dummy import DummyCache

from gateway import response_cache
from gateway.response_cache import CachedAnswer


def answer(text: str = "Paris.") -> CachedAnswer:
    return CachedAnswer(
        text=text,
        finish_reason="stop",
        endpoint="primary",
        upstream_model="m",
        stored_at=0.0,
    )


async def test_every_request_task_uses_the_same_backend():
    # Django keeps cache backends per context, and a server starts each
    # request in a context of its own: a backend per request (and on Redis a
    # connection pool per request) unless it is resolved once.
    async def backend():
        return response_cache._cache()

    first, second = [
        await asyncio.create_task(backend(), context=contextvars.Context())
        for _ in range(2)
    ]

    assert first is second


async def test_an_answer_stored_in_one_task_is_found_in_another():
    key = response_cache.cache_key("m", [{"role": "user", "content": "Capital?"}])

    assert await asyncio.create_task(response_cache.store(key, answer()))

    found = await asyncio.create_task(response_cache.lookup(key))
    assert found is not None and found.text == "Paris."


def test_a_new_cache_setting_takes_effect(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}
    }

    assert isinstance(response_cache._cache(), DummyCache)
