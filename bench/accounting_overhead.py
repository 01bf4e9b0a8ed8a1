"""Measure what limits, budgets and usage records add to a request.

Usage (SQLite, a throwaway file):

    .venv/bin/python bench/accounting_overhead.py [--requests 2000] [--warmup 200]

PostgreSQL (the database is created when missing; its usage tables are
emptied first), optionally with Redis for the rate-limit counters:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/llmsite_bench_acct \\
    REDIS_URL=redis://127.0.0.1:6379/5 .venv/bin/python bench/accounting_overhead.py

A zero-latency simulated upstream runs in its own process. Three cases share
one engine and one upstream:

- engine: ``gateway.router`` alone (no limits, no budgets, no record);
- service: ``gateway.service``: rate limits (rpm and tpm counters), context
  fitting for the reservation, one usage record, its hourly rollup;
- service + 1 budget: the same for a user with a budget, so each request
  also reserves on its counter before the call (one UPDATE, through a thread)
  and settles it in the batched write;
- service + 2 budgets: a user budget and an API key budget: two UPDATEs in
  one transaction before the call.

At concurrency 1 the cases are interleaved request by request, so drift hits
all alike; p50 and p99 are in ms and "+p50" is over the engine. At
concurrency 50 each case runs on its own for the same number of requests and
reports requests per second and CPU ms per request of this process (the
usage writer's thread included; the upstream's process excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import MESSAGES, cpu_model, percentile  # noqa: E402
from common import UPSTREAM_SERVER as SERVER  # noqa: E402

MODEL = "bench-model"


def create_postgres_database(url: str) -> None:
    """CREATE DATABASE for DATABASE_URL when it does not exist yet."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [name]
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def setup_django() -> str:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    if "DATA_DIR" not in os.environ:
        data_dir = tempfile.mkdtemp(prefix="llmsite-bench-")
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        os.environ["DATA_DIR"] = data_dir
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        create_postgres_database(url)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django.conf import settings

    return settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]


def prepare(port: int, model: str) -> tuple[int, int, int, int]:
    """Empty the bench tables; an endpoint, a route, users, a key, budgets."""
    from django.contrib.auth import get_user_model

    from gateway.models import (
        ApiKey,
        Budget,
        BudgetScope,
        Endpoint,
        ModelRoute,
        UsageRecord,
        UsageRollup,
        UserLimits,
    )

    UsageRecord.objects.all().delete()
    UsageRollup.objects.all().delete()
    Budget.objects.all().delete()
    Endpoint.objects.all().delete()
    get_user_model().objects.filter(username__startswith="bench-").delete()
    endpoint = Endpoint.objects.create(
        name="bench", base_url=f"http://127.0.0.1:{port}/v1"
    )
    ModelRoute.objects.create(model_name=MODEL, endpoint=endpoint, upstream_model=model)
    users = []
    for name in ("bench-plain", "bench-budget", "bench-budgets"):
        user = get_user_model().objects.create_user(name)
        # Limits high enough never to refuse, but counted like any other.
        UserLimits.objects.create(user=user, rpm_limit=10**9, tpm_limit=10**9)
        users.append(user.pk)
    key, _ = ApiKey.generate(get_user_model().objects.get(pk=users[2]), "bench")
    ApiKey.objects.filter(pk=key.pk).update(rpm_limit=10**9, tpm_limit=10**9)
    for user_id in users[1:]:
        Budget.objects.create(
            scope=BudgetScope.USER, user_id=user_id, token_limit=10**15
        )
    Budget.objects.create(scope=BudgetScope.API_KEY, api_key=key, token_limit=10**15)
    return users[0], users[1], users[2], key.pk


Case = Callable[[], Awaitable[float]]


def cases(
    plain_user: int, budget_user: int, budgets_user: int, budgets_key: int, stream: bool
) -> dict[str, Case]:
    from gateway import router, service
    from gateway.service import Caller

    async def engine() -> float:
        started = time.perf_counter()
        if stream:
            events = router.stream_chat(MODEL, MESSAGES)
            async for _ in events:
                pass
            assert events.result is not None and events.result.ok
        else:
            result = await router.complete_chat(MODEL, MESSAGES)
            assert result.ok, result.error
        return time.perf_counter() - started

    def through_service(user_id: int, api_key_id: int | None = None) -> Case:
        caller = Caller(user_id, api_key_id, source="api")

        async def run() -> float:
            started = time.perf_counter()
            if stream:
                async with contextlib.aclosing(
                    service.stream_chat(caller, MODEL, MESSAGES)
                ) as events:
                    async for event in events:
                        last = event
                assert isinstance(last, service.Done) and last.status == "ok"
            else:
                done = await service.complete_chat(caller, MODEL, MESSAGES)
                assert done.status == "ok"
            return time.perf_counter() - started

        return run

    return {
        "engine": engine,
        "service": through_service(plain_user),
        "service + 1 budget": through_service(budget_user),
        "service + 2 budgets": through_service(budgets_user, budgets_key),
    }


async def sequential(all_cases: dict[str, Case], requests: int, warmup: int) -> None:
    samples: dict[str, list[float]] = {name: [] for name in all_cases}
    for round_ in range(warmup + requests):
        for name, case in all_cases.items():
            elapsed = await case()
            if round_ >= warmup:
                samples[name].append(elapsed * 1000)
    floor = statistics.median(samples["engine"])
    print(f"{'case':<22} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8}")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(
            f"{name:<22} {p50:>8.3f} {percentile(values, 99):>8.3f} "
            f"{p50 - floor:>+8.3f}"
        )


async def concurrent(all_cases: dict[str, Case], requests: int, width: int) -> None:
    print(f"{'case':<22} {'req/s':>8} {'CPU ms/req':>11} {'+CPU ms':>8}")
    floor = None
    for name, case in all_cases.items():
        remaining = requests

        async def worker(case: Case = case) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await case()

        for _ in range(width * 4):
            await case()
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(width)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_request = cpu / requests * 1000
        floor = per_request if floor is None else floor
        print(
            f"{name:<22} {requests / wall:>8.0f} {per_request:>11.3f} "
            f"{per_request - floor:>+8.3f}"
        )


async def measure(port: int, args: argparse.Namespace, engine: str) -> None:
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from gateway import accounting, client

    users = await sync_to_async(prepare)(port, args.model)
    cache = settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]
    print(
        f"accounting overhead on {engine} with {cache}: {args.requests} requests "
        f"per case after {args.warmup} warm-up, model {args.model}, "
        f"{args.tokens} tokens per answer"
    )
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"loop {'uvloop' if args.uvloop else 'asyncio'}"
    )
    for stream in (False, True):
        kind = "stream (whole)" if stream else "plain"
        all_cases = cases(*users, stream)
        print(f"\n{kind}, concurrency 1")
        await sequential(all_cases, args.requests, args.warmup)
        print(f"\n{kind}, concurrency {args.concurrency}")
        await concurrent(all_cases, args.requests, args.concurrency)
    await client.aclose_all()
    await sync_to_async(accounting.close_writer, thread_sensitive=False)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument(
        "--model",
        default="gpt-4o-mini",
        help="upstream model name; an OpenAI name makes context fitting use tiktoken",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    engine = setup_django()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, args.model, str(args.tokens)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        if args.uvloop:
            import uvloop

            uvloop.run(measure(port, args, engine))
        else:
            asyncio.run(measure(port, args, engine))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
