"""Measure the engine's added latency against calling the upstream directly.

Usage: ``.venv/bin/python bench/engine_overhead.py [--requests 2000] [--warmup 200]``

A zero-latency simulated upstream runs in its own process.  At concurrency 1,
the same requests go, interleaved so that drift hits both sides alike:

- direct: one httpx.AsyncClient posting to the upstream (the floor);
- engine: ``gateway.router`` (route query, breaker check, context fitting,
  token counting, pooled clients, SSE parsing, usage, response cache);
- engine, routes read every call: the same with GATEWAY_ROUTE_CACHE_SECONDS=0,
  which shows what the route query (and its thread hop) would cost.

Plain requests report the total time; streams report the time to the first
token and to the end.  Each line gives p50 and p99 in ms and the p50 added
over direct.  Limits and accounting are not part of the engine and not here.

The database is a throwaway SQLite file (DATA_DIR points at a temporary
directory), migrated at start.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
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

Sample = tuple[float, float]  # (first token or total, total), in seconds


def setup_django(settings_module: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    if "DATA_DIR" not in os.environ:
        data_dir = tempfile.mkdtemp(prefix="llmsite-bench-")
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        os.environ["DATA_DIR"] = data_dir
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


async def measure(port: int, args: argparse.Namespace) -> None:
    import httpx
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from gateway import client, router
    from gateway.models import Endpoint, ModelRoute
    from gateway.router import Delta

    base = f"http://127.0.0.1:{port}/v1"

    def create_route() -> None:
        endpoint = Endpoint.objects.create(name="bench", base_url=base)
        ModelRoute.objects.create(
            model_name=MODEL, endpoint=endpoint, upstream_model=args.model
        )

    await sync_to_async(create_route)()
    ttl = getattr(settings, "GATEWAY_ROUTE_CACHE_SECONDS", 1.0)
    body = json.dumps({"model": args.model, "messages": MESSAGES}).encode()
    stream_body = json.dumps(
        {
            "model": args.model,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    direct = httpx.AsyncClient(
        base_url=base, headers={"content-type": "application/json"}
    )

    async def direct_plain() -> Sample:
        started = time.perf_counter()
        response = await direct.post("/chat/completions", content=body)
        data = response.json()
        assert data["choices"][0]["message"]["content"]
        total = time.perf_counter() - started
        return total, total

    async def direct_stream() -> Sample:
        started = time.perf_counter()
        first = None
        async with direct.stream(
            "POST", "/chat/completions", content=stream_body
        ) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                if first is None and choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started

    def engine_plain(route_ttl: float) -> Callable[[], Awaitable[Sample]]:
        async def run() -> Sample:
            settings.GATEWAY_ROUTE_CACHE_SECONDS = route_ttl
            started = time.perf_counter()
            result = await router.complete_chat(MODEL, MESSAGES)
            assert result.ok, result.error
            total = time.perf_counter() - started
            return total, total

        return run

    def engine_stream(route_ttl: float) -> Callable[[], Awaitable[Sample]]:
        async def run() -> Sample:
            settings.GATEWAY_ROUTE_CACHE_SECONDS = route_ttl
            started = time.perf_counter()
            first = None
            stream = router.stream_chat(MODEL, MESSAGES)
            async for event in stream:
                if first is None and isinstance(event, Delta):
                    first = time.perf_counter() - started
            assert stream.result is not None and stream.result.ok
            return first or 0.0, time.perf_counter() - started

        return run

    cases: dict[str, Callable[[], Awaitable[Sample]]] = {
        "plain: direct httpx": direct_plain,
        "plain: engine": engine_plain(ttl),
        "plain: engine, routes every call": engine_plain(0),
        "stream: direct httpx": direct_stream,
        "stream: engine": engine_stream(ttl),
        "stream: engine, routes every call": engine_stream(0),
    }
    samples: dict[str, list[Sample]] = {name: [] for name in cases}
    for round_ in range(args.warmup + args.requests):
        # Interleaved, one of each per round, so drift hits every case alike.
        for name, case in cases.items():
            sample = await case()
            if round_ >= args.warmup:
                samples[name].append(sample)

    await direct.aclose()
    await client.aclose_all()

    print(
        f"engine overhead, concurrency 1, {args.requests} requests per case after "
        f"{args.warmup} warm-up, model {args.model}, {args.tokens} tokens per answer"
    )
    print(
        f"machine: {cpu_model()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"loop {'uvloop' if args.uvloop else 'asyncio'}"
    )
    print()
    header = f"{'case':<34} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'ratio':>6}"
    for kind, index, label in (
        ("plain", 1, "total"),
        ("stream", 0, "first token"),
        ("stream", 1, "whole stream"),
    ):
        print(f"{kind} - {label}")
        print(header)
        floor = statistics.median(s[index] for s in samples[f"{kind}: direct httpx"])
        for name in cases:
            if not name.startswith(kind):
                continue
            values = [s[index] * 1000 for s in samples[name]]
            p50 = statistics.median(values)
            p99 = percentile(values, 99)
            added = p50 - floor * 1000
            print(
                f"{name:<34} {p50:>8.2f} {p99:>8.2f} {added:>+8.2f} "
                f"{p50 / (floor * 1000):>6.2f}"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument(
        "--model",
        default="gpt-4o-mini",
        help="upstream model name; an OpenAI name makes context fitting use tiktoken",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--settings", default="llmsite.settings")
    args = parser.parse_args()
    setup_django(args.settings)
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

            uvloop.run(measure(port, args))
        else:
            asyncio.run(measure(port, args))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
