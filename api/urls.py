"""URLs of the REST API, mounted at /api/.

The views are imported on first use, not with the URLconf: DRF, django-filter
and drf-spectacular hold about 20 MiB once imported, and a process that
serves only /v1 or the chat never needs them.  resolve() and reverse() work
without the import (the names are here); a request, or drf-spectacular
walking the patterns for the schema, imports the view.
"""

from __future__ import annotations

import threading
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path, re_path
from django.utils.module_loading import import_string

app_name = "api"


class LazyView:
    """A view given by dotted path, imported on its first use.

    A class-based view becomes ``as_view()``.  Attributes a middleware or the
    schema generator asks of it (``cls``, ``initkwargs``, ``login_required``)
    come from the imported view.
    """

    def __init__(self, dotted_path: str, *, csrf_exempt: bool = True) -> None:
        self.dotted_path = dotted_path
        # Django's CSRF middleware reads this before the view runs, so it is
        # declared, not imported: DRF's views are csrf_exempt (their session
        # authentication enforces CSRF itself).  A test compares it with each
        # imported view.
        self.csrf_exempt = csrf_exempt
        # What the resolver names the view by (ResolverMatch._func_path, the
        # resolver's callback strings) without importing it: its dotted path.
        self.__module__, _, self.__name__ = dotted_path.rpartition(".")
        self.__qualname__ = self.__name__
        self._view: Any = None
        self._lock = threading.Lock()

    def load(self) -> Any:
        """The real view, imported on the first call."""
        view = self._view
        if view is None:
            # Requests run in several threads; each view is built once.
            with self._lock:
                if self._view is None:
                    target = import_string(self.dotted_path)
                    as_view = getattr(target, "as_view", None)
                    self._view = as_view() if as_view is not None else target
                view = self._view
        return view

    def __call__(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return self.load()(request, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Private and dunder lookups (copy, pickle, asyncio's coroutine marker)
        # are about this object.  reverse() asks every pattern for view_class
        # when it first builds its tables, and every page reverses URLs: the
        # name above stands in for it.
        if name.startswith("_") or name == "view_class":
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        return f"<LazyView {self.dotted_path}>"


urlpatterns = [
    path(
        "usage/records/",
        LazyView("api.views.records.UsageRecordList"),
        name="usage-records",
    ),
    path(
        "usage/rollups/",
        LazyView("api.views.rollups.UsageRollupsView"),
        name="usage-rollups",
    ),
    path("budgets/", LazyView("api.views.budgets.BudgetsView"), name="budgets"),
    path("endpoints/", LazyView("api.views.endpoints.EndpointsView"), name="endpoints"),
    path("me/", LazyView("api.views.me.MeView"), name="me"),
    path("schema/", LazyView("api.views.docs.SchemaView"), name="schema"),
    path("docs/", LazyView("api.views.docs.SwaggerView"), name="docs"),
    path("redoc/", LazyView("api.views.docs.RedocView"), name="redoc"),
    # Anything else under /api/ is a JSON 404, not the HTML page.
    re_path(r"^.*$", LazyView("api.exceptions.not_found", csrf_exempt=False)),
]
