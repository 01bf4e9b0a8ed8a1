"""Shared fixtures: named personas and a clean cache for every test."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.cache import cache

from chat import conversation_settings
from gateway import accounting, router

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix, tmp_path_factory
) -> None:
    """Put the SQLite test database in a file, as in production.

    pytest-django's default in-memory database runs in SQLite's shared-cache
    mode, where a table being written by one connection cannot be read by
    another ("database table is locked", with no busy wait). Several threads
    write at once here (the usage writer, the chat's answer store, a live
    server), so the tests use a file with WAL and busy waits instead.
    """
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3") and not database.get("TEST", {}).get(
        "NAME"
    ):
        path = tmp_path_factory.mktemp("sqlite") / "test.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(path)


@pytest.fixture(autouse=True)
def _clean_cache():
    """No test sees another's rate limits, cached routes, defaults or answers."""
    cache.clear()
    router.forget_routes()
    conversation_settings.forget_model_defaults()
    yield
    cache.clear()
    router.forget_routes()
    conversation_settings.forget_model_defaults()


@pytest.fixture(scope="session", autouse=True)
def _usage_writer_closed(django_db_setup, django_db_blocker):
    """Close the usage writer's connection before the test database is dropped."""
    yield
    with django_db_blocker.unblock():
        accounting.close_writer()


@pytest.fixture
def owner(django_user_model):
    """Alice: an ordinary user who owns the conversations under test."""
    return django_user_model.objects.create_user("alice", "alice@example.com", PASSWORD)


@pytest.fixture
def other_user(django_user_model):
    """Bob: an ordinary user who must never see Alice's data."""
    return django_user_model.objects.create_user("bob", "bob@example.com", PASSWORD)


@pytest.fixture
def staff(django_user_model):
    """Sam: a superuser who runs the admin."""
    return django_user_model.objects.create_superuser(
        "sam", "sam@example.com", PASSWORD
    )
