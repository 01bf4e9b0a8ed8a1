"""The chat admin: list views cost the same few queries however many rows."""

from __future__ import annotations

import pytest
from django.test import Client

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_for(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


def fill(owner, conversations: int) -> None:
    for index in range(conversations):
        conversation = Conversation.objects.create(user=owner, title=f"c{index}")
        Message.objects.create(conversation=conversation, role="user", content="hi")


@pytest.mark.parametrize("url", ["/admin/chat/conversation/", "/admin/chat/message/"])
def test_list_views_do_not_query_per_row(
    admin_client_for, owner, url, django_assert_max_num_queries
):
    fill(owner, 3)
    with django_assert_max_num_queries(12) as few:
        assert admin_client_for.get(url).status_code == 200
    fill(owner, 30)

    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client_for.get(url)

    assert response.status_code == 200


def test_the_conversation_page_lists_its_messages(admin_client_for, owner):
    conversation = Conversation.objects.create(user=owner, title="Plans")
    Message.objects.create(conversation=conversation, role="user", content="secret")

    response = admin_client_for.get(
        f"/admin/chat/conversation/{conversation.id}/change/"
    )

    assert response.status_code == 200
    assert b"secret" in response.content


def test_search_finds_messages_by_their_text(admin_client_for, owner):
    fill(owner, 2)
    conversation = Conversation.objects.create(user=owner, title="x")
    Message.objects.create(conversation=conversation, role="user", content="needle")

    response = admin_client_for.get("/admin/chat/message/", {"q": "needle"})

    assert response.status_code == 200
    assert response.context["cl"].result_list[0].conversation_id == conversation.id
    assert len(response.context["cl"].result_list) == 1
