"""Answer versions in chat.actions: regenerate and edit keep what they replace."""

from __future__ import annotations

import importlib
import uuid

import pytest
from django.apps import apps
from django.core.cache import cache

from chat import actions, leases
from chat.errors import ChatError
from chat.models import Message
from tests.chat.conftest import ASSISTANT, MODEL, USER

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_claims():
    cache.clear()
    yield
    cache.clear()


def answer(turn: actions.Turn, content: str) -> Message:
    """Commit a planned turn and store its answer, as a finished generation does."""
    actions.commit_turn(turn, uuid.uuid4())
    actions.save_answer(
        turn.conversation.id,
        turn.answer_id,
        actions.Answer(content=content, status="complete", model=MODEL),
    )
    return Message.objects.get(id=turn.answer_id)


def shown(user, conversation) -> list[tuple[str, str]]:
    """What the page shows: the path, with each message's "n / m"."""
    opened = actions.open_conversation(user, conversation.id)
    return [
        (m["content"], f"{m['versions']['index']}/{m['versions']['count']}")
        for m in opened["messages"]
    ]


def regenerate(user, conversation, content: str) -> Message:
    return answer(actions.plan_regenerate(user, conversation.id, None), content)


def edit(user, message, content: str, answer_content: str) -> Message:
    return answer(actions.plan_edit(user, message.id, content, None), answer_content)


def test_regenerating_twice_keeps_three_versions_of_the_answer(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))

    regenerate(owner, conversation, "a2")
    third = regenerate(owner, conversation, "a3")

    assert shown(owner, conversation) == [("q", "1/1"), ("a3", "3/3")]
    page = actions.open_conversation(owner, conversation.id)["messages"]
    versions = page[-1]["versions"]
    second = Message.objects.get(content="a2")
    assert (versions["prev"], versions["next"]) == (second.id, None)
    assert page[-1]["id"] == third.id
    assert page[-1]["parent_id"] == page[0]["id"]


def test_switching_shows_an_earlier_answer_and_the_next_question_follows_it(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))
    first = conversation.messages.get(content="a1")
    regenerate(owner, conversation, "a2")

    opened = actions.switch_version(owner, conversation.id, first.id)

    assert opened["type"] == "opened"
    assert [m["content"] for m in opened["messages"]] == ["q", "a1"]
    assert opened["messages"][-1]["versions"]["index"] == 1
    turn = actions.plan_send(owner, conversation.id, "and then?", MODEL)
    assert [m.content for m in turn.history] == ["q", "a1", "and then?"]
    actions.commit_turn(turn, uuid.uuid4())
    assert turn.user_message.parent_id == first.id


def test_regenerate_while_an_old_version_is_shown_answers_the_question_shown(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    q2 = conversation.messages.get(content="q2")
    edit(owner, q2, "q2 rewritten", "a2 for the rewrite")
    actions.switch_version(owner, conversation.id, q2.id)

    turn = actions.plan_regenerate(owner, conversation.id, None)
    again = answer(turn, "a2 again")

    assert [m.content for m in turn.history] == ["q1", "a1", "q2"]
    assert again.parent_id == q2.id
    assert shown(owner, conversation) == [
        ("q1", "1/1"),
        ("a1", "1/1"),
        ("q2", "1/2"),
        ("a2 again", "2/2"),
    ]


def test_switching_the_question_brings_back_the_branch_last_shown_below_it(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    q1 = conversation.messages.get(content="q1")
    # A new branch from the first question, whose answer has two versions of
    # which the first is shown when we leave it.
    first_rewrite_answer = edit(owner, q1, "q1'", "a1' one")
    rewrite = Message.objects.get(content="q1'")
    regenerate(owner, conversation, "a1' two")
    actions.switch_version(owner, conversation.id, first_rewrite_answer.id)

    actions.switch_version(owner, conversation.id, q1.id)
    assert shown(owner, conversation) == [
        ("q1", "1/2"),
        ("a1", "1/1"),
        ("q2", "1/1"),
        ("a2", "1/1"),
    ]

    actions.switch_version(owner, conversation.id, rewrite.id)
    assert shown(owner, conversation) == [("q1'", "2/2"), ("a1' one", "1/2")]


def test_history_and_pages_read_only_the_path_shown(owner, make_conversation):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    edit(owner, conversation.messages.get(content="q2"), "q2'", "a2'")
    newest = conversation.messages.get(content="a2'")

    page = actions.message_page(owner, conversation.id, newest.id)
    turn = actions.plan_send(owner, conversation.id, "q3", MODEL)

    assert [m["content"] for m in page["messages"]] == ["q1", "a1", "q2'"]
    assert [m.content for m in turn.history] == ["q1", "a1", "q2'", "a2'", "q3"]


def test_nobody_can_switch_to_another_users_message(
    owner, other_user, make_conversation
):
    mine = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))
    regenerate(owner, mine, "a2")
    theirs = make_conversation(other_user, (USER, "their q"), (ASSISTANT, "their a"))
    their_answer = theirs.messages.get(role=ASSISTANT)
    my_first = mine.messages.get(content="a1")

    for user, conversation_id, message_id in [
        (owner, mine.id, their_answer.id),
        (owner, theirs.id, their_answer.id),
        (other_user, mine.id, my_first.id),
        (owner, uuid.uuid4(), my_first.id),
    ]:
        with pytest.raises(ChatError) as caught:
            actions.switch_version(user, conversation_id, message_id)
        assert caught.value.code == "not_found"

    assert shown(owner, mine) == [("q", "1/1"), ("a2", "2/2")]


