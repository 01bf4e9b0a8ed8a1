"""The password reset and sign-up throttles: counts per email and per address."""

from __future__ import annotations

import pytest
import time_machine
from django.test import RequestFactory

from accounts import throttle


def request_from(address: str):
    return RequestFactory().post("/", REMOTE_ADDR=address)


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.PASSWORD_RESET_LIMIT = 2
    settings.PASSWORD_RESET_LIMIT_PER_ADDRESS = 5
    settings.SIGNUP_LIMIT_PER_ADDRESS = 2


def test_an_email_is_counted_whatever_its_case_and_spaces():
    here = request_from("192.0.2.1")
    assert throttle.password_reset(here, "Alice@Example.com") is None
    assert throttle.password_reset(here, " alice@example.com ") is None

    refusal = throttle.password_reset(here, "ALICE@EXAMPLE.COM")

    assert refusal is not None
    assert refusal.message.startswith("Too many password reset requests. Try again")
    assert throttle.password_reset(here, "bob@example.com") is None


def test_an_address_is_counted_across_emails():
    here = request_from("192.0.2.1")
    for number in range(5):
        assert throttle.password_reset(here, f"p{number}@example.com") is None

    assert throttle.password_reset(here, "other@example.com") is not None
    assert throttle.password_reset(request_from("192.0.2.2"), "x@example.com") is None


def test_a_refused_attempt_does_not_count_against_the_other_key():
    here = request_from("192.0.2.1")
    throttle.password_reset(here, "alice@example.com")
    throttle.password_reset(here, "alice@example.com")
    for _ in range(5):
        throttle.password_reset(here, "alice@example.com")  # refused, not counted

    assert throttle.password_reset(here, "bob@example.com") is None


def test_the_count_ends_an_hour_after_the_first_attempt():
    here = request_from("192.0.2.1")
    with time_machine.travel("2026-01-01 10:00:00Z", tick=False) as clock:
        throttle.signup(here)
        throttle.signup(here)
        refusal = throttle.signup(here)
        assert refusal is not None
        assert "after 11:00 UTC (in 60 minutes)" in refusal.message

        clock.shift(3601)

        assert throttle.signup(here) is None


def test_a_limit_of_zero_turns_a_throttle_off(settings):
    settings.SIGNUP_LIMIT_PER_ADDRESS = 0
    here = request_from("192.0.2.1")

    assert all(throttle.signup(here) is None for _ in range(20))
