"""Claims on running answers: one per conversation, a few per user, and they expire."""

from __future__ import annotations

import uuid

import pytest
import time_machine

from chat import leases
from chat.errors import ChatError


def test_one_answer_per_conversation():
    conversation = uuid.uuid4()
    leases.claim(1, conversation, 2, "process-a")

    with pytest.raises(ChatError) as caught:
        leases.claim(1, conversation, 2, "process-b")

    assert caught.value.code == "busy"
    assert leases.owner_of(conversation) == "process-a"


def test_a_user_has_a_limited_number_of_slots():
    leases.claim(1, uuid.uuid4(), 2, "p")
    leases.claim(1, uuid.uuid4(), 2, "p")
    refused = uuid.uuid4()

    with pytest.raises(ChatError) as caught:
        leases.claim(1, refused, 2, "p")
    leases.claim(2, uuid.uuid4(), 2, "p")

    assert caught.value.code == "too_many_generations"
    # The refused claim does not keep the conversation busy.
    assert leases.owner_of(refused) is None


def test_released_claims_free_the_slot_and_the_conversation():
    conversation = uuid.uuid4()
    lease = leases.claim(1, conversation, 1, "p")

    leases.release(lease)

    assert leases.owner_of(conversation) is None
    leases.claim(1, uuid.uuid4(), 1, "p")


def test_claims_of_a_dead_process_expire_unless_renewed(settings):
    # Frozen time moves local-memory expiry; Redis keeps its own clock.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "chat-leases",
        }
    }
    with time_machine.travel(0, tick=False) as traveller:
        kept = leases.claim(1, uuid.uuid4(), 2, "alive")
        lost = leases.claim(1, uuid.uuid4(), 2, "dead")

        traveller.shift(leases.renew_seconds())
        leases.renew([kept])
        traveller.shift(leases.lease_seconds() - leases.renew_seconds() + 1)

        assert leases.owner_of(uuid.UUID(kept.conversation_key.rsplit(":")[-1])) == (
            "alive"
        )
        assert leases.owner_of(uuid.UUID(lost.conversation_key.rsplit(":")[-1])) is None
        leases.claim(1, uuid.uuid4(), 2, "new")
