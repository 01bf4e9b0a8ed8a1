"""The admin: secrets stay write-only, big lists stay cheap."""

from __future__ import annotations

import re

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from gateway.models import ApiKey, Endpoint, ModelDefaults, ModelRoute, UsageRecord

pytestmark = pytest.mark.django_db

SECRET = "sk-live-0123456789abcdefSECRET"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def endpoint():
    endpoint = Endpoint(name="primary", base_url="https://api.example.com/v1")
    endpoint.api_key = SECRET
    endpoint.save()
    return endpoint


def test_endpoint_key_never_appears_in_list_or_form(admin_client, endpoint):
    listing = admin_client.get(reverse("admin:gateway_endpoint_changelist"))
    form = admin_client.get(
        reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    )

    assert listing.status_code == form.status_code == 200
    for page in (listing, form):
        assert SECRET not in page.content.decode()
        assert endpoint.api_key_encrypted not in page.content.decode()
    assert "primary" in listing.content.decode()


def _endpoint_form(endpoint, **changes):
    data = {
        "name": endpoint.name,
        "base_url": endpoint.base_url,
        "enabled": "on",
        "priority": 100,
        "connect_timeout": 5,
        "first_token_timeout": 30,
        "timeout": 60,
        "request_timeout": 120,
        "retries_before_failover": 0,
        "max_retries": 3,
        "backoff_multiplier": 2,
        "failure_threshold": 3,
        "cooldown_seconds": 60,
        "probe_interval": 300,
        "probe_mode": "models",
        "supports_stream_usage": "on",
        "routes-TOTAL_FORMS": 0,
        "routes-INITIAL_FORMS": 0,
    }
    data.update(changes)
    return data


def test_saving_with_a_blank_key_keeps_the_stored_one(admin_client, endpoint):
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    response = admin_client.post(url, _endpoint_form(endpoint, timeout=30))

    assert response.status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.timeout == 30
    assert endpoint.api_key == SECRET


def test_a_new_key_replaces_the_old_and_clear_removes_it(admin_client, endpoint):
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    admin_client.post(url, _endpoint_form(endpoint, api_key="sk-new"))
    endpoint.refresh_from_db()
    assert endpoint.api_key == "sk-new"

    admin_client.post(url, _endpoint_form(endpoint, clear_api_key="on"))
    endpoint.refresh_from_db()
    assert endpoint.api_key == ""


def create_key(admin_client, owner, name: str = "ci"):
    response = admin_client.post(
        reverse("admin:gateway_apikey_add"), {"user": owner.pk, "name": name}
    )
    raw = re.search(r'id="new-api-key"[^>]*value="([^"]+)"', response.content.decode())
    return response, raw.group(1) if raw else None


def test_creating_an_api_key_shows_it_once_and_stores_only_its_hash(
    admin_client, owner
):
    response, raw = create_key(admin_client, owner)

    key = ApiKey.objects.get(name="ci")
    assert response.status_code == 200
    assert raw is not None and raw.startswith(ApiKey.PREFIX)
    assert ApiKey.hash(raw) == key.key_hash
    assert "shown once" in response.content.decode()
    listing = admin_client.get(reverse("admin:gateway_apikey_changelist")).content
    change = admin_client.get(reverse("admin:gateway_apikey_change", args=[key.pk]))
    for page in (listing.decode(), change.content.decode()):
        assert raw not in page
        assert key.key_hash not in page


def test_a_new_api_key_never_travels_in_a_cookie_the_session_or_a_redirect(
    admin_client, owner
):
    response, raw = create_key(admin_client, owner)

    assert raw
    assert "Location" not in response
    assert "no-store" in response["Cache-Control"]
    for morsel in response.cookies.values():
        assert raw not in morsel.value
        assert raw[len(ApiKey.PREFIX) :][:16] not in morsel.value
    session = admin_client.session
    assert all(raw not in str(value) for value in session.values())
    later = admin_client.get(reverse("admin:gateway_apikey_changelist"))
    assert raw not in later.content.decode()
    assert all(raw not in str(m) for m in get_messages(later.wsgi_request))


def test_usage_list_costs_a_fixed_number_of_queries(
    admin_client, owner, endpoint, django_assert_max_num_queries
):
    UsageRecord.objects.bulk_create(
        UsageRecord(
            user=owner,
            model_name="m",
            endpoint=endpoint,
            endpoint_name="primary",
            status="ok",
        )
        for _ in range(60)
    )

    with django_assert_max_num_queries(8):
        response = admin_client.get(reverse("admin:gateway_usagerecord_changelist"))

    assert response.status_code == 200
    assert "alice" in response.content.decode()


