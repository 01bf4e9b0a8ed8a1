"""Self-service API keys: one user's own, bounded, revocable, and under the
limits and budgets an admin set, like any other key."""

# The /v1 fixtures are shared with tests/gateway/test_api, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from accounts import keys
from gateway.models import ApiKey, Budget, UserLimits
from tests.gateway.test_api import (  # noqa: F401 - fixtures
    MESSAGES,
    MODEL,
    Program,
    _isolated,
    add_route,
    post,
    primary,
    records,
    route,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_own_keys_are_the_users_only_newest_first(owner, other_user):
    first, _ = keys.create_key(owner, "first")
    second, _ = keys.create_key(owner, "second")
    keys.create_key(other_user, "bob's")

    assert list(keys.own_keys(owner)) == [second, first]


def test_the_limit_counts_active_keys_of_this_user_only(owner, other_user, settings):
    settings.API_KEYS_PER_USER = 1
    keys.create_key(other_user, "bob's")
    mine, _ = keys.create_key(owner, "mine")

    with pytest.raises(keys.KeyLimitReached, match="You already have 1 active key,"):
        keys.create_key(owner, "another")

    keys.revoke_key(owner, mine.pk)
    keys.create_key(owner, "another")
    assert ApiKey.objects.active().filter(user=owner).count() == 1


def test_another_users_key_cannot_be_revoked(owner, other_user):
    bobs, _ = keys.create_key(other_user, "bob's")

    with pytest.raises(ApiKey.DoesNotExist):
        keys.revoke_key(owner, bobs.pk)

    bobs.refresh_from_db()
    assert bobs.is_active


async def test_a_self_made_key_works_and_stops_at_once_when_revoked(route, owner):
    key, raw = await sync_to_async(keys.create_key)(owner, "mine")
    program = Program(f"Bearer {raw}")
    assert (
        await post(program, {"model": MODEL, "messages": MESSAGES})
    ).status_code == 200

    await sync_to_async(keys.revoke_key)(owner, key.pk)
    refused = await post(program, {"model": MODEL, "messages": MESSAGES})

    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


async def test_a_self_made_key_is_refused_by_the_users_exhausted_budget(
    route, owner, primary
):
    await Budget.objects.acreate(scope="user", user=owner, token_limit=0)
    key, raw = await sync_to_async(keys.create_key)(owner, "mine")

    response = await post(
        Program(f"Bearer {raw}"), {"model": MODEL, "messages": MESSAGES}
    )

    assert response.status_code == 429
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert primary.stats.chat_requests == 0
    (record,) = await records()
    assert (record.status, record.api_key_id) == ("rejected", key.pk)


async def test_a_self_made_key_is_held_to_the_users_rate_limit(route, owner):
    await UserLimits.objects.acreate(user=owner, rpm_limit=1)
    _, raw = await sync_to_async(keys.create_key)(owner, "mine")
    program = Program(f"Bearer {raw}")
    assert (
        await post(program, {"model": MODEL, "messages": MESSAGES})
    ).status_code == 200

    response = await post(program, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert "Your limit of 1 request per minute is used up" in error["message"]
