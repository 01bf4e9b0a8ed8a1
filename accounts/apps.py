from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Each user's own account: password, reset by mail, API keys, sign-up."""

    name = "accounts"
    verbose_name = "Accounts"
