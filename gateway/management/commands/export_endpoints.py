"""Export endpoints, model routes and budgets as TOML (without API keys)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from gateway.config_file import export_text


class Command(BaseCommand):
    help = "Write endpoints, routes and budgets as TOML (API keys are never written)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "path", nargs="?", type=Path, help="the file to write (default: stdout)"
        )

    def handle(self, *args: object, path: Path | None, **options: object) -> None:
        text = export_text()
        if path is None:
            self.stdout.write(text, ending="")
        else:
            path.write_text(text, encoding="utf-8")
            self.stdout.write(self.style.SUCCESS(f"Wrote {path}"))
