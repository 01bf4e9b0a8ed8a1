"""Fixtures of the REST API tests: keys, records and a way to make more."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway.models import ApiKey, Endpoint, UsageRecord

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:
    """The personas' password hashing dominated these tests; it is not under test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def endpoint(db) -> Endpoint:
    return Endpoint.objects.create(name="east", base_url="https://east.example.com/v1")


@pytest.fixture
def make_record(db) -> Callable[..., UsageRecord]:
    """Create a usage record; every field has a plain default."""
    counter = iter(range(1, 1_000_000))

    def make(user: Any = None, **fields: Any) -> UsageRecord:
        n = next(counter)
        values: dict[str, Any] = {
            "created_at": T0 + timedelta(minutes=n),
            "user": user,
            "source": "chat",
            "model_name": "gpt-test",
            "endpoint_name": "east",
            "upstream_model": "gpt-test-up",
            "prompt_tokens": 10 * n,
            "completion_tokens": 5 * n,
            "latency_ms": 100.5 + n,
            "ttft_ms": 20.25,
            "status": "ok",
            "attempts": 1,
            "cost": Decimal("0.000123") * n,
        }
        values.update(fields)
        return UsageRecord.objects.create(**values)

    return make


@pytest.fixture
def owner_key(owner) -> tuple[ApiKey, str]:
    """Alice's API key and its raw value."""
    return ApiKey.generate(owner, "alice-laptop")


@pytest.fixture
def bearer(owner_key) -> dict[str, str]:
    """Headers that sign in with Alice's key."""
    return {"Authorization": f"Bearer {owner_key[1]}"}
