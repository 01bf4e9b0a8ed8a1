"""Concurrent chat streams over websockets on one web process: frame delay p99.

Usage:

    .venv/bin/python bench/ws_streams.py --streams 250,500,1000 \\
        --server daphne --layer memory [--tps 20] [--tokens 200]

    --server daphne|uvicorn   the web process (one process, as deployed)
    --layer memory|redis      redis sets REDIS_URL (default
                              redis://127.0.0.1:6379/9), which moves the channel
                              layer and Django's cache to Redis
    --direct                  also run the same streams straight from the
                              simulated upstream (SSE over httpx): the floor

Three processes: the simulated upstream (``manage.py simulate_upstream``,
paced at --tps tokens per second), the web server under test, and this
client (uvloop, one websocket per stream, one user per stream so the per-user
limits never refuse). Each run uses a fresh SQLite database in a temporary
DATA_DIR unless DATABASE_URL is set. The upstream pool is sized for the run
(GATEWAY_MAX_CONNECTIONS): every stream holds one connection to the
simulator for its whole length.

The client opens every socket first, then sends one question per socket,
spread evenly over --ramp seconds, and reads frames until ``done``.

Frame delay: the simulator emits token i of a stream at t0 + i/tps. For a
frame whose text ends with token k the ideal arrival is t0 + k/tps; t0 is
estimated per stream as the earliest (arrival - k/tps) over its frames, the
way NTP estimates a clock offset. Delay is then arrival - (t0 + k/tps), so
what it measures is how late frames come compared with the best frame of the
same stream: coalescing (up to CHAT_FRAME_INTERVAL_MS), event-loop lag,
garbage-collector pauses. Time to first token (send -> first delta) is
reported apart; it includes storing the question and routing.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_seconds, loadavg, percentile  # noqa: E402

from gateway.simulator import generated_tokens  # noqa: E402

MODEL = "bench-chat"
PYTHON = sys.executable

SETUP = """
import json
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from gateway.models import Endpoint, ModelRoute

count, base_url, model = COUNT, BASE_URL, MODEL_NAME
endpoint = Endpoint.objects.create(name="bench", base_url=base_url, timeout=60)
ModelRoute.objects.create(
    model_name=model, endpoint=endpoint, upstream_model="sim-small",
    context_window=8000, max_output_tokens=4000,
)
User = get_user_model()
users = [User(username=f"bench-{n}") for n in range(count)]
for user in users:
    user.set_unusable_password()
User.objects.bulk_create(users)
keys = []
for user in User.objects.filter(username__startswith="bench-").order_by("id"):
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    keys.append(session.session_key)
with open(OUT, "w") as out:
    json.dump(keys, out)
"""

# Runs the server with the garbage collector tuned (--gc): objects alive after
# start-up are frozen out of collections, and young collections run less often.
GC_WRAPPER = """
import gc, sys
gc.collect(); gc.freeze(); gc.set_threshold(50_000, 50, 100)
sys.argv = sys.argv[1:]
if sys.argv[0] == "uvicorn":
    import uvicorn.main; uvicorn.main.main()
else:
    from daphne.cli import CommandLineInterface; CommandLineInterface.entrypoint()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


@dataclass
class Stream:
    """What one client saw of one answer."""

    sent_at: float = 0.0
    first_delta_at: float | None = None
    # (arrival, index of the last token the frame completes)
    frames: list[tuple[float, int]] = field(default_factory=list)
    chars: int = 0
    error: str | None = None
    done: bool = False
    counted: bool = False


class Token:
    """Maps the length of the answer so far to the index of its last token."""

    def __init__(self, count: int) -> None:
        ends, total = [], 0
        for token in generated_tokens(count):
            total += len(token)
            ends.append(total)
        self.ends = ends

    def index(self, chars: int) -> int:
        return max(0, bisect.bisect_right(self.ends, chars) - 1)


def delays(
    streams: list[Stream], tps: float, window: tuple[float, float] | None = None
) -> list[float]:
    """Frame delays in ms; with a window, only of frames that arrived in it."""
    found = []
    for stream in streams:
        if len(stream.frames) < 2:
            continue
        offset = min(arrival - k / tps for arrival, k in stream.frames)
        found.extend(
            (arrival - (offset + k / tps)) * 1000
            for arrival, k in stream.frames
            if window is None or window[0] <= arrival <= window[1]
        )
    return found


