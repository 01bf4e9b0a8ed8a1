"""What the benchmark scripts share: statistics, machine facts, a workload."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A zero-latency simulated upstream in its own process: argv is the model
# name and the answer's length in tokens; it prints its port when ready.
UPSTREAM_SERVER = """
import asyncio, sys
from gateway.simulator import Behaviour, SimulatedUpstream

async def main():
    upstream = SimulatedUpstream(
        behaviour=Behaviour(completion_tokens=int(sys.argv[2])), models=[sys.argv[1]]
    )
    async with upstream:
        print(upstream.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain what a gateway adds to an LLM call."},
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Processes:
    """Children started here; all of them are stopped by ``stop_all``."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[str]] = []

    def start(
        self, argv: list[str], env: dict[str, str], read_stdout: bool = False
    ) -> subprocess.Popen[str]:
        """Start a child; its stdout is a pipe only if the caller reads it.

        A pipe nobody reads fills after 64 KiB, and the child then blocks on its
        next write: daphne's access log stalled the whole server that way.
        """
        child = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE if read_stdout else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[str]) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop(child)


async def wait_ready(
    url: str, child: subprocess.Popen[str], seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SystemExit(f"web server exited with {child.returncode}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not answer in {seconds:g} s")


def web_argv(server: str, port: int) -> list[str]:
    """One web process serving llmsite: daphne (as ``make run``) or uvicorn."""
    if server == "daphne":
        # -v 0: no access log, like uvicorn's --no-access-log below.
        cmd = [str(BIN / "daphne"), "-v", "0", "-b", "127.0.0.1", "-p", str(port)]
        cmd.append("llmsite.asgi:application")
    else:
        cmd = [str(BIN / "uvicorn"), "llmsite.asgi:application", "--port", str(port)]
        cmd += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    return cmd


def start_simulator(
    procs: Processes, options: list[str], env: dict[str, str], prefix: tuple = ()
) -> str:
    """Start ``manage.py simulate_upstream`` and return the URL it prints when ready.

    ``prefix`` goes before the interpreter (``taskset -c 0``, say).
    """
    argv = [*prefix, sys.executable, "manage.py", "simulate_upstream", *options]
    child = procs.start(argv, env, read_stdout=True)
    assert child.stdout is not None
    url = child.stdout.readline().strip()
    if not url.startswith("http"):
        raise SystemExit(f"simulator did not start: {url!r}")
    return url.rstrip("/")
