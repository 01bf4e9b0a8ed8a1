"""Formats: JSON pages, and CSV / JSON Lines exports of the whole range.

The export renderers only take part in content negotiation (`?format=` or
`Accept:`); the view streams the body itself (gateway.usage_export).
"""

from __future__ import annotations

from typing import Any

from rest_framework import renderers
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request

from api.exceptions import ParamError


class CSVRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None
    ) -> bytes:
        raise NotImplementedError("exports are streamed by the view")


class JSONLinesRenderer(renderers.BaseRenderer):
    media_type = "application/jsonl"
    format = "jsonl"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None
    ) -> bytes:
        raise NotImplementedError("exports are streamed by the view")


class NDJSONRenderer(JSONLinesRenderer):
    """The other common name of JSON Lines, for Accept: application/x-ndjson."""

    media_type = "application/x-ndjson"


class StrictContentNegotiation(DefaultContentNegotiation):
    """An unknown `?format=` is a 400 naming it, not DRF's 404."""

    def select_renderer(
        self, request: Request, renderers: list, format_suffix: str | None = None
    ) -> tuple:
        fmt = format_suffix or request.query_params.get(
            self.settings.URL_FORMAT_OVERRIDE
        )
        if fmt and not any(r.format == fmt for r in renderers):
            known = sorted({r.format for r in renderers})
            raise ParamError(
                "format",
                f"Unknown format; use one of: {', '.join(known)}.",
                "invalid_choice",
            )
        return super().select_renderer(request, renderers, format_suffix)
