"""`manage.py prune_usage`: delete old raw usage records; the rollups stay."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from gateway.accounting import prune_cutoff, prune_usage


class Command(BaseCommand):
    help = (
        "Delete raw usage records older than N days (counted from midnight UTC), "
        "in batches. The hourly rollups, which the dashboards read, are kept."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than-days",
            type=int,
            required=True,
            help="Keep this many whole days of raw records besides today.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=5000,
            help="Records deleted per transaction (default 5000).",
        )

    def handle(
        self, *args: Any, older_than_days: int, batch_size: int, **options: Any
    ) -> None:
        if older_than_days < 1:
            raise CommandError("--older-than-days must be at least 1")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        cutoff = prune_cutoff(older_than_days)
        deleted = prune_usage(older_than_days, batch_size=batch_size)
        self.stdout.write(
            f"Deleted {deleted} usage records from before {cutoff:%Y-%m-%d %H:%M} UTC."
        )