@pytest.mark.parametrize(
    "name",
    ["endpoint", "modelroute", "budget", "apikey", "usagerecord", "modeldefaults"],
)
def test_every_gateway_list_renders(admin_client, name):
    response = admin_client.get(reverse(f"admin:gateway_{name}_changelist"))

    assert response.status_code == 200


def test_usage_list_shows_rounded_times_and_tokens_in_one_column(
    admin_client, owner, endpoint
):
    UsageRecord.objects.create(
        user=owner,
        model_name="m",
        endpoint=endpoint,
        endpoint_name="primary",
        status="ok",
        prompt_tokens=17,
        completion_tokens=23,
        tokens_estimated=True,
        latency_ms=2526.793891000125,
        ttft_ms=6.2,
    )

    page = admin_client.get(reverse("admin:gateway_usagerecord_changelist")).content
    text = page.decode()

    assert "2,527 ms" in text and "6 ms" in text
    assert "2526.79" not in text
    assert "≈17 → ≈23" in text
    for column in ("latency", "ttft", "tokens"):
        sorted_page = admin_client.get(
            reverse("admin:gateway_usagerecord_changelist"),
            {
                "o": str(
                    [
                        "created_at",
                        "source",
                        "user",
                        "model_name",
                        "endpoint_column",
                        "status",
                        "tokens",
                        "latency",
                        "ttft",
                    ].index(column)
                    + 1
                )
            },
        )
        assert sorted_page.status_code == 200


# --- HTTPS only --------------------------------------------------------------------


