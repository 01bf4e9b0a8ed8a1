"""Model constraints, key handling and encryption at rest."""

from __future__ import annotations

import importlib
from decimal import Decimal

import pytest
from django.apps import apps as django_apps
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction

from gateway import crypto
from gateway.models import ApiKey, Budget, BudgetScope, Endpoint, ModelRoute

pytestmark = pytest.mark.django_db

SECRET = "sk-live-0123456789abcdefSECRET"


@pytest.fixture
def endpoint():
    endpoint = Endpoint(name="primary", base_url="https://api.example.com/v1")
    endpoint.api_key = SECRET
    endpoint.save()
    return endpoint


def test_endpoint_api_key_is_encrypted_at_rest(endpoint):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT api_key_encrypted FROM gateway_endpoint WHERE id = %s",
            [endpoint.pk],
        )
        stored = cursor.fetchone()[0]

    assert SECRET not in stored
    assert stored.startswith(crypto.PREFIX)
    assert Endpoint.objects.get(pk=endpoint.pk).api_key == SECRET


def test_endpoint_api_key_never_appears_in_its_representations(endpoint):
    for text in (repr(endpoint), str(endpoint), repr(Endpoint.objects.all())):
        assert SECRET not in text


def test_a_changed_secret_key_gives_a_clear_error_not_garbage(endpoint, settings):
    settings.SECRET_KEY = "another-secret-key-that-is-long-enough-0123456789"

    with pytest.raises(crypto.DecryptionError, match="cannot be decrypted"):
        _ = Endpoint.objects.get(pk=endpoint.pk).api_key


def test_encryption_keys_can_be_rotated(endpoint, settings):
    old = settings.SECRET_KEY
    settings.FIELD_ENCRYPTION_KEYS = ["new-encryption-key", old]

    assert Endpoint.objects.get(pk=endpoint.pk).api_key == SECRET
    endpoint.api_key = SECRET
    endpoint.save()
    settings.FIELD_ENCRYPTION_KEYS = ["new-encryption-key"]
    assert Endpoint.objects.get(pk=endpoint.pk).api_key == SECRET


def test_endpoint_defaults_match_the_documented_ones():
    endpoint = Endpoint.objects.create(name="e", base_url="http://127.0.0.1:1/v1")

    timeouts = (
        endpoint.connect_timeout,
        endpoint.first_token_timeout,
        endpoint.timeout,
        endpoint.request_timeout,
    )
    assert timeouts == (5.0, 30.0, 60.0, 120.0)
    assert (endpoint.retries_before_failover, endpoint.max_retries) == (0, 3)
    assert endpoint.backoff_multiplier == 2.0
    assert (endpoint.failure_threshold, endpoint.probe_interval) == (3, 300)
    assert endpoint.status == "unknown"


def test_one_model_name_routes_once_per_endpoint(endpoint):
    ModelRoute.objects.create(model_name="m", endpoint=endpoint, upstream_model="a")

    with pytest.raises(IntegrityError), transaction.atomic():
        ModelRoute.objects.create(model_name="m", endpoint=endpoint, upstream_model="b")


def test_a_route_cannot_reserve_more_output_than_its_window(endpoint):
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelRoute.objects.create(
            model_name="m",
            endpoint=endpoint,
            upstream_model="a",
            context_window=1000,
            max_output_tokens=1000,
        )


def test_route_cost_uses_prices_per_thousand_tokens(endpoint):
    route = ModelRoute(
        model_name="m",
        endpoint=endpoint,
        upstream_model="a",
        input_price_per_1k=Decimal("0.5"),
        output_price_per_1k=Decimal("1.5"),
    )

    assert route.cost(1000, 2000) == Decimal("3.500000")
    assert ModelRoute(model_name="m", endpoint=endpoint).cost(10, 10) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"scope": BudgetScope.GLOBAL, "user": "owner"},
        {"scope": BudgetScope.USER},
        {"scope": BudgetScope.ENDPOINT, "user": "owner"},
    ],
)
def test_a_budget_targets_exactly_what_its_scope_names(fields, owner):
    fields = {k: owner if v == "owner" else v for k, v in fields.items()}

    with pytest.raises(IntegrityError), transaction.atomic():
        Budget.objects.create(**fields)


def test_one_global_budget_per_period():
    Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=10)

    with pytest.raises(IntegrityError), transaction.atomic():
        Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=20)


def test_api_key_is_stored_hashed_and_shown_once(owner):
    key, raw = ApiKey.generate(owner, "laptop")

    stored = ApiKey.objects.get(pk=key.pk)
    assert raw.startswith("llms-")
    assert stored.key_hash == ApiKey.hash(raw)
    assert raw not in {stored.key_hash, stored.prefix, str(stored), repr(stored)}
    assert stored.prefix == raw[:12]
    assert stored.is_active


