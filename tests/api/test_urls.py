"""The REST API's views load on first use, and behave as if imported up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.urls import get_resolver, resolve, reverse

from api.urls import LazyView, urlpatterns

ROOT = Path(__file__).resolve().parents[2]

# A web process once started and asked for a /v1 URL and a page's reverse():
# the modules it has imported from DRF, drf-spectacular and Pillow.
STARTUP_PROBE = """
import json, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "llmsite.settings"
import llmsite.asgi
from django.urls import resolve, reverse
resolve("/v1/models")
reverse("api:usage-records")
print(json.dumps(sorted(
    name for name in sys.modules
    if name.split(".")[0] in ("rest_framework", "drf_spectacular", "PIL")
)))
"""


def test_a_started_process_has_not_imported_drf_or_pillow(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    imported = json.loads(result.stdout.splitlines()[-1])
    # Only what INSTALLED_APPS loads: the apps' configs and system checks.
    assert imported == [
        "drf_spectacular",
        "drf_spectacular.apps",
        "drf_spectacular.checks",
        "rest_framework",
        "rest_framework.apps",
        "rest_framework.checks",
    ]


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
