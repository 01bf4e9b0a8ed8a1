"""URLs of the REST API, mounted at /api/."""

from __future__ import annotations

from django.urls import path, re_path

from api.exceptions import not_found
from api.views.budgets import BudgetsView
from api.views.docs import RedocView, SchemaView, SwaggerView
from api.views.endpoints import EndpointsView
from api.views.me import MeView
from api.views.records import UsageRecordList
from api.views.rollups import UsageRollupsView

app_name = "api"

urlpatterns = [
    path("usage/records/", UsageRecordList.as_view(), name="usage-records"),
    path("usage/rollups/", UsageRollupsView.as_view(), name="usage-rollups"),
    path("budgets/", BudgetsView.as_view(), name="budgets"),
    path("endpoints/", EndpointsView.as_view(), name="endpoints"),
    path("me/", MeView.as_view(), name="me"),
    path("schema/", SchemaView.as_view(), name="schema"),
    path("docs/", SwaggerView.as_view(), name="docs"),
    path("redoc/", RedocView.as_view(), name="redoc"),
    # Anything else under /api/ is a JSON 404, not the HTML page.
    re_path(r"^.*$", not_found),
]
