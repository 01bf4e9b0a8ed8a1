"""The endpoint page explains itself: key status, connection test, fetching models."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from gateway import client
from gateway.models import ApiKey, Endpoint, ModelRoute

pytestmark = pytest.mark.django_db

SECRET = "sk-live-0123456789abcdefSECRET"


@pytest.fixture
def endpoint():
    return Endpoint.objects.create(
        name="primary", base_url="https://api.example.com/v1", api_key=SECRET
    )


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def upstream():
    """The endpoint's side: answers set per test, requests kept."""
    state = {"status": 200, "json": {"data": []}, "requests": []}

    def answer(request: httpx.Request) -> httpx.Response:
        state["requests"].append(request)
        return httpx.Response(state["status"], json=state["json"])

    with client.pools.use_transport(httpx.MockTransport(answer)):
        yield state


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def change_page(admin_client, endpoint):
    return admin_client.get(
        reverse("admin:gateway_endpoint_change", args=[endpoint.pk])
    )


def test_the_form_says_a_key_is_stored_without_showing_it(admin_client, endpoint):
    page = change_page(admin_client, endpoint).content.decode()

    assert "A key is set; leave empty to keep it." in page
    assert SECRET not in page


def test_the_form_says_when_no_key_is_stored(admin_client):
    bare = Endpoint.objects.create(name="bare", base_url="https://b.example.com/v1")

    page = change_page(admin_client, bare).content.decode()

    assert "No key stored." in page
    assert "A key is set" not in page


def test_the_page_offers_test_connection_and_fetch_models(admin_client, endpoint):
    page = change_page(admin_client, endpoint).content.decode()

    assert reverse("admin:gateway_endpoint_test_connection", args=[endpoint.pk]) in page
    assert reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk]) in page
    assert "Test connection" in page and "Fetch models" in page


def test_test_connection_reports_success(admin_client, endpoint, upstream):
    upstream["json"] = {"data": [{"id": "gpt-a"}, {"id": "gpt-b"}]}
    url = reverse("admin:gateway_endpoint_test_connection", args=[endpoint.pk])

    response = admin_client.post(url, follow=True)

    [message] = messages_of(response)
    assert message.startswith("primary: connected in ")
    assert "2 model(s) listed" in message
    [request] = upstream["requests"]
    assert str(request.url) == "https://api.example.com/v1/models"
    assert request.headers["authorization"] == f"Bearer {SECRET}"


def test_test_connection_reports_the_error_without_the_key(
    admin_client, endpoint, upstream
):
    upstream["status"] = 401
    upstream["json"] = {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
    url = reverse("admin:gateway_endpoint_test_connection", args=[endpoint.pk])

    response = admin_client.post(url, follow=True)

    [message] = messages_of(response)
    assert message.startswith("primary: the connection failed (HTTP 401): ")
    assert "Incorrect API key provided" in message
    assert SECRET not in message
    assert SECRET not in response.content.decode()


def test_test_connection_is_a_post(admin_client, endpoint, upstream):
    url = reverse("admin:gateway_endpoint_test_connection", args=[endpoint.pk])

    assert admin_client.get(url).status_code == 405
    assert upstream["requests"] == []


def test_test_connection_is_for_staff_only(client, owner, endpoint, upstream):
    client.force_login(owner)
    url = reverse("admin:gateway_endpoint_test_connection", args=[endpoint.pk])

    response = client.post(url)

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    assert upstream["requests"] == []


def test_fetch_models_lists_the_endpoints_models(admin_client, endpoint, upstream):
    upstream["json"] = {"data": [{"id": "gpt-b"}, {"id": "gpt-a"}]}
    ModelRoute.objects.create(
        model_name="chat", endpoint=endpoint, upstream_model="gpt-b"
    )

    page = admin_client.get(
        reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk])
    ).content.decode()

    assert page.index("gpt-a") < page.index("gpt-b")
    assert 'name="pick" value="gpt-a"' in page
    assert 'name="pick" value="gpt-b"' not in page  # already routed
    assert "routed as <strong>chat</strong>" in page


