"""The deployment under test: two daphne processes, A and B, serving one site.

One PostgreSQL database, one Redis database (keys of their own), two
simulated upstreams ("main", and "broken", which answers every request with
a 503), and what the tests sign in with.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import Site, wait_for_port

MODEL = "house-model"
# Routed to "broken" first (an upstream that always answers 503), then "main".
FLAKY_MODEL = "flaky-model"
BREAKER_THRESHOLD = 2
RPM_LIMIT = 8
BUDGET_TOKENS = 400
POLICY_CACHE_SECONDS = 2
MONITOR_LEASE_SECONDS = 3
MONITOR_IDLE_SECONDS = 1

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
from gateway.models import ApiKey, Budget, BudgetScope, Endpoint, ModelRoute

users = get_user_model().objects
alice = users.create_user("alice", password="not-used-here")
bob = users.create_user("bob", password="not-used-here")
main = Endpoint.objects.create(name="main", base_url="{main_url}", timeout=30)
broken = Endpoint.objects.create(
    name="broken",
    base_url="{broken_url}",
    failure_threshold={threshold},
    cooldown_seconds=600,
)
ModelRoute.objects.create(
    model_name="{model}", endpoint=main, upstream_model="sim-small"
)
ModelRoute.objects.create(
    model_name="{flaky_model}", endpoint=broken, upstream_model="sim-small", priority=1
)
ModelRoute.objects.create(
    model_name="{flaky_model}", endpoint=main, upstream_model="sim-small", priority=2
)
Budget.objects.create(scope=BudgetScope.USER, user=bob, token_limit={budget})
keys = {{}}
for owner, name, rpm in [
    (alice, "chat", None),
    (alice, "limited", {rpm}),
    (alice, "revocable", None),
    (bob, "budget", None),
]:
    key, raw = ApiKey.generate(owner, name)
    key.rpm_limit = rpm
    key.save()
    keys[name] = {{"id": key.pk, "raw": raw}}
client = Client()
client.force_login(alice)
print(json.dumps({{"cookie": client.cookies["sessionid"].value, "keys": keys}}))
"""


@dataclass
class Deployment:
    """The site, its two web processes A and B, and what the tests sign in with."""

    site: Site
    a: int
    b: int
    cookie: str
    keys: dict[str, dict[str, Any]]
    broken_url: str

    def url(self, port: int, path: str) -> str:
        return f"http://127.0.0.1:{port}{path}"

    def chat(
        self, port: int, key: str, content: str = "Hello.", **body: Any
    ) -> httpx.Response:
        """One plain /v1/chat/completions request through the process on `port`."""
        return self.chat_at_once([port], key, content, **body)[0]

    def chat_at_once(
        self, ports: Sequence[int], key: str, content: str, **body: Any
    ) -> list[httpx.Response]:
        """One request per entry of `ports`, through that process, all at once."""
        headers = {"Authorization": f"Bearer {self.keys[key]['raw']}"}
        payload = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            **body,
        }

        async def every() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=len(ports))
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            self.url(port, "/v1/chat/completions"),
                            headers=headers,
                            json=payload,
                        )
                        for port in ports
                    )
                )

        return asyncio.run(every())

    def records(self, where: str, *args: Any, count: int) -> list[tuple[Any, ...]]:
        """The usage records matching `where`, once there are `count` of them.

        Each process writes its records a few milliseconds after the answer.
        """
        query = (
            "SELECT request_id, status, endpoint_name, trail, prompt_tokens, "
            f"completion_tokens FROM gateway_usagerecord WHERE {where} ORDER BY id"
        )
        deadline = time.monotonic() + 10
        while True:
            rows = self.site.sql(query, *args)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def request_id(response: httpx.Response) -> uuid.UUID:
    """The usage record's request id of a /v1 answer (its `chatcmpl-` id)."""
    return uuid.UUID(response.json()["id"].removeprefix("chatcmpl-"))


def start(logs: Path) -> Deployment:
    """Create the site, start its upstreams and its two web processes."""
    site = Site(
        logs,
        "scale",
        WEB_CONCURRENCY="2",
        CHAT_RESUME_GRACE_SECONDS="10",
        GATEWAY_POLICY_CACHE_SECONDS=str(POLICY_CACHE_SECONDS),
        MONITOR_LEASE_SECONDS=str(MONITOR_LEASE_SECONDS),
        MONITOR_IDLE_SECONDS=str(MONITOR_IDLE_SECONDS),
        RATE_LIMIT_RPM="0",
        USAGE_WRITE_DELAY_MS="50",
        PYTHONUNBUFFERED="1",
    )
    try:
        site.create()
        main_url = site.upstream("--models", "sim-small")
        broken_url = site.upstream(
            "--fault", "status", "--fault-status", "503", "--models", "sim-small"
        )
        credentials = site.shell(
            SETUP.format(
                main_url=main_url,
                broken_url=broken_url,
                threshold=BREAKER_THRESHOLD,
                model=MODEL,
                flaky_model=FLAKY_MODEL,
                budget=BUDGET_TOKENS,
                rpm=RPM_LIMIT,
            )
        )
        (a, port_a), (b, port_b) = (
            site.launch("daphne", logs / "a.log"),
            site.launch("daphne", logs / "b.log"),
        )
        wait_for_port(port_a, a)
        wait_for_port(port_b, b)
    except BaseException:
        site.drop()
        raise
    return Deployment(
        site=site,
        a=port_a,
        b=port_b,
        cookie=credentials["cookie"],
        keys=credentials["keys"],
        broken_url=broken_url,
    )