# --- HTTPS only --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1",
        "HTTPS://API.EXAMPLE.COM/v1",
        "https://10.0.0.5:8000/v1",
        "http://localhost:11434/v1",
        "http://LOCALHOST/v1",
        "http://ollama.localhost:11434/v1",
        "http://127.0.0.1:9101/v1",
        "http://127.9.8.7/v1",
        "http://[::1]:8000/v1",
        "http://[::ffff:127.0.0.1]:8000/v1",
    ],
)
def test_https_and_loopback_urls_are_accepted_without_opting_in(url):
    endpoint = Endpoint(name="e", base_url=url)

    endpoint.full_clean()
    endpoint.save()

    assert Endpoint.objects.get(name="e").allow_plain_http is False


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://api.example.com/v1", "api.example.com"),
        ("http://10.0.0.5:8000/v1", "10.0.0.5"),
        ("http://192.168.1.20/v1", "192.168.1.20"),
        # Look like this machine, but are not: a name anyone can register,
        # and numeric forms the rule does not try to interpret.
        ("http://localhost.example.com/v1", "localhost.example.com"),
        ("http://127.0.0.1.nip.io/v1", "127.0.0.1.nip.io"),
        ("http://2130706433/v1", "2130706433"),
        ("http://[::2]/v1", "::2"),
    ],
)
def test_plain_http_off_this_machine_is_refused_by_validation_and_save(url, host):
    endpoint = Endpoint(name="e", base_url=url)

    with pytest.raises(ValidationError) as cleaned:
        endpoint.full_clean()
    with pytest.raises(ValidationError) as saved:
        endpoint.save()

    for caught in (cleaned, saved):
        # The last: a number as a host is also not a valid URL for the field.
        message = caught.value.message_dict["base_url"][-1]
        assert message.startswith(f"Plain http:// to {host} would send the API key")
        assert "allow plain HTTP for this endpoint" in message
    assert not Endpoint.objects.exists()


def test_every_orm_path_that_saves_a_url_checks_it(endpoint):
    with pytest.raises(ValidationError):
        Endpoint.objects.create(name="other", base_url="http://10.0.0.5/v1")
    with pytest.raises(ValidationError):
        Endpoint.objects.update_or_create(
            name=endpoint.name, defaults={"base_url": "http://10.0.0.5/v1"}
        )
    endpoint.base_url = "http://10.0.0.5/v1"
    with pytest.raises(ValidationError):
        endpoint.save(update_fields=["base_url"])
    endpoint.refresh_from_db()
    endpoint.allow_plain_http = True
    endpoint.base_url = "http://10.0.0.5/v1"
    endpoint.save()
    # Withdrawing the opt-in is a change to the URL's rule as well.
    endpoint.allow_plain_http = False
    with pytest.raises(ValidationError):
        endpoint.save(update_fields=["allow_plain_http"])

    assert Endpoint.objects.get(pk=endpoint.pk).base_url == "http://10.0.0.5/v1"
    assert Endpoint.objects.get(pk=endpoint.pk).allow_plain_http is True
    assert Endpoint.objects.count() == 1


def test_a_save_of_other_fields_does_not_trip_over_an_old_url(endpoint):
    # Rows written before the rule (or by a bulk update) stay editable elsewhere;
    # the client refuses to send to them until they are fixed.
    Endpoint.objects.filter(pk=endpoint.pk).update(base_url="http://10.0.0.5/v1")
    endpoint.refresh_from_db()
    endpoint.api_key = "sk-rotated"

    endpoint.save(update_fields=["api_key_encrypted"])

    assert Endpoint.objects.get(pk=endpoint.pk).api_key == "sk-rotated"
    assert endpoint.sends_in_clear


@pytest.mark.parametrize("url", ["ftp://files.example.com/v1", "api.example.com/v1"])
def test_schemes_other_than_https_are_refused(url):
    with pytest.raises(ValidationError) as caught:
        Endpoint(name="e", base_url=url, allow_plain_http=True).save()

    assert caught.value.message_dict["base_url"] == ["Use an https:// URL."]


def test_opting_in_allows_plain_http_and_is_reported_as_sending_in_clear():
    endpoint = Endpoint(
        name="lan", base_url="http://10.0.0.5:8000/v1", allow_plain_http=True
    )
    endpoint.full_clean()
    endpoint.save()

    assert endpoint.sends_in_clear
    assert not Endpoint(name="a", base_url="https://x.test/v1").sends_in_clear
    assert not Endpoint(name="b", base_url="http://127.0.0.1/v1").sends_in_clear


def test_the_upgrade_keeps_existing_plain_http_endpoints_working_but_flagged():
    migration = importlib.import_module(
        "gateway.migrations.0004_endpoint_allow_plain_http"
    )
    # As the rows stood before the flag existed: written without the rule.
    Endpoint.objects.bulk_create(
        Endpoint(name=name, base_url=url)
        for name, url in [
            ("lan", "http://10.0.0.5:8000/v1"),
            ("local", "http://127.0.0.1:11434/v1"),
            ("cloud", "https://api.example.com/v1"),
        ]
    )

    migration.keep_plain_http_working(django_apps, None)

    flags = dict(Endpoint.objects.values_list("name", "allow_plain_http"))
    assert flags == {"lan": True, "local": False, "cloud": False}
