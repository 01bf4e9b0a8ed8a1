"""Helpers for the rollups, budgets, endpoints and me views: callers and usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.test import Client

from gateway import accounting
from gateway.accounting import UsageEntry
from gateway.models import ApiKey

# A Tuesday afternoon; every test that writes usage freezes time here.
NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)


def session_client(user: Any) -> Client:
    """A browser signed in as `user`."""
    client = Client()
    client.force_login(user)
    return client


def key_client(user: Any, name: str = "script") -> tuple[Client, ApiKey]:
    """A program calling with a personal API key of `user`."""
    key, raw = ApiKey.generate(user, name)
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}"), key


def use(
    user: Any,
    *,
    hours_ago: float = 1,
    model: str = "sim-small",
    endpoint: Any = None,
    key: ApiKey | None = None,
    prompt: int = 10,
    completion: int = 5,
    status: str = "ok",
    latency_ms: float | None = 100.0,
    ttft_ms: float | None = 20.0,
    cost: str | None = "0.001000",
    estimated: bool = False,
    **fields: Any,
) -> None:
    """Write one usage record (and its rollup) for `user`, `hours_ago` before NOW."""
    accounting.record_usage(
        UsageEntry(
            model_name=model,
            status=status,
            created_at=NOW - timedelta(hours=hours_ago),
            source="api" if key else "chat",
            user_id=user.pk if user else None,
            api_key_id=key.pk if key else None,
            endpoint_id=endpoint.pk if endpoint else None,
            endpoint_name=endpoint.name if endpoint else "",
            prompt_tokens=prompt,
            completion_tokens=completion,
            tokens_estimated=estimated,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            cost=Decimal(cost) if cost is not None else None,
            **fields,
        )
    )


def assert_error(response: Any, status: int, param: str | None = None) -> None:
    """A JSON error body of the API's one shape, naming `param` on a 400."""
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
