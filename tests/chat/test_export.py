"""Exporting conversations: the files, their structure, and who may have them."""

from __future__ import annotations

import json
import uuid
import warnings

import pytest
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from markdown_it import MarkdownIt

from chat import export
from chat.models import Conversation, Message, MessageStatus
from gateway.models import Endpoint, UsageRecord, UsageStatus
from tests.chat.conftest import ASSISTANT, MODEL, USER
from tests.gateway.usage_support import close_thread_connections

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(owner) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def bob(other_user) -> Client:
    client = Client()
    client.force_login(other_user)
    return client


@pytest.fixture
def answered(owner, make_conversation) -> Conversation:
    """Alice's conversation: a question, an answer with its usage record."""
    conversation = make_conversation(owner, (USER, "How do tides work?"), title="Tides")
    conversation.system_prompt = "Answer like a sailor."
    conversation.temperature = 0.3
    conversation.save()
    endpoint = Endpoint.objects.create(name="primary", base_url="http://127.0.0.1:9/v1")
    record = UsageRecord.objects.create(
        user=owner,
        conversation_id=conversation.id,
        model_name=MODEL,
        endpoint=endpoint,
        endpoint_name="primary",
        prompt_tokens=12,
        completion_tokens=34,
        tokens_estimated=True,
        latency_ms=1250.0,
        ttft_ms=210.5,
        status=UsageStatus.OK,
    )
    Message.objects.create(
        conversation=conversation,
        role=ASSISTANT,
        content="The **moon** pulls the sea.",
        model_name=MODEL,
        endpoint=endpoint,
        endpoint_name="primary",
        usage=record,
        token_count=34,
        meta={"hops": [{"from": "backup", "to": "primary", "reason": "timeout"}]},
    )
    return conversation


def download(client: Client, conversation: Conversation, extension: str):
    return client.get(f"/chat/export/{conversation.id}.{extension}")