def test_fetch_models_reports_a_failure_on_the_endpoint_page(
    admin_client, endpoint, upstream
):
    upstream["status"] = 503
    upstream["json"] = {"error": {"message": "overloaded"}}

    response = admin_client.get(
        reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk]), follow=True
    )

    assert response.redirect_chain[-1][0] == reverse(
        "admin:gateway_endpoint_change", args=[endpoint.pk]
    )
    [message] = messages_of(response)
    assert "the models could not be fetched (HTTP 503)" in message


def test_ticked_models_become_routes_under_their_public_names(admin_client, endpoint):
    url = reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk])

    response = admin_client.post(
        url,
        {
            "pick": ["gpt-a", "gpt-b"],
            "name:gpt-a": "smart",
            "name:gpt-b": "",
            "name:gpt-c": "not ticked",
        },
        follow=True,
    )

    routes = set(
        ModelRoute.objects.filter(endpoint=endpoint).values_list(
            "model_name", "upstream_model"
        )
    )
    assert routes == {("smart", "gpt-a"), ("gpt-b", "gpt-b")}
    assert "2 route(s) created on primary: smart, gpt-b." in messages_of(response)


def test_a_model_already_routed_under_that_name_is_reported(admin_client, endpoint):
    ModelRoute.objects.create(model_name="smart", endpoint=endpoint, upstream_model="x")
    url = reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk])

    response = admin_client.post(
        url, {"pick": ["gpt-a"], "name:gpt-a": "smart"}, follow=True
    )

    assert ModelRoute.objects.filter(endpoint=endpoint).count() == 1
    [message] = messages_of(response)
    assert message.startswith("Not created: smart (")


def test_creating_routes_needs_the_add_route_permission(
    client, django_user_model, endpoint
):
    viewer = django_user_model.objects.create_user("vera", password="x", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_endpoint"),
        Permission.objects.get(codename="change_endpoint"),
    )
    client.force_login(viewer)
    url = reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk])

    response = client.post(url, {"pick": ["gpt-a"]})

    assert response.status_code == 403
    assert not ModelRoute.objects.exists()


def test_creating_routes_needs_the_csrf_token(staff, endpoint):
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(staff)
    url = reverse("admin:gateway_endpoint_fetch_models", args=[endpoint.pk])

    response = csrf_client.post(url, {"pick": ["gpt-a"]})

    assert response.status_code == 403
    assert not ModelRoute.objects.exists()


def test_an_api_keys_owner_cannot_be_changed(admin_client, owner, other_user):
    key, _raw = ApiKey.generate(owner, "laptop")
    url = reverse("admin:gateway_apikey_change", args=[key.pk])

    page = admin_client.get(url).content.decode()
    admin_client.post(
        url,
        {"user": other_user.pk, "name": "renamed", "rpm_limit": "", "tpm_limit": ""},
    )

    key.refresh_from_db()
    assert 'name="user"' not in page
    assert key.user == owner
    assert key.name == "renamed"


def test_a_new_api_key_still_chooses_its_owner(admin_client):
    page = admin_client.get(reverse("admin:gateway_apikey_add")).content.decode()

    assert 'name="user"' in page


def test_the_list_shows_the_breaker_and_last_check_in_few_columns(admin_client):
    now = timezone.now()
    Endpoint.objects.create(
        name="tired",
        base_url="https://t.example.com/v1",
        last_checked_at=now - timedelta(minutes=3),
        consecutive_failures=2,
        disabled_until=now + timedelta(minutes=10),
    )
    Endpoint.objects.create(name="fresh", base_url="https://f.example.com/v1")
    Endpoint.objects.create(
        name="busy",
        base_url="https://b.example.com/v1",
        resting_until=now + timedelta(seconds=12),
    )

    page = admin_client.get(reverse("admin:gateway_endpoint_changelist"))
    # timesince and timeuntil put a no-break space between number and unit.
    listing = page.content.decode().replace("\xa0", " ")
    rows = listing.split('id="result_list"')[1].split("<tr")
    tired = next(r for r in rows if ">tired<" in r)
    fresh = next(r for r in rows if ">fresh<" in r)
    busy = next(r for r in rows if ">busy<" in r)

    assert "2 failure(s) in a row; open for 9 minutes" in tired
    assert "3 minutes ago" in tired
    assert '<td class="field-last_check">never</td>' in fresh
    assert '<td class="field-breaker">—</td>' in fresh
    # A rest shorter than a minute in seconds, not "0 minutes".
    assert re.search(r"resting for 1[12] s<", busy)
