"""The account pages: password change and reset, own API keys, sign-up."""

from __future__ import annotations

import re
import threading

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.mail.backends import locmem
from django.urls import reverse

from accounts.forms import wait_for_reset_mail
from gateway.models import ApiKey
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a much longer tangerine sentence"


@pytest.fixture
def alice_client(client, owner):
    client.force_login(owner)
    return client


@pytest.fixture
def bobs_key(other_user) -> ApiKey:
    return ApiKey.generate(other_user, "bob's script")[0]


def create(client, name: str):
    return client.post(reverse("account_key_create"), {"name": name})


# --- The page -----------------------------------------------------------------


def test_the_account_page_needs_a_sign_in(client):
    response = client.get(reverse("account"))

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_the_account_page_lists_only_your_own_keys(alice_client, owner, bobs_key):
    ApiKey.generate(owner, "laptop")
    revoked, _ = ApiKey.generate(owner, "old server")
    revoked.revoked_at = revoked.created_at
    revoked.save()

    response = alice_client.get(reverse("account"))

    page = response.content.decode()
    assert response.status_code == 200
    assert "laptop" in page and "old server" in page
    assert "bob&#x27;s script" not in page and bobs_key.prefix not in page
    assert page.count("revoked ") == 1
    assert "1 of 20 active keys" in page
    assert "default-src 'self'" in response["Content-Security-Policy"]


def test_the_chat_page_links_to_the_account_page(alice_client):
    response = alice_client.get(reverse("chat:page"))

    assert f'href="{reverse("account")}"' in response.content.decode()


# --- Creating a key -----------------------------------------------------------


def test_a_new_key_is_shown_once_and_only_its_hash_is_stored(alice_client, owner):
    response = create(alice_client, "  my script  ")

    raw = response.context["raw_key"]
    key = ApiKey.objects.get(user=owner)
    assert response.status_code == 200
    assert raw in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert key.name == "my script"
    assert key.key_hash == ApiKey.hash(raw) and raw not in key.key_hash
    assert raw.startswith(key.prefix)
    assert raw not in alice_client.get(reverse("account")).content.decode()
    assert raw not in str(dict(alice_client.session))


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "This field is required."),
        ("   ", "This field is required."),
        ("x" * 101, "at most 100 characters"),
        ("line\nbreak", "control or invisible characters"),
        ("right\u202eto left", "control or invisible characters"),
    ],
    ids=["empty", "blank", "too-long", "newline", "bidi"],
)
def test_a_bad_key_name_is_refused_with_the_reason(alice_client, name, error):
    response = create(alice_client, name)

    assert response.status_code == 400
    assert error in response.content.decode()
    assert not ApiKey.objects.exists()


def test_a_name_of_exactly_the_limit_is_accepted(alice_client, owner):
    assert create(alice_client, "x" * 100).status_code == 200
    assert ApiKey.objects.get(user=owner).name == "x" * 100


def test_creating_beyond_the_limit_is_refused_until_one_is_revoked(
    alice_client, owner, settings
):
    settings.API_KEYS_PER_USER = 2
    first = create(alice_client, "one")
    create(alice_client, "two")

    refused = create(alice_client, "three")

    assert refused.status_code == 400
    assert "You already have 2 active keys" in refused.content.decode()
    assert ApiKey.objects.filter(user=owner).count() == 2
    key_id = ApiKey.objects.get(name="one").pk
    assert first.context["key"].pk == key_id
    alice_client.post(reverse("account_key_revoke", args=[key_id]))
    assert create(alice_client, "three").status_code == 200


def test_creating_a_key_needs_a_post(alice_client):
    assert alice_client.get(reverse("account_key_create")).status_code == 405


def test_creating_a_key_needs_a_sign_in(client):
    response = create(client, "sneaky")

    assert response.status_code == 302
    assert not ApiKey.objects.exists()


# --- Revoking a key -----------------------------------------------------------


def test_revoking_asks_first_then_revokes_on_post(alice_client, owner):
    key, _ = ApiKey.generate(owner, "laptop")
    url = reverse("account_key_revoke", args=[key.pk])

    confirm = alice_client.get(url)
    key.refresh_from_db()
    assert confirm.status_code == 200
    assert "Revoke this API key?" in confirm.content.decode()
    assert key.is_active

    done = alice_client.post(url, follow=True)

    key.refresh_from_db()
    assert not key.is_active
    assert "The key “laptop”" in done.content.decode()
    assert "is revoked" in done.content.decode()


def test_revoking_twice_keeps_the_first_time(alice_client, owner):
    key, _ = ApiKey.generate(owner, "laptop")
    url = reverse("account_key_revoke", args=[key.pk])
    alice_client.post(url)
    key.refresh_from_db()
    first = key.revoked_at

    alice_client.post(url)

    key.refresh_from_db()
    assert key.revoked_at == first


