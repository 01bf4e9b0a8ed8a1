"""Extra-header values are secrets: encrypted at rest, write-only, never exported."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.urls import reverse

from gateway.client import EndpointConfig
from gateway.config_file import ConfigFileError, export_text, import_text
from gateway.models import Endpoint
from tests.gateway.test_admin import _endpoint_form

pytestmark = pytest.mark.django_db

HEADER_SECRET = "xk-header-secret-0123456789"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def endpoint():
    return Endpoint.objects.create(
        name="tenant",
        base_url="https://api.example.com/v1",
        extra_headers={"x-api-key": HEADER_SECRET, "OpenAI-Organization": "org-1"},
    )


def stored_column(endpoint: Endpoint) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extra_headers_encrypted FROM gateway_endpoint WHERE id = %s",
            [endpoint.pk],
        )
        return cursor.fetchone()[0]


def test_values_are_stored_encrypted_and_read_back(endpoint):
    column = stored_column(endpoint)

    assert HEADER_SECRET not in column
    assert "x-api-key" not in column
    assert column.startswith("fernet:")
    assert Endpoint.objects.get(pk=endpoint.pk).extra_headers == {
        "x-api-key": HEADER_SECRET,
        "OpenAI-Organization": "org-1",
    }


def test_the_upstream_still_gets_them(endpoint):
    config = EndpointConfig.from_model(Endpoint.objects.get(pk=endpoint.pk))

    assert config.request_headers()["x-api-key"] == HEADER_SECRET
    assert HEADER_SECRET not in repr(config)
    assert HEADER_SECRET not in repr(endpoint) + str(endpoint)


def test_unreadable_headers_leave_the_endpoint_usable_without_them(endpoint, settings):
    settings.FIELD_ENCRYPTION_KEYS = ["a completely different key than before"]

    config = EndpointConfig.from_model(Endpoint.objects.get(pk=endpoint.pk))

    assert "x-api-key" not in config.request_headers()


def test_the_admin_shows_names_but_never_values(admin_client, endpoint):
    listing = admin_client.get(reverse("admin:gateway_endpoint_changelist"))
    form = admin_client.get(
        reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    )

    assert listing.status_code == form.status_code == 200
    page = form.content.decode()
    assert "x-api-key (set)" in page
    for html in (listing.content.decode(), page):
        assert HEADER_SECRET not in html
        assert "org-1" not in html
        assert stored_column(endpoint) not in html


def change(admin_client, endpoint, **fields):
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    return admin_client.post(url, _endpoint_form(endpoint, **fields))


def test_saving_without_touching_them_keeps_them(admin_client, endpoint):
    response = change(admin_client, endpoint, timeout=30)

    assert response.status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.extra_headers["x-api-key"] == HEADER_SECRET


def test_a_typed_header_is_added_or_replaces_one_of_the_same_name(
    admin_client, endpoint
):
    response = change(
        admin_client,
        endpoint,
        set_extra_headers="X-API-KEY: xk-rotated-value-987\nX-Tenant: acme\n",
    )

    assert response.status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.extra_headers == {
        "X-API-KEY": "xk-rotated-value-987",
        "X-Tenant": "acme",
        "OpenAI-Organization": "org-1",
    }


def test_checked_headers_are_removed(admin_client, endpoint):
    change(admin_client, endpoint, remove_extra_headers=["x-api-key"])

    endpoint.refresh_from_db()
    assert endpoint.extra_headers == {"OpenAI-Organization": "org-1"}

    change(admin_client, endpoint, remove_extra_headers=["OpenAI-Organization"])
    endpoint.refresh_from_db()
    assert endpoint.extra_headers == {}
    assert stored_column(endpoint) == ""


def test_a_bad_header_is_refused_without_echoing_the_typed_value(
    admin_client, endpoint
):
    response = change(
        admin_client, endpoint, set_extra_headers="no colon xk-typed-secret-55"
    )
    bad_name = change(
        admin_client, endpoint, set_extra_headers="Bad Name: xk-typed-secret-55"
    )
    reserved = change(admin_client, endpoint, set_extra_headers="Host: evil.example")

    for answer in (response, bad_name, reserved):
        assert answer.status_code == 200  # the form again, with the error
        assert "xk-typed-secret-55" not in answer.content.decode()
    assert "Line 1: write it as Name: value." in response.content.decode()
    assert "cannot be set here" in reserved.content.decode()
    endpoint.refresh_from_db()
    assert endpoint.extra_headers["x-api-key"] == HEADER_SECRET


def test_export_never_writes_values_and_reimport_keeps_them(endpoint):
    exported = export_text()

    assert HEADER_SECRET not in exported
    assert "org-1" not in exported
    assert "#   tenant: OpenAI-Organization, x-api-key" in exported
    import_text(exported)
    endpoint.refresh_from_db()
    assert endpoint.extra_headers["x-api-key"] == HEADER_SECRET


TOML = """
[[endpoints]]
name = "tenant"
base_url = "https://api.example.com/v1"
{lines}
"""


def test_import_reads_secret_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("TENANT_KEY", HEADER_SECRET)

    import_text(
        TOML.format(
            lines='extra_headers = { "OpenAI-Organization" = "org-1" }\n'
            'extra_headers_env = { "x-api-key" = "TENANT_KEY" }'
        )
    )

    endpoint = Endpoint.objects.get(name="tenant")
    assert endpoint.extra_headers == {
        "OpenAI-Organization": "org-1",
        "x-api-key": HEADER_SECRET,
    }
    assert HEADER_SECRET not in stored_column(endpoint)


def test_a_missing_header_variable_is_an_error(monkeypatch):
    monkeypatch.delenv("TENANT_KEY", raising=False)

    with pytest.raises(ConfigFileError) as caught:
        import_text(
            TOML.format(lines='extra_headers_env = { "x-api-key" = "TENANT_KEY" }')
        )

    assert "TENANT_KEY" in str(caught.value)
    assert not Endpoint.objects.filter(name="tenant").exists()


@pytest.mark.parametrize(
    "lines",
    [
        'extra_headers = { "Bad Name" = "v" }',
        'extra_headers = { "X-Ok" = 5 }',
        'extra_headers = "x-api-key: v"',
        'extra_headers = { "Content-Length" = "5" }',
    ],
)
def test_bad_headers_in_a_file_are_refused(lines):
    with pytest.raises(ConfigFileError):
        import_text(TOML.format(lines=lines))


def test_the_data_migration_encrypts_existing_values(transactional_db):
    from django.core.management import call_command

    call_command("migrate", "gateway", "0002", verbosity=0)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO gateway_endpoint (name, base_url, api_key_encrypted,"
                " enabled, priority, timeout, connect_timeout, max_retries,"
                " backoff_multiplier, failure_threshold, cooldown_seconds,"
                " probe_interval, probe_mode, probe_model, extra_headers,"
                " supports_stream_usage, status, consecutive_failures,"
                " probe_failures, created_at, updated_at) VALUES (%s, %s, '', %s,"
                " 1, 120, 10, 3, 2, 3, 60, 300, 'models', '', %s, %s, 'unknown',"
                " 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
                [
                    "legacy",
                    "https://api.example.com/v1",
                    True,
                    json.dumps({"x-api-key": HEADER_SECRET}),
                    True,
                ],
            )
    finally:
        # Every app: going back unapplied the migrations of apps that depend
        # on gateway's later ones (chat) too.
        call_command("migrate", verbosity=0)

    endpoint = Endpoint.objects.get(name="legacy")
    assert HEADER_SECRET not in stored_column(endpoint)
    assert endpoint.extra_headers == {"x-api-key": HEADER_SECRET}
