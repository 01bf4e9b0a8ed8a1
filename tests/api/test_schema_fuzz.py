"""schemathesis over /api/schema/: every operation, never a 5xx, always as described.

The schema is fetched from the running app, so operations added to /api are
covered as soon as they are routed. Requests go through Django's WSGI handler
in this thread (and this test's transaction), signed in with the API key of a
staff user and of a regular user in turn, over a few records.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from gateway.models import ApiKey

pytestmark = pytest.mark.django_db

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Left out on purpose, the rest (no 5xx; status codes, content types, bodies
# and headers as the schema says) all run:
# - positive_data_acceptance: a schema cannot say that `until` must come after
#   `since`, and that 400 is the documented answer;
# - negative_data_rejection: /api is lenient where it helps people: a time
#   without an offset is UTC, an empty parameter is as if absent (HTML forms).
LENIENCY_CHECKS = [positive_data_acceptance, negative_data_rejection]

_django = get_wsgi_application()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Django's WSGI app, keeping the test's connection open as the test client does."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        result = _django(environ, start_response)
        try:
            return list(result)
        finally:
            result.close()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def _schema() -> Any:
    """The schema /api/schema/ serves, as schemathesis sees it, calling `app`."""
    generator = SchemaGenerator()
    loaded = schemathesis.openapi.from_dict(generator.get_schema(public=True))
    loaded.app = app
    return loaded


# Loaded when the tests are collected (no database needed), not through the
# lazy fixture loader, which does not run on this pytest.
schema = _schema()


@pytest.fixture(autouse=True)
def _records(owner, staff, make_record, owner_key, endpoint) -> None:
    make_record(owner, endpoint=endpoint, api_key=owner_key[0], source="api")
    make_record(staff, status="error", error_type="timeout", cost=None)
    make_record(owner, fallback_hops=[{"endpoint": "west"}], tokens_estimated=True)


def test_the_served_schema_is_the_one_under_test(client) -> None:
    served = client.get("/api/schema/?format=json").json()

    assert served["paths"] == schema.raw_schema["paths"]
    assert "/api/usage/records/" in served["paths"]


@pytest.fixture
def credentials(staff, owner_key) -> list[dict[str, str]]:
    """Headers of a staff user's key and of a regular user's key."""
    _, raw = ApiKey.generate(staff, "fuzz")
    return [
        {"Authorization": f"Bearer {raw}"},
        {"Authorization": f"Bearer {owner_key[1]}"},
    ]


@schema.parametrize()
@FUZZ
def test_every_operation_answers_as_its_schema_says(case, credentials) -> None:
    for headers in credentials:
        case.call_and_validate(headers=headers, excluded_checks=LENIENCY_CHECKS)
