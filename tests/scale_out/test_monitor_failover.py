"""One monitor probes, a standby waits, and takes over when the active one dies."""

from __future__ import annotations

import signal
import time

from tests.scale_out.deployment import MONITOR_IDLE_SECONDS, MONITOR_LEASE_SECONDS
from tests.servers import needs_postgres_and_redis, stop

pytestmark = needs_postgres_and_redis


def test_a_standby_monitor_takes_over_within_the_lease_after_kill_9(
    deployment, tmp_path
):
    site = deployment.site

    def holder_pid() -> int | None:
        rows = site.sql(
            "SELECT holder FROM monitoring_monitorlease "
            "WHERE name = 'monitor' AND expires_at > now() AND holder <> ''"
        )
        return int(rows[0][0].split(":")[1]) if rows else None

    def wait_for(condition, timeout: float) -> float:
        began = time.monotonic()
        while not condition():
            assert time.monotonic() - began < timeout
            time.sleep(0.05)
        return time.monotonic() - began

    def probe_round() -> None:
        """Make every endpoint due now; return once a monitor has probed them."""
        [(before,)] = site.sql("SELECT count(*) FROM monitoring_proberesult")
        site.sql("UPDATE gateway_endpoint SET next_probe_at = NULL")
        wait_for(
            lambda: (
                site.sql("SELECT count(*) FROM monitoring_proberesult")[0][0]
                >= before + 2
            ),
            timeout=10,
        )

    def log(name: str) -> str:
        return (tmp_path / name).read_text(errors="replace")

    first = site.start("monitor", log=tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: holder_pid() == first.pid, timeout=20)
        second = site.start("monitor", log=tmp_path / "second.log")
        wait_for(lambda: "started" in log("second.log"), timeout=20)
        for _ in range(3):
            probe_round()
            # The standby wakes at least once between rounds.
            time.sleep(MONITOR_IDLE_SECONDS * 1.5)

        assert log("first.log").count("Probed ") >= 3
        # The standby neither probed nor believed itself active.
        assert "Probed " not in log("second.log")
        assert "is the active monitor" not in log("second.log")
        assert holder_pid() == first.pid

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        took = wait_for(
            lambda: holder_pid() == second.pid,
            timeout=MONITOR_LEASE_SECONDS + MONITOR_IDLE_SECONDS + 5,
        )
        assert took <= MONITOR_LEASE_SECONDS + MONITOR_IDLE_SECONDS + 1
        probe_round()
        assert "Probed " in log("second.log")
    finally:
        stop(first)
        if second is not None:
            stop(second)
