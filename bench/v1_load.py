"""Load /v1/chat/completions through a real web server, against the upstream direct.

Usage::

    .venv/bin/python bench/v1_load.py --server daphne|uvicorn [--seconds 10]
        [--concurrency 50] [--latency-requests 500] [--rss-requests 20000]

Processes (all started here and stopped at the end, also on Ctrl-C):

- a zero-latency simulated upstream (``manage.py simulate_upstream``, unpaced,
  20 tokens per answer), pinned to core 0;
- one web process serving llmsite, pinned to core 1 with ``taskset -c 1``:
  ``daphne`` or ``uvicorn --loop uvloop --http httptools --no-access-log``;
- the load client (this process), pinned to core 0, several asyncio workers
  each with its own ``httpx.AsyncClient``.

The database is a throwaway SQLite DATA_DIR, migrated, with one endpoint, one
route, one user and one API key. RATE_LIMIT_RPM and RATE_LIMIT_TPM are set so
high that limits are counted on every request but never refuse.

Figures, side by side in one run (gateway against the same request sent to the
simulator directly):

(a) concurrency 1, interleaved: plain total, time to the first streamed content
    chunk, whole stream; p50 and p99.
(b) concurrency N for S seconds each: plain requests/s and whole streams/s, with
    the web process's CPU use over the window (1.00 = one core saturated).
(c) VmRSS of the web process after 5k, 10k and 20k requests through /v1
    (counting the requests of (a) and (b)).

The direct figures must be far above the gateway's, or the client (which shares
core 0 with the simulator) is the bottleneck and the ratios mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from common import (
    MESSAGES,
    ROOT,
    Processes,
    cpu_model,
    cpu_seconds,
    free_port,
    loadavg,
    percentile,
    start_simulator,
    wait_ready,
    web_argv,
)

PYTHON = sys.executable
BIN = Path(PYTHON).parent
UPSTREAM_MODEL = "sim-small"
MODEL = "bench-model"
SETUP = f"""
from django.contrib.auth import get_user_model
from gateway.models import ApiKey, Endpoint, ModelRoute
import os
endpoint = Endpoint.objects.create(name="bench", base_url=os.environ["BENCH_UPSTREAM"])
ModelRoute.objects.create(
    model_name="{MODEL}", endpoint=endpoint, upstream_model="{UPSTREAM_MODEL}"
)
user = get_user_model().objects.create_user("bench", password="bench-pass-123")
key, raw = ApiKey.generate(user, "bench")
print(raw)
"""

TIMEOUT = 10.0  # seconds; a request without an answer by then is a failure
Sample = tuple[float, float]  # (total or first chunk, total), seconds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Target:
    """One side of the comparison: a base URL, headers and a request counter."""

    def __init__(self, base: str, model: str, headers: dict[str, str]) -> None:
        self.base = base
        self.headers = {"content-type": "application/json", **headers}
        self.plain = json.dumps({"model": model, "messages": MESSAGES}).encode()
        self.stream = json.dumps(
            {
                "model": model,
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        self.sent = 0
        self.errors = 0  # answers that were not a fresh 200 or were truncated
        self.failures = 0  # no answer: timeouts, dropped connections

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            headers=self.headers,
            timeout=TIMEOUT,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    async def post_plain(self, client: httpx.AsyncClient) -> Sample:
        started = time.perf_counter()
        self.sent += 1
        response = await client.post("/chat/completions", content=self.plain)
        total = time.perf_counter() - started
        cached = response.headers.get("x-llmsite-cached", "false") != "false"
        if response.status_code != 200 or cached:
            self.errors += 1
        return total, total

    async def post_stream(self, client: httpx.AsyncClient, parse: bool) -> Sample:
        started = time.perf_counter()
        first = 0.0
        self.sent += 1
        async with client.stream(
            "POST", "/chat/completions", content=self.stream
        ) as response:
            if response.status_code != 200:
                self.errors += 1
            if parse:
                async for line in response.aiter_lines():
                    if (
                        not first
                        and line.startswith('data: {"')
                        and '"content"' in line
                    ):
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            first = time.perf_counter() - started
            else:
                tail = b""
                async for chunk in response.aiter_raw():
                    tail = (tail + chunk)[-32:]
                if b"[DONE]" not in tail:
                    self.errors += 1
        return first, time.perf_counter() - started


async def latency(
    direct: Target, gateway: Target, rounds: int, warmup: int
) -> dict[str, list[Sample]]:
    clients = {"direct": direct.client(), "v1": gateway.client()}
    targets = {"direct": direct, "v1": gateway}
    cases: dict[str, Callable[[], Awaitable[Sample]]] = {}
    for side in ("direct", "v1"):
        target, client = targets[side], clients[side]
        cases[f"plain {side}"] = lambda t=target, c=client: t.post_plain(c)
        cases[f"stream {side}"] = lambda t=target, c=client: t.post_stream(c, True)
    samples: dict[str, list[Sample]] = {name: [] for name in cases}
    for round_ in range(warmup + rounds):
        for name, case in cases.items():
            try:
                sample = await case()
            except httpx.HTTPError:  # counted by the target, no sample
                targets[name.split()[1]].failures += 1
                continue
            if round_ >= warmup:
                samples[name].append(sample)
    for client in clients.values():
        await client.aclose()
    return samples


async def throughput(
    target: Target, stream: bool, concurrency: int, seconds: float, pid: int | None
) -> tuple[float, float | None]:
    """Completed requests per second, and the web process's cores used."""
    clients = [target.client() for _ in range(concurrency)]
    done = 0
    measuring = False
    stop_at = 0.0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            try:
                if stream:
                    await target.post_stream(client, False)
                else:
                    await target.post_plain(client)
            except httpx.HTTPError:  # a timeout or a dropped connection
                target.failures += 1
                continue
            if measuring:
                done += 1

    # One second of warm-up (connections, caches), then the measured window.
    stop_at = time.perf_counter() + 1 + seconds
    tasks = [asyncio.create_task(worker(c)) for c in clients]
    await asyncio.sleep(1)
    measuring = True
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else None
    await asyncio.gather(*tasks)
    for client in clients:
        await client.aclose()
    return done / elapsed, cpu


