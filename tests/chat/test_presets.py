"""A user's presets: the JSON views under /chat/api/presets/ and their checks."""

# ruff: noqa: F811 (fixtures from test_views, used as arguments)

from __future__ import annotations

import pytest
from django.test import Client

from chat.models import Preset
from tests.chat.conftest import MODEL
from tests.chat.test_views import alice, bob, csrf  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db

API = "/chat/api/presets/"
PIRATE = {
    "name": "Pirate",
    "model": MODEL,
    "settings": {"system_prompt": "Talk like a pirate.", "temperature": 1.2},
}


def create(client: Client, body: dict, **kwargs):
    return client.post(
        API, body, content_type="application/json", headers=csrf(client), **kwargs
    )


def test_a_preset_is_saved_listed_and_deleted(alice, model_route):
    created = create(alice, PIRATE)

    assert created.status_code == 201
    preset = created.json()["preset"]
    assert preset["settings"] == {
        "system_prompt": "Talk like a pirate.",
        "temperature": 1.2,
        "top_p": None,
        "max_tokens": None,
    }
    assert alice.get(API).json()["presets"] == [preset]
    deleted = alice.delete(f"{API}{preset['id']}/", headers=csrf(alice))
    assert deleted.status_code == 200
    assert not Preset.objects.exists()


def test_saving_a_preset_of_the_same_name_replaces_it(alice, model_route):
    create(alice, PIRATE)
    create(alice, {**PIRATE, "settings": {"top_p": 0.5}})

    [preset] = Preset.objects.all()
    assert (preset.system_prompt, preset.top_p) == ("", 0.5)


def test_presets_need_the_csrf_token(alice):
    refused = alice.post(API, PIRATE, content_type="application/json")

    assert refused.status_code == 403
    assert not Preset.objects.exists()


def test_anonymous_callers_get_401():
    assert Client().get(API).status_code == 401


def test_bob_sees_none_of_alices_presets_and_cannot_delete_them(
    alice, bob, owner, model_route
):
    preset_id = create(alice, PIRATE).json()["preset"]["id"]

    assert bob.get(API).json()["presets"] == []
    theirs = bob.delete(f"{API}{preset_id}/", headers=csrf(bob))
    missing = bob.delete(f"{API}{preset_id + 1000}/", headers=csrf(bob))

    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()
    assert Preset.objects.filter(user=owner).count() == 1


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({**PIRATE, "name": " "}, "invalid", "name"),
        ({**PIRATE, "name": "x" * 101}, "too_large", "100 characters"),
        ({**PIRATE, "settings": {"top_p": 2}}, "invalid", "from 0 to 1"),
        ({**PIRATE, "settings": {"max_tokens": 5000}}, "invalid", "at most 2,000"),
        ({**PIRATE, "model": 7}, "invalid", "model"),
        ([1, 2], "invalid", "object"),
    ],
)
def test_bad_presets_are_refused_with_a_reason_and_not_stored(
    alice, model_route, body, code, words
):
    refused = create(alice, body)

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == code
    assert words in refused.json()["error"]["message"]
    assert not Preset.objects.exists()


def test_a_system_prompt_over_the_limit_is_refused(alice, settings):
    settings.CHAT_MAX_SYSTEM_PROMPT_CHARS = 10

    refused = create(alice, {"name": "Long", "settings": {"system_prompt": "x" * 11}})

    assert refused.json()["error"]["code"] == "too_large"
    assert not Preset.objects.exists()


def test_a_user_keeps_at_most_chat_max_presets(alice, settings):
    settings.CHAT_MAX_PRESETS = 2
    for name in ("One", "Two"):
        assert create(alice, {"name": name}).status_code == 201

    refused = create(alice, {"name": "Three"})

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "too_many_presets"
    assert "at most 2" in refused.json()["error"]["message"]
    # Replacing one of the two is still fine.
    assert create(alice, {"name": "Two", "settings": {"top_p": 1}}).status_code == 201
