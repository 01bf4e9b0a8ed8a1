"""How the OpenAPI schema describes our authentication (drf-spectacular)."""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import serializers


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A personal API key, `llms-...` (the same as /v1).",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.SessionAuthentication"
    name = "session"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    code = serializers.CharField()
    param = serializers.CharField(
        allow_null=True, help_text="The query parameter at fault, if one is."
    )


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer of /api."""

    error = ErrorDetailSerializer()


# Answers any /api operation may give besides its own.
ERROR_RESPONSES = {
    "400": "A query parameter is invalid or unknown; `param` names it.",
    "401": "No credentials, or an invalid API key.",
    "403": "The caller may not see this.",
    "406": "The Accept header names no format this operation serves.",
}


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's, plus the error answers every operation can give."""

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if self.method != "GET" or not self.view.__module__.startswith("api."):
            return responses
        error = self._get_response_for_code(
            ErrorSerializer, "400", media_types=["application/json"]
        )
        for code, description in ERROR_RESPONSES.items():
            if code == "401" and not self.get_auth():
                continue
            responses.setdefault(code, {**error, "description": description})
        return responses
