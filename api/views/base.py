"""What every /api view shares."""

from __future__ import annotations

from rest_framework import generics
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from api.exceptions import ParamError

# Parameters every view understands besides its filters.
COMMON_PARAMS = frozenset({"format"})


class ApiView(generics.GenericAPIView):
    """A GenericAPIView whose errors are always JSON and whose params are checked.

    `allowed_params` (besides the filterset's and the paginator's) lists the
    query parameters a view takes; any other is a 400, so a misspelt filter
    never silently widens an answer or an export.
    """

    allowed_params: frozenset[str] = frozenset()

    def initial(self, request: Request, *args: object, **kwargs: object) -> None:
        super().initial(request, *args, **kwargs)
        self.check_params(request)

    def known_params(self) -> set[str]:
        known = set(COMMON_PARAMS | self.allowed_params)
        filterset_class = getattr(self, "filterset_class", None)
        if filterset_class is not None:
            known |= set(filterset_class.base_filters)
        paginator = self.paginator
        if paginator is not None:
            for name in ("cursor_query_param", "page_size_query_param"):
                if getattr(paginator, name, None):
                    known.add(getattr(paginator, name))
        return known

    def check_params(self, request: Request) -> None:
        known = self.known_params()
        for name in request.query_params:
            if name not in known:
                raise ParamError(
                    name[:100], "Unknown query parameter.", "unknown_parameter"
                )

    def handle_exception(self, exc: Exception) -> Response:
        # An error is JSON whatever format was asked for (CSV cannot say it).
        self.request.accepted_renderer = JSONRenderer()
        self.request.accepted_media_type = JSONRenderer.media_type
        return super().handle_exception(exc)
