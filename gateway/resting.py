"""Rate-limit rests: an endpoint that answered 429 is left alone until it said.

A 429 means "not now", not "down": it never counts against the circuit breaker
and never moves the endpoint's status (so no "endpoint is down" alert).  When
the 429 carries a Retry-After, the endpoint rests until then: the router skips
it without calling it while another route can take the request, and waits the
rest out (saying so) only when none can.

The rest is kept in the Endpoint row (``resting_until``), so every process
sees it; it is written only on a 429, with a compare-and-set that only ever
moves it later, and read from the route snapshot like the breaker state.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from gateway.client import EndpointConfig
from gateway.models import Endpoint

logger = logging.getLogger("gateway.resting")

# However long an upstream asks for, an endpoint rests at most this long: an
# absurd Retry-After must not take it out for a day.  The monitor's probes
# and the admin are untouched by rests.
MAX_REST_SECONDS = 3600.0


def seconds_left(config: EndpointConfig, now: datetime | None = None) -> float:
    """How long the endpoint still rests (0 when it does not)."""
    if config.resting_until is None:
        return 0.0
    remaining = config.resting_until - (now or timezone.now())
    return max(0.0, remaining.total_seconds())


async def rest(
    endpoint_id: int, seconds: float, now: datetime | None = None
) -> datetime | None:
    """Let the endpoint rest `seconds` from now; the new end, or None if unchanged.

    An existing longer rest stands: of several 429s, the latest end wins.
    """
    if not seconds > 0:
        return None
    until = (now or timezone.now()) + timedelta(
        seconds=min(float(seconds), MAX_REST_SECONDS)
    )
    moved = await (
        Endpoint.objects.filter(id=endpoint_id)
        .filter(Q(resting_until__isnull=True) | Q(resting_until__lt=until))
        .aupdate(resting_until=until)
    )
    if not moved:
        return None
    logger.info("endpoint %s rate limited: resting until %s", endpoint_id, until)
    return until
