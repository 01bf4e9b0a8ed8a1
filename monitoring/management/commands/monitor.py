"""`manage.py monitor`: probe endpoints on schedule and send alerts."""

from __future__ import annotations

import asyncio
import signal
from argparse import ArgumentParser
from collections.abc import Awaitable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from monitoring.worker import Monitor

T = TypeVar("T")


async def _closing(work: Awaitable[T]) -> T:
    """Run `work`, then close the connections of the thread the ORM ran in."""
    try:
        return await work
    finally:
        await sync_to_async(connections.close_all)()


class Command(BaseCommand):
    help = (
        "Probe every enabled endpoint on its interval, record its status and "
        "send alerts. Several may run: one is active, the others stand by."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Run one round (probes, alerts, pruning) and exit.",
        )
        parser.add_argument(
            "--all",
            action="store_true",
            dest="force",
            help="With --once: probe every enabled endpoint, due or not.",
        )

    def handle(self, *args: Any, once: bool, force: bool, **options: Any) -> None:
        monitor = Monitor()
        if once:
            if not asyncio.run(_closing(monitor.run_once(force=force))):
                raise CommandError(
                    "Another monitor holds the lease "
                    f"({monitor.lease.current_holder() or 'just released'}); "
                    "nothing was probed."
                )
            self.stdout.write(f"Probed in {monitor.rounds} round(s).")
            return
        asyncio.run(_closing(self._run(monitor)))

    async def _run(self, monitor: Monitor) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            self.stdout.write(f"{signal.strsignal(signum)}, finishing...")
            monitor.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        self.stdout.write(f"Monitor {monitor.holder} is running.")
        await monitor.run()
