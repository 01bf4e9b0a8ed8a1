"""Model constraints, key handling and encryption at rest."""

from __future__ import annotations

from decimal import Decimal

import pytest
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

    assert (endpoint.timeout, endpoint.max_retries, endpoint.backoff_multiplier) == (
        120.0,
        3,
        2.0,
    )
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
