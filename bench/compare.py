"""Compare /v1 on daphne and uvicorn, the LiteLLM proxy and the upstream, in one run.

Usage::

    .venv/bin/python bench/compare.py [--seconds 10] [--latency-requests 500]
        [--rss-requests 10000] [--servers daphne,uvicorn] [--no-litellm]
    .venv/bin/python bench/compare.py --processes 2 \\
        --database-url postgres://... --redis-url redis://...

The same load as ``v1_load.py`` (whose functions this reuses) goes to each
gateway in turn, one at a time, against one zero-latency simulated upstream
started once: llmsite ``/v1`` on daphne, on uvicorn, the floor under them (a
bare Django async proxy on the same server and httpx, ``floor_proxy.py``;
``--floor daphne,uvicorn`` or ``none``), and the LiteLLM proxy
(``litellm[proxy]==1.108.7``, one worker, no database, a master key, a model
entry pointing at the same upstream, ``LITELLM_LOCAL_MODEL_COST_MAP=True``).
Each gateway's latency is interleaved with direct calls to the upstream, and
its added latency is against those. The web process is pinned to core 1, the
simulator and this client to core 0.

LiteLLM runs from the interop tests' cached virtualenv (``scripts/peers.py``:
``~/.cache/llmsite/peers/litellm-1.108.7``), built here on first use (pip's
output is shown); if that fails, LiteLLM is skipped with a message and the rest
still runs.

``--processes 2`` measures how far a second web process goes: each llmsite
server with one and then two processes on PostgreSQL and Redis (the database
given is emptied first). The two processes listen on two ports, pinned to
cores 0 and 1, and the client spreads its connections over both
round-robin; daphne has no ``--workers``, and two ports keep both servers on
the same footing and the split even. The client and simulator are not pinned
in this mode: they share both cores with the web processes. LiteLLM is
left out of this mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    BIN,
    ROOT,
    Processes,
    cpu_model,
    free_port,
    loadavg,
    wait_ready,
)

# The LiteLLM peer is built and started by scripts/peers.py, from the root.
sys.path.insert(0, str(ROOT))

from v1_load import (
    MODEL,
    UPSTREAM_MODEL,
    Figures,
    Target,
    add_load_arguments,
    llmsite_env,
    measure,
    prepare_database,
    start_llmsite,
    start_upstream,
    stop_on_sigterm,
)

from scripts import peers

# 1.108.7 refuses to start without a master key.
LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{upstream_model}
      api_base: {upstream}
      api_key: x
general_settings:
  master_key: {key}
"""
BENCH = Path(__file__).resolve().parent
CLIENT_CORE = "0"
WEB_CORE = "1"


@dataclass
class Result:
    """One column of the table."""

    name: str
    figures: Figures


def litellm_built() -> bool:
    """Whether the proxy can run, building it on first use; False if that fails."""
    try:
        peers.build("litellm")
    except peers.BuildFailed as exc:
        print(f"LiteLLM skipped: {exc}", file=sys.stderr)
        return False
    return True


def start_litellm(
    procs: Processes, upstream: str, workdir: Path
) -> tuple[subprocess.Popen[str], str, str]:
    """One LiteLLM proxy worker on the web core; its process, base URL and key."""
    key = f"sk-{secrets.token_hex(32)}"
    config = workdir / "litellm.yaml"
    config.write_text(
        LITELLM_CONFIG.format(
            model=MODEL, upstream_model=UPSTREAM_MODEL, upstream=upstream, key=key
        )
    )
    port = free_port()
    argv = ["taskset", "-c", WEB_CORE, *peers.litellm_argv(config, port)]
    child = procs.start(argv, peers.litellm_env())
    base = f"http://127.0.0.1:{port}"
    asyncio.run(wait_ready(f"{base}/health/liveliness", child, seconds=120))
    return child, base, key


def run_llmsite(
    args: argparse.Namespace,
    procs: Processes,
    env: dict[str, str],
    upstream: str,
    key: str,
    server: str,
    cores: list[str],
) -> Figures:
    children, bases, _ = start_llmsite(procs, env, server, cores)
    gateway = Target(
        [f"{base}/v1" for base in bases], MODEL, {"authorization": f"Bearer {key}"}
    )
    direct = Target([upstream], UPSTREAM_MODEL, {})
    try:
        return asyncio.run(measure(args, direct, gateway, [c.pid for c in children]))
    finally:
        for child in children:
            procs.stop(child)


def run_floor(
    args: argparse.Namespace, procs: Processes, upstream: str, server: str
) -> Figures:
    """The bare Django proxy (floor_proxy.py) on one server, on the web core."""
    port = free_port()
    if server == "daphne":
        serve = [str(BIN / "daphne"), "-v", "0", "-b", "127.0.0.1", "-p", str(port)]
    else:
        serve = [str(BIN / "uvicorn"), "--port", str(port), "--no-access-log"]
        serve += ["--loop", "uvloop", "--http", "httptools"]
    argv = ["taskset", "-c", WEB_CORE, *serve, "floor_proxy:application"]
    env = {**os.environ, "FLOOR_UPSTREAM": upstream, "PYTHONPATH": str(BENCH)}
    child = procs.start(argv, env)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(f"{base}/healthz", child))
        gateway = Target([f"{base}/v1"], UPSTREAM_MODEL, {})
        direct = Target([upstream], UPSTREAM_MODEL, {})
        return asyncio.run(measure(args, direct, gateway, [child.pid]))
    finally:
        procs.stop(child)


