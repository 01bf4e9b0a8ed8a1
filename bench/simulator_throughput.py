"""Measure the simulated upstream's throughput: plain requests/s and paced streams.

Usage: ``.venv/bin/python bench/simulator_throughput.py [--seconds 5]``

The server runs in its own process (one core at most, as it is single-threaded),
and its CPU time is read from /proc, so "per CPU-second" figures hold even when
the load generator competes for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
SERVER = """
import asyncio, sys
from gateway.simulator import Behaviour, SimulatedUpstream

async def main():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=20)) as up:
        print(up.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""
CHAT = b'{"model":"sim-small","messages":[{"role":"user","content":"Hello there"}]}'


async def raw_worker(port: int, request: bytes, deadline: float) -> int:
    """Send keep-alive requests back to back on one socket; return how many."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    while time.monotonic() < deadline:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        done += 1
    writer.close()
    return done


async def raw_stream(port: int, request: bytes) -> tuple[int, float]:
    """Read one streamed response on its own socket; return data lines, duration."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    received = b""
    while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
        chunk = await reader.read(65536)
        if not chunk:
            break
        received += chunk
    writer.close()
    return received.count(b"data: "), time.monotonic() - started


async def httpx_worker(client: httpx.AsyncClient, deadline: float) -> int:
    """Send plain chat requests with httpx until the deadline; return how many."""
    done = 0
    while time.monotonic() < deadline:
        response = await client.post("/chat/completions", content=CHAT)
        response.raise_for_status()
        done += 1
    return done


async def stream_once(client: httpx.AsyncClient, behaviour: str) -> tuple[int, float]:
    """Read one paced stream; return its data lines and its duration."""
    started = time.monotonic()
    lines = 0
    body = CHAT[:-1] + b',"stream":true}'
    headers = {"x-sim-behaviour": behaviour, "content-type": "application/json"}
    async with client.stream(
        "POST", "/chat/completions", content=body, headers=headers
    ) as response:
        async for line in response.aiter_lines():
            lines += line.startswith("data: ")
    return lines, time.monotonic() - started


async def measure(port: int, pid: int, seconds: float) -> None:
    base = f"http://127.0.0.1:{port}/v1"

    async def timed(label: str, run) -> None:
        cpu, wall = cpu_seconds(pid), time.monotonic()
        count, unit = await run()
        cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - wall
        per_cpu = count / max(cpu, 1e-9)
        print(
            f"{label:<44} {count / wall:>9.0f} {unit}/s wall"
            f"  {per_cpu:>9.0f} {unit}/CPU-s  (server CPU {cpu / wall:.0%})"
        )

    async def raw(path: str, body: bytes, connections: int = 32):
        method = b"POST" if body else b"GET"
        request = (
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        deadline = time.monotonic() + seconds
        workers = [raw_worker(port, request, deadline) for _ in range(connections)]
        return sum(await asyncio.gather(*workers)), "req"

    # httpx spends a core near 1,000 req/s and slows as concurrency grows, so it
    # shows what one Python client sees rather than the server's capacity.
    async def with_httpx(concurrency: int):
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits) as client:
            deadline = time.monotonic() + seconds
            workers = [httpx_worker(client, deadline) for _ in range(concurrency)]
            return sum(await asyncio.gather(*workers)), "req"

    async def streams(count: int, tps: int, tokens: int, client: str = "raw"):
        behaviour = f'{{"tokens_per_second":{tps},"completion_tokens":{tokens}}}'
        if client == "raw":
            body = CHAT[:-1] + b',"stream":true}'
            request = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nX-Sim-Behaviour: "
                + behaviour.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            results = await asyncio.gather(
                *(raw_stream(port, request) for _ in range(count))
            )
        else:
            limits = httpx.Limits(max_connections=count)
            async with httpx.AsyncClient(
                base_url=base, limits=limits, timeout=httpx.Timeout(60)
            ) as http:
                results = await asyncio.gather(
                    *(stream_once(http, behaviour) for _ in range(count))
                )
        ideal = (tokens - 1) / tps
        slowest = max(duration for _, duration in results)
        print(f"  {count} streams: slowest {slowest:.2f} s (ideal {ideal:.2f} s)")
        return sum(lines for lines, _ in results), "chunk"

    await timed("plain GET /v1/models, raw client x32", lambda: raw("/v1/models", b""))
    await timed("plain chat, raw client x32", lambda: raw("/v1/chat/completions", CHAT))
    await timed(
        "plain chat, raw client x1 (1/latency)",
        lambda: raw("/v1/chat/completions", CHAT, connections=1),
    )
    await timed("plain chat, httpx x4", lambda: with_httpx(4))
    await timed("500 streams, 20 tok/s, 60 tokens, raw", lambda: streams(500, 20, 60))
    await timed("1000 streams, 20 tok/s, 60 tokens, raw", lambda: streams(1000, 20, 60))
    await timed(
        "200 streams, 20 tok/s, 60 tokens, httpx",
        lambda: streams(200, 20, 60, client="httpx"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        asyncio.run(measure(port, server.pid, args.seconds))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
