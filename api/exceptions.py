"""One error shape for the whole /api, the same as /v1 (OpenAI's).

`{"error": {"message": str, "type": str, "code": str, "param": str | null}}`
where `param` names the query parameter at fault (400), `type` is one of
invalid_request_error (400), authentication_error (401), permission_error
(403), not_found_error (404), method_not_allowed (405), not_acceptable (406).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    406: "not_acceptable",
    415: "unsupported_media_type",
    429: "rate_limit_error",
}


class ParamError(exceptions.APIException):
    """A bad query parameter: 400 naming it."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"

    def __init__(self, param: str, message: str, code: str = "invalid") -> None:
        super().__init__(message, code)
        self.param = param


class ParamForbidden(ParamError):
    """A query parameter the caller may not use with that value: 403."""

    status_code = status.HTTP_403_FORBIDDEN

    def __init__(self, param: str, message: str) -> None:
        super().__init__(param, message, "forbidden")


def error_body(
    status_code: int, message: str, code: str, param: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status_code, "api_error"),
            "code": code,
            "param": param,
        }
    }


def _first(detail: Any, param: str | None = None) -> tuple[str | None, str, str]:
    """(param, message, code) of the first error in a DRF error detail."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = None if key in {"non_field_errors", "__all__"} else str(key)
            return _first(value, param or name)
        return param, "Invalid request.", "invalid"
    if isinstance(detail, list):
        if detail:
            return _first(detail[0], param)
        return param, "Invalid request.", "invalid"
    code = getattr(detail, "code", None) or "invalid"
    return param, str(detail), str(code)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler (headers, status), with our error body."""
    # Imported here: rest_framework.views loads the settings that name this
    # module and api.renderers, which imports ParamError from it.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a bug: Django's 500, logged
    if isinstance(exc, ParamError):
        param, message, code = exc.param, str(exc.detail), str(exc.detail.code)
    elif isinstance(exc, exceptions.APIException):
        param, message, code = _first(exc.detail)
        if not isinstance(exc, exceptions.ValidationError):
            param = None
            code = exc.get_codes() if isinstance(exc.get_codes(), str) else code
    else:  # Http404, PermissionDenied from Django
        param, message, code = None, "Not found.", "not_found"
        if response.status_code == status.HTTP_403_FORBIDDEN:
            message, code = "Permission denied.", "permission_denied"
    response.data = error_body(response.status_code, message, code, param)
    return response


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Any /api/ path that names nothing: a JSON 404, not the HTML page."""
    return JsonResponse(
        error_body(404, "No such API endpoint.", "not_found"), status=404
    )
