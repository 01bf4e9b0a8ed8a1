"""Fixtures for the chat tests: a configured model and conversations to work on."""

from __future__ import annotations

import pytest

from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway.models import Endpoint, ModelRoute

MODEL = "house-model"


@pytest.fixture
def model_route(db):
    """One enabled route for MODEL on an endpoint nobody calls in unit tests."""
    endpoint = Endpoint.objects.create(name="primary", base_url="http://127.0.0.1:9/v1")
    return ModelRoute.objects.create(
        model_name=MODEL, endpoint=endpoint, upstream_model="sim-small"
    )


@pytest.fixture
def make_conversation(db):
    """Create a conversation with (role, content[, status]) turns, in order."""

    def make(user, *turns, title="Plans") -> Conversation:
        conversation = Conversation.objects.create(
            user=user, title=title, model_name=MODEL
        )
        for turn in turns:
            role, content, *rest = turn
            Message.objects.create(
                conversation=conversation,
                role=role,
                content=content,
                status=rest[0] if rest else MessageStatus.COMPLETE,
            )
        return conversation

    return make


USER = MessageRole.USER
ASSISTANT = MessageRole.ASSISTANT
