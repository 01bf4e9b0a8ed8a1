"""One monitor round over many endpoints: time per round and the monitor's memory.

Usage: ``.venv/bin/python bench/monitor_round.py [--endpoints 1000] [--rounds 5]
[--latency 0.0] [--hang 0] [--concurrency 50]``

Every endpoint points at one simulated upstream process under its own path
prefix (``/e/<n>/v1``). Each round claims, probes and records every endpoint,
exactly as ``manage.py monitor`` does, and is timed phase by phase. The data
goes to a fresh SQLite database in a temporary folder unless DATABASE_URL is
set (then use a scratch database: the benchmark's endpoints are deleted at the
end). ``--hang N`` makes N endpoints never answer, to show that the round is
bounded by MONITOR_PROBE_TIMEOUT, not by them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import percentile

ROOT = Path(__file__).resolve().parent.parent
SERVER = """
import asyncio, sys
from gateway.simulator import Behaviour, SimulatedUpstream

async def main():
    latency, hang = float(sys.argv[1]), int(sys.argv[2])
    upstream = SimulatedUpstream(behaviour=Behaviour(latency=latency))
    for n in range(1, hang + 1):
        upstream.set_behaviour(Behaviour(fault="stall"), prefix=f"e/{n}")
    async with upstream:
        print(upstream.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds")
    parser.add_argument("--hang", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    args = parser.parse_args()

    os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="llmsite-bench-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "llmsite.settings"
    os.environ["MONITOR_CONCURRENCY"] = str(args.concurrency)
    os.environ["MONITOR_PROBE_TIMEOUT"] = str(args.probe_timeout)
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))

    import django

    django.setup()
    from asgiref.sync import sync_to_async
    from django.conf import settings
    from django.core.management import call_command

    from gateway.models import Endpoint
    from monitoring import probes

    call_command("migrate", verbosity=0)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.latency), str(args.hang)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(server.stdout.readline())
    created = Endpoint.objects.bulk_create(
        Endpoint(
            name=f"bench-{n:05}",
            base_url=f"http://127.0.0.1:{port}/e/{n}/v1",
            api_key=f"sk-bench-{n:05}-0123456789abcdef",
        )
        for n in range(1, args.endpoints + 1)
    )
    baseline = rss_mib("VmRSS")

    async def one_round() -> dict[str, float]:
        started = time.perf_counter()
        targets = await sync_to_async(probes.claim_due)(force=True)
        claimed = time.perf_counter()
        outcomes = await probes.probe_all(targets)
        probed = time.perf_counter()
        await sync_to_async(probes.record)(outcomes)
        done = time.perf_counter()
        healthy = sum(o.status == "connected" for o in outcomes)
        return {
            "claim": claimed - started,
            "probe": probed - claimed,
            "record": done - probed,
            "total": done - started,
            "healthy": healthy,
        }

    async def run_all() -> list[dict[str, float]]:
        return [await one_round() for _ in range(args.rounds)]

    try:
        rounds = asyncio.run(run_all())
    finally:
        server.terminate()
        server.wait(timeout=10)
        Endpoint.objects.filter(pk__in=[e.pk for e in created]).delete()

    totals = [r["total"] for r in rounds]
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}, "
        f"{settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}"
    )
    print(
        f"endpoints: {args.endpoints}, concurrency: {args.concurrency}, "
        f"upstream latency: {args.latency * 1000:.0f} ms, hanging: {args.hang}, "
        f"probe timeout: {args.probe_timeout:g} s"
    )
    for i, r in enumerate(rounds, 1):
        print(
            f"round {i}: {r['total']:.2f} s (claim {r['claim']:.2f}, probe "
            f"{r['probe']:.2f}, record {r['record']:.2f}); "
            f"{int(r['healthy'])} connected"
        )
    print(
        f"per round: median {statistics.median(totals):.2f} s, "
        f"p99 {percentile(totals, 99):.2f} s, "
        f"{args.endpoints / statistics.median(totals):.0f} probes/s"
    )
    print(
        f"memory: {baseline:.0f} MiB before the rounds, "
        f"{rss_mib('VmRSS'):.0f} MiB after, peak {rss_mib('VmHWM'):.0f} MiB"
    )


if __name__ == "__main__":
    main()
