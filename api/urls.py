"""URLs of the REST API, mounted at /api/."""

from __future__ import annotations

from django.urls import path, re_path

from api.exceptions import not_found
from api.views.docs import RedocView, SchemaView, SwaggerView
from api.views.records import UsageRecordList

app_name = "api"

urlpatterns = [
    path("usage/records/", UsageRecordList.as_view(), name="usage-records"),
    path("schema/", SchemaView.as_view(), name="schema"),
    path("docs/", SwaggerView.as_view(), name="docs"),
    path("redoc/", RedocView.as_view(), name="redoc"),
    # Anything else under /api/ is a JSON 404, not the HTML page.
    re_path(r"^.*$", not_found),
]
