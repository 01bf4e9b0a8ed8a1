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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
LATENCY_CASES = (  # label, request kind, index into the Sample
    ("c=1 plain total", "plain", 1),
    ("c=1 first streamed chunk", "stream", 0),
    ("c=1 whole stream", "stream", 1),
)
RATE_CASES = (("plain requests/s", False), ("whole streams/s", True))


def rss_mib(pids: list[int]) -> float:
    """VmRSS of the web processes together."""
    total = 0.0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


class Target:
    """One side of the comparison: base URLs, headers and request counters.

    With several base URLs (one per web process) each new client takes the
    next one, so the load's connections are spread round-robin.
    """

    def __init__(self, bases: list[str], model: str, headers: dict[str, str]) -> None:
        self.bases = bases
        self.next_base = 0
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
        self.failure_kinds: Counter[str] = Counter()

    def failed(self, error: Exception) -> None:
        """A request without an answer: count it, and its kind for the report."""
        self.failures += 1
        self.failure_kinds[type(error).__name__] += 1

    def client(self) -> httpx.AsyncClient:
        base = self.bases[self.next_base % len(self.bases)]
        self.next_base += 1
        return httpx.AsyncClient(
            base_url=base,
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
            except httpx.HTTPError as error:  # counted by the target, no sample
                targets[name.split()[1]].failed(error)
                continue
            if round_ >= warmup:
                samples[name].append(sample)
    for client in clients.values():
        await client.aclose()
    return samples


async def throughput(
    target: Target, stream: bool, concurrency: int, seconds: float, pids: list[int]
) -> tuple[float, float]:
    """Completed requests per second, and the cores the web processes used."""
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
            except httpx.HTTPError as error:  # a timeout or a dropped connection
                target.failed(error)
                continue
            if measuring:
                done += 1

    def cpu() -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    # One second of warm-up (connections, caches), then the measured window.
    stop_at = time.perf_counter() + 1 + seconds
    tasks = [asyncio.create_task(worker(c)) for c in clients]
    await asyncio.sleep(1)
    measuring = True
    cpu0 = cpu()
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - t0
    cores = (cpu() - cpu0) / elapsed
    await asyncio.gather(*tasks)
    for client in clients:
        await client.aclose()
    return done / elapsed, cores


async def fill_to(target: Target, total: int, concurrency: int) -> None:
    """Send plain requests until ``target.sent`` reaches ``total``."""
    clients = [target.client() for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient) -> None:
        while target.sent < total:
            try:
                await target.post_plain(client)
            except httpx.HTTPError as error:
                target.failed(error)

    await asyncio.gather(*(worker(c) for c in clients))
    for client in clients:
        await client.aclose()


@dataclass
class Figures:
    """What one gateway measured against the upstream called directly."""

    direct: Target
    gateway: Target
    latency_ms: dict[str, tuple[list[float], list[float]]]  # (direct, gateway)
    rates: dict[str, tuple[float, float, float]]  # (direct, gateway, web cores)
    rss: list[tuple[str, float]]  # (after how many requests, MiB)

    def added_p50(self, label: str) -> float:
        direct, gateway = self.latency_ms[label]
        return statistics.median(gateway) - statistics.median(direct)


async def measure(
    args: argparse.Namespace, direct: Target, gateway: Target, pids: list[int]
) -> Figures:
    """Latency at concurrency 1, then throughput, then memory as requests add up."""
    rss = [("after start", rss_mib(pids))]
    samples = await latency(direct, gateway, args.latency_requests, args.warmup)
    latency_ms = {
        label: (
            [s[index] * 1000 for s in samples[f"{kind} direct"]],
            [s[index] * 1000 for s in samples[f"{kind} v1"]],
        )
        for label, kind, index in LATENCY_CASES
    }
    rates = {}
    for label, stream in RATE_CASES:
        direct_rate, _ = await throughput(
            direct, stream, args.concurrency, args.seconds, []
        )
        gateway_rate, cores = await throughput(
            gateway, stream, args.concurrency, args.seconds, pids
        )
        rates[label] = (direct_rate, gateway_rate, cores)
    rss.append((f"{gateway.sent:,} req", rss_mib(pids)))
    for mark in (5_000, 10_000, 20_000):
        if mark > args.rss_requests:
            break
        if gateway.sent < mark:
            await fill_to(gateway, mark, args.concurrency)
            rss.append((f"{mark // 1000}k req", rss_mib(pids)))
    for side, target in (("direct", direct), ("gateway", gateway)):
        if target.failures:
            kinds = ", ".join(f"{n} {k}" for k, n in target.failure_kinds.items())
            lost = f"{side}: {target.failures} without an answer: {kinds}"
            print(lost, file=sys.stderr)
    return Figures(direct, gateway, latency_ms, rates, rss)


def llmsite_env(data_dir: str) -> dict[str, str]:
    """The web processes' environment: limits counted but never refusing."""
    return {
        **os.environ,
        "DATA_DIR": data_dir,
        "DJANGO_SETTINGS_MODULE": "llmsite.settings",
        "RATE_LIMIT_RPM": "10000000",
        "RATE_LIMIT_TPM": "1000000000",
        "LOG_LEVEL": "WARNING",
        "DEBUG": "false",
    }


def start_upstream(
    procs: Processes, env: dict[str, str], core: str | None, tokens: int
) -> str:
    """The zero-latency simulated upstream; returns its /v1 base URL."""
    upstream = start_simulator(
        procs,
        [
            *("--port", str(free_port()), "--models", UPSTREAM_MODEL),
            *("--tokens-per-second", "0", "--completion-tokens", str(tokens)),
        ],
        env,
        prefix=("taskset", "-c", core) if core else (),
    )
    return upstream if upstream.endswith("/v1") else f"{upstream}/v1"


def prepare_database(env: dict[str, str], upstream: str, flush: bool) -> str:
    """Migrate (and empty, if asked) the database, add the bench model; the API key."""
    env = {**env, "BENCH_UPSTREAM": upstream}
    manage = [PYTHON, "manage.py"]
    subprocess.run([*manage, "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    if flush:
        subprocess.run(
            [*manage, "flush", "--no-input", "-v", "0"], cwd=ROOT, env=env, check=True
        )
    return subprocess.run(
        [*manage, "shell", "-c", SETUP],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]


def start_llmsite(
    procs: Processes, env: dict[str, str], server: str, cores: list[str]
) -> tuple[list[subprocess.Popen[str]], list[str], list[str]]:
    """One web process per core, each on its own port, all ready.

    Returns the processes, their base URLs and the first one's command line.
    """
    children, bases, argv = [], [], []
    for core in cores:
        port = free_port()
        argv = ["taskset", "-c", core, *web_argv(server, port)]
        children.append(procs.start(argv, env))
        bases.append(f"http://127.0.0.1:{port}")
    for child, base in zip(children, bases, strict=True):
        asyncio.run(wait_ready(f"{base}/healthz", child))
    return children, bases, argv


def rows(figures: Figures, concurrency: int, seconds: float) -> list[str]:
    """The v1_load table: direct against /v1, one figure a row."""
    table = []
    for label, (d, g) in figures.latency_ms.items():
        d50, g50 = statistics.median(d), statistics.median(g)
        table.append(
            f"| {label}, p50 / p99 ms | {d50:.2f} / {percentile(d, 99):.2f} "
            f"| {g50:.2f} / {percentile(g, 99):.2f} | +{g50 - d50:.2f} ms p50 |"
        )
    for label, (d_rate, g_rate, cores) in figures.rates.items():
        table.append(
            f"| c={concurrency} {label} ({seconds:g} s) | {d_rate:,.0f} "
            f"| {g_rate:,.0f} (web CPU {cores:.2f} core) | x{g_rate / d_rate:.2f} |"
        )
    rss_text = ", ".join(f"{name} {mib:.0f}" for name, mib in figures.rss)
    table.append(f"| web VmRSS MiB | - | {rss_text} | |")
    direct, gateway = figures.direct, figures.gateway
    table.append(
        f"| errors (non-200, cached, truncated) / no answer in {TIMEOUT:g} s "
        f"| {direct.errors} / {direct.failures} "
        f"| {gateway.errors} / {gateway.failures} of {gateway.sent:,} | |"
    )
    return table


def stop_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: the caller's finally block stops every child."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def add_load_arguments(parser: argparse.ArgumentParser, *, rss_requests: int) -> None:
    """The options of the load itself, shared with compare.py."""
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rss-requests", type=int, default=rss_requests)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    add_load_arguments(parser, rss_requests=20_000)
    parser.add_argument("--web-core", default="1")
    parser.add_argument("--client-core", default="0")
    args = parser.parse_args()

    command = "taskset -c {} .venv/bin/python bench/v1_load.py {}".format(
        args.client_core, " ".join(sys.argv[1:])
    )
    load_before = loadavg()
    os.sched_setaffinity(0, {int(c) for c in args.client_core.split(",")})
    data_dir = tempfile.mkdtemp(prefix="llmsite-v1load-")
    env = llmsite_env(data_dir)
    procs = Processes()
    stop_on_sigterm()
    try:
        upstream = start_upstream(procs, env, args.client_core, args.tokens)
        key = prepare_database(env, upstream, flush=False)
        (web,), bases, web_cmd = start_llmsite(procs, env, args.server, [args.web_core])
        direct = Target([upstream], UPSTREAM_MODEL, {})
        gateway = Target([f"{bases[0]}/v1"], MODEL, {"authorization": f"Bearer {key}"})
        started = time.perf_counter()
        figures = asyncio.run(measure(args, direct, gateway, [web.pid]))
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

    port = bases[0].rsplit(":", 1)[1]
    web_text = " ".join(web_cmd[3:]).replace(str(BIN) + "/", "").replace(port, "X")
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
    for row in rows(figures, args.concurrency, args.seconds):
        print(row)


if __name__ == "__main__":
    main()
