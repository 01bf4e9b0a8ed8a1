"""What the benchmark scripts share: statistics, machine facts, a workload."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
