"""A lease in the database so that only one monitor probes at a time.

Any number of monitors may run; each tries to take the lease on every loop.
The holder renews it well before it expires; when the holder dies, the lease
runs out and the next standby to ask takes it over. Every change is a
compare-and-set UPDATE, so two processes can never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from monitoring.models import MonitorLease

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_holder_id() -> str:
    """An id for this process that says where it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The named lease as seen by one holder."""

    def __init__(self, holder: str, *, ttl: float, name: str = "monitor") -> None:
        self.name = name
        self.holder = holder
        self.ttl = timedelta(seconds=ttl)
        self.expires_at: datetime | None = None

    def acquire(self) -> bool:
        """Renew the lease if held, take it if free or expired; True if held now."""
        now = timezone.now()
        expires = now + self.ttl
        MonitorLease.objects.get_or_create(
            name=self.name, defaults={"expires_at": EPOCH}
        )
        mine = MonitorLease.objects.filter(name=self.name, holder=self.holder)
        if mine.update(expires_at=expires):
            self.expires_at = expires
            return True
        free = MonitorLease.objects.filter(
            Q(expires_at__lte=now) | Q(holder=""), name=self.name
        )
        previous = free.values_list("holder", flat=True).first()
        if free.update(holder=self.holder, acquired_at=now, expires_at=expires):
            self.expires_at = expires
            if previous:
                logger.warning(
                    "Monitor %s took over the lease from %s", self.holder, previous
                )
            else:
                logger.info("Monitor %s holds the lease", self.holder)
            return True
        if self.expires_at is not None:
            logger.warning("Monitor %s lost the lease; standing by", self.holder)
        self.expires_at = None
        return False

    def needs_renewal(self) -> bool:
        """Whether a third of the lease has run out since it was last renewed."""
        if self.expires_at is None:
            return True
        return timezone.now() >= self.expires_at - self.ttl * 2 / 3

    def release(self) -> None:
        """Give the lease up at once, so a standby need not wait for it to expire."""
        MonitorLease.objects.filter(name=self.name, holder=self.holder).update(
            holder="", expires_at=timezone.now()
        )
        self.expires_at = None

    def current_holder(self) -> str:
        """Who holds the lease now, or "" when nobody does."""
        row = MonitorLease.objects.filter(
            name=self.name, expires_at__gt=timezone.now()
        ).first()
        return row.holder if row else ""