def steady_window(streams: list[Stream]) -> tuple[float, float] | None:
    """From the last stream's first frame to the first stream's last frame."""
    streamed = [s for s in streams if s.frames]
    if not streamed:
        return None
    begin = max(s.frames[0][0] for s in streamed)
    end = min(s.frames[-1][0] for s in streamed)
    return (begin, end) if begin < end else None


class Environment:
    """The simulator and the database, shared by the runs of one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir = tempfile.mkdtemp(prefix="llmsite-wsbench-")
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get(
                "DJANGO_SETTINGS_MODULE", "llmsite.settings"
            ),
            "DATA_DIR": self.data_dir,
            "SECRET_KEY": "bench-" + "x" * 60,
            "ALLOWED_HOSTS": "127.0.0.1",
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT_RPM": "1000000",
            "CHAT_RESUME_GRACE_SECONDS": "0",
        }
        self.env.pop("REDIS_URL", None)
        self.processes: list[subprocess.Popen] = []

    def manage(self, *argv: str, env: dict | None = None) -> str:
        return subprocess.run(
            [PYTHON, "manage.py", *argv],
            cwd=ROOT,
            env=env or self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def start_simulator(self) -> str:
        port = free_port()
        process = subprocess.Popen(
            [
                PYTHON,
                "manage.py",
                "simulate_upstream",
                "--port",
                str(port),
                "--tokens-per-second",
                str(self.args.tps),
                "--completion-tokens",
                str(self.args.tokens),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        self.simulator = process
        line = process.stdout.readline()
        match = re.search(r"http://\S+/v1", line)
        if not match:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        return match.group(0)

    def prepare(self, env: dict, count: int, base_url: str) -> list[str]:
        """A fresh database: migrations, one endpoint, `count` signed-in users."""
        url = env.get("DATABASE_URL", "")
        if url.startswith(("postgres://", "postgresql://")):
            self.reset_postgres(url)
        else:
            Path(self.data_dir, "db.sqlite3").unlink(missing_ok=True)
        self.manage("migrate", "--no-input", env=env)
        if env.get("REDIS_URL"):
            self.manage(
                "shell",
                "-c",
                "from django.core.cache import cache; cache.clear()",
                env=env,
            )
        out = Path(self.data_dir, "sessions.json")
        values = (
            f"COUNT, BASE_URL, MODEL_NAME, OUT = "
            f"{count!r}, {base_url!r}, {MODEL!r}, {str(out)!r}\n"
        )
        self.manage("shell", "-c", values + SETUP, env=env)
        return json.loads(out.read_text())

    @staticmethod
    def reset_postgres(url: str) -> None:
        from urllib.parse import urlsplit, urlunsplit

        import psycopg

        parts = urlsplit(url)
        name = parts.path.lstrip("/")
        admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def start_server(self, kind: str, env: dict) -> tuple[subprocess.Popen, int]:
        port = free_port()
        app = "llmsite.asgi:application"
        if kind == "uvicorn":
            argv = ["uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--log-level", "warning", "--lifespan", "off"]
        else:
            argv = ["daphne", "-b", "127.0.0.1", "-p", str(port), app]
        if self.args.gc:
            command = [PYTHON, "-c", GC_WRAPPER, *argv]
        else:
            command = [PYTHON, "-m", argv[0], *argv[1:]]
            if kind == "daphne":
                command = [str(Path(PYTHON).with_name("daphne")), *argv[1:]]
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr
        )
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                return process, port
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.1)

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Start:
    """Holds every socket until all are open, then releases them over the ramp."""

    def __init__(self, count: int, ramp: float) -> None:
        self.count = count
        self.ramp = ramp
        self.opened = 0
        self.go = asyncio.Event()
        self.at = 0.0

    def arrive(self, stream: Stream) -> None:
        if stream.counted:
            return
        stream.counted = True
        self.opened += 1
        if self.opened == self.count:
            self.at = time.monotonic() + 0.5
            self.go.set()

    async def wait(self, stream: Stream, index: int) -> None:
        self.arrive(stream)
        await self.go.wait()
        delay = self.at + self.ramp * index / self.count - time.monotonic()
        await asyncio.sleep(max(0.0, delay))


async def one_stream(
    port: int,
    session: str,
    stream: Stream,
    tokens: Token,
    start: Start,
    index: int,
    connecting: asyncio.Semaphore,
) -> None:
    import websockets

    async with connecting:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws/chat/",
            # The page's own origin, port included (llmsite.origins).
            origin=f"http://127.0.0.1:{port}",
            additional_headers={"Cookie": f"sessionid={session}"},
            max_size=2**22,
            open_timeout=60,
            ping_interval=None,
        )
    async with ws:
        await start.wait(stream, index)
        stream.sent_at = time.monotonic()
        await ws.send(
            json.dumps(
                {
                    "type": "send",
                    "conversation_id": None,
                    "content": "Tell me about gateways.",
                    "model": MODEL,
                }
            )
        )
        async for raw in ws:
            now = time.monotonic()
            frame = json.loads(raw)
            kind = frame["type"]
            if kind == "delta":
                stream.chars += len(frame["text"])
                if stream.first_delta_at is None:
                    stream.first_delta_at = now
                stream.frames.append((now, tokens.index(stream.chars)))
            elif kind == "done":
                stream.done = True
                return
            elif kind == "error":
                stream.error = frame["code"]
                return


async def run_streams(port: int, sessions: list[str], args) -> list[Stream]:
    tokens = Token(args.tokens)
    streams = [Stream() for _ in sessions]
    start = Start(len(sessions), args.ramp)
    # Sockets open first, a hundred at a time, like browsers arriving.
    connecting = asyncio.Semaphore(100)

    async def run(index: int, session: str) -> None:
        try:
            await one_stream(
                port, session, streams[index], tokens, start, index, connecting
            )
        except asyncio.CancelledError:
            streams[index].error = "unfinished"
            raise
        except Exception as exc:
            streams[index].error = type(exc).__name__
            # A socket that never opened must not hold the others back.
            start.arrive(streams[index])

    # Streams still open at the deadline count as errors: the others are
    # reported all the same.
    timeout = args.tokens / args.tps + args.ramp + 180
    tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(sessions)]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return streams


def report(
    label: str,
    streams: list[Stream],
    args,
    cpu: dict[str, float],
    server_cpu: float | None = None,
) -> dict:
    """Print one run's row; ``server_cpu`` is the web process's CPU seconds."""
    done = sum(s.done for s in streams)
    errors: dict[str, int] = {}
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    ttft = [(s.first_delta_at - s.sent_at) * 1000 for s in streams if s.first_delta_at]
    delay = delays(streams, args.tps)
    window = steady_window(streams)
    steady = delays(streams, args.tps, window) if window else []
    frames = sum(len(s.frames) for s in streams)
    row = {
        "case": label,
        "streams": len(streams),
        "done": done,
        "errors": errors,
        "frames": frames,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "delay_p50": percentile(delay, 50),
        "delay_p99": percentile(delay, 99),
        "delay_max": max(delay) if delay else float("nan"),
        "steady_s": window[1] - window[0] if window else 0.0,
        "steady_p50": percentile(steady, 50),
        "steady_p99": percentile(steady, 99),
        **cpu,
    }
    cpu_text = " ".join(f"{k} {v:.0f}%" for k, v in cpu.items())
    if server_cpu is not None:
        # Less sensitive to other processes on the machine than the delays:
        # what one stream (its start, frames and end) costs the web process.
        row["server_cpu_ms_per_stream"] = server_cpu * 1000 / len(streams)
        cpu_text += f" ({row['server_cpu_ms_per_stream']:.1f} ms per stream)"
    print(
        f"{label:<28} {len(streams):>5} streams  done {done:>5}  "
        f"errors {errors or '-'}  frames {frames:>7}  "
        f"ttft p50 {row['ttft_p50']:6.0f} p99 {row['ttft_p99']:6.0f} ms  "
        f"delay p50 {row['delay_p50']:5.0f} p99 {row['delay_p99']:5.0f} "
        f"max {row['delay_max']:5.0f} ms  all {len(streams)} streaming "
        f"({row['steady_s']:.0f} s): p50 {row['steady_p50']:5.0f} "
        f"p99 {row['steady_p99']:5.0f} ms  cpu: {cpu_text}  load {loadavg()}",
        flush=True,
    )
    return row


async def direct_streams(base_url: str, count: int, args) -> list[Stream]:
    """The same streams straight from the simulator: the floor of this setup."""
    import httpx

    tokens = Token(args.tokens)
    streams = [Stream() for _ in range(count)]
    clients = [
        httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100))
        for _ in range(max(1, count // 50))
    ]
    body = {
        "model": "sim-small",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me about gateways."}],
    }
    start = time.monotonic() + 0.5

    async def one(index: int) -> None:
        stream = streams[index]
        await asyncio.sleep(
            max(0.0, start + args.ramp * index / count - time.monotonic())
        )
        stream.sent_at = time.monotonic()
        client = clients[index % len(clients)]
        async with client.stream(
            "POST", f"{base_url}/chat/completions", json=body
        ) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.monotonic()
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content") or ""
                if text:
                    stream.chars += len(text)
                    stream.first_delta_at = stream.first_delta_at or now
                    stream.frames.append((now, tokens.index(stream.chars)))
        stream.done = True

    await asyncio.gather(*(one(i) for i in range(count)))
    for client in clients:
        await client.aclose()
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="250,500,1000")
    parser.add_argument("--server", default="daphne", choices=["daphne", "uvicorn"])
    parser.add_argument("--layer", default="memory", choices=["memory", "redis"])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds")
    parser.add_argument("--frame-ms", type=int, help="CHAT_FRAME_INTERVAL_MS")
    parser.add_argument("--gc", action="store_true", help="tune the server's GC")
    parser.add_argument("--direct", action="store_true")
    args = parser.parse_args()
    # A terminated benchmark still stops the servers it started (finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    import uvloop

    counts = [int(n) for n in args.streams.split(",")]
    environment = Environment(args)
    try:
        base_url = environment.start_simulator()
        print(f"# {machine()}")
        extras = [f"server {args.server}", f"layer {args.layer}"]
        if args.gc:
            extras.append("GC tuned")
        if args.frame_ms:
            extras.append(f"frame interval {args.frame_ms} ms")
        database = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "SQLite"
        extras.append(f"database {database}")
        print(
            f"# {args.tps:g} tokens/s, {args.tokens} tokens per answer, "
            f"ramp {args.ramp:g} s, {', '.join(extras)}",
            flush=True,
        )
        for count in counts:
            if args.direct:
                sim_before = cpu_seconds(environment.simulator.pid)
                started = time.monotonic()
                streams = uvloop.run(direct_streams(base_url, count, args))
                elapsed = time.monotonic() - started
                sim_cpu = (
                    cpu_seconds(environment.simulator.pid) - sim_before
                ) / elapsed
                report(
                    "direct (SSE, no gateway)", streams, args, {"sim": sim_cpu * 100}
                )
            env = dict(environment.env)
            # Every stream holds an upstream connection for its whole length:
            # the default pool (10 per endpoint) would queue all but ten.
            env["GATEWAY_MAX_CONNECTIONS"] = str(count + 50)
            env["GATEWAY_MAX_KEEPALIVE"] = str(count + 50)
            # ... spread over as many clients as keeps each pool at the size
            # of the default's (100 over 4): httpcore walks a client's whole
            # pool on every request and every response closed, which at 250+
            # connections per client was the largest part of a stream start.
            env["GATEWAY_CLIENTS_PER_ENDPOINT"] = str(max(4, (count + 50) // 25))
            if args.layer == "redis":
                env["REDIS_URL"] = args.redis_url
            if args.frame_ms:
                env["CHAT_FRAME_INTERVAL_MS"] = str(args.frame_ms)
            sessions = environment.prepare(env, count, base_url)
            server, port = environment.start_server(args.server, env)
            try:
                server_before = cpu_seconds(server.pid)
                sim_before = cpu_seconds(environment.simulator.pid)
                client_before = time.process_time()
                started = time.monotonic()
                streams = uvloop.run(run_streams(port, sessions, args))
                elapsed = time.monotonic() - started
                server_cpu = cpu_seconds(server.pid) - server_before
                cpu = {
                    "server": server_cpu / elapsed * 100,
                    "sim": (cpu_seconds(environment.simulator.pid) - sim_before)
                    / elapsed
                    * 100,
                    "client": (time.process_time() - client_before) / elapsed * 100,
                }
                report(
                    f"{args.server} + {args.layer} layer",
                    streams,
                    args,
                    cpu,
                    server_cpu,
                )
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
    finally:
        environment.close()


if __name__ == "__main__":
    main()
