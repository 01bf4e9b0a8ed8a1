"""`manage.py rebuild_rollups`: recompute hourly usage rollups from raw records."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from gateway.accounting import hour_of, parse_day_or_time, rebuild_rollups


class Command(BaseCommand):
    help = (
        "Recompute the hourly usage rollups of a time range from the raw usage "
        "records, replacing what is there. Hours whose raw records were pruned "
        "are left alone."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--since",
            required=True,
            help=(
                "Start (UTC): YYYY-MM-DD or YYYY-MM-DDTHH:MM; rounded down to the hour."
            ),
        )
        parser.add_argument(
            "--until",
            help="End (UTC), exclusive; rounded up to the hour. Default: now.",
        )

    def handle(self, *args: Any, since: str, until: str | None, **options: Any) -> None:
        try:
            start = parse_day_or_time(since)
            end = (
                parse_day_or_time(until)
                if until
                else hour_of(timezone.now()) + timedelta(hours=1)
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if end <= start:
            raise CommandError("--until must be later than --since")
        rebuilt = rebuild_rollups(start, end)
        if rebuilt.since is None:
            self.stdout.write("No usage records: nothing to rebuild.")
            return
        self.stdout.write(
            f"Rebuilt {rebuilt.since:%Y-%m-%d %H:%M} to {rebuilt.until:%Y-%m-%d %H:%M} "
            f"UTC: {rebuilt.deleted} rollup rows replaced by {rebuilt.created}."
        )
