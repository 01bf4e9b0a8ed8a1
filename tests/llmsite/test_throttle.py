"""Sign-ins are throttled per account and per client address, for a while."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.test import Client

from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

START = "2026-03-04 12:00:00+00:00"


@pytest.fixture(autouse=True)
def limits(settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS = 5
    settings.LOGIN_LOCKOUT_MINUTES = 15
    settings.BEHIND_PROXY = False


def sign_in(
    username: str,
    password: str,
    address: str = "203.0.113.7",
    path: str = "/accounts/login/",
    **headers: str,
):
    client = Client(REMOTE_ADDR=address, **headers)
    response = client.post(path, {"username": username, "password": password})
    response.signed_in = "_auth_user_id" in client.session
    return response


def test_an_account_is_locked_after_the_limit_from_any_address(owner):
    for n in range(3):
        assert not sign_in("alice", "wrong", address=f"198.51.100.{n}").signed_in

    response = sign_in("alice", PASSWORD, address="192.0.2.200")

    assert response.signed_in is False
    assert response.status_code == 200
    assert "Too many failed sign-ins for this account" in response.content.decode()


def test_the_message_says_when_to_try_again():
    with time_machine.travel(START, tick=False):
        for _ in range(3):
            response = sign_in("alice", "wrong")

    page = response.content.decode()
    # The third failure reached the limit: its own answer already says so.
    assert "Try again after 12:15 UTC (in 15 minutes)." in page


def test_an_address_is_locked_after_the_limit_over_any_usernames(owner):
    for n in range(5):
        assert not sign_in(f"guess{n}", "wrong", address="203.0.113.9").signed_in

    from_there = sign_in("alice", PASSWORD, address="203.0.113.9")
    from_elsewhere = sign_in("alice", PASSWORD, address="203.0.113.10")

    assert from_there.signed_in is False
    assert "Too many failed sign-ins for your address" in from_there.content.decode()
    assert from_elsewhere.signed_in is True


def test_fifty_quick_wrong_passwords_are_not_all_checked(owner, django_user_model):
    answers = [sign_in("alice", f"guess-{n}").content.decode() for n in range(50)]

    refused = [page for page in answers if "Too many failed sign-ins" in page]
    assert len(refused) == 48  # the 3rd answer onwards
    assert sign_in("alice", PASSWORD).signed_in is False


def test_the_admin_login_is_throttled_too(staff):
    for _ in range(3):
        sign_in("sam", "wrong", path="/admin/login/")

    response = sign_in("sam", PASSWORD, path="/admin/login/")

    assert response.signed_in is False
    assert "Too many failed sign-ins for this account" in response.content.decode()


def test_the_lockout_ends_on_its_own(owner):
    with time_machine.travel(START, tick=False) as traveller:
        for _ in range(3):
            sign_in("alice", "wrong")
        traveller.shift(timedelta(minutes=14))
        assert sign_in("alice", PASSWORD).signed_in is False

        traveller.shift(timedelta(minutes=1, seconds=1))
        assert sign_in("alice", PASSWORD).signed_in is True


def test_the_count_starts_again_after_a_lockout(owner):
    with time_machine.travel(START, tick=False) as traveller:
        for _ in range(3):
            sign_in("alice", "wrong")
        traveller.shift(timedelta(minutes=16))

        sign_in("alice", "wrong")
        assert sign_in("alice", PASSWORD).signed_in is True


def test_a_successful_sign_in_clears_the_accounts_count(owner):
    for _ in range(2):
        sign_in("alice", "wrong", address="198.51.100.1")
    assert sign_in("alice", PASSWORD, address="198.51.100.2").signed_in

    for _ in range(2):
        sign_in("alice", "wrong", address="198.51.100.3")

    assert sign_in("alice", PASSWORD, address="198.51.100.4").signed_in is True


def test_usernames_are_counted_without_case(owner):
    for name in ("alice", "ALICE", "Alice "):
        sign_in(name, "wrong", address="198.51.100.1")

    assert sign_in("alice", PASSWORD, address="198.51.100.2").signed_in is False


def test_forwarded_for_is_ignored_unless_behind_a_proxy(owner):
    for n in range(5):
        sign_in(f"guess{n}", "wrong", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}")

    assert (
        sign_in("alice", PASSWORD, HTTP_X_FORWARDED_FOR="10.0.0.99").signed_in is False
    )


def test_behind_a_proxy_the_address_the_proxy_saw_counts(owner, settings):
    settings.BEHIND_PROXY = True
    for n in range(5):
        # The client forges the first entry; the proxy appends what it saw.
        sign_in(
            f"guess{n}",
            "wrong",
            address="10.0.0.1",
            HTTP_X_FORWARDED_FOR=f"192.0.2.{n}, 203.0.113.50",
        )

    same_client = sign_in(
        "alice", PASSWORD, address="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.50"
    )
    other_client = sign_in(
        "alice", PASSWORD, address="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.51"
    )

    assert same_client.signed_in is False
    assert other_client.signed_in is True


def test_ipv6_clients_are_counted_per_64_block(owner):
    for n in range(5):
        sign_in(f"guess{n}", "wrong", address=f"2001:db8:1:2::{n + 1}")

    assert sign_in("alice", PASSWORD, address="2001:db8:1:2::ff").signed_in is False
    assert sign_in("alice", PASSWORD, address="2001:db8:1:3::1").signed_in is True


def test_a_limit_of_zero_turns_that_check_off(owner, settings):
    settings.LOGIN_FAILURE_LIMIT = 0
    for n in range(4):
        sign_in("alice", "wrong", address=f"198.51.100.{n}")

    assert sign_in("alice", PASSWORD, address="198.51.100.9").signed_in is True
