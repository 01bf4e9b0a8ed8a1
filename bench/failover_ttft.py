"""Time to the first token through /v1 when a model's primary endpoint fails.

Usage::

    .venv/bin/python bench/failover_ttft.py [--modes healthy,503,refused,direct]
        [--repeat 5] [--max-wait 130] [--plain] [--server daphne|uvicorn]

What a caller of ``/v1/chat/completions`` waits for when the first endpoint of
a model is down, for each way it can be down:

- ``healthy``: the primary answers (the baseline through the gateway);
- ``503``: the primary answers every request with a 503;
- ``refused``: nothing listens on the primary's port (a socket is bound there
  and never listens, so the connection is refused and no other program can
  take the port during the run);
- ``hung``: the primary accepts the request and never sends a byte;
- ``429``: the primary answers 429 with ``Retry-After: 60``;
- ``direct``: the same request sent straight to the fallback's simulator, no
  gateway (the floor any failover is measured against).

Setup, as ``make run`` has it: a throwaway SQLite DATA_DIR, migrated, and
``manage.py setup_demo`` itself registers the primary and fallback endpoints
of ``demo-chat`` (so every Endpoint and ModelRoute field is what the demo
gets: the fields it sets, and the models' defaults for the rest, including
fields added later); two simulated upstreams (``manage.py simulate_upstream``),
one per endpoint, on the free ports handed to ``setup_demo``; one web process serving
``llmsite.asgi`` (daphne, as ``make run`` starts it, or uvicorn); a user with
a personal API key. The monitor is not started: its probes would change the
endpoints' state between runs. RATE_LIMIT_RPM is raised so the limits are
counted but never refuse.

Each run starts from the endpoints' rows as ``setup_demo`` left them: every
column of every Endpoint and ModelRoute row is written back (breaker counters,
``disabled_until``, health, and whatever per-endpoint state is added later),
then the mode is applied (the primary simulator's behaviour under its
``/primary`` prefix through ``/_sim/behaviour``, or the primary's base URL),
and the script waits out the web process's route cache so it reads the fresh
rows. So every run is a first failure, never a breaker already open.

Figures per mode: the time from sending the streamed request to the first
content delta (``--plain``: the total time of the plain request), median,
minimum and maximum over ``--repeat`` runs, and which endpoint answered
(``X-LLMSite-Endpoint``). A run without an answer within ``--max-wait``
seconds counts as that many seconds and is printed as ">=".
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from common import (
    MESSAGES,
    ROOT,
    Processes,
    cpu_model,
    free_port,
    loadavg,
    start_simulator,
    wait_ready,
    web_argv,
)

# How the primary simulator misbehaves, as /_sim/behaviour objects. "hung"
# holds the response headers back for an hour: the request is accepted and
# read, and nothing comes back.
PRIMARY_BEHAVIOURS: dict[str, dict[str, Any]] = {
    "healthy": {},
    "503": {"fault": "status", "fault_status": 503},
    "refused": {},
    "hung": {"latency": 3600},
    "429": {"fault": "status", "fault_status": 429, "retry_after": 60},
    "direct": {},
}
MODES = tuple(PRIMARY_BEHAVIOURS)
PRIMARY, FALLBACK = "demo-primary", "demo-fallback"
# After the first token, how long the rest of a streamed answer may take.
TAIL = 30.0
# Added to the route cache's lifetime before a run, so the web process has
# dropped the snapshot it took of the previous run's rows.
CACHE_MARGIN = 0.3


@dataclass
class Run:
    seconds: float | None  # None: no answer within --max-wait
    answered_by: str  # the X-LLMSite-Endpoint header
    ok: bool  # a 200 with content


@dataclass
class Bench:
    web: str
    key: str
    primary_sim: str  # the primary simulator's root URL
    fallback_url: str  # the fallback endpoint's base URL (direct mode)
    upstream_model: str
    closed_url: str  # a base URL on which connections are refused
    max_wait: float
    plain: bool
    settle: float


def setup_django() -> None:
    """Django in this process, on the DATA_DIR the environment names."""
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def seed(primary_port: int, fallback_port: int) -> str:
    """Migrate, seed the demo as ``make run`` does, and return a raw API key."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from gateway.models import ApiKey

    call_command("migrate", verbosity=0)
    # setup_demo prints the admin password it made up; nobody needs it here.
    call_command(
        "setup_demo",
        primary_port=primary_port,
        fallback_port=fallback_port,
        stdout=io.StringIO(),
    )
    user = get_user_model().objects.create_user("bench", password="bench-pass-123")
    _, raw = ApiKey.generate(user, "failover")
    return raw


def snapshot() -> dict[type, dict[int, dict[str, Any]]]:
    """Every column of every Endpoint and ModelRoute row, by model and pk."""
    from gateway.models import Endpoint, ModelRoute

    rows: dict[type, dict[int, dict[str, Any]]] = {}
    for model in (Endpoint, ModelRoute):
        fields = [f.attname for f in model._meta.concrete_fields if not f.primary_key]
        rows[model] = {
            obj.pk: {name: getattr(obj, name) for name in fields}
            for obj in model.objects.all()
        }
    return rows


