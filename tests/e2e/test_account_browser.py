"""Your account in the system Chromium: password change, and an API key made in
the browser that the official openai SDK uses until it is revoked.

Screenshots go to test-artifacts/e2e/.
"""

from __future__ import annotations

import pytest

from gateway.models import ApiKey
from gateway.simulator import generated_tokens
from tests.e2e.conftest import SIM_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NEW_PASSWORD = "a much longer tangerine sentence"


def sign_in(page, username: str, password: str) -> None:
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")


def test_changing_the_password_then_signing_in_with_it(
    page, login, owner, sim_model, screenshot
):
    login(page, owner)
    page.click("#account-link")
    page.wait_for_url("**/accounts/")
    page.click("#change-password")

    page.fill("#id_old_password", "not my password")
    page.fill("#id_new_password1", "short")
    page.fill("#id_new_password2", "short")
    page.click("button[type=submit]")
    assert page.locator("#id_old_password").get_attribute("aria-invalid") == "true"
    assert "This password is too short" in page.locator("main").inner_text()
    screenshot(page, "account-01-password-errors")

    page.fill("#id_old_password", "correct horse battery staple")
    page.fill("#id_new_password1", NEW_PASSWORD)
    page.fill("#id_new_password2", NEW_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/accounts/")
    assert "Your password is changed." in page.locator(".messages").inner_text()

    page.goto("/chat/")
    page.click("text=Sign out")
    page.wait_for_url("**/accounts/login/")
    sign_in(page, "alice", "correct horse battery staple")
    assert "correct username and password" in page.locator(".error").inner_text()
    sign_in(page, "alice", NEW_PASSWORD)
    page.wait_for_url("**/chat/")


def test_a_key_made_in_the_browser_serves_the_sdk_until_it_is_revoked(
    page, login, owner, sim_model, live_server_url, screenshot
):
    openai = pytest.importorskip("openai")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    login(page, owner, next_path="/accounts/")
    assert page.locator("#no-keys").is_visible()

    page.fill("#id_name", "my script")
    page.click("#create-key")
    raw = page.input_value("#new-key")
    page.click("#copy-key")
    page.wait_for_function(
        "document.getElementById('copy-status').textContent.length > 0"
    )
    assert page.evaluate("navigator.clipboard.readText()") == raw
    assert raw.startswith("llms-")
    screenshot(page, "account-02-new-key")

    sdk = openai.OpenAI(
        base_url=f"{live_server_url}/v1", api_key=raw, max_retries=0, timeout=20
    )
    answer = sdk.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "Hello from a script."}]
    )
    assert answer.choices[0].message.content == "".join(generated_tokens(40))

    page.click("#done")
    page.wait_for_url("**/accounts/")
    row = page.locator("#key-list tbody tr", has_text="my script")
    assert raw not in page.content()
    assert raw[:12] in row.inner_text()
    assert "never" not in row.inner_text()  # last used: just now
    screenshot(page, "account-03-key-list")

    row.get_by_role("link", name="Revoke my script").click()
    page.click("#confirm-revoke")
    page.wait_for_url("**/accounts/")
    assert "is revoked" in page.locator(".messages").inner_text()
    assert "revoked" in row.inner_text()

    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(
            model=SIM_MODEL, messages=[{"role": "user", "content": "Still there?"}]
        )
    assert not ApiKey.objects.get(name="my script").is_active


def test_the_account_page_fits_a_phone_in_dark_mode_by_keyboard(page, login, owner):
    ApiKey.generate(owner, "a key with a rather long name for a narrow screen")
    page.set_viewport_size({"width": 390, "height": 844})
    page.emulate_media(color_scheme="dark")
    login(page, owner, next_path="/accounts/")

    width = page.evaluate("document.documentElement.scrollWidth")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.keyboard.press("Tab")
    skip_link = page.evaluate("document.activeElement.textContent")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    revoke = page.evaluate("document.activeElement.getAttribute('aria-label')")

    assert width <= 390
    assert background == "rgb(21, 23, 27)"
    assert skip_link == "Skip to the content"
    assert revoke.startswith("Revoke a key with a rather long name")
