"""The REST API's views load on first use, and behave as if imported up front."""

from __future__ import annotations

import pytest
from django.urls import get_resolver, resolve, reverse

from api.urls import LazyView, urlpatterns


@pytest.mark.parametrize(
    "pattern", [p for p in urlpatterns if isinstance(p.callback, LazyView)]
)
def test_each_lazy_view_declares_the_csrf_exemption_of_the_view_it_loads(pattern):
    # Django's CSRF middleware reads csrf_exempt from the URL's callback; the
    # declared value must be what the imported view says.
    view = pattern.callback.load()
    assert pattern.callback.csrf_exempt is getattr(view, "csrf_exempt", False)


def test_the_resolver_names_the_loaded_view():
    match = resolve("/api/me/")
    assert match.view_name == "api:me"
    assert match._func_path == "api.views.me.MeView"
    assert reverse("api:me") == "/api/me/"


def test_the_view_is_built_once():
    view = LazyView("api.views.me.MeView")
    assert view.load() is view.load()
    assert view.cls.__name__ == "MeView"


def test_private_lookups_do_not_import_the_view():
    view = LazyView("api.no_such_module.View")
    with pytest.raises(AttributeError):
        view._is_coroutine  # noqa: B018  (the lookup itself is the test)
    with pytest.raises(ImportError):
        view.load()


@pytest.mark.django_db
def test_an_unknown_api_path_is_still_a_json_404(client):
    response = client.get("/api/nothing-here/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_every_api_view_is_in_the_urlconf():
    names = {p.name for p in get_resolver("api.urls").url_patterns if p.name}
    assert names == {
        "usage-records",
        "usage-rollups",
        "budgets",
        "endpoints",
        "me",
        "schema",
        "docs",
        "redoc",
    }
