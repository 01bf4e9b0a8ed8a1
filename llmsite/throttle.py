"""Login throttling per account and per client address.

Failed sign-ins are counted in Django's cache (Redis when REDIS_URL is set, so
every web process shares the counts; the local-memory cache of one process
otherwise) under two separate keys: the username and the client address. When
either reaches its limit within LOGIN_LOCKOUT_MINUTES, sign-ins for it are
refused for LOGIN_LOCKOUT_MINUTES, then the lockout ends on its own. A
successful sign-in clears its username's count; an address's count is not
cleared by a success, so one valid account cannot reset a guessing run.

The check runs in the two login forms (the site's and the admin's), before
the password is checked, with a message that says when to try again; they are
the only places that call authenticate(). Failures are counted from Django's
user_login_failed signal. (An authentication backend raising PermissionDenied
would also guard other callers, but a second backend makes Django's login()
and the test client's force_login() ask which backend to use.)

Counters use cache.add + cache.incr, atomic on Redis, so parallel guesses
from several processes cannot slip past the limit by more than a race's
width. Usernames and addresses are stored hashed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import caches
from django.core.exceptions import ValidationError
from django.dispatch import receiver
from django.http import HttpRequest

PREFIX = "login-throttle"
# Longest X-Forwarded-For value looked at; a proxy chain is a few entries.
MAX_FORWARDED_LENGTH = 1024


@dataclass(frozen=True)
class Lockout:
    """A refused sign-in: why, and when the next attempt will be heard."""

    until: float
    by: str  # "account" or "address"

    @property
    def message(self) -> str:
        """The sentence the login page shows."""
        what = "this account" if self.by == "account" else "your address"
        return f"Too many failed sign-ins for {what}. {try_again(self.until)}"


def try_again(until: float) -> str:
    """The end of a refusal's sentence: when the next attempt will be heard."""
    minutes = max(1, math.ceil((until - time.time()) / 60))
    at = datetime.fromtimestamp(until, tz=UTC).strftime("%H:%M")
    unit = "minute" if minutes == 1 else "minutes"
    return f"Try again after {at} UTC (in {minutes} {unit})."


def counter_cache() -> Any:
    """The cache holding throttle counts (shared by every process on Redis)."""
    return caches[settings.LOGIN_THROTTLE_CACHE]


def digest(value: str) -> str:
    """A name or address as a throttle key holds it: hashed."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def client_address(request: HttpRequest | None) -> str:
    """The client's address: the proxy's X-Forwarded-For only with BEHIND_PROXY.

    The proxy appends the address it saw, so the last entry is the one to
    trust; the entries before it are whatever the client sent. IPv6 clients
    are counted per /64, the block one subscriber usually holds.
    """
    if request is None:
        return ""
    raw = request.META.get("REMOTE_ADDR", "")
    if settings.BEHIND_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded and len(forwarded) <= MAX_FORWARDED_LENGTH:
            raw = forwarded.split(",")[-1].strip()
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _keys(request: HttpRequest | None, username: str | None) -> list[tuple[str, str]]:
    keys = []
    if username and settings.LOGIN_FAILURE_LIMIT > 0:
        name = username.strip().casefold()[:150]
        keys.append(("account", f"{PREFIX}:account:{digest(name)}"))
    address = client_address(request)
    if address and settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS > 0:
        keys.append(("address", f"{PREFIX}:address:{digest(address)}"))
    return keys


def _limit(by: str) -> int:
    if by == "account":
        return settings.LOGIN_FAILURE_LIMIT
    return settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS


def lockout(request: HttpRequest | None, username: str | None) -> Lockout | None:
    """The lockout in force for this username or client address, if any."""
    cache = counter_cache()
    now = time.time()
    found = []
    for by, key in _keys(request, username):
        until = cache.get(f"{key}:until")
        if isinstance(until, int | float) and until > now:
            found.append(Lockout(until=float(until), by=by))
    return max(found, key=lambda lock: lock.until) if found else None


def record_failure(request: HttpRequest | None, username: str | None) -> None:
    """Count one failed sign-in; lock what reached its limit."""
    if lockout(request, username) is not None:
        return  # refused while locked: the lockout's end stays fixed
    cache = counter_cache()
    window = settings.LOGIN_LOCKOUT_MINUTES * 60
    for by, key in _keys(request, username):
        count_key = f"{key}:count"
        cache.add(count_key, 0, timeout=window)
        try:
            count = cache.incr(count_key)
        except ValueError:  # expired between add and incr
            cache.set(count_key, 1, timeout=window)
            count = 1
        if count >= _limit(by):
            cache.set(f"{key}:until", time.time() + window, timeout=window + 60)
            # The count starts again from zero once the lockout ends.
            cache.delete(count_key)


def clear_account(username: str | None) -> None:
    """Forget an account's failures after it signed in."""
    if not username:
        return
    cache = counter_cache()
    for by, key in _keys(None, username):
        if by == "account":
            cache.delete_many([f"{key}:count", f"{key}:until"])


@receiver(user_login_failed, dispatch_uid="llmsite.throttle.failed")
def _on_login_failed(
    sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any
) -> None:
    username = credentials.get("username")
    record_failure(request, username if isinstance(username, str) else None)


@receiver(user_logged_in, dispatch_uid="llmsite.throttle.logged_in")
def _on_logged_in(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    clear_account(user.get_username())


class ThrottledLoginMixin:
    """Refuse a locked sign-in with a message that says when to try again."""

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        lock = lockout(self.request, username)
        if lock is not None:
            raise ValidationError(lock.message, code="locked_out")
        try:
            return super().clean()
        except ValidationError:
            # This failure may have been the one that reached the limit.
            lock = lockout(self.request, username)
            if lock is not None:
                raise ValidationError(lock.message, code="locked_out") from None
            raise


class ThrottledAuthenticationForm(ThrottledLoginMixin, AuthenticationForm):
    """The site's login form."""


class ThrottledAdminAuthenticationForm(ThrottledLoginMixin, AdminAuthenticationForm):
    """The admin's login form."""
