"""Images in the chat page: attach, send as a content part, see the thumbnail."""

from __future__ import annotations

import pytest

from chat.models import Attachment
from gateway import router
from gateway.models import ModelRoute
from tests.chat.images import image_bytes
from tests.e2e.conftest import SIM_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def vision_model(sim_model):
    ModelRoute.objects.filter(model_name=SIM_MODEL).update(accepts_images=True)
    router.forget_routes()
    return sim_model


def png_file(name: str = "chart.png") -> dict:
    return {
        "name": name,
        "mimeType": "image/png",
        "buffer": image_bytes("PNG", (64, 48)),
    }


def test_an_attached_image_is_sent_as_a_content_part_and_shown_as_a_thumbnail(
    page, login, owner, vision_model, screenshot
):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")
    options = page.locator("#model option").all_inner_texts()
    assert options == [f"{SIM_MODEL} · 8k · images"]

    page.set_input_files("#image-picker", [png_file()])
    page.locator(".attachment-ready").wait_for()
    assert "chart.png — 64 \u00d7 48" in page.locator(".attachment-ready").inner_text()
    screenshot(page, "images-01-ready-to-send")
    page.fill("#input", "/sim images\nWhat does the chart show?")
    page.press("#input", "Enter")
    page.locator(".msg-assistant:not([data-status=streaming]) .msg-footer").wait_for()

    stored = Attachment.objects.get()
    answer = page.locator(".msg-assistant .bubble").last.inner_text()
    assert answer == f"Received 1 image: image/png {stored.size} bytes."
    thumbnail = page.locator(".msg-user .msg-images img")
    thumbnail.wait_for()
    page.wait_for_function(
        "document.querySelector('.msg-user .msg-images img').naturalWidth > 0"
    )
    link = page.locator(".msg-user .msg-images a")
    assert link.get_attribute("href") == f"/chat/api/attachments/{stored.id}/"
    assert page.locator(".attachment").count() == 0
    screenshot(page, "images-02-sent-with-thumbnail")

    # Reopened, the question still shows its image.
    page.reload()
    page.locator(".msg-user .msg-images img").wait_for()


def test_a_wrong_file_is_refused_in_words_and_can_be_removed_by_keyboard(
    page, login, owner, vision_model
):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")

    page.set_input_files(
        "#image-picker",
        [{"name": "notes.png", "mimeType": "image/png", "buffer": b"plain text\n"}],
    )
    error = page.locator(".attachment-error")
    error.wait_for()
    assert "PNG, JPEG, WebP or GIF" in error.inner_text()
    page.fill("#input", "Hello")
    assert page.locator("#send").is_disabled()

    page.locator(".attachment-remove").focus()
    page.keyboard.press("Enter")
    assert page.locator(".attachment").count() == 0
    assert page.locator("#send").is_enabled()
    assert not Attachment.objects.exists()


def test_a_model_without_images_offers_no_attach_button(page, login, owner, sim_model):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")

    assert page.locator("#attach").is_hidden()
    assert page.locator("#model option").all_inner_texts() == [f"{SIM_MODEL} · 8k"]


def test_the_images_fit_a_phone_in_dark_mode(
    browser, live_server_url, login, owner, vision_model, screenshot
):
    context = browser.new_context(
        base_url=live_server_url,
        viewport={"width": 390, "height": 800},
        color_scheme="dark",
        # The test's own waits evaluate script; the page's policy has its test.
        bypass_csp=True,
    )
    page = context.new_page()
    try:
        login(page, owner)
        page.wait_for_function("window.llmsiteChat.socket.connected")
        page.set_input_files(
            "#image-picker", [png_file("a-photo-with-a-long-name.png")]
        )
        page.locator(".attachment-ready").wait_for()
        page.fill("#input", "/sim images\nAnd on a phone?")
        page.press("#input", "Enter")
        page.locator(
            ".msg-assistant:not([data-status=streaming]) .msg-footer"
        ).wait_for()
        page.locator(".msg-user .msg-images img").wait_for()
        width = page.evaluate("document.documentElement.scrollWidth")
        screenshot(page, "images-03-phone-dark")
    finally:
        context.close()

    assert width <= 390