def restore(rows: dict[type, dict[int, dict[str, Any]]]) -> None:
    """Write the snapshot back: a fresh breaker and health for every endpoint.

    ``update()`` sends no signal, which is right: the web process forgets its
    route snapshots on its own when their lifetime ends, and the caller waits
    for that.
    """
    for model, by_pk in rows.items():
        for pk, values in by_pk.items():
            model.objects.filter(pk=pk).update(**values)


def endpoint_settings(name: str) -> str:
    """The endpoint's configuration as stored, for the report."""
    from gateway.models import Endpoint

    endpoint = Endpoint.objects.get(name=name)
    skip = ("id", "name", "base_url")
    values = [
        f"{f.name}={getattr(endpoint, f.attname)}"
        for f in Endpoint._meta.concrete_fields
        if f.name not in skip
        and not f.name.endswith(("_encrypted", "_at", "_until", "_ms"))
        and f.name not in ("status", "consecutive_failures", "probe_failures")
    ]
    return ", ".join(values)


async def prepare(bench: Bench, mode: str, rows: dict) -> None:
    """Reset every endpoint's state, then make the primary fail as ``mode`` says."""
    from asgiref.sync import sync_to_async

    from gateway.models import Endpoint

    def reset() -> None:
        restore(rows)
        if mode == "refused":
            Endpoint.objects.filter(name=PRIMARY).update(base_url=bench.closed_url)

    await sync_to_async(reset)()
    behaviour = PRIMARY_BEHAVIOURS[mode]
    async with httpx.AsyncClient(base_url=bench.primary_sim, timeout=5) as sim:
        if behaviour:
            response = await sim.post("/primary/_sim/behaviour", json=behaviour)
        else:
            response = await sim.post("/primary/_sim/reset")
        response.raise_for_status()
    await asyncio.sleep(bench.settle)


async def one_run(bench: Bench, mode: str) -> Run:
    if mode == "direct":
        url = f"{bench.fallback_url}/chat/completions"
        model, headers = bench.upstream_model, {}
    else:
        url = f"{bench.web}/v1/chat/completions"
        model, headers = "demo-chat", {"authorization": f"Bearer {bench.key}"}
    body: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if not bench.plain:
        body["stream"] = True
    # A fresh client per run: a capped run leaves no half-read connection behind.
    async with httpx.AsyncClient(timeout=None, headers=headers) as client:
        started = time.perf_counter()
        seconds: float | None = None
        try:
            async with asyncio.timeout(bench.max_wait) as deadline:
                if bench.plain:
                    response = await client.post(url, json=body)
                    seconds = time.perf_counter() - started
                    return Run(seconds, answered(mode, response), has_content(response))
                async with client.stream("POST", url, json=body) as response:
                    lines = response.aiter_lines()
                    if response.status_code == 200:
                        seconds = await first_content(lines, started)
                    # The rest is read to the end, so the gateway finishes the
                    # request as it would for any caller; it is not timed.
                    deadline.reschedule(asyncio.get_running_loop().time() + TAIL)
                    async for _ in lines:
                        pass
        except TimeoutError:
            if seconds is None:
                return Run(None, "-", False)
    if seconds is None:  # an error status, an error event or an empty answer
        return Run(time.perf_counter() - started, answered(mode, response), False)
    return Run(seconds, answered(mode, response), True)


def has_content(response: httpx.Response) -> bool:
    if response.status_code != 200:
        return False
    try:
        return bool(response.json()["choices"][0]["message"]["content"])
    except (ValueError, LookupError, TypeError):
        return False


async def first_content(lines: AsyncIterator[str], started: float) -> float | None:
    """Seconds to the first SSE event with a non-empty content delta, if any."""
    async for line in lines:
        if not line.startswith("data: {"):
            continue
        choices = json.loads(line[6:]).get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            return time.perf_counter() - started
    return None


def answered(mode: str, response: httpx.Response) -> str:
    if mode == "direct":
        return "fallback, direct"
    return response.headers.get("x-llmsite-endpoint") or "-"


async def measure(bench: Bench, modes: list[str], repeat: int, rows: dict) -> dict:
    results: dict[str, list[Run]] = {mode: [] for mode in modes}
    # One request through a healthy primary first: the web process's first
    # request loads what later ones reuse (token encodings, connections).
    await prepare(bench, "healthy", rows)
    await one_run(bench, "healthy")
    for mode in modes:
        for index in range(repeat):
            await prepare(bench, mode, rows)
            run = await one_run(bench, mode)
            results[mode].append(run)
            shown = f"{run.seconds:.3f} s" if run.seconds is not None else "capped"
            print(
                f"{mode} {index + 1}/{repeat}: {shown}, {run.answered_by}",
                file=sys.stderr,
                flush=True,
            )
            if run.seconds is None:
                # The gateway sees the client leave and ends the request; let
                # it finish before the next run resets the rows under it.
                await asyncio.sleep(2)
    return results


