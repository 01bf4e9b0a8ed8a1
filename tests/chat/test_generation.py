"""The first step of answers started together, without a socket."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import generation, leases
from chat.errors import ChatError
from chat.protocol import Send
from gateway import accounting, limits
from tests.chat.conftest import MODEL

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _nothing_kept():
    limits._caller_limits.clear()
    accounting.forget_budgets()
    yield
    limits._caller_limits.clear()
    accounting.forget_budgets()


def first_steps(users):
    return [
        (
            user.pk,
            generation.prepare_for(user, Send(None, f"Hello from {user}", MODEL)),
            "owner-channel",
        )
        for user in users
    ]


def test_answers_started_together_read_their_askers_policies_once(
    django_user_model, model_route
):
    def start(count, prefix):
        users = [
            django_user_model.objects.create_user(f"{prefix}{n}") for n in range(count)
        ]
        with CaptureQueriesContext(connection) as queries:
            prepared = generation.prepare_all(first_steps(users))
        return prepared, len(queries)

    start(1, "warm")  # the model's defaults, read once per process
    _, two = start(2, "a")
    prepared, eight = start(8, "b")

    assert eight == two
    for turn, lease in prepared:
        assert turn.is_new_conversation
        assert cache.get(lease.conversation_key) == "owner-channel"
        leases.release(lease)


def test_a_refused_first_step_leaves_the_others_of_its_batch_started(
    owner, other_user, model_route, settings
):
    settings.CHAT_MAX_CONCURRENT_GENERATIONS = 1
    busy = generation.prepare_all(first_steps([owner]))[0]

    outcomes = generation.prepare_all(first_steps([owner, other_user]))

    assert isinstance(outcomes[0], ChatError)
    assert outcomes[0].code == "too_many_generations"
    assert outcomes[1][0].conversation.user == other_user
    for _, claims in (busy, outcomes[1]):
        leases.release(claims)
