"""Rate limits and budgets hold over A and B together, under concurrent load."""

from __future__ import annotations

import threading
from collections import Counter

from tests.scale_out.deployment import BUDGET_TOKENS, RPM_LIMIT, request_id
from tests.servers import needs_postgres_and_redis

pytestmark = needs_postgres_and_redis

REQUESTS = 40


def test_a_keys_rpm_limit_admits_n_requests_over_both_processes(deployment):
    d = deployment
    ports = [d.a, d.b] * (REQUESTS // 2)

    responses = d.chat_at_once(ports, "limited", "Hello.")

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: RPM_LIMIT, 429: REQUESTS - RPM_LIMIT}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
    records = d.records("api_key_id = %s", d.keys["limited"]["id"], count=REQUESTS)
    assert Counter(r[1] for r in records) == {
        "ok": RPM_LIMIT,
        "rejected": REQUESTS - RPM_LIMIT,
    }


def test_a_budget_shared_by_both_processes_is_never_overspent(deployment):
    d = deployment
    site = d.site
    ports = [d.a, d.b] * (REQUESTS // 2)
    # What the budget has spent and holds, read over and over during the load.
    seen: list[int] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            seen.extend(
                used + reserved
                for used, reserved in site.sql(
                    "SELECT used_tokens, reserved_tokens FROM gateway_budgetcounter"
                )
            )

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        responses = d.chat_at_once(
            ports, "budget", "Count to twenty.\n/sim tokens=20", max_tokens=20
        )
    finally:
        finished.set()
        watcher.join(10)

    statuses = Counter(r.status_code for r in responses)
    admitted = statuses[200]
    assert 0 < admitted < REQUESTS, statuses
    refused = [r for r in responses if r.status_code != 200]
    assert {r.json()["error"]["code"] for r in refused} == {"budget_exhausted"}
    assert seen and max(seen) <= BUDGET_TOKENS
    records = d.records("api_key_id = %s", d.keys["budget"]["id"], count=REQUESTS)
    # Exactly one record per request, named by the answer's id.
    assert len(records) == REQUESTS
    assert Counter(r[1] for r in records) == {
        "ok": admitted,
        "rejected": REQUESTS - admitted,
    }
    assert {r[0] for r in records if r[1] == "ok"} == {
        request_id(r) for r in responses if r.status_code == 200
    }
    [(used, reserved)] = site.sql(
        "SELECT used_tokens, reserved_tokens FROM gateway_budgetcounter"
    )
    assert reserved == 0
    assert used == sum(r[4] + r[5] for r in records if r[1] == "ok")
    assert used <= BUDGET_TOKENS
    assert site.sql("SELECT count(*) FROM gateway_budgethold") == [(0,)]
