"""The circuit breaker opened through A is open for B too."""

from __future__ import annotations

import httpx

from tests.scale_out.deployment import BREAKER_THRESHOLD, FLAKY_MODEL, request_id
from tests.servers import needs_postgres_and_redis

pytestmark = needs_postgres_and_redis


def test_failures_through_a_open_the_circuit_and_b_skips_the_endpoint(deployment):
    d = deployment
    d.site.sql(
        "UPDATE gateway_endpoint SET consecutive_failures = 0, "
        "disabled_until = NULL, status = 'unknown' WHERE name = 'broken'"
    )
    stats = f"{d.broken_url.removesuffix('/v1')}/_sim/stats"
    tried = httpx.get(stats).json()["chat_requests"]

    for _ in range(BREAKER_THRESHOLD):
        response = d.chat(d.a, "chat", model=FLAKY_MODEL)
        assert response.status_code == 200
        assert response.json()["llmsite"]["endpoint"] == "main"
    assert httpx.get(stats).json()["chat_requests"] == tried + BREAKER_THRESHOLD
    assert d.site.sql(
        "SELECT disabled_until > now() FROM gateway_endpoint WHERE name = 'broken'"
    ) == [(True,)]

    response = d.chat(d.b, "chat", model=FLAKY_MODEL)

    assert response.status_code == 200
    summary = response.json()["llmsite"]
    assert summary["endpoint"] == "main"
    assert summary["attempts"] == 1
    # Skipped without a call: the broken upstream saw nothing more.
    assert httpx.get(stats).json()["chat_requests"] == tried + BREAKER_THRESHOLD
    [record] = d.records("request_id = %s", request_id(response), count=1)
    _, status, endpoint, trail, _, _ = record
    assert (status, endpoint) == ("ok", "main")
    assert [(hop["endpoint"], hop["outcome"], hop.get("reason")) for hop in trail] == [
        ("broken", "skipped", "circuit_open"),
        ("main", "ok", None),
    ]
