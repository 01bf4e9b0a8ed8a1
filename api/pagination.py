"""Cursor pagination in time order, with a 400 for a bad cursor or page size."""

from __future__ import annotations

from django.conf import settings
from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request

from api.exceptions import ParamError


def page_size(request: Request, default: int, maximum: int) -> int:
    """The ``page_size`` asked for; absent or empty (as every filter): `default`."""
    raw = request.query_params.get("page_size")
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ParamError("page_size", "page_size must be a whole number.")
    size = int(raw)
    if size < 1:
        raise ParamError("page_size", "page_size must be at least 1.", "min_value")
    if size > maximum:
        raise ParamError(
            "page_size", f"page_size must be at most {maximum}.", "max_value"
        )
    return size


class TimeCursorPagination(CursorPagination):
    """Oldest first by (created_at, id); rows added later land on later pages.

    The cursor is opaque: it holds the position (a created_at) and an offset
    among rows of that same instant, so a page never repeats or skips a row
    that existed when the walk began, and rows written afterwards with a later
    time are met at the end.
    """

    ordering = ("created_at", "id")
    page_size_query_param = "page_size"
    page_size_query_description = "Rows per page (1 to the maximum, 1000 by default)."

    def __init__(self) -> None:
        # Read per request, so a settings override (tests) takes effect.
        self.page_size = settings.API_PAGE_SIZE
        self.max_page_size = settings.API_MAX_PAGE_SIZE

    def get_page_size(self, request: Request) -> int:
        return page_size(request, settings.API_PAGE_SIZE, self.max_page_size)

    def decode_cursor(self, request: Request) -> Cursor | None:
        raw = request.query_params.get(self.cursor_query_param)
        if raw is not None and len(raw) > 1000:
            raise ParamError("cursor", "Invalid cursor.")
        try:
            cursor = super().decode_cursor(request)
        except NotFound as exc:  # DRF's answer to a tampered cursor
            raise ParamError("cursor", "Invalid cursor.") from exc
        # The position goes into a created_at filter: it must be a time, or
        # the database would raise on it.
        if cursor is not None and cursor.position is not None:
            try:
                moment = parse_datetime(cursor.position)
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None:
                raise ParamError("cursor", "Invalid cursor.")
        return cursor
