"""Uploads are checked by content, re-encoded, bound once, and sent as image parts."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone
from PIL import Image

from chat import actions, attachments
from chat.errors import ChatError
from chat.models import Attachment, Message
from gateway.models import Endpoint, ModelRoute
from tests.chat.conftest import MODEL, USER
from tests.chat.images import image_bytes, png_claiming

pytestmark = pytest.mark.django_db


@pytest.fixture
def image_model(model_route):
    model_route.accepts_images = True
    model_route.save()
    return model_route


def upload(user, data: bytes | None = None) -> Attachment:
    return attachments.store_upload(user, data or image_bytes())


# --- Uploads ---------------------------------------------------------------------


def test_a_png_is_stored_with_its_size_hash_and_a_thumbnail(owner):
    stored = upload(owner, image_bytes("PNG", (600, 300)))

    assert (stored.content_type, stored.width, stored.height) == ("image/png", 600, 300)
    assert stored.size == len(stored.data)
    assert stored.sha256 == hashlib.sha256(stored.data).hexdigest()
    assert stored.message is None
    thumb = Image.open(io.BytesIO(stored.thumbnail))
    assert thumb.format == "WEBP"
    assert max(thumb.size) <= 256


def test_a_jpeg_loses_its_metadata(owner):
    exif = Image.Exif()
    exif[0x010F] = "Secret Camera Co"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 0.0)}  # GPS
    stored = upload(owner, image_bytes("JPEG", exif=exif.tobytes(), comment=b"hi"))

    reopened = Image.open(io.BytesIO(stored.data))
    assert reopened.format == "JPEG"
    assert not reopened.getexif()
    assert b"Secret Camera" not in bytes(stored.data)
    assert "comment" not in reopened.info


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("WEBP", "image/webp"), ("GIF", "image/png"), ("JPEG", "image/jpeg")],
)
def test_each_format_taken_is_kept_or_made_a_still_png(owner, fmt, content_type):
    stored = upload(owner, image_bytes(fmt))

    assert stored.content_type == content_type
    assert Image.open(io.BytesIO(stored.data)).size == (40, 30)


def test_an_oversize_upload_is_refused_and_nothing_stored(owner, settings):
    settings.CHAT_IMAGE_MAX_BYTES = 2048
    big = image_bytes("PNG", (300, 300), compress_level=0)

    with pytest.raises(ChatError) as refused:
        upload(owner, big)

    assert refused.value.code == "too_large"
    assert "2 KiB" in refused.value.message
    assert not Attachment.objects.exists()


@pytest.mark.parametrize(
    "data",
    [b"just some text, named cat.png by its sender\n", b"%PDF-1.7\n" + b"x" * 100],
    ids=["text", "pdf"],
)
def test_a_file_that_is_not_an_image_is_refused(owner, data):
    with pytest.raises(ChatError) as refused:
        upload(owner, data)

    assert refused.value.code == "invalid"
    assert "PNG, JPEG, WebP or GIF" in refused.value.message
    assert not Attachment.objects.exists()


def test_a_truncated_png_is_refused_as_damaged(owner):
    whole = image_bytes("PNG", (200, 200))

    with pytest.raises(ChatError) as refused:
        upload(owner, whole[: len(whole) // 2])

    assert refused.value.code == "invalid"
    assert "damaged or cut short" in refused.value.message
    assert not Attachment.objects.exists()


@pytest.mark.parametrize(
    ("width", "height", "words"),
    [
        # Would take 30 GB decoded: Pillow's own guard refuses it at once.
        (100_000, 100_000, "far more than 40,000,000 pixels"),
        # Under Pillow's guard, over ours: refused before a byte is decoded.
        (9_000, 9_000, "9,000 x 9,000 = 81,000,000 pixels"),
    ],
)
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(
    owner, width, height, words
):
    with pytest.raises(ChatError) as refused:
        upload(owner, png_claiming(width, height))

    assert refused.value.code == "too_large"
    assert words in refused.value.message
    assert "the limit is 40,000,000 pixels" in refused.value.message
    assert not Attachment.objects.exists()


def test_the_pixel_limit_is_a_setting(owner, settings):
    settings.CHAT_IMAGE_MAX_PIXELS = 40 * 30 - 1

    with pytest.raises(ChatError) as refused:
        upload(owner)

    assert refused.value.code == "too_large"


def test_one_user_cannot_pile_up_unsent_uploads(owner, other_user, monkeypatch):
    monkeypatch.setattr(attachments, "MAX_PENDING", 2)
    upload(owner)
    upload(owner)
    upload(other_user)

    with pytest.raises(ChatError) as refused:
        upload(owner)

    assert refused.value.code == "too_many_uploads"


def test_uploads_not_sent_within_a_day_are_deleted_on_the_next_upload(
    owner, make_conversation
):
    conversation = make_conversation(owner, (USER, "look"))
    with time_machine.travel(timezone.now() - timedelta(days=2), tick=False):
        stale = upload(owner)
        sent = upload(owner)
    sent.message = conversation.messages.get()
    sent.save()
    fresh = upload(owner)

    upload(owner)

    assert set(Attachment.objects.values_list("id", flat=True)) >= {sent.id, fresh.id}
    assert not Attachment.objects.filter(id=stale.id).exists()


def test_removing_an_upload_works_only_for_its_owner_before_it_is_sent(
    owner, other_user
):
    mine = upload(owner)

    with pytest.raises(ChatError) as refused:
        attachments.remove_upload(other_user, mine.id)
    assert refused.value.code == "not_found"

    attachments.remove_upload(owner, mine.id)
    assert not Attachment.objects.exists()


# --- Which models take images ------------------------------------------------------


def test_a_model_takes_images_only_when_every_enabled_route_does(image_model):
    assert attachments.model_takes_images(MODEL)
    assert attachments.models_taking_images() == {MODEL}

    backup = Endpoint.objects.create(name="backup", base_url="http://127.0.0.1:9/v1")
    text_only = ModelRoute.objects.create(
        model_name=MODEL, endpoint=backup, upstream_model="llama", priority=2
    )
    assert not attachments.model_takes_images(MODEL)
    assert attachments.models_taking_images() == set()

    text_only.enabled = False
    text_only.save()
    assert attachments.model_takes_images(MODEL)
    assert not attachments.model_takes_images("no-such-model")


# --- Sending -------------------------------------------------------------------------


def test_a_send_carries_the_images_as_content_parts_and_binds_them(owner, image_model):
    image = upload(owner)
    turn = actions.plan_send(owner, None, "What is this?", MODEL)

    attachments.prepare(owner, turn, [image.id])

    parts = turn.history[-1].content
    assert parts[0] == {"type": "text", "text": "What is this?"}
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == bytes(image.data)
    actions.commit_turn(turn, uuid.uuid4())
    image.refresh_from_db()
    assert image.message_id == turn.user_message.id
    described = actions.message_dict(turn.user_message)["attachments"]
    assert described == [
        {
            "id": str(image.id),
            "width": 40,
            "height": 30,
            "content_type": "image/png",
            "size": image.size,
            "url": f"/chat/api/attachments/{image.id}/",
            "thumbnail_url": f"/chat/api/attachments/{image.id}/thumbnail/",
        }
    ]


def test_images_to_a_model_that_does_not_take_them_are_refused(owner, model_route):
    image = upload(owner)
    turn = actions.plan_send(owner, None, "What is this?", MODEL)

    with pytest.raises(ChatError) as refused:
        attachments.prepare(owner, turn, [image.id])

    assert refused.value.code == "invalid"
    assert "does not take images" in refused.value.message


def test_someone_elses_upload_cannot_be_attached(owner, other_user, image_model):
    theirs = upload(other_user)
    turn = actions.plan_send(owner, None, "Mine now?", MODEL)

    with pytest.raises(ChatError) as refused:
        attachments.prepare(owner, turn, [theirs.id])

    assert refused.value.code == "not_found"
    theirs.refresh_from_db()
    assert theirs.message is None


def test_an_image_already_sent_cannot_be_sent_again(owner, image_model):
    image = upload(owner)
    first = actions.plan_send(owner, None, "one", MODEL)
    attachments.prepare(owner, first, [image.id])
    actions.commit_turn(first, uuid.uuid4())
    second = actions.plan_send(owner, None, "two", MODEL)

    with pytest.raises(ChatError) as refused:
        attachments.prepare(owner, second, [image.id])

    assert refused.value.code == "not_found"


def test_an_upload_removed_before_the_turn_is_stored_stores_nothing(owner, image_model):
    image = upload(owner)
    turn = actions.plan_send(owner, None, "look", MODEL)
    attachments.prepare(owner, turn, [image.id])
    image.delete()

    with pytest.raises(ChatError):
        actions.commit_turn(turn, uuid.uuid4())

    assert not Message.objects.exists()


def test_earlier_images_go_along_and_become_a_note_for_a_text_only_model(
    owner, image_model, make_conversation
):
    conversation = make_conversation(owner, (USER, "first look"), ("assistant", "ok"))
    image = upload(owner)
    image.message = conversation.messages.get(role=USER)
    image.save()

    turn = actions.plan_send(owner, conversation.id, "and now?", MODEL)
    attachments.prepare(owner, turn, [])
    first = next(m for m in turn.history if m.id == image.message_id)
    assert first.content[1]["type"] == "image_url"

    image_model.accepts_images = False
    image_model.save()
    turn = actions.plan_send(owner, conversation.id, "and now?", MODEL)
    attachments.prepare(owner, turn, [])
    first = next(m for m in turn.history if m.id == image.message_id)
    assert first.content == f"first look\n\n{attachments.NOTE}"
    assert turn.history[-1].content == "and now?"


def test_a_page_of_messages_lists_their_images_in_one_query(
    owner, image_model, make_conversation, django_assert_max_num_queries
):
    conversation = make_conversation(
        owner, (USER, "a"), ("assistant", "b"), (USER, "c"), ("assistant", "d")
    )
    for message in conversation.messages.filter(role=USER):
        image = upload(owner)
        image.message = message
        image.save()

    with django_assert_max_num_queries(6):
        opened = actions.open_conversation(owner, conversation.id)

    shown = [len(m["attachments"]) for m in opened["messages"]]
    assert shown == [1, 0, 1, 0]


def test_an_edit_keeps_the_questions_images_and_adds_new_ones(
    owner, image_model, make_conversation
):
    conversation = make_conversation(owner, (USER, "first"), ("assistant", "ok"))
    question = conversation.messages.get(role=USER)
    kept = upload(owner)
    kept.message = question
    kept.save()
    added = upload(owner, image_bytes("JPEG"))

    turn = actions.plan_edit(owner, question.id, "first, rewritten", MODEL)
    attachments.prepare(owner, turn, [added.id])
    actions.commit_turn(turn, uuid.uuid4())

    types = [p["image_url"]["url"].split(";")[0] for p in turn.history[-1].content[1:]]
    assert types == ["data:image/png", "data:image/jpeg"]
    # The edit is a new version of the question, with a copy of the image
    # kept; the earlier version keeps its own.
    new_version = turn.user_message
    assert new_version.id != question.id
    assert [a.content_type for a in new_version.attachments.order_by("created_at")] == [
        kept.content_type,
        added.content_type,
    ]
    assert added.id in set(new_version.attachments.values_list("id", flat=True))
    assert list(question.attachments.values_list("id", flat=True)) == [kept.id]