@pytest.mark.parametrize("method", ["get", "post"])
def test_another_users_key_is_a_404_and_stays_active(alice_client, bobs_key, method):
    url = reverse("account_key_revoke", args=[bobs_key.pk])

    response = getattr(alice_client, method)(url)

    bobs_key.refresh_from_db()
    assert response.status_code == 404
    assert bobs_key.is_active
    assert "bob" not in response.content.decode()


@pytest.mark.parametrize("key_id", [999_999, 2**63, 10**30])
def test_a_missing_key_is_the_same_404(alice_client, key_id):
    response = alice_client.post(f"/accounts/keys/{key_id}/revoke/")

    assert response.status_code == 404


def test_revoking_needs_a_sign_in(client, bobs_key):
    response = client.post(reverse("account_key_revoke", args=[bobs_key.pk]))

    bobs_key.refresh_from_db()
    assert response.status_code == 302
    assert bobs_key.is_active


# --- Self-service turned off --------------------------------------------------


def test_without_self_service_the_page_says_an_admin_issues_keys(
    alice_client, owner, settings
):
    settings.SELF_SERVICE_API_KEYS = False
    key, _ = ApiKey.generate(owner, "issued by admin")

    page = alice_client.get(reverse("account")).content.decode()

    assert "API keys are issued by an administrator" in page
    assert "issued by admin" in page
    assert reverse("account_key_create") not in page
    assert reverse("account_key_revoke", args=[key.pk]) not in page


def test_without_self_service_create_and_revoke_are_refused(
    alice_client, owner, settings
):
    settings.SELF_SERVICE_API_KEYS = False
    key, _ = ApiKey.generate(owner, "issued by admin")

    created = create(alice_client, "mine")
    revoked = alice_client.post(reverse("account_key_revoke", args=[key.pk]))

    key.refresh_from_db()
    assert (created.status_code, revoked.status_code) == (403, 403)
    assert ApiKey.objects.count() == 1
    assert key.is_active


# --- Changing the password ----------------------------------------------------


def test_changing_the_password_keeps_this_session(alice_client, owner):
    response = alice_client.post(
        reverse("password_change"),
        {
            "old_password": PASSWORD,
            "new_password1": NEW_PASSWORD,
            "new_password2": NEW_PASSWORD,
        },
        follow=True,
    )

    owner.refresh_from_db()
    assert owner.check_password(NEW_PASSWORD)
    assert response.redirect_chain[-1][0] == reverse("account")
    assert "Your password is changed." in response.content.decode()
    assert alice_client.get(reverse("account")).status_code == 200


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("wrong", NEW_PASSWORD, "Your old password was entered incorrectly"),
        (PASSWORD, "short", "This password is too short"),
        (PASSWORD, "password123", "This password is too common"),
        (PASSWORD, "83749201574638", "This password is entirely numeric"),
        (PASSWORD, "alice", "too similar to the username"),
    ],
    ids=["wrong-old", "short", "common", "numeric", "like-username"],
)
def test_a_refused_password_change_shows_why(alice_client, owner, old, new, error):
    response = alice_client.post(
        reverse("password_change"),
        {"old_password": old, "new_password1": new, "new_password2": new},
    )

    owner.refresh_from_db()
    assert response.status_code == 200
    assert error in response.content.decode()
    assert owner.check_password(PASSWORD)


def test_the_password_change_page_needs_a_sign_in(client):
    assert client.get(reverse("password_change")).status_code == 302


# --- Resetting a forgotten password -------------------------------------------


def reset(client, email: str):
    response = client.post(reverse("password_reset"), {"email": email})
    wait_for_reset_mail()
    return response


def test_the_login_page_links_to_the_reset(client):
    page = client.get(reverse("login")).content.decode()

    assert f'href="{reverse("password_reset")}"' in page
    assert "Forgot your password?" in page


def test_a_reset_mails_a_link_that_sets_a_new_password(client, owner):
    response = reset(client, "ALICE@example.com")

    assert response.status_code == 302
    assert response["Location"] == reverse("password_reset_done")
    (message,) = mail.outbox
    assert message.to == ["alice@example.com"]
    link = re.search(r"http://testserver(/accounts/password/reset/\S+/)", message.body)
    assert link is not None
    assert '"alice"' in message.body

    form = client.get(link[1], follow=True)
    assert "Set a new password" in form.content.decode()
    done = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
        follow=True,
    )
    owner.refresh_from_db()
    assert "Password set" in done.content.decode()
    assert owner.check_password(NEW_PASSWORD)
    again = client.get(link[1], follow=True)
    assert "This link does not work" in again.content.decode()


def test_a_reset_does_not_reveal_whether_an_address_exists(client, owner):
    known = reset(client, "alice@example.com")
    unknown = reset(client, "nobody@example.com")

    assert (known.status_code, known["Location"]) == (
        unknown.status_code,
        unknown["Location"],
    )
    assert len(mail.outbox) == 1
    done = client.get(known["Location"]).content.decode()
    assert "If an account has that address" in done


