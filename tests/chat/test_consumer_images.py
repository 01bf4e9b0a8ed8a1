"""Images over the websocket: sent as content parts, refused without a trace."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat import attachments
from chat.models import Attachment, Conversation, Message
from gateway import router
from gateway.models import Endpoint, ModelRoute
from gateway.simulator import Behaviour, SimulatedUpstream
from tests.chat.conftest import MODEL
from tests.chat.images import image_bytes

# The autouse fixture ends each test with its answers stored.
from tests.chat.test_consumer_streams import (  # noqa: F401
    _no_answer_left_running,
    frames_until,
    session_cookie,
)
from tests.chat.test_consumer_streams import connect as connect_with

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstream():
    server = SimulatedUpstream(behaviour=Behaviour(completion_tokens=8))
    with server.run_in_thread():
        yield server


@pytest.fixture
def image_route(upstream, settings):
    settings.RATE_LIMIT_RPM = 1000
    endpoint = Endpoint.objects.create(
        name="vision", base_url=upstream.base_url_for("/e/1"), timeout=5
    )
    route = ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model="sim-small",
        accepts_images=True,
    )
    router.forget_routes()
    return route


async def connect(user) -> WebsocketCommunicator:
    return await connect_with(await sync_to_async(session_cookie)(user))


async def until(communicator, *types: str) -> list[dict[str, Any]]:
    return await frames_until(communicator, *types)


async def upload(user, fmt: str = "PNG") -> Attachment:
    return await sync_to_async(attachments.store_upload)(user, image_bytes(fmt))


async def send(communicator, ids, content="/sim images\nWhat is in it?"):
    await communicator.send_json_to(
        {
            "type": "send",
            "conversation_id": None,
            "content": content,
            "model": MODEL,
            "attachments": [str(i) for i in ids],
        }
    )


async def test_an_attached_image_reaches_the_upstream_as_a_content_part(
    owner, image_route
):
    image = await upload(owner)
    communicator = await connect(owner)

    await send(communicator, [image.id])
    frames = await until(communicator, "done", "error")

    start = next(f for f in frames if f["type"] == "start")
    assert [a["id"] for a in start["user_message"]["attachments"]] == [str(image.id)]
    done = frames[-1]
    assert done["type"] == "done"
    assert done["answer"]["content"] == (
        f"Received 1 image: image/png {image.size} bytes."
    )
    await image.arefresh_from_db()
    question = await Message.objects.aget(role="user")
    assert image.message_id == question.id
    # Counted with the image rule: 40x30 is one tile, 85 + 170 tokens.
    assert done["context"]["tokens"] >= 255
    await communicator.disconnect()


async def test_someone_elses_image_is_refused_and_nothing_is_stored(
    owner, other_user, image_route
):
    theirs = await upload(other_user)
    communicator = await connect(owner)

    await send(communicator, [theirs.id])
    error = (await until(communicator, "error"))[-1]

    assert (error["code"], error["request"]) == ("not_found", "send")
    assert not await Conversation.objects.aexists()
    await theirs.arefresh_from_db()
    assert theirs.message_id is None
    await communicator.disconnect()


async def test_images_for_a_text_only_model_are_refused_and_stay_unsent(
    owner, image_route
):
    image_route.accepts_images = False
    await image_route.asave()
    router.forget_routes()
    image = await upload(owner)
    communicator = await connect(owner)

    await send(communicator, [image.id])
    error = (await until(communicator, "error"))[-1]

    assert error["code"] == "invalid"
    assert "does not take images" in error["message"]
    assert not await Message.objects.aexists()
    await image.arefresh_from_db()
    assert image.message_id is None
    await communicator.disconnect()


async def test_more_images_than_allowed_are_refused(owner, image_route, settings):
    settings.CHAT_MAX_IMAGES_PER_MESSAGE = 1
    first, second = await upload(owner), await upload(owner)
    communicator = await connect(owner)

    await send(communicator, [first.id, second.id])
    error = (await until(communicator, "error"))[-1]

    assert error["code"] == "invalid"
    assert "at most 1 images" in error["message"]
    assert not await Message.objects.aexists()
    await communicator.disconnect()


async def test_a_refused_send_keeps_the_upload_for_another_try(owner, image_route):
    # The image alone (85 + 170 tokens) does not fit what the window leaves.
    image_route.context_window, image_route.max_output_tokens = 300, 100
    await image_route.asave()
    router.forget_routes()
    image = await upload(owner)
    communicator = await connect(owner)
    await send(communicator, [image.id], content="What is in it?")
    error = (await until(communicator, "error"))[-1]
    assert (error["code"], error.get("refused")) == ("context_too_large", True)
    await image.arefresh_from_db()
    assert image.message_id is None
    assert not await Message.objects.aexists()

    image_route.context_window = 4000
    await image_route.asave()
    router.forget_routes()
    await send(communicator, [image.id])
    done = (await until(communicator, "done", "error"))[-1]

    assert done["type"] == "done"
    assert done["answer"]["content"].startswith("Received 1 image")
    await communicator.disconnect()
