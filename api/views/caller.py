"""Who is calling: the signed-in user, and the API key when one was used."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.request import Request

from gateway.models import ApiKey


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller of an API view: a user, through a session or one of their keys."""

    user_id: int
    username: str
    is_staff: bool
    api_key: ApiKey | None

    @property
    def api_key_id(self) -> int | None:
        return self.api_key.pk if self.api_key is not None else None


def caller_of(request: Request) -> Caller:
    """The caller of an authenticated request."""
    user = request.user
    key = request.auth if isinstance(request.auth, ApiKey) else None
    return Caller(user.pk, user.get_username(), bool(user.is_staff), key)
