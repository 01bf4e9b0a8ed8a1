"""The monitor process: hold the lease, probe, deliver alerts, prune, sweep.

Modelled on healthchecks' `sendalerts` command: a loop of steps, each of
which returns whether it found work, so the loop sleeps only when idle and
tests call the steps one at a time. Two loops run side by side, probes and
alert deliveries, so a slow webhook never delays a probe round. Errors are
logged and the loop goes on: one bad row costs a round, never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from asgiref.sync import sync_to_async
from channels.db import aclose_old_connections

from gateway import accounting
from monitoring import alerts, conf, probes
from monitoring.lease import Lease, new_holder_id

logger = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600


class Monitor:
    """One monitor process; active while it holds the lease, standing by otherwise."""

    def __init__(self, holder: str | None = None) -> None:
        self.lease = Lease(
            holder or new_holder_id(), ttl=float(conf.get("MONITOR_LEASE_SECONDS"))
        )
        self.idle_seconds = float(conf.get("MONITOR_IDLE_SECONDS"))
        self.active = False
        self.rounds = 0
        self._stopping: asyncio.Event | None = None
        self._last_prune: float | None = None
        self._last_sweep: float | None = None

    @property
    def holder(self) -> str:
        return self.lease.holder

    # --- Steps: each returns whether it found work ----------------------------------

    async def lease_step(self) -> bool:
        """Take or renew the lease; True while this monitor is the active one."""
        if self.active and not self.lease.needs_renewal():
            return True
        self.active = await sync_to_async(self.lease.acquire)()
        return self.active

    async def probe_step(self, *, force: bool = False) -> bool:
        """Probe the endpoints that are due (all enabled ones if forced)."""
        report = await probes.run_round(force=force)
        if report.probed:
            self.rounds += 1
            logger.info(
                "Probed %d endpoint(s) in %.2f s: %s; %d status change(s)",
                report.probed,
                report.seconds,
                ", ".join(f"{n} {s}" for s, n in sorted(report.by_status.items())),
                len(report.transitions),
            )
        return report.probed > 0

    async def alert_step(self) -> bool:
        """Deliver the alerts that are due."""
        return await alerts.deliver_due()

    async def prune_step(self, *, force: bool = False) -> bool:
        """Delete old probe results and alerts, at most once an hour."""
        now = time.monotonic()
        recent = self._last_prune is not None and (
            now - self._last_prune < PRUNE_EVERY_SECONDS
        )
        if recent and not force:
            return False
        self._last_prune = now
        results = await sync_to_async(probes.prune)()
        events = await sync_to_async(alerts.prune)()
        if results or events:
            logger.info("Pruned %d probe result(s) and %d alert(s)", results, events)
        return bool(results or events)

    async def sweep_step(self, *, force: bool = False) -> bool:
        """Release what requests of dead web processes held, every sweep interval.

        A web process killed without warning (kill -9, out of memory) leaves
        its requests' budget reservations held; the sweeper settles them and
        writes their records, so that a budget is never locked up by them.
        """
        now = time.monotonic()
        interval = float(conf.get("GATEWAY_SWEEP_SECONDS"))
        recent = self._last_sweep is not None and now - self._last_sweep < interval
        if recent and not force:
            return False
        self._last_sweep = now
        swept = await sync_to_async(accounting.sweep_abandoned)()
        return swept > 0

    # --- Running ----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loops to finish what they are doing and return."""
        if self._stopping is not None:
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def run(self) -> None:
        """Run until `stop()`: probe and alert loops, then give the lease up."""
        self._stopping = asyncio.Event()
        logger.info("Monitor %s started", self.holder)
        try:
            await asyncio.gather(self._probe_loop(), self._alert_loop())
        finally:
            if self.active:
                await sync_to_async(self.lease.release)()
                self.active = False
            logger.info("Monitor %s stopped", self.holder)

    async def run_once(self, *, force: bool = False) -> bool:
        """One round: probe, deliver the alerts it raised, prune; False if standby."""
        if not await self.lease_step():
            return False
        try:
            await self.probe_step(force=force)
            while await self.alert_step():
                pass
            await self.prune_step(force=True)
            await self.sweep_step(force=True)
        finally:
            await sync_to_async(self.lease.release)()
            self.active = False
        return True

    async def _probe_loop(self) -> None:
        was_active = False
        while not self.stopping:
            busy = False
            try:
                await aclose_old_connections()
                if await self.lease_step():
                    if not was_active:
                        logger.info("Monitor %s is the active monitor", self.holder)
                    busy = await self.probe_step()
                    await self.prune_step()
                    busy = await self.sweep_step() or busy
                elif was_active:
                    logger.warning("Monitor %s is standing by", self.holder)
                was_active = self.active
            except Exception:
                logger.exception("Monitor loop failed; trying again shortly")
                busy = False
            if not busy:
                await self._pause()

    async def _alert_loop(self) -> None:
        while not self.stopping:
            busy = False
            if self.active:
                try:
                    await aclose_old_connections()
                    busy = await self.alert_step()
                except Exception:
                    logger.exception("Alert delivery failed; trying again shortly")
            if not busy:
                await self._pause()

    async def _pause(self) -> None:
        """Sleep while idle; wake at once on stop.

        Each wake costs one indexed query for due probes, so a probe the
        breaker brought forward while the loop slept runs within one sleep.
        """
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=self.idle_seconds)
