"""Import endpoints, model routes and budgets from a TOML file.

Either layout: the project's (config/llm_api.example.toml) or the original
spec's `[llm_api]` table (config/llm_api.toml).
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.config_file import ConfigFileError, import_text


class Command(BaseCommand):
    help = "Create or update endpoints, routes and budgets from a TOML file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="the TOML file")
        parser.add_argument(
            "--dry-run", action="store_true", help="validate and report, change nothing"
        )

    def handle(
        self, *args: object, path: Path, dry_run: bool, **options: object
    ) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        try:
            summary = import_text(text, dry_run=dry_run)
        except ConfigFileError as exc:
            raise CommandError(
                f"{path} was not imported; nothing changed:\n"
                + "\n".join(f"  {problem}" for problem in exc.problems)
            ) from None
        prefix = "Dry run, nothing saved. " if dry_run else ""
        self.stdout.write(self.style.SUCCESS(f"{prefix}{path}: {summary}"))
        for note in summary.notes:
            self.stdout.write(f"  {note}")