def test_a_message_of_another_conversation_is_not_found(owner, make_conversation):
    one = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))
    two = make_conversation(owner, (USER, "other q"), (ASSISTANT, "other a"))

    with pytest.raises(ChatError) as caught:
        actions.switch_version(owner, one.id, two.messages.last().id)

    assert caught.value.code == "not_found"


def test_switching_is_refused_while_the_conversation_is_answered(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))
    first = conversation.messages.get(content="a1")
    regenerate(owner, conversation, "a2")
    lease = leases.claim(owner.pk, conversation.id, 3, "elsewhere")

    with pytest.raises(ChatError) as caught:
        actions.switch_version(owner, conversation.id, first.id)

    leases.release(lease)
    assert caught.value.code == "busy"
    assert shown(owner, conversation) == [("q", "1/1"), ("a2", "2/2")]


def test_an_uncommitted_regenerate_leaves_the_path_as_it_was(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))

    # Planned but refused by the gateway: never committed.
    actions.plan_regenerate(owner, conversation.id, None)

    assert shown(owner, conversation) == [("q", "1/1"), ("a1", "1/1")]
    assert conversation.messages.count() == 2


def test_a_question_not_shown_any_more_cannot_be_edited(owner, make_conversation):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a"))
    old = conversation.messages.get(content="q")
    edit(owner, old, "q'", "a'")

    with pytest.raises(ChatError) as caught:
        actions.plan_edit(owner, old.id, "q''", None)

    assert caught.value.code == "invalid"


def test_switching_to_a_version_under_a_hidden_branch_is_refused(
    owner, make_conversation
):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    hidden_answer = conversation.messages.get(content="a2")
    edit(owner, conversation.messages.get(content="q1"), "q1'", "a1'")

    with pytest.raises(ChatError) as caught:
        actions.switch_version(owner, conversation.id, hidden_answer.id)

    assert caught.value.code == "invalid"
    assert shown(owner, conversation) == [("q1'", "2/2"), ("a1'", "1/1")]


def test_a_page_reads_its_versions_in_one_query(
    owner, make_conversation, django_assert_num_queries
):
    conversation = make_conversation(
        owner, *[(USER if i % 2 == 0 else ASSISTANT, f"m{i}") for i in range(20)]
    )
    regenerate(owner, conversation, "again")

    # The conversation, streaming answers, one page batch, its images, its
    # versions.
    with django_assert_num_queries(5):
        opened = actions.open_conversation(owner, conversation.id, running=True)

    assert len(opened["messages"]) == 20


def test_the_migration_links_existing_messages_in_order(owner, make_conversation):
    conversation = make_conversation(
        owner, (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"), (ASSISTANT, "a2")
    )
    conversation.messages.update(parent=None)
    migration = importlib.import_module("chat.migrations.0003_message_versions")

    migration.link_linear_chains(apps, None)

    rows = list(conversation.messages.order_by("created_at", "id"))
    assert [m.parent_id for m in rows] == [None, *[m.id for m in rows[:-1]]]
    assert shown(owner, conversation) == [
        ("q1", "1/1"),
        ("a1", "1/1"),
        ("q2", "1/1"),
        ("a2", "1/1"),
    ]


def test_a_message_stored_without_a_parent_follows_the_path_shown(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "q"), (ASSISTANT, "a1"))
    first = conversation.messages.get(content="a1")
    regenerate(owner, conversation, "a2")
    actions.switch_version(owner, conversation.id, first.id)

    later = Message.objects.create(conversation=conversation, role=USER, content="q2")

    assert later.parent_id == first.id
    assert shown(owner, conversation)[-1] == ("q2", "1/1")
