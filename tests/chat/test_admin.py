"""The chat admin: list views cost the same few queries however many rows."""

from __future__ import annotations

import pytest
from django.test import Client

from chat.attachments import store_upload
from chat.models import Conversation, Message
from tests.chat.images import image_bytes

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


def test_the_message_list_shows_an_escaped_excerpt_of_the_text(admin_client_for, owner):
    conversation = Conversation.objects.create(user=owner, title="t")
    Message.objects.create(
        conversation=conversation,
        role="user",
        content="<script>alert(1)</script> " + "word " * 100 + "THE-END",
    )

    page = admin_client_for.get("/admin/chat/message/").content.decode()

    assert "&lt;script&gt;alert(1)&lt;/script&gt; word word" in page
    assert "<script>alert(1)" not in page
    assert "THE-END" not in page.split('id="result_list"')[1].split("</table>")[0]


def test_nobody_adds_a_message_to_a_users_conversation(admin_client_for, owner):
    conversation = Conversation.objects.create(user=owner, title="t")

    add_page = admin_client_for.get("/admin/chat/message/add/")
    conversation_page = admin_client_for.get(
        f"/admin/chat/conversation/{conversation.pk}/change/"
    ).content.decode()

    assert add_page.status_code == 403
    assert (
        "/admin/chat/message/add/"
        not in admin_client_for.get("/admin/chat/message/").content.decode()
    )
    # The inline offers no empty form and the script no "Add another" button.
    assert 'name="messages-TOTAL_FORMS" value="0"' in conversation_page
    assert 'name="messages-MAX_NUM_FORMS" value="0"' in conversation_page


def test_timestamps_are_read_only(admin_client_for, owner):
    conversation = Conversation.objects.create(user=owner, title="t")
    message = Message.objects.create(
        conversation=conversation, role="user", content="hi"
    )

    conversation_page = admin_client_for.get(
        f"/admin/chat/conversation/{conversation.pk}/change/"
    ).content.decode()
    message_page = admin_client_for.get(
        f"/admin/chat/message/{message.pk}/change/"
    ).content.decode()

    assert 'name="updated_at' not in conversation_page
    assert 'name="created_at' not in conversation_page
    assert "field-updated_at" in conversation_page
    assert 'name="created_at' not in message_page


def test_the_admin_is_branded(admin_client_for):
    page = admin_client_for.get("/admin/").content.decode()

    assert "llmsite administration" in page
    assert "Django administration" not in page
    assert "css/admin.css" in page


def test_the_image_list_describes_uploads_without_their_bytes(
    admin_client_for, owner, django_assert_max_num_queries
):
    stored = store_upload(owner, image_bytes())
    with django_assert_max_num_queries(12) as queries:
        response = admin_client_for.get("/admin/chat/attachment/")
    page = admin_client_for.get(f"/admin/chat/attachment/{stored.id}/change/")

    assert response.status_code == 200
    assert "image/png" in response.content.decode()
    assert not any('"data"' in q["sql"] for q in queries.captured_queries)
    assert stored.sha256 in page.content.decode()
