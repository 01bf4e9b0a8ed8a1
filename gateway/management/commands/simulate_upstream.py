"""Run the simulated OpenAI-compatible upstream until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.simulator import DEFAULT_MODELS, FAULTS, Behaviour, SimulatedUpstream


class Command(BaseCommand):
    help = (
        "Serve a simulated OpenAI-compatible upstream (for the demo, tests and "
        "benchmarks) and print its base URL. Re-script it while it runs with "
        "POST /_sim/behaviour, or per request with /sim directives."
    )
    # It needs no database or app registry, so it runs before settings are ready.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9100, help="0 picks one")
        parser.add_argument(
            "--latency", type=float, default=0.0, help="seconds before headers"
        )
        parser.add_argument(
            "--ttft", type=float, default=0.0, help="seconds to the first chunk"
        )
        parser.add_argument(
            "--tokens-per-second", type=float, default=0.0, help="0 = unpaced"
        )
        parser.add_argument("--completion-tokens", type=int, default=64)
        parser.add_argument("--reply", help="answer with this text")
        parser.add_argument(
            "--echo", action="store_true", help="answer with the user's message"
        )
        parser.add_argument("--fault", choices=sorted(FAULTS))
        parser.add_argument("--fault-status", type=int, default=500)
        parser.add_argument("--retry-after", type=float)
        parser.add_argument("--fault-after-tokens", type=int, default=0)
        parser.add_argument(
            "--models",
            default=",".join(DEFAULT_MODELS),
            help="comma-separated model ids",
        )
        parser.add_argument(
            "--api-key", help="require Authorization: Bearer KEY on /v1 requests"
        )

    def handle(self, *args: object, **options: Any) -> None:
        try:
            behaviour = Behaviour(
                latency=options["latency"],
                ttft=options["ttft"],
                tokens_per_second=options["tokens_per_second"],
                completion_tokens=options["completion_tokens"],
                reply=options["reply"],
                echo=options["echo"],
                fault=options["fault"],
                fault_status=options["fault_status"],
                retry_after=options["retry_after"],
                fault_after_tokens=options["fault_after_tokens"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        models = [m.strip() for m in options["models"].split(",") if m.strip()]
        upstream = SimulatedUpstream(
            host=options["host"],
            port=options["port"],
            behaviour=behaviour,
            models=models,
            api_key=options["api_key"] or None,
        )
        asyncio.run(self._serve(upstream))

    async def _serve(self, upstream: SimulatedUpstream) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await upstream.start()
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {upstream.host}:{upstream.port}: {exc.strerror}"
            ) from None
        # The URL alone on a line, so scripts that pass --port 0 can read it.
        self.stdout.write(upstream.base_url)
        self.stdout.flush()
        try:
            await stop.wait()
        finally:
            await upstream.stop()
        stats = upstream.stats
        self.stderr.write(
            f"Stopped after {stats.requests} requests "
            f"({stats.streams_completed} streams completed, "
            f"{stats.client_disconnects} abandoned by the client)."
        )
