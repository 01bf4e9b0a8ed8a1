"""GET /api/usage/records/: usage records as JSON pages, CSV or JSON Lines."""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request

from api.filters import MAX_ID, UsageRecordFilter
from api.pagination import TimeCursorPagination
from api.permissions import scope_to_caller
from api.renderers import CSVRenderer, JSONLinesRenderer, NDJSONRenderer
from api.serializers import UsageRecordSerializer
from api.views.base import ApiView
from gateway import usage_export
from gateway.models import UsageRecord

EXPORTS = {
    "csv": (usage_export.iter_csv, "text/csv; charset=utf-8", "csv"),
    "jsonl": (usage_export.iter_jsonl, "application/jsonl; charset=utf-8", "jsonl"),
}

_EXPORT_DESCRIPTION = (
    "The whole filtered range (not one page), streamed, with a header row "
    "(CSV). Cells that a spreadsheet would run as a formula start with an "
    "apostrophe."
)


class UsageRecordList(ApiView):
    """Usage records, oldest first; a regular user sees only their own."""

    serializer_class = UsageRecordSerializer
    filterset_class = UsageRecordFilter
    pagination_class = TimeCursorPagination
    renderer_classes = [JSONRenderer, CSVRenderer, JSONLinesRenderer, NDJSONRenderer]

    def get_queryset(self) -> QuerySet:
        return scope_to_caller(UsageRecord.objects.all(), self.request)

    @extend_schema(
        operation_id="usage_records_list",
        parameters=[
            OpenApiParameter(
                "api_key",
                {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                description="An API key's id.",
            ),
            OpenApiParameter(
                "page_size",
                {"type": "integer", "minimum": 1, "maximum": 1000},
                description="Rows per page; 100 when not given (API_PAGE_SIZE).",
            ),
            OpenApiParameter(
                "cursor",
                {"type": "string", "maxLength": 1000},
                description="The `next` or `previous` link's cursor, as given.",
            ),
            OpenApiParameter(
                "user",
                {"type": "string", "maxLength": 150},
                description=(
                    "A user's id or username. Staff: anyone's; others: only "
                    "their own (else 403)."
                ),
            ),
            OpenApiParameter(
                "model",
                {"type": "string", "maxLength": 200},
                description="The model name asked for.",
            ),
            OpenApiParameter(
                "endpoint",
                {"type": "string", "maxLength": 100},
                description="The id or name of the endpoint that answered.",
            ),
            OpenApiParameter(
                "format",
                OpenApiTypes.STR,
                enum=["json", "csv", "jsonl"],
                description=(
                    "json: one page. csv / jsonl: the whole filtered range, "
                    "streamed (also chosen by Accept: text/csv, "
                    "application/jsonl or application/x-ndjson)."
                ),
            ),
        ],
        responses={
            (200, "application/json"): UsageRecordSerializer(many=True),
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR, description=_EXPORT_DESCRIPTION
            ),
            (200, "application/jsonl"): OpenApiResponse(
                OpenApiTypes.STR, description=_EXPORT_DESCRIPTION
            ),
            (200, "application/x-ndjson"): OpenApiResponse(
                OpenApiTypes.STR, description=_EXPORT_DESCRIPTION
            ),
        },
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        queryset = self.filter_queryset(self.get_queryset())
        export = EXPORTS.get(request.accepted_renderer.format)
        if export is not None:
            return self.export(queryset, *export)
        named = queryset.values_list(*usage_export.FIELDS, named=True)
        page = self.paginate_queryset(named)
        serializer = self.get_serializer(page, many=True)
        return self.get_paginated_response(serializer.data)

    def export(
        self, queryset: QuerySet, chunks: Any, content_type: str, extension: str
    ) -> StreamingHttpResponse:
        """Stream the whole range: async under ASGI, sync under WSGI."""
        body = chunks(queryset.order_by("created_at", "id"))
        if isinstance(self.request._request, ASGIRequest):
            body = usage_export.aiter_chunks(body)
        response = StreamingHttpResponse(body, content_type=content_type)
        data = self.filterset_data()
        name = usage_export.filename(data.get("since"), data.get("until"), extension)
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        response["Cache-Control"] = "no-store"
        response["X-Content-Type-Options"] = "nosniff"
        return response

    def filterset_data(self) -> dict[str, Any]:
        filterset = UsageRecordFilter(
            self.request.query_params, queryset=UsageRecord.objects.none()
        )
        return filterset.form.cleaned_data if filterset.is_valid() else {}
