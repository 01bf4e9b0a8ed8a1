"""The OpenAPI schema and its Swagger UI / ReDoc pages, from vendored files."""

from __future__ import annotations

from typing import Any

from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerSplitView,
)
from rest_framework.request import Request

# Registers the authentication extensions before the first schema is built.
from api import schema  # noqa: F401

# The pages load only our own static files (drf-spectacular-sidecar). Swagger
# UI and ReDoc set style attributes from script, hence 'unsafe-inline' for
# styles only; ReDoc also runs a worker from a blob: URL. No inline script:
# the split view serves Swagger UI's start-up script as a file.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


class _Policy:
    def finalize_response(
        self, request: Request, response: Any, *args: Any, **kwargs: Any
    ) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
        response["Referrer-Policy"] = "same-origin"
        return response


class SchemaView(SpectacularAPIView):
    """The OpenAPI 3 schema (YAML, or JSON with ?format=json)."""


class SwaggerView(_Policy, SpectacularSwaggerSplitView):
    """Swagger UI over the schema."""

    url_name = "api:schema"


class RedocView(_Policy, SpectacularRedocView):
    """ReDoc over the schema, without the web fonts of the stock page."""

    url_name = "api:schema"
    template_name = "api/redoc.html"
