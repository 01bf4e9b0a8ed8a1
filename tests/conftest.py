"""Shared fixtures: named personas and a clean cache for every test."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from gateway import router

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _clean_cache():
    """No test sees another's rate limits, cached routes or cached answers."""
    cache.clear()
    router.forget_routes()
    yield
    cache.clear()
    router.forget_routes()


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
