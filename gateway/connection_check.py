"""One-off requests the admin makes to an endpoint: a connection test, its models.

The admin's views are synchronous; each call here runs the async client on a
loop of its own, with pools of its own that are closed before it returns, so
nothing is left bound to a loop that is gone and the site's own pools (those
of the server's loop) are never touched. A test transport installed on the
site's pools (``gateway.client.pools.use_transport``) is used here too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import async_to_sync

from gateway import client, sanitize
from gateway.models import Endpoint

# An admin waits for the answer: longer than a probe, shorter than patience.
CHECK_SECONDS = 10.0
ERROR_CHARS = 300

T = TypeVar("T")


class CheckFailed(Exception):
    """The endpoint could not be asked; the message is clean and safe to show."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass(frozen=True)
class ConnectionResult:
    """What one connection test found."""

    latency_ms: float
    model_count: int


def _run(endpoint: Endpoint, call: Callable[..., Awaitable[T]]) -> T:
    """Call `call(config, client_pools=...)` once, bounded, errors made safe."""
    try:
        config = client.EndpointConfig.from_model(endpoint)
    except Exception as exc:
        raise CheckFailed(
            f"its settings cannot be used ({type(exc).__name__})"
        ) from exc

    async def once() -> T:
        pools = client.ClientPools()
        if client.pools.transport is not None:
            pools.transport = client.pools.transport
        try:
            async with asyncio.timeout(CHECK_SECONDS):
                return await call(config, client_pools=pools)
        finally:
            await pools.aclose_all()

    try:
        return async_to_sync(once)()
    except TimeoutError:
        raise CheckFailed(f"no answer within {CHECK_SECONDS:g} s") from None
    except client.APIClientError as exc:
        message = sanitize.clean_text(
            exc.message, secrets=config.secrets, limit=ERROR_CHARS
        )
        raise CheckFailed(message, exc.status_code) from None


def check_connection(endpoint: Endpoint) -> ConnectionResult:
    """Ask the endpoint for its models once, now; raises `CheckFailed`."""
    started = time.perf_counter()
    models = _run(endpoint, client.list_models)
    return ConnectionResult(
        latency_ms=(time.perf_counter() - started) * 1000, model_count=len(models)
    )


def fetch_model_ids(endpoint: Endpoint) -> list[str]:
    """The ids of the models the endpoint offers, sorted; raises `CheckFailed`."""
    models: list[dict[str, Any]] = _run(endpoint, client.list_models)
    # list_models already cleaned and bounded each id and the list's length.
    return sorted({model["id"] for model in models})