def run_litellm(
    args: argparse.Namespace, procs: Processes, upstream: str, workdir: Path
) -> Figures:
    child, base, key = start_litellm(procs, upstream, workdir)
    gateway = Target([f"{base}/v1"], MODEL, {"authorization": f"Bearer {key}"})
    direct = Target([upstream], UPSTREAM_MODEL, {})
    try:
        return asyncio.run(measure(args, direct, gateway, [child.pid]))
    finally:
        procs.stop(child)


def table(results: list[Result], concurrency: int) -> list[str]:
    """One column per gateway; direct figures are over all the runs."""
    head = ["figure", "upstream direct", *(r.name for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def add(label: str, direct: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([label, direct, *cells]) + " |")

    for label, name in (
        ("c=1 plain total", "plain, added latency p50, c=1"),
        ("c=1 first streamed chunk", "stream, added time to first token p50, c=1"),
    ):
        direct_p50 = [
            statistics.median(r.figures.latency_ms[label][0]) for r in results
        ]
        add(
            name,
            f"{statistics.median(direct_p50):.2f} ms absolute",
            [f"+{r.figures.added_p50(label):.2f} ms" for r in results],
        )
    for label in ("plain requests/s", "whole streams/s"):
        direct_rates = [r.figures.rates[label][0] for r in results]
        cells = []
        for result in results:
            _, rate, cores = result.figures.rates[label]
            cells.append(f"{rate:,.0f} ({cores:.2f} core)")
        add(
            f"{label}, c={concurrency}",
            f"{min(direct_rates):,.0f} to {max(direct_rates):,.0f}",
            cells,
        )
    add(
        "RSS MiB: at start, after the run",
        "",
        [f"{r.figures.rss[0][1]:.0f}, {r.figures.rss[-1][1]:.0f}" for r in results],
    )
    add(
        "requests sent; errors / no answer",
        "",
        [
            f"{r.figures.gateway.sent:,}; {r.figures.gateway.errors} / "
            f"{r.figures.gateway.failures}"
            for r in results
        ],
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="daphne,uvicorn")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--floor",
        default="uvicorn",
        help="servers for the bare Django proxy (floor_proxy.py), or 'none'",
    )
    parser.add_argument("--processes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--database-url", help="PostgreSQL for --processes 2")
    parser.add_argument("--redis-url", help="Redis for --processes 2")
    add_load_arguments(parser, rss_requests=10_000)
    args = parser.parse_args()
    servers = args.servers.split(",")
    if args.processes == 2 and not (args.database_url and args.redis_url):
        parser.error("--processes 2 needs --database-url and --redis-url")

    command = " ".join([".venv/bin/python bench/compare.py", *sys.argv[1:]])
    load_before = loadavg()
    pinned = args.processes == 1
    if pinned:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-compare-"))
    env = llmsite_env(str(workdir))
    if args.processes == 2:
        env |= {"DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url}
    litellm = not args.no_litellm and pinned and litellm_built()
    procs = Processes()
    stop_on_sigterm()
    results: list[Result] = []
    started = time.perf_counter()
    try:
        upstream = start_upstream(
            procs, env, CLIENT_CORE if pinned else None, args.tokens
        )
        key = prepare_database(env, upstream, flush=args.processes == 2)
        for server in servers:
            for count in range(1, args.processes + 1):
                cores = [WEB_CORE] if count == 1 else ["0", "1"]
                name = f"llmsite {server}" + (f" x{count}" if not pinned else "")
                print(f"measuring {name}", file=sys.stderr)
                figures = run_llmsite(args, procs, env, upstream, key, server, cores)
                results.append(Result(name, figures))
        floors = [] if args.floor == "none" or not pinned else args.floor.split(",")
        for server in floors:
            print(f"measuring the bare Django proxy on {server}", file=sys.stderr)
            figures = run_floor(args, procs, upstream, server)
            results.append(Result(f"bare Django proxy, {server}", figures))
        if litellm:
            print("measuring LiteLLM", file=sys.stderr)
            figures = run_litellm(args, procs, upstream, workdir)
            results.append(Result(f"LiteLLM {peers.LITELLM_VERSION}", figures))
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    placement = (
        f"web process on core {WEB_CORE}, simulator and client on core {CLIENT_CORE}"
        if pinned
        else "web processes on cores 0 and 1, simulator and client unpinned"
    )
    database = "PostgreSQL + Redis" if args.processes == 2 else "SQLite, local memory"
    print(f"`{command}` ({time.perf_counter() - started:.0f} s)")
    print()
    print(
        f"{placement}; {database}; zero-latency simulator, {args.tokens} tokens; "
        f"{args.latency_requests} rounds at c=1, {args.seconds:g} s windows at "
        f"c={args.concurrency}, RSS after {args.rss_requests:,} requests"
    )
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, httpx {httpx.__version__}; load average "
        f"before {load_before}, after {loadavg()}"
    )
    print()
    for line in table(results, args.concurrency):
        print(line)


if __name__ == "__main__":
    main()