def headings(markdown: str) -> list[str]:
    """The headings a CommonMark renderer sees (not lines inside code blocks)."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [
        tokens[index + 1].content
        for index, token in enumerate(tokens)
        if token.type == "heading_open"
    ]


def roles(markdown: str) -> list[str]:
    """Who speaks, by the message headings after the title."""
    return [heading.split(" · ")[0] for heading in headings(markdown)[1:]]


def code_blocks(markdown: str) -> list[str]:
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [token.content for token in tokens if token.type == "fence"]


# --- JSON --------------------------------------------------------------------------


def test_the_json_file_holds_the_conversation_settings_and_usage(alice, answered):
    response = download(alice, answered, "json")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == 'attachment; filename="tides.json"'
    document = json.loads(response.content)
    assert document["format"] == export.FORMAT
    assert document["version"] == export.VERSION
    [conversation] = document["conversations"]
    assert conversation["id"] == str(answered.id)
    assert conversation["title"] == "Tides"
    assert conversation["model"] == MODEL
    assert conversation["settings"] == {
        "system_prompt": "Answer like a sailor.",
        "temperature": 0.3,
        "top_p": None,
        "max_tokens": None,
    }
    question, answer = conversation["messages"]
    assert question["role"] == "user"
    assert question["content"] == "How do tides work?"
    assert question["usage"] is None
    assert answer["role"] == "assistant"
    assert answer["status"] == "complete"
    assert answer["model"] == MODEL
    assert answer["endpoint"] == "primary"
    record = UsageRecord.objects.get()
    assert answer["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "estimated": True,
        "latency_ms": 1250.0,
        "ttft_ms": 210.5,
        "request_id": str(record.request_id),
    }
    assert answer["fallback"] == [
        {"from": "backup", "to": "primary", "reason": "timeout"}
    ]


def test_the_json_file_reads_back_to_what_is_stored(alice, answered):
    document = json.loads(download(alice, answered, "json").content)
    [conversation] = document["conversations"]

    stored = answered.messages.order_by("created_at", "id")
    assert [
        (m["id"], m["role"], m["content"], m["status"])
        for m in conversation["messages"]
    ] == [(m.id, m.role, m.content, m.status) for m in stored]
    assert uuid.UUID(conversation["id"]) == answered.id
    assert conversation["created_at"] == answered.created_at.isoformat()
    assert conversation["updated_at"] == answered.updated_at.isoformat()


def test_an_answer_without_its_record_keeps_the_usage_it_noted(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "hi"))
    request_id = uuid.uuid4()
    Message.objects.create(
        conversation=conversation,
        role=ASSISTANT,
        content="hello",
        request_id=request_id,
        meta={
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "estimated": False},
            "latency_ms": 80.0,
            "ttft_ms": 40.0,
        },
    )
    _, messages = export.owned(owner, conversation.id)

    assert export.message_json(messages[1])["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "estimated": False,
        "latency_ms": 80.0,
        "ttft_ms": 40.0,
        "request_id": str(request_id),
    }


def test_both_files_keep_the_versions_and_markdown_reads_as_shown(
    alice, owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "Name a colour"))
    question = conversation.messages.get()
    earlier = Message.objects.create(
        conversation=conversation,
        parent=question,
        role=ASSISTANT,
        content="Blue",
        active=False,
    )
    shown = Message.objects.create(
        conversation=conversation, parent=question, role=ASSISTANT, content="Teal"
    )

    document = json.loads(download(alice, conversation, "json").content)
    [exported] = document["conversations"]
    markdown = download(alice, conversation, "md").content.decode()

    assert [(m["id"], m["parent_id"], m["shown"]) for m in exported["messages"]] == [
        (question.id, None, True),
        (earlier.id, question.id, False),
        (shown.id, question.id, True),
    ]
    assert roles(markdown) == ["You", "Assistant"]
    assert "Teal" in markdown
    assert "Blue" not in markdown


# --- Markdown ----------------------------------------------------------------------


def test_the_markdown_file_shows_who_said_what_and_how_it_was_answered(alice, answered):
    response = download(alice, answered, "md")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="tides.md"'
    text = response.content.decode()
    found = headings(text)
    assert found[0] == "Tides"
    assert found[1] == "System prompt"
    assert found[2].startswith("You · ")
    assert found[3].startswith(f"Assistant ({MODEL}) · ")
    assert "The **moon** pulls the sea." in text
    assert "_via primary · ≈12 in · ≈34 out · 1.2 s · first token 210 ms_" in text
    assert code_blocks(text) == ["Answer like a sailor.\n"]
    assert "- Temperature: 0.3" in text


def test_code_in_a_message_does_not_swallow_the_messages_after_it(
    owner, make_conversation
):
    conversation = make_conversation(
        owner,
        (USER, "What does this print?\n```python\nprint('## not a heading')\n```"),
        (ASSISTANT, "It prints:\n\n~~~\n## not a heading\n~~~"),
        (USER, "thanks"),
    )
    text = export.document_markdown(*export.owned(owner, conversation.id))

    assert roles(text) == ["You", "Assistant", "You"]
    assert code_blocks(text) == ["print('## not a heading')\n", "## not a heading\n"]


def test_a_block_left_open_by_a_stopped_answer_is_closed(owner, make_conversation):
    conversation = make_conversation(
        owner,
        (USER, "Write a script"),
        (ASSISTANT, "Here:\n\n````bash\necho ```\necho hi", MessageStatus.PARTIAL),
        (USER, "go on"),
    )
    text = export.document_markdown(*export.owned(owner, conversation.id))

    assert roles(text) == ["You", "Assistant", "You"]
    assert code_blocks(text) == ["echo ```\necho hi\n"]
    assert "partial" in text


def test_raw_html_that_would_hide_the_rest_shows_as_text(owner, make_conversation):
    conversation = make_conversation(
        owner,
        (USER, "What is <!-- this?"),
        (ASSISTANT, "<script>\nalert(1)\n\n```html\n<!-- a comment\n```"),
        (USER, "and <pre>?"),
    )
    text = export.document_markdown(*export.owned(owner, conversation.id))

    assert roles(text) == ["You", "Assistant", "You"]
    assert "\\<script>\nalert(1)" in text
    assert code_blocks(text) == ["<!-- a comment\n"]
    html = MarkdownIt("commonmark").render(text)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_a_system_prompt_with_fences_sits_in_a_longer_fence(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "hi"))
    conversation.system_prompt = "Answer in code:\n```\nlike this\n```\n## Rules"
    conversation.save()

    text = export.document_markdown(*export.owned(owner, conversation.id))

    assert "````text\n" in text
    assert code_blocks(text) == [conversation.system_prompt + "\n"]
    assert "Rules" not in headings(text)


def test_a_title_with_markup_stays_one_heading(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "hi"), title="# Plans\n## for *May*")

    text = export.document_markdown(*export.owned(owner, conversation.id))

    title, question = headings(text)[:2]
    assert title == "\\# Plans \\#\\# for *May*"
    assert question.startswith("You · ")


def test_file_names_are_made_safe_from_the_title(owner, make_conversation):
    risky = make_conversation(owner, title='../../etc/passwd"\r\nX-Evil: 1')
    nameless = make_conversation(owner, title="")
    accents = make_conversation(owner, title="Crème brûlée ça va")

    assert export.filename(risky, "md") == "etcpasswd-x-evil-1.md"
    assert (
        export.filename(nameless, "json") == f"conversation-{str(nameless.id)[:8]}.json"
    )
    assert export.filename(accents, "md") == "crème-brûlée-ça-va.md"


def test_a_non_ascii_file_name_is_sent_encoded(alice, owner, make_conversation):
    conversation = make_conversation(owner, (USER, "hi"), title="Crème brûlée")

    response = download(alice, conversation, "md")

    assert response["Content-Disposition"] == (
        "attachment; filename*=utf-8''cr%C3%A8me-br%C3%BBl%C3%A9e.md"
    )


# --- Who may export ------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["md", "json"])
def test_another_users_conversation_is_not_found(bob, answered, extension):
    response = download(bob, answered, extension)

    assert response.status_code == 404
    assert b"moon" not in response.content


@pytest.mark.parametrize("extension", ["md", "json"])
def test_a_missing_conversation_is_not_found_the_same_way(alice, extension):
    response = alice.get(f"/chat/export/{uuid.uuid4()}.{extension}")

    assert response.status_code == 404


@pytest.mark.parametrize(
    "url", ["/chat/export/all.json", f"/chat/export/{uuid.uuid4()}.md"]
)
def test_signed_out_visitors_are_sent_to_sign_in(client, url):
    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_exports_answer_only_get(alice, answered):
    assert alice.post(f"/chat/export/{answered.id}.json").status_code == 405
    assert alice.post("/chat/export/all.json").status_code == 405


# --- Everything at once -------------------------------------------------------


def read_all(client: Client) -> dict:
    response = client.get("/chat/export/all.json")
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Disposition"] == (
        'attachment; filename="llmsite-conversations.json"'
    )
    return json.loads(b"".join(response.streaming_content))


def test_all_conversations_come_as_one_json_file_without_others(
    alice, owner, other_user, answered, make_conversation
):
    empty = make_conversation(owner, title="Nothing yet")
    make_conversation(other_user, (USER, "bob's secret"), title="Bob's")

    document = read_all(alice)

    assert document["format"] == export.FORMAT
    assert document["version"] == export.VERSION
    by_id = {c["id"]: c for c in document["conversations"]}
    assert set(by_id) == {str(answered.id), str(empty.id)}
    assert by_id[str(empty.id)]["messages"] == []
    assert [m["content"] for m in by_id[str(answered.id)]["messages"]] == [
        "How do tides work?",
        "The **moon** pulls the sea.",
    ]
    assert "bob's secret" not in json.dumps(document)


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_file_streams_from_an_async_iterator(owner, monkeypatch):
    """A sync iterator would be read whole into a list by Django under ASGI."""
    monkeypatch.setattr(export, "FLUSH_CHARS", 10)
    conversation = await Conversation.objects.acreate(user=owner, title="Async")
    await Message.objects.acreate(conversation=conversation, role=USER, content="hi")
    client = AsyncClient()
    await client.aforce_login(owner)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = await client.get("/chat/export/all.json")
        assert response.status_code == 200
        assert response.is_async
        pieces = [piece async for piece in response.streaming_content]

    assert len(pieces) > 1
    [exported] = json.loads(b"".join(pieces))["conversations"]
    assert exported["id"] == str(conversation.id)
    assert [m["content"] for m in exported["messages"]] == ["hi"]
    close_thread_connections()


def test_a_user_without_conversations_gets_an_empty_list(bob):
    assert read_all(bob)["conversations"] == []


def test_many_conversations_stream_in_batches_with_few_queries(
    owner, monkeypatch, django_assert_max_num_queries
):
    monkeypatch.setattr(export, "BATCH", 20)
    monkeypatch.setattr(export, "FLUSH_CHARS", 2000)
    conversations = Conversation.objects.bulk_create(
        Conversation(user=owner, title=f"c{index}", model_name=MODEL)
        for index in range(250)
    )
    Message.objects.bulk_create(
        Message(conversation=c, role=role, content=f"{role} of {c.title}")
        for c in conversations
        for role in (USER, ASSISTANT)
    )

    with CaptureQueriesContext(connection) as queries:
        pieces = list(export.stream_all(owner))

    # Three queries a batch (conversations, their messages with usage, the
    # messages' images) and one to find the end: 13 batches of 20 for 250.
    assert len(queries) <= 3 * 13 + 1
    assert len(pieces) > 10
    assert max(len(piece) for piece in pieces) < 2000 + 1000
    document = json.loads("".join(pieces))
    assert len(document["conversations"]) == 250
    assert len({c["id"] for c in document["conversations"]}) == 250
    first = document["conversations"][0]
    assert [m["content"] for m in first["messages"]] == [
        f"user of {first['title']}",
        f"assistant of {first['title']}",
    ]