class HeldMailBackend(locmem.EmailBackend):
    """A mail server that answers only once the test lets it."""

    release = threading.Event()

    def send_messages(self, messages):
        assert self.release.wait(timeout=10)
        return super().send_messages(messages)


def test_the_reset_answers_without_waiting_for_the_mail_server(client, owner, settings):
    settings.EMAIL_BACKEND = f"{__name__}.HeldMailBackend"
    HeldMailBackend.release.clear()

    response = client.post(reverse("password_reset"), {"email": "alice@example.com"})

    assert response.status_code == 302
    assert mail.outbox == []
    HeldMailBackend.release.set()
    wait_for_reset_mail()
    assert len(mail.outbox) == 1


def test_the_reset_is_throttled_per_address_whether_it_exists_or_not(
    client, owner, settings
):
    settings.PASSWORD_RESET_LIMIT = 2
    for email in ["alice@example.com", "nobody@example.com"]:
        for _ in range(2):
            assert reset(client, email).status_code == 302

        refused = reset(client, email)

        assert refused.status_code == 200
        assert "Too many password reset requests" in refused.content.decode()
    assert len(mail.outbox) == 2


def test_the_reset_is_throttled_per_client_address(client, owner, settings):
    settings.PASSWORD_RESET_LIMIT_PER_ADDRESS = 3
    for number in range(3):
        assert reset(client, f"person{number}@example.com").status_code == 302

    refused = reset(client, "alice@example.com")

    assert "Too many password reset requests" in refused.content.decode()
    assert mail.outbox == []


def test_a_reset_lifts_a_sign_in_lockout(client, owner, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    for _ in range(2):
        client.post(reverse("login"), {"username": "alice", "password": "wrong"})
    reset(client, "alice@example.com")
    link = re.search(r"http://testserver(\S+)", mail.outbox[0].body)[1]
    form = client.get(link, follow=True)
    client.post(
        form.redirect_chain[-1][0],
        {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )

    signed_in = client.post(
        reverse("login"), {"username": "alice", "password": NEW_PASSWORD}
    )

    assert signed_in.status_code == 302


def test_a_new_password_from_a_reset_is_validated(client, owner):
    reset(client, "alice@example.com")
    link = re.search(r"http://testserver(\S+)", mail.outbox[0].body)[1]
    form = client.get(link, follow=True)

    response = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "12345678", "new_password2": "12345678"},
    )

    owner.refresh_from_db()
    assert "This password is too common" in response.content.decode()
    assert owner.check_password(PASSWORD)


# --- Signing up ---------------------------------------------------------------


def signup(client, **fields):
    data = {
        "username": "carol",
        "email": "carol@example.com",
        "password1": NEW_PASSWORD,
        "password2": NEW_PASSWORD,
    }
    return client.post(reverse("signup"), {**data, **fields})


def test_with_signup_off_the_page_is_a_404_and_not_linked(client, settings):
    settings.SIGNUP_ENABLED = False

    assert client.get(reverse("signup")).status_code == 404
    assert signup(client).status_code == 404
    assert reverse("signup") not in client.get(reverse("login")).content.decode()
    assert not get_user_model().objects.filter(username="carol").exists()


def test_with_signup_on_a_new_user_is_created_and_signed_in(client, settings):
    settings.SIGNUP_ENABLED = True
    assert reverse("signup") in client.get(reverse("login")).content.decode()

    response = signup(client)

    carol = get_user_model().objects.get(username="carol")
    assert response.status_code == 302
    assert response["Location"] == "/chat/"
    assert carol.email == "carol@example.com"
    assert not carol.is_staff and not carol.is_superuser
    assert carol.check_password(NEW_PASSWORD)
    assert client.get(reverse("account")).status_code == 200


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"password1": "short", "password2": "short"}, "This password is too short"),
        ({"password2": "something else"}, "The two password fields didn"),
        ({"email": ""}, "This field is required."),
        ({"email": "not-an-address"}, "Enter a valid email address."),
        ({"username": "alice"}, "A user with that username already exists."),
        ({"username": "bad name!"}, "Enter a valid username."),
    ],
    ids=["short", "mismatch", "no-email", "bad-email", "taken", "bad-username"],
)
def test_a_refused_signup_shows_why(client, settings, owner, fields, error):
    settings.SIGNUP_ENABLED = True

    response = signup(client, **fields)

    assert response.status_code == 400
    assert error in response.content.decode()
    assert not get_user_model().objects.filter(email="carol@example.com").exists()


def test_signup_is_throttled_per_client_address(client, settings):
    settings.SIGNUP_ENABLED = True
    settings.SIGNUP_LIMIT_PER_ADDRESS = 2
    signup(client, username="one", password2="mismatch")
    signup(client, username="two", password2="mismatch")

    refused = signup(client, username="three")

    assert refused.status_code == 429
    assert "Too many sign-up attempts" in refused.content.decode()
    assert not get_user_model().objects.filter(username="three").exists()
