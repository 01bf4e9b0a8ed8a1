"""The image URLs: upload, view and remove, each for the signed-in owner only."""

from __future__ import annotations

import pytest
from django.test import Client

from chat.models import Attachment
from tests.chat.images import image_bytes

pytestmark = pytest.mark.django_db

UPLOAD = "/chat/api/attachments/"


def client_for(user, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def post_image(client: Client, data: bytes, name: str = "cat.png", **extra):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return client.post(
        UPLOAD, {"file": SimpleUploadedFile(name, data, "image/png")}, **extra
    )


@pytest.fixture
def alices_image(owner) -> Attachment:
    response = post_image(client_for(owner), image_bytes())
    assert response.status_code == 201
    return Attachment.objects.get(id=response.json()["attachment"]["id"])


def test_an_upload_answers_with_the_images_id_and_urls(owner):
    response = post_image(client_for(owner), image_bytes("JPEG"), name="x.png")

    assert response.status_code == 201
    described = response.json()["attachment"]
    stored = Attachment.objects.get(id=described["id"])
    assert stored.owner == owner
    # The name and the client's content type say PNG; the bytes say JPEG.
    assert described["content_type"] == "image/jpeg"
    assert described["thumbnail_url"] == f"/chat/api/attachments/{stored.id}/thumbnail/"


def test_an_upload_needs_a_signed_in_user():
    response = post_image(Client(), image_bytes())

    assert response.status_code == 401
    assert not Attachment.objects.exists()


def test_an_upload_needs_the_csrf_token(owner):
    response = post_image(client_for(owner, csrf=True), image_bytes())

    assert response.status_code == 403
    assert not Attachment.objects.exists()


def test_a_renamed_text_file_is_refused_with_a_sentence(owner):
    response = post_image(client_for(owner), b"hello, I am text\n", name="cat.png")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert "PNG, JPEG, WebP or GIF" in response.json()["error"]["message"]


def test_an_oversize_upload_is_refused(owner, settings):
    settings.CHAT_IMAGE_MAX_BYTES = 1024
    response = post_image(
        client_for(owner), image_bytes("PNG", (200, 200), compress_level=0)
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_large"
    assert not Attachment.objects.exists()


def test_an_upload_without_a_file_is_refused(owner):
    response = client_for(owner).post(UPLOAD, {"other": "x"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize("suffix", ["", "thumbnail/"])
def test_the_owner_sees_the_image_with_safe_headers(owner, alices_image, suffix):
    response = client_for(owner).get(f"{UPLOAD}{alices_image.id}/{suffix}")

    assert response.status_code == 200
    expected = "image/webp" if suffix else "image/png"
    assert response["Content-Type"] == expected
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Disposition"] == "inline"
    assert response["Cache-Control"].startswith("private")
    body = response.content
    assert body == bytes(alices_image.thumbnail if suffix else alices_image.data)


@pytest.mark.parametrize("suffix", ["", "thumbnail/"])
def test_another_user_gets_404_for_an_image(other_user, alices_image, suffix):
    response = client_for(other_user).get(f"{UPLOAD}{alices_image.id}/{suffix}")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize("suffix", ["", "thumbnail/"])
def test_an_anonymous_visitor_gets_no_image(alices_image, suffix):
    response = Client().get(f"{UPLOAD}{alices_image.id}/{suffix}")

    assert response.status_code == 401


def test_another_user_cannot_remove_an_upload(other_user, alices_image):
    response = client_for(other_user).delete(f"{UPLOAD}{alices_image.id}/")

    assert response.status_code == 404
    assert Attachment.objects.filter(id=alices_image.id).exists()


def test_the_owner_removes_an_upload_not_sent_yet(owner, alices_image):
    response = client_for(owner).delete(f"{UPLOAD}{alices_image.id}/")

    assert response.status_code == 200
    assert not Attachment.objects.exists()


def test_the_chat_page_says_which_models_take_images(owner, model_route):
    model_route.accepts_images = True
    model_route.save()

    response = client_for(owner).get("/chat/")

    config = response.context["config"]
    assert config["image_models"] == [model_route.model_name]
    assert config["images"]["max_per_message"] == 4