async def fill_to(target: Target, total: int, concurrency: int) -> None:
    """Send plain requests until ``target.sent`` reaches ``total``."""
    clients = [target.client() for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        while target.sent < total:
            try:
                await target.post_plain(client)
            except httpx.HTTPError:
                target.failures += 1

    await asyncio.gather(*(worker(c) for c in clients))
    for client in clients:
        await client.aclose()


async def measure(
    args: argparse.Namespace, upstream: str, web: str, key: str, pid: int
) -> list[str]:
    direct = Target(upstream, UPSTREAM_MODEL, {})
    gateway = Target(f"{web}/v1", MODEL, {"authorization": f"Bearer {key}"})
    rows: list[str] = []
    rss = [("after start", rss_mib(pid))]

    lat = await latency(direct, gateway, args.latency_requests, args.warmup)
    for label, kind, index in (
        ("c=1 plain total", "plain", 1),
        ("c=1 first streamed chunk", "stream", 0),
        ("c=1 whole stream", "stream", 1),
    ):
        d = [s[index] * 1000 for s in lat[f"{kind} direct"]]
        g = [s[index] * 1000 for s in lat[f"{kind} v1"]]
        d50, g50 = statistics.median(d), statistics.median(g)
        rows.append(
            f"| {label}, p50 / p99 ms | {d50:.2f} / {percentile(d, 99):.2f} "
            f"| {g50:.2f} / {percentile(g, 99):.2f} | +{g50 - d50:.2f} ms p50 |"
        )

    for label, stream in (("plain requests/s", False), ("whole streams/s", True)):
        d_rate, _ = await throughput(
            direct, stream, args.concurrency, args.seconds, None
        )
        g_rate, cpu = await throughput(
            gateway, stream, args.concurrency, args.seconds, pid
        )
        rows.append(
            f"| c={args.concurrency} {label} ({args.seconds:g} s) | {d_rate:,.0f} "
            f"| {g_rate:,.0f} (web CPU {cpu:.2f} core) | x{g_rate / d_rate:.2f} |"
        )
    rss.append((f"{gateway.sent:,} req", rss_mib(pid)))

    for mark in (5_000, 10_000, 20_000):
        if mark > args.rss_requests:
            break
        if gateway.sent < mark:
            await fill_to(gateway, mark, args.concurrency)
            rss.append((f"{mark // 1000}k req", rss_mib(pid)))
    rss_text = ", ".join(f"{name} {mib:.0f}" for name, mib in rss)
    rows.append(f"| web VmRSS MiB | - | {rss_text} | |")
    rows.append(
        f"| errors (non-200, cached, truncated) / no answer in {TIMEOUT:g} s "
        f"| {direct.errors} / {direct.failures} "
        f"| {gateway.errors} / {gateway.failures} of {gateway.sent:,} | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rss-requests", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument("--web-core", default="1")
    parser.add_argument("--client-core", default="0")
    args = parser.parse_args()

    command = "taskset -c {} .venv/bin/python bench/v1_load.py {}".format(
        args.client_core, " ".join(sys.argv[1:])
    )
    load_before = loadavg()
    os.sched_setaffinity(0, {int(c) for c in args.client_core.split(",")})
    data_dir = tempfile.mkdtemp(prefix="llmsite-v1load-")
    env = {
        **os.environ,
        "DATA_DIR": data_dir,
        "DJANGO_SETTINGS_MODULE": "llmsite.settings",
        "RATE_LIMIT_RPM": "10000000",
        "RATE_LIMIT_TPM": "1000000000",
        "LOG_LEVEL": "WARNING",
        "DEBUG": "false",
    }
    procs = Processes()
    # SIGTERM behaves like Ctrl-C: the finally block stops every child.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        upstream = start_simulator(
            procs,
            [
                *("--port", str(free_port()), "--models", UPSTREAM_MODEL),
                *("--tokens-per-second", "0", "--completion-tokens", str(args.tokens)),
            ],
            env,
            prefix=("taskset", "-c", args.client_core),
        )
        if not upstream.endswith("/v1"):
            upstream += "/v1"
        env["BENCH_UPSTREAM"] = upstream
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True
        )
        key = subprocess.run(
            [PYTHON, "manage.py", "shell", "-c", SETUP],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        port = free_port()
        web_cmd = ["taskset", "-c", args.web_core, *web_argv(args.server, port)]
        web = procs.start(web_cmd, env)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(f"{base}/healthz", web))
        started = time.perf_counter()
        rows = asyncio.run(measure(args, upstream, base, key, web.pid))
        elapsed = time.perf_counter() - started
        procs.stop(web)  # a clean shutdown writes the queued usage records
        with sqlite3.connect(Path(data_dir) / "db.sqlite3") as db:
            (records,) = db.execute(
                "SELECT COUNT(*) FROM gateway_usagerecord"
            ).fetchone()
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)

    web_text = " ".join(web_cmd[3:]).replace(str(BIN) + "/", "").replace(str(port), "X")
    print(f"### /v1 load, {args.server}, web on core {args.web_core}")
    print()
    print(f"`{command}` ({elapsed:.0f} s)")
    print()
    print(f"web: `taskset -c {args.web_core} {web_text}`; upstream: ", end="")
    print(
        f"`manage.py simulate_upstream --models {UPSTREAM_MODEL}` (zero latency, ",
        end="",
    )
    print(f"unpaced, {args.tokens} tokens) and client on core {args.client_core}")
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, httpx {httpx.__version__}; load average "
        f"before {load_before}, after {loadavg()}; usage records written {records:,}"
    )
    print()
    print("| figure | direct to simulator | through /v1 | added |")
    print("|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
