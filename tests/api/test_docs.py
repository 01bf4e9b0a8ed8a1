"""The OpenAPI schema and its documentation pages."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.django_db


def test_the_schema_describes_the_exports_and_the_error_shape(client):
    schema = client.get("/api/schema/?format=json").json()

    records = schema["paths"]["/api/usage/records/"]["get"]
    assert set(records["responses"]["200"]["content"]) == {
        "application/json",
        "text/csv",
        "application/jsonl",
        "application/x-ndjson",
    }
    params = {p["name"] for p in records["parameters"]}
    assert {"since", "until", "user", "api_key", "model", "endpoint"} <= params
    assert {"status", "source", "cached", "estimated", "cursor", "page_size"} <= params
    error = schema["components"]["schemas"]["Error"]
    assert "error" in error["properties"]
    assert records["responses"]["400"]["content"]["application/json"]


@pytest.mark.parametrize("path", ["/api/docs/", "/api/redoc/"])
def test_the_docs_pages_load_only_our_own_files_under_a_policy(client, path):
    response = client.get(path)

    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    page = response.content.decode()
    # No CDN, no inline script: every script is one of our static files.
    assert "https://" not in page
    scripts = re.findall(r"<script([^>]*)>", page)
    assert scripts and all("src=" in attrs for attrs in scripts)
    for src in re.findall(r'<script src="([^"]+)"', page):
        assert src.startswith(("/static/", "/api/docs/"))


def test_swagger_uis_start_up_script_is_served_as_a_file(client):
    response = client.get("/api/docs/?script=")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/javascript")
    assert "/api/schema/" in response.content.decode()


def test_the_vendored_files_the_docs_name_exist():
    from django.contrib.staticfiles import finders

    for name in (
        "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
        "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css",
        "drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js",
    ):
        assert finders.find(name), name
