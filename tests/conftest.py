"""Shared fixtures: named personas and a clean cache for every test."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from gateway import accounting, router

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _clean_cache():
    """No test sees another's rate limits, cached routes or cached answers."""
    cache.clear()
    router.forget_routes()
    yield
    cache.clear()
    router.forget_routes()


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
