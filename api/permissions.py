"""Who sees what: a user their own rows, staff everything."""

from __future__ import annotations

from django.db.models import QuerySet
from rest_framework.request import Request


def is_staff(request: Request) -> bool:
    """True when the caller (session or API key's user) is active staff."""
    user = request.user
    return bool(user and user.is_authenticated and user.is_active and user.is_staff)


def scope_to_caller(
    queryset: QuerySet, request: Request, user_field: str = "user"
) -> QuerySet:
    """The rows the caller may see: all for staff, else those of `user_field`."""
    if is_staff(request):
        return queryset
    if not request.user or not request.user.is_authenticated:
        return queryset.none()
    return queryset.filter(**{user_field: request.user.pk})
