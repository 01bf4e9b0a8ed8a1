"""GET /api/endpoints/: health, uptime and circuit; operator details for staff only."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import time_machine

from gateway.models import Endpoint, EndpointStatus
from monitoring.models import ProbeResult
from monitoring.probes import refresh_rollups
from tests.api.views_support import (
    NOW,
    Client,
    assert_error,
    key_client,
    session_client,
)

pytestmark = pytest.mark.django_db

URL = "/api/endpoints/"
SECRET = "sk-live-do-not-show-0123456789"
HEADER_SECRET = "hdr-secret-value-987654321"


@pytest.fixture(autouse=True)
def _frozen():
    with time_machine.travel(NOW, tick=False):
        yield


def endpoint(name, status, priority=10, **fields):
    made = Endpoint(
        name=name,
        base_url=fields.pop("base_url", f"https://{name}.test/v1"),
        status=status,
        priority=priority,
        last_checked_at=NOW - timedelta(minutes=2),
        last_latency_ms=120.0,
        **fields,
    )
    made.api_key = SECRET
    made.extra_headers = {"X-Tenant": HEADER_SECRET}
    made.save()
    return made


def probe_history(target, outcomes):
    """Probe results `hours` back with the given status, rolled up by the monitor."""
    results = ProbeResult.objects.bulk_create(
        ProbeResult(
            endpoint=target,
            checked_at=NOW - timedelta(hours=hours),
            status=status,
            latency_ms=None if status == "disconnected" else 100.0,
            http_status=503 if status == "disconnected" else 200,
        )
        for hours, status in outcomes
    )
    refresh_rollups([target.pk], min(r.checked_at for r in results))


@pytest.fixture
def fleet():
    """Primary healthy, backup slow, spare open-circuited, old disabled."""
    primary = endpoint("primary", EndpointStatus.CONNECTED, priority=1)
    backup = endpoint("backup", EndpointStatus.SLOW, priority=2)
    spare = endpoint(
        "spare",
        EndpointStatus.DISCONNECTED,
        priority=3,
        disabled_until=NOW + timedelta(seconds=30),
        consecutive_failures=5,
    )
    endpoint("old", EndpointStatus.CONNECTED, enabled=False)
    # Primary: up for the last day, down 3 of 4 probes 3 days ago.
    probe_history(
        primary,
        [
            (1, "connected"),
            (5, "connected"),
            (20, "slow"),
            (72, "disconnected"),
            (73, "disconnected"),
            (74, "disconnected"),
            (75, "connected"),
        ],
    )
    probe_history(spare, [(1, "disconnected"), (2, "connected")])
    return primary, backup, spare


def test_anonymous_gets_401_json():
    assert_error(Client().get(URL), 401)


def test_users_see_health_uptime_and_circuit_of_enabled_endpoints(owner, fleet):
    body = session_client(owner).get(URL).json()
    rows = {row["name"]: row for row in body["endpoints"]}
    assert list(rows) == ["primary", "backup", "spare"]
    primary, spare = rows["primary"], rows["spare"]
    assert primary["status"] == "connected"
    assert primary["last_latency_ms"] == 120.0
    assert primary["last_checked_at"] == "2026-03-10T12:28:00Z"
    assert primary["uptime"] == {"last_24h": 100.0, "last_7d": 57.14, "last_30d": 57.14}
    assert primary["circuit"] == {"state": "closed", "disabled_until": None}
    assert spare["circuit"] == {
        "state": "open",
        "disabled_until": "2026-03-10T12:30:30Z",
    }
    assert spare["uptime"]["last_24h"] == 50.0
    assert rows["backup"]["uptime"] == {
        "last_24h": None,
        "last_7d": None,
        "last_30d": None,
    }


def test_overall_status_and_available_endpoints(owner, fleet):
    body = session_client(owner).get(URL).json()
    assert body["status"] == "degraded"
    assert body["available"] == ["primary", "backup"]
    assert [r["available"] for r in body["endpoints"]] == [True, True, False]


def test_all_connected_is_ok(owner, fleet):
    Endpoint.objects.filter(name__in=["backup", "spare"]).update(
        status=EndpointStatus.CONNECTED, disabled_until=None
    )
    body = session_client(owner).get(URL).json()
    assert body["status"] == "ok"
    assert body["available"] == ["primary", "backup", "spare"]


def test_none_available_is_down(owner, fleet):
    Endpoint.objects.filter(enabled=True).update(status=EndpointStatus.DISCONNECTED)
    body = session_client(owner).get(URL).json()
    assert (body["status"], body["available"]) == ("down", [])


def test_a_half_open_circuit_can_take_a_trial_request(owner, fleet):
    Endpoint.objects.filter(name="spare").update(
        disabled_until=NOW - timedelta(seconds=1), status=EndpointStatus.UNKNOWN
    )
    rows = {r["name"]: r for r in session_client(owner).get(URL).json()["endpoints"]}
    assert rows["spare"]["circuit"]["state"] == "half_open"
    assert rows["spare"]["available"] is True


def test_no_endpoints_is_down(owner):
    body = session_client(owner).get(URL).json()
    assert body == {"status": "down", "available": [], "endpoints": []}


def test_users_never_see_operator_details(owner, fleet):
    for client in (session_client(owner), key_client(owner)[0]):
        response = client.get(URL)
        text = response.content.decode()
        assert "operator" not in json.loads(text)["endpoints"][0]
        assert "https://primary.test" not in text
        assert SECRET not in text and HEADER_SECRET not in text


def test_staff_see_operator_details_but_never_secrets(staff, fleet):
    response = session_client(staff).get(URL)
    text = response.content.decode()
    assert SECRET not in text and HEADER_SECRET not in text
    assert "X-Tenant" not in text
    rows = {r["name"]: r for r in response.json()["endpoints"]}
    operator = rows["spare"]["operator"]
    assert operator["base_url"] == "https://spare.test/v1"
    assert operator["consecutive_failures"] == 5
    assert operator["has_api_key"] is True
    assert "api_key" not in operator


def test_a_plain_http_endpoint_is_flagged(owner, fleet):
    endpoint(
        "lan",
        EndpointStatus.CONNECTED,
        base_url="http://10.0.0.5:8000/v1",
        allow_plain_http=True,
    )
    rows = {r["name"]: r for r in session_client(owner).get(URL).json()["endpoints"]}
    assert rows["lan"]["plain_http"] is True
    assert rows["primary"]["plain_http"] is False


def test_query_count_does_not_grow_with_endpoints(
    staff, fleet, django_assert_max_num_queries
):
    client = session_client(staff)
    with django_assert_max_num_queries(4):
        client.get(URL)
    for n in range(10):
        endpoint(f"extra{n}", EndpointStatus.CONNECTED)
    with django_assert_max_num_queries(4):
        response = client.get(URL)
    assert len(response.json()["endpoints"]) == 13