def fmt(value: float, capped: bool) -> str:
    text = f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f">= {text}" if capped else text


def table(results: dict[str, list[Run]], max_wait: float, plain: bool) -> list[str]:
    what = "plain request, total" if plain else "streamed, first content delta"
    lines = [
        f"| primary | runs | {what}: median | min | max | answered by "
        "| no answer or error |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, runs in results.items():
        values = sorted(r.seconds if r.seconds is not None else max_wait for r in runs)
        capped = {max_wait} if any(r.seconds is None for r in runs) else set()
        median = statistics.median(values)
        by = ", ".join(sorted({r.answered_by for r in runs if r.seconds is not None}))
        failed = sum(not r.ok for r in runs)
        lines.append(
            f"| {mode} | {len(runs)} | {fmt(median, median in capped)} "
            f"| {fmt(values[0], values[0] in capped)} "
            f"| {fmt(values[-1], values[-1] in capped)} | {by or '-'} | {failed} |"
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join(MODES)} (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per mode")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="seconds after which a run counts as '>= max-wait' (default: "
        "GATEWAY_REQUEST_MAX_SECONDS's default, the longest a request may take)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="time the plain request's total instead of the streamed first token",
    )
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="daphne")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=0.0,
        help="the simulators' pace (make run: 25); 0 = unpaced",
    )
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose of {MODES}")
    if not 1 <= args.repeat <= 1000:
        parser.error("--repeat must be 1..1000")
    if not 0 < args.max_wait <= 3600:
        parser.error("--max-wait must be in (0, 3600]")
    if not 0 <= args.tokens_per_second <= 10_000:
        parser.error("--tokens-per-second must be 0..10000")
    return args


def main() -> None:
    args = parse_args()
    command = "{} bench/failover_ttft.py {}".format(
        ".venv/bin/python", " ".join(sys.argv[1:])
    ).rstrip()
    load_before = loadavg()
    data_dir = tempfile.mkdtemp(prefix="llmsite-failover-")
    for name in ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL"):
        os.environ.pop(name, None)  # only the two demo endpoints
    os.environ.update(
        {
            "DATA_DIR": data_dir,
            "DJANGO_SETTINGS_MODULE": "llmsite.settings",
            "RATE_LIMIT_RPM": "1000000",
            "LOG_LEVEL": "WARNING",
            "DEBUG": "false",
        }
    )
    env = dict(os.environ)
    primary_port, fallback_port = free_port(), free_port()
    # Bound and never listening: connecting to it is refused, and the port
    # stays ours for the whole run.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        setup_django()
        from django.conf import settings

        key = seed(primary_port, fallback_port)
        from gateway.models import Endpoint

        rows = snapshot()
        fallback = Endpoint.objects.get(name=FALLBACK)
        upstream_model = fallback.routes.get().upstream_model
        settings_text = endpoint_settings(PRIMARY)
        # Both as make run starts them, each on the port setup_demo gave it.
        for sim_port in (primary_port, fallback_port):
            start_simulator(
                procs,
                [
                    *("--port", str(sim_port), "--models", "sim-small,sim-large"),
                    *("--tokens-per-second", f"{args.tokens_per_second:g}"),
                ],
                env,
            )
        primary_sim = f"http://127.0.0.1:{primary_port}"
        port = free_port()
        web_child = procs.start(web_argv(args.server, port), env)
        web = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(f"{web}/healthz", web_child))
        bench = Bench(
            web=web,
            key=key,
            primary_sim=primary_sim,
            fallback_url=fallback.base_url.rstrip("/"),
            upstream_model=upstream_model,
            closed_url=f"http://127.0.0.1:{closed.getsockname()[1]}/primary/v1",
            max_wait=args.max_wait,
            plain=args.plain,
            settle=settings.GATEWAY_ROUTE_CACHE_SECONDS + CACHE_MARGIN,
        )
        started = time.perf_counter()
        results = asyncio.run(measure(bench, args.modes, args.repeat, rows))
        elapsed = time.perf_counter() - started
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()
        closed.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    kind = "plain total" if args.plain else "streamed, first token"
    print(f"### /v1 time to first answer when the primary fails ({kind})")
    print()
    print(f"`{command}` ({elapsed:.0f} s)")
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {args.server}, simulators at "
        f"{args.tokens_per_second:g} tokens/s; load average before {load_before}, "
        f"after {loadavg()}"
    )
    print()
    print(f"primary endpoint as setup_demo makes it: {settings_text}")
    print()
    for line in table(results, args.max_wait, args.plain):
        print(line)


if __name__ == "__main__":
    main()
