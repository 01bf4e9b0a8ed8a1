"""The chat page and its JSON API: login, ownership, CSRF, security headers."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat.models import Conversation
from tests.chat.conftest import MODEL, USER

pytestmark = pytest.mark.django_db

API = "/chat/api/conversations/"


@pytest.fixture
def alice(owner) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    return client


@pytest.fixture
def bob(other_user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(other_user)
    return client


def csrf(client: Client) -> dict[str, str]:
    client.get("/chat/")
    return {"X-CSRFToken": client.cookies["csrftoken"].value}


def test_the_page_asks_anonymous_visitors_to_sign_in(client):
    response = client.get("/chat/")

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=/chat/")


def test_the_page_lists_the_models_and_forbids_inline_script(alice, model_route):
    response = alice.get("/chat/")

    assert response.status_code == 200
    config = json.loads(
        response.content.decode()
        .split('id="chat-config" type="application/json">')[1]
        .split("</script>")[0]
    )
    assert config["models"] == [MODEL]
    assert config["default_model"] == MODEL
    assert config["budget"]["remaining"] is None
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy


def test_a_conversation_page_is_only_for_its_owner(
    alice, bob, owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "secret plans"))

    assert alice.get(f"/chat/c/{conversation.id}/").status_code == 200
    response = bob.get(f"/chat/c/{conversation.id}/")
    assert response.status_code == 404
    assert b"secret plans" not in response.content


def test_the_api_answers_401_to_anonymous_callers(client):
    response = client.get(API)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_the_list_and_search_show_only_the_callers_conversations(
    alice, owner, other_user, make_conversation
):
    make_conversation(owner, (USER, "about tides"), title="Sea")
    make_conversation(owner, (USER, "bread"), title="Baking")
    make_conversation(other_user, (USER, "tides too"), title="Bob's sea")

    everything = alice.get(API).json()["conversations"]
    found = alice.get(API, {"q": "tides"}).json()["conversations"]

    assert sorted(c["title"] for c in everything) == ["Baking", "Sea"]
    assert [c["title"] for c in found] == ["Sea"]


def test_a_bad_paging_cursor_is_a_clear_error(alice):
    response = alice.get(API, {"before": "yesterday"})

    assert response.status_code == 400
    assert "ISO 8601" in response.json()["error"]["message"]


def test_rename_needs_the_csrf_token(alice, owner, make_conversation):
    conversation = make_conversation(owner)
    url = f"{API}{conversation.id}/"

    refused = alice.patch(url, {"title": "x"}, content_type="application/json")
    renamed = alice.patch(
        url, {"title": "Renamed"}, content_type="application/json", headers=csrf(alice)
    )

    assert refused.status_code == 403
    assert renamed.json()["conversation"]["title"] == "Renamed"
    conversation.refresh_from_db()
    assert conversation.title == "Renamed"


def test_nobody_renames_or_deletes_another_users_conversation(
    bob, owner, make_conversation
):
    conversation = make_conversation(owner, title="Alice's")
    url = f"{API}{conversation.id}/"
    headers = csrf(bob)

    renamed = bob.patch(
        url, {"title": "Bob's"}, content_type="application/json", headers=headers
    )
    deleted = bob.delete(url, headers=headers)

    assert (renamed.status_code, deleted.status_code) == (404, 404)
    conversation.refresh_from_db()
    assert conversation.title == "Alice's"


def test_delete_removes_the_conversation_and_its_messages(
    alice, owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"))

    response = alice.delete(f"{API}{conversation.id}/", headers=csrf(alice))

    assert response.status_code == 200
    assert not Conversation.objects.filter(id=conversation.id).exists()


def test_rename_refuses_a_body_that_is_not_json(alice, owner, make_conversation):
    conversation = make_conversation(owner)

    response = alice.patch(
        f"{API}{conversation.id}/",
        "title=x",
        content_type="application/json",
        headers=csrf(alice),
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"


def test_a_foreign_or_deleted_conversation_gets_a_page_with_a_way_back(
    bob, owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "secret plans"))
    foreign = bob.get(f"/chat/c/{conversation.id}/")
    conversation.delete()
    deleted = bob.get(f"/chat/c/{conversation.id}/")

    for response in (foreign, deleted):
        page = response.content.decode()
        assert response.status_code == 404
        assert "<h1>Not found</h1>" in page
        assert 'href="/chat/" id="back-to-chat"' in page
        assert "css/base.css" in page  # the site's style, not a bare "Not Found"
        assert "secret plans" not in page


def test_staff_see_a_link_to_the_admin_and_users_do_not(alice, staff):
    sam = Client()
    sam.force_login(staff)

    assert 'id="admin-link"' in sam.get("/chat/").content.decode()
    assert 'href="/admin/"' in sam.get("/chat/").content.decode()
    assert 'id="admin-link"' not in alice.get("/chat/").content.decode()
