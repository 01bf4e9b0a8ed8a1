"""The chat's reads and writes, without a socket: ownership, turns, search."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import actions
from chat.errors import ChatError
from chat.models import Conversation, Message, MessageStatus
from tests.chat.conftest import ASSISTANT, MODEL, USER

pytestmark = pytest.mark.django_db


def test_a_first_message_creates_a_conversation_titled_after_it(owner, model_route):
    new_id = uuid.uuid4()

    turn = actions.plan_send(
        owner,
        None,
        "  How do   tides work?\nAnd why twice a day?",
        MODEL,
        new_id=new_id,
    )
    actions.commit_turn(turn, uuid.uuid4())

    assert Conversation.objects.get().id == new_id
    assert turn.conversation.title == "How do tides work?"
    assert turn.user_message.content.startswith("  How do")
    assert turn.user_message.token_count > 0
    assert [m.role for m in turn.history] == ["user"]
    assert turn.history[0].id == turn.user_message.id


def test_turns_committed_together_fail_one_by_one(owner, make_conversation):
    doomed = make_conversation(owner, (USER, "q1"), (ASSISTANT, "a1"))
    other = make_conversation(owner, (USER, "q1"), (ASSISTANT, "a1"))
    refused = actions.plan_send(owner, doomed.id, "q2", MODEL)
    fresh = actions.plan_send(owner, None, "Why is the sea salty?", MODEL)
    kept = actions.plan_send(owner, other.id, "q2", MODEL)
    doomed.delete()

    outcomes = actions.commit_turns(
        [(refused, uuid.uuid4()), (fresh, uuid.uuid4()), (kept, uuid.uuid4())]
    )

    assert isinstance(outcomes[0], ChatError)
    assert outcomes[1:] == [None, None]
    assert not refused.committed
    assert actions.message_dict(fresh.user_message)["versions"]["count"] == 1
    assert kept.user_message.parent.content == "a1"
    assert Message.objects.filter(status=MessageStatus.STREAMING).count() == 2


def test_new_conversations_committed_together_take_the_same_queries(owner, model_route):
    def commit(count):
        turns = [
            (actions.plan_send(owner, None, f"Question {n}?", MODEL), uuid.uuid4())
            for n in range(count)
        ]
        with CaptureQueriesContext(connection) as queries:
            outcomes = actions.commit_turns(turns)
        assert outcomes == [None] * count
        return turns, len(queries)

    _, two = commit(2)
    turns, twelve = commit(12)

    assert twelve == two
    for turn, request_id in turns:
        answer = Message.objects.get(id=turn.answer_id)
        assert answer.parent_id == turn.user_message.id
        assert answer.request_id == request_id
        assert answer.status == MessageStatus.STREAMING
        assert turn.history[-1].id == turn.user_message.id
        shown = actions.message_dict(turn.user_message)
        assert shown["attachments"] == []
        assert shown["parent_id"] is None
        assert shown["content"] == turn.content
    assert Conversation.objects.filter(user=owner).count() == 14


def test_a_refused_new_conversation_leaves_the_others_of_its_batch_stored(
    owner, model_route
):
    taken = actions.plan_send(owner, None, "First?", MODEL)
    actions.commit_turn(taken, uuid.uuid4())
    # The same id again: its insert fails, as a conversation that cannot be
    # stored would.
    clash = actions.plan_send(
        owner, None, "Again?", MODEL, new_id=taken.conversation.id
    )
    fresh = actions.plan_send(owner, None, "Why is the sea salty?", MODEL)

    outcomes = actions.commit_turns([(clash, uuid.uuid4()), (fresh, uuid.uuid4())])

    assert outcomes[0] is not None
    assert outcomes[1] is None
    assert not clash.committed
    assert fresh.committed
    assert fresh.conversation.messages.count() == 2
    assert taken.conversation.messages.count() == 2


def test_long_first_messages_give_a_shortened_title():
    title = actions.title_from("word " * 40)

    assert len(title) <= actions.TITLE_CHARS
    assert title.endswith("…")


@pytest.mark.parametrize(
    ("question", "title"),
    [
        ("/sim tps=50\nWhy is the sky blue?", "Why is the sky blue?"),
        ("## Fix my *flaky* test\nIt fails on CI", "Fix my flaky test"),
        (
            "Read [the docs](https://example.com/x) and **then** `run()`",
            "Read the docs and then run()",
        ),
        ("```python\nprint(1)\n```\nWhat does it print?", "print(1)"),
        ("> - [ ] quoted task\n", "quoted task"),
        ("Rename snake_case_name to __camel__", "Rename snake_case_name to camel"),
        ("\n\n---\n   \nplain line", "plain line"),
        ("/sim echo", ""),
    ],
)
def test_titles_are_the_first_line_of_text_without_markup(question, title):
    assert actions.title_from(question) == title


def test_editing_the_first_question_gives_a_new_title(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q1"), (ASSISTANT, "a1"), title="q1")
    first = conversation.messages.first()

    turn = actions.plan_edit(owner, first.id, "# Better question\nmore", None)
    actions.commit_turn(turn, uuid.uuid4())

    conversation.refresh_from_db()
    assert conversation.title == "Better question"
    assert turn.conversation.title == "Better question"


def test_editing_a_later_question_keeps_the_title(owner, make_conversation):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), title="q1"
    )
    second = conversation.messages.last()

    actions.commit_turn(
        actions.plan_edit(owner, second.id, "q2 again", None), uuid.uuid4()
    )

    conversation.refresh_from_db()
    assert conversation.title == "q1"


def test_a_title_set_by_hand_survives_an_edit_until_cleared(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q1"), (ASSISTANT, "a1"))
    first = conversation.messages.first()
    actions.rename(owner, conversation.id, "My name")

    actions.commit_turn(
        actions.plan_edit(owner, first.id, "q1 edited", None), uuid.uuid4()
    )
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_set_by_hand) == ("My name", True)

    cleared = actions.rename(owner, conversation.id, "  ")
    conversation.refresh_from_db()
    assert cleared["title"] == "q1 edited"
    assert conversation.title_set_by_hand is False


def test_history_keeps_the_system_prompt_and_skips_failed_answers(
    owner, make_conversation
):
    conversation = make_conversation(
        owner,
        (USER, "one"),
        (ASSISTANT, "", MessageStatus.ERROR),
        (USER, "one again"),
        (ASSISTANT, "partial answer", MessageStatus.PARTIAL),
    )
    conversation.system_prompt = "Be brief."
    conversation.save()

    turn = actions.plan_send(owner, conversation.id, "two", MODEL)

    assert [(m.role, m.content) for m in turn.history] == [
        ("system", "Be brief."),
        ("user", "one"),
        ("user", "one again"),
        ("assistant", "partial answer"),
        ("user", "two"),
    ]


def test_nobody_can_write_into_another_users_conversation(
    owner, other_user, make_conversation
):
    conversation = make_conversation(owner, (USER, "mine"))

    with pytest.raises(ChatError) as caught:
        actions.plan_send(other_user, conversation.id, "hello", MODEL)

    assert caught.value.code == "not_found"
    assert conversation.messages.count() == 1


def test_regenerate_keeps_the_last_answer_as_an_earlier_version(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )

    turn = actions.plan_regenerate(owner, conversation.id, None)
    actions.commit_turn(turn, uuid.uuid4())

    assert turn.user_message.content == "q2"
    assert [m.content for m in turn.history] == ["q1", "a1", "q2"]
    assert list(conversation.messages.values_list("content", "status", "active")) == [
        ("q1", MessageStatus.COMPLETE, True),
        ("a1", MessageStatus.COMPLETE, True),
        ("q2", MessageStatus.COMPLETE, True),
        ("a2", MessageStatus.COMPLETE, False),
        ("", MessageStatus.STREAMING, True),
    ]


def test_edit_adds_a_version_of_the_question_and_keeps_what_came_after(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    first = conversation.messages.first()

    turn = actions.plan_edit(owner, first.id, "q1, better", None)
    actions.commit_turn(turn, uuid.uuid4())

    assert turn.user_message.id != first.id
    assert turn.user_message.versions["index"] == 2
    assert list(
        conversation.messages.filter(active=True).values_list("content", flat=True)
    ) == ["q1, better", ""]
    assert list(
        conversation.messages.filter(active=False).values_list("content", flat=True)
    ) == ["q1", "a1", "q2", "a2"]


def test_only_user_messages_can_be_edited(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a"))
    answer = conversation.messages.last()

    with pytest.raises(ChatError) as caught:
        actions.plan_edit(owner, answer.id, "rewritten", None)

    assert caught.value.code == "invalid"


def test_another_users_message_cannot_be_edited(owner, other_user, make_conversation):
    question = make_conversation(owner, (USER, "q")).messages.get()

    with pytest.raises(ChatError) as caught:
        actions.plan_edit(other_user, question.id, "mine now", None)

    assert caught.value.code == "not_found"
    question.refresh_from_db()
    assert question.content == "q"


def test_an_answer_is_stored_with_its_footer(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "", "streaming"))
    placeholder = conversation.messages.last()
    meta = {"endpoint": "primary", "usage": {"prompt_tokens": 5}}

    saved = actions.save_answer(
        conversation.id,
        placeholder.id,
        actions.Answer(
            content="a", status=MessageStatus.COMPLETE, model=MODEL, meta=meta
        ),
    )

    stored = Message.objects.get(id=saved["id"])
    assert (stored.role, stored.content, stored.meta) == (ASSISTANT, "a", meta)


def test_an_answer_to_a_deleted_conversation_is_dropped(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "", "streaming"))
    placeholder = conversation.messages.last()
    conversation.delete()

    saved = actions.save_answer(
        conversation.id,
        placeholder.id,
        actions.Answer(content="a", status=MessageStatus.PARTIAL, model=MODEL),
    )

    assert saved is None
    assert not Message.objects.exists()


def test_answers_ending_together_are_stored_in_the_same_queries(
    owner, make_conversation
):
    def end(count):
        placeholders = []
        for _ in range(count):
            conversation = make_conversation(
                owner, (USER, "q"), (ASSISTANT, "", "streaming")
            )
            placeholder = conversation.messages.last()
            # Another version of the answer, regenerated later.
            Message.objects.create(
                conversation=conversation,
                parent_id=placeholder.parent_id,
                role=ASSISTANT,
                content="later",
                active=False,
            )
            placeholders.append(placeholder)
        items = [
            (
                p.conversation_id,
                p.id,
                actions.Answer(
                    content=f"answer {n}",
                    status=MessageStatus.COMPLETE,
                    model=MODEL,
                    meta={"endpoint": "primary"},
                ),
            )
            for n, p in enumerate(placeholders)
        ]
        with CaptureQueriesContext(connection) as queries:
            saved = actions.save_answers(items)
        return saved, len(queries)

    _, two = end(2)
    saved, eight = end(8)

    assert eight == two + 6  # one UPDATE per answer, the rest shared
    assert [s["content"] for s in saved] == [f"answer {n}" for n in range(8)]
    # Each is the first of two versions of the answer to its own question.
    assert [(s["versions"]["index"], s["versions"]["count"]) for s in saved] == [
        (1, 2)
    ] * 8
    assert all(s["versions"]["next"] == s["id"] + 1 for s in saved)
    assert all(s["meta"] == {"endpoint": "primary"} for s in saved)


def test_first_questions_of_different_conversations_are_not_versions(
    owner, make_conversation
):
    firsts = [make_conversation(owner, (USER, "q")).messages.get() for _ in range(3)]

    shown = actions.with_versions(firsts)

    assert [m.versions["count"] for m in shown] == [1, 1, 1]


def test_an_answer_deleted_before_its_batch_is_stored_is_dropped_alone(
    owner, make_conversation
):
    kept = make_conversation(owner, (USER, "q"), (ASSISTANT, "", "streaming"))
    gone = make_conversation(owner, (USER, "q"), (ASSISTANT, "", "streaming"))
    items = [
        (
            c.id,
            c.messages.last().id,
            actions.Answer(content="a", status=MessageStatus.COMPLETE, model=MODEL),
        )
        for c in (gone, kept)
    ]
    gone.delete()

    saved = actions.save_answers(items)

    assert saved[0] is None
    assert saved[1]["content"] == "a"
    assert Message.objects.get(id=items[1][1]).status == MessageStatus.COMPLETE


def test_the_list_is_newest_first_and_only_the_users_own(
    owner, other_user, make_conversation
):
    older = make_conversation(owner, title="older")
    newer = make_conversation(owner, title="newer")
    make_conversation(other_user, title="bob's")
    Conversation.objects.filter(id=newer.id).update(updated_at=older.updated_at)
    Conversation.objects.filter(id=older.id).update(
        updated_at=older.updated_at.replace(year=2020)
    )

    page = actions.list_conversations(owner)

    assert [c["title"] for c in page["conversations"]] == ["newer", "older"]
    assert page["more"] is False


def test_search_finds_titles_and_message_text(owner, other_user, make_conversation):
    make_conversation(owner, (USER, "nothing here"), title="Tides")
    make_conversation(owner, (USER, "what about TIDES in lakes?"), title="Lakes")
    make_conversation(owner, (USER, "bread"), title="Baking")
    make_conversation(other_user, (USER, "tides"), title="Bob's tides")

    found = actions.list_conversations(owner, "tides")

    assert sorted(c["title"] for c in found["conversations"]) == ["Lakes", "Tides"]


def test_paging_goes_on_from_the_oldest_shown(owner, make_conversation):
    for index in range(5):
        make_conversation(owner, title=f"c{index}")

    first = actions.list_conversations(owner, limit=3)
    oldest = Conversation.objects.get(id=first["conversations"][-1]["id"]).updated_at
    rest = actions.list_conversations(owner, before=oldest, limit=3)

    assert first["more"] is True
    assert len(first["conversations"]) + len(rest["conversations"]) == 5
    assert rest["more"] is False


def test_rename_and_delete_are_owner_only(owner, other_user, make_conversation):
    conversation = make_conversation(owner, (USER, "q"))

    with pytest.raises(ChatError):
        actions.rename(other_user, conversation.id, "stolen")
    with pytest.raises(ChatError):
        actions.delete(other_user, conversation.id)
    renamed = actions.rename(owner, conversation.id, "  New   name ")

    assert renamed["title"] == "New name"
    actions.delete(owner, conversation.id)
    assert not Conversation.objects.exists()


def test_only_models_with_an_enabled_route_are_offered(model_route):
    endpoint = model_route.endpoint
    model_route.pk = None
    model_route.model_name = "switched-off"
    model_route.enabled = False
    model_route.save()

    assert actions.available_models() == [MODEL]
    endpoint.enabled = False
    endpoint.save()
    assert actions.available_models() == []
