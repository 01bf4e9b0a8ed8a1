"""The monitoring settings, read when used so tests can override them."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

DEFAULTS: dict[str, object] = {
    "MONITOR_CONCURRENCY": 50,
    "MONITOR_PROBE_TIMEOUT": 5.0,
    "MONITOR_SLOW_MS": 500.0,
    "MONITOR_DOWN_MS": 2000.0,
    "MONITOR_DOWN_AFTER": 2,
    "MONITOR_RECHECK_SECONDS": 30.0,
    "MONITOR_RETENTION_DAYS": 30,
    "MONITOR_LEASE_SECONDS": 30.0,
    "MONITOR_IDLE_SECONDS": 1.0,
    # How often the active monitor releases reservations of dead requests.
    "GATEWAY_SWEEP_SECONDS": 30.0,
    "ALERT_EMAILS": [],
    "ALERT_WEBHOOK_URL": "",
    "ALERT_WEBHOOK_TIMEOUT": 10.0,
    "ALERT_MAX_ATTEMPTS": 4,
    "ALERT_RETRY_SECONDS": 30.0,
    "METRICS_TOKEN": "",
}


def get(name: str) -> object:
    """A monitoring setting, or its default when settings.py does not set it."""
    return getattr(settings, name, DEFAULTS[name])


@dataclass(frozen=True)
class Thresholds:
    """How a probe's outcome becomes an endpoint status."""

    slow_ms: float
    down_ms: float
    down_after: int

    @classmethod
    def from_settings(cls) -> Thresholds:
        """MONITOR_SLOW_MS, MONITOR_DOWN_MS and MONITOR_DOWN_AFTER."""
        return cls(
            slow_ms=float(get("MONITOR_SLOW_MS")),
            down_ms=float(get("MONITOR_DOWN_MS")),
            down_after=max(1, int(get("MONITOR_DOWN_AFTER"))),
        )