def test_the_form_refuses_plain_http_off_this_machine_on_the_url_field(
    admin_client, endpoint
):
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])

    response = admin_client.post(
        url, _endpoint_form(endpoint, base_url="http://10.0.0.5:8000/v1")
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["base_url"]
    assert errors["base_url"][0].startswith(
        "Plain http:// to 10.0.0.5 would send the API key in clear."
    )
    assert "Plain http:// to 10.0.0.5" in response.content.decode()
    endpoint.refresh_from_db()
    assert endpoint.base_url == "https://api.example.com/v1"


def test_the_add_form_refuses_it_too_and_accepts_loopback(admin_client):
    blank = Endpoint(name="new", base_url="")
    add = reverse("admin:gateway_endpoint_add")

    refused = admin_client.post(
        add, _endpoint_form(blank, base_url="http://llm.example.com/v1")
    )
    local = admin_client.post(
        add, _endpoint_form(blank, base_url="http://localhost:11434/v1")
    )

    assert "base_url" in refused.context["adminform"].form.errors
    assert local.status_code == 302
    assert list(Endpoint.objects.values_list("base_url", flat=True)) == [
        "http://localhost:11434/v1"
    ]


def test_opting_in_saves_plain_http_and_shows_a_warning_in_list_and_form(
    admin_client, endpoint
):
    url = reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    saved = admin_client.post(
        url,
        _endpoint_form(
            endpoint, base_url="http://10.0.0.5:8000/v1", allow_plain_http="on"
        ),
    )
    Endpoint.objects.create(name="secure", base_url="https://b.example.com/v1")

    listing = admin_client.get(reverse("admin:gateway_endpoint_changelist"))
    form = admin_client.get(url)

    assert saved.status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.allow_plain_http is True
    warning = "⚠ Plain HTTP: the API key travels in clear"
    assert warning in form.content.decode()
    rows = listing.content.decode().split('id="result_list"')[1].split("<tr")
    assert warning in next(r for r in rows if ">primary<" in r)
    assert warning not in next(r for r in rows if ">secure<" in r)
    # The list's URL column says https itself; the warning is for the others.
    assert "https://b.example.com/v1" in next(r for r in rows if ">secure<" in r)


def test_a_row_written_past_validation_is_shown_as_refused(admin_client, endpoint):
    Endpoint.objects.filter(pk=endpoint.pk).update(base_url="http://10.0.0.5/v1")

    listing = admin_client.get(reverse("admin:gateway_endpoint_changelist"))

    assert "⚠ Plain HTTP refused: no request is sent" in listing.content.decode()


def test_a_usage_record_page_shows_its_trail_as_a_table(admin_client, endpoint):
    record = UsageRecord.objects.create(
        model_name="m",
        endpoint=endpoint,
        endpoint_name="backup",
        status="ok",
        trail=[
            {
                "endpoint": "primary",
                "outcome": "failed",
                "started_ms": 0.3,
                "duration_ms": 12.4,
                "reason": "http_503",
                "status_code": 503,
            },
            {
                "endpoint": "<b>backup</b>",
                "outcome": "ok",
                "started_ms": 13.0,
                "duration_ms": 240.6,
            },
        ],
    )

    response = admin_client.get(
        reverse("admin:gateway_usagerecord_change", args=[record.pk])
    )

    assert response.status_code == 200
    text = response.content.decode()
    rows = text.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert rows.index("primary") < rows.index("backup")
    assert "<td>failed</td><td>503</td><td>http_503</td>" in rows
    assert "<td>13 ms</td><td>241 ms</td>" in rows
    assert "&lt;b&gt;backup&lt;/b&gt;" in rows
    assert "&quot;duration_ms&quot;" not in text


# --- Rate limits in effect --------------------------------------------------------


def test_a_users_page_shows_their_rate_limits_read_only(admin_client, owner, settings):
    from gateway.models import UserLimits

    settings.RATE_LIMIT_RPM = 0
    url = reverse("admin:auth_user_change", args=[owner.pk])

    before = admin_client.get(url).content.decode()
    UserLimits.objects.create(user=owner, rpm_limit=12)
    after = admin_client.get(url).content.decode()

    assert "requests/min: default (none) · tokens/min: default (none)" in before
    assert 'name="rate_limits_in_effect"' not in before
    assert "requests/min: 12, user override · tokens/min: default (none)" in after


def test_the_key_list_and_page_show_effective_limits_and_their_source(
    admin_client, owner, settings, django_assert_max_num_queries
):
    from gateway.models import UserLimits

    settings.RATE_LIMIT_RPM = 0
    plain, _ = ApiKey.generate(owner, "plain")
    limited, _ = ApiKey.generate(owner, "limited")
    limited.rpm_limit, limited.tpm_limit = 3, 900
    limited.save()
    UserLimits.objects.create(user=owner, tpm_limit=500)

    listing = admin_client.get(reverse("admin:gateway_apikey_changelist"))
    page = admin_client.get(reverse("admin:gateway_apikey_change", args=[plain.pk]))

    text = listing.content.decode()
    assert "requests/min: default (none) · tokens/min: 500, user override" in text
    assert "requests/min: 3, key override · tokens/min: 500, user override" in text
    assert (
        "requests/min: default (none) · tokens/min: 500, user override"
        in page.content.decode()
    )
    # The owner's limits come with the list's one query, not one per row.
    for number in range(5):
        ApiKey.generate(owner, f"more-{number}")
    with django_assert_max_num_queries(8):
        admin_client.get(reverse("admin:gateway_apikey_changelist"))


def test_a_new_endpoint_form_starts_with_the_settings_limits(admin_client, settings):
    settings.ENDPOINT_RPM_LIMIT = 5

    form = admin_client.get(reverse("admin:gateway_endpoint_add")).content.decode()

    assert re.search(r'name="rpm_limit"[^>]*value="5"', form)


def test_a_route_is_marked_as_taking_images_in_its_admin(admin_client, endpoint):
    route = ModelRoute.objects.create(
        model_name="vision", endpoint=endpoint, upstream_model="gpt-4o"
    )

    listed = admin_client.get("/admin/gateway/modelroute/?accepts_images__exact=0")
    form = admin_client.get(f"/admin/gateway/modelroute/{route.pk}/change/")

    assert "vision" in listed.content.decode()
    assert 'name="accepts_images"' in form.content.decode()


def test_model_defaults_are_saved_from_the_admin_within_their_ranges(admin_client):
    url = reverse("admin:gateway_modeldefaults_add")
    form = {"model_name": "house", "system_prompt": "Be kind.", "temperature": "2.5"}

    refused = admin_client.post(url, form)
    saved = admin_client.post(url, {**form, "temperature": "0.5", "max_tokens": "300"})

    assert refused.status_code == 200
    assert "less than or equal to 2" in refused.content.decode()
    assert saved.status_code == 302
    defaults = ModelDefaults.objects.get()
    assert (defaults.model_name, defaults.temperature, defaults.max_tokens) == (
        "house",
        0.5,
        300,
    )
