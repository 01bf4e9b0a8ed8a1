"""Throttling of password reset requests and sign-ups.

The same cache-based approach as the login throttle (llmsite.throttle): counts
in Django's cache (shared by every process on Redis), keys hashed, cache.add +
cache.incr so parallel requests slip past a limit by a race's width at most.
Unlike sign-in failures, every attempt counts, and each count lives for a
fixed hour from its first attempt. A reset request is counted by the email
address typed, whether or not an account has it, so a refusal says nothing
about which addresses exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings
from django.http import HttpRequest

from llmsite.throttle import client_address, counter_cache, digest, try_again

PREFIX = "account-throttle"
WINDOW_SECONDS = 3600
# Longest email address looked at; EmailField refuses longer ones anyway.
MAX_EMAIL_LENGTH = 320


@dataclass(frozen=True)
class Refusal:
    """A refused attempt: what it was, and when the next one will be heard."""

    until: float
    what: str

    @property
    def message(self) -> str:
        """The sentence the page shows."""
        return f"Too many {self.what}. {try_again(self.until)}"


def _attempt(
    action: str, what: str, counted: list[tuple[str, str, int]]
) -> Refusal | None:
    """Refuse when any counter is at its limit; count the attempt otherwise.

    A window ends by its own clock, not only by the cache's expiry, so the
    hour is the same on every cache backend (and under a frozen test clock).
    """
    cache = counter_cache()
    keys = [
        (f"{PREFIX}:{action}:{by}:{digest(value)}", limit)
        for by, value, limit in counted
        if value and limit > 0
    ]
    now = time.time()
    windows = {}
    for key, limit in keys:
        until = cache.get(f"{key}:until")
        open_window = isinstance(until, int | float) and until > now
        windows[key] = open_window
        count = cache.get(f"{key}:count") if open_window else 0
        if isinstance(count, int) and count >= limit:
            return Refusal(until=float(until), what=what)
    timeout = WINDOW_SECONDS + 60
    for key, _limit in keys:
        if not windows[key]:
            cache.set_many(
                {f"{key}:until": now + WINDOW_SECONDS, f"{key}:count": 1},
                timeout=timeout,
            )
            continue
        cache.add(f"{key}:count", 0, timeout=timeout)
        try:
            cache.incr(f"{key}:count")
        except ValueError:  # expired between add and incr
            cache.set(f"{key}:count", 1, timeout=timeout)
    return None


def password_reset(request: HttpRequest, email: str) -> Refusal | None:
    """Count one reset request for this email address and client address."""
    return _attempt(
        "reset",
        "password reset requests",
        [
            (
                "email",
                email.strip().casefold()[:MAX_EMAIL_LENGTH],
                settings.PASSWORD_RESET_LIMIT,
            ),
            (
                "address",
                client_address(request),
                settings.PASSWORD_RESET_LIMIT_PER_ADDRESS,
            ),
        ],
    )


def signup(request: HttpRequest) -> Refusal | None:
    """Count one sign-up attempt from this client address."""
    return _attempt(
        "signup",
        "sign-up attempts from your address",
        [("address", client_address(request), settings.SIGNUP_LIMIT_PER_ADDRESS)],
    )
