"""GET /api/usage/records/: who sees what, filters, pages, exports, errors."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from gateway.models import ApiKey, UsageRecord
from tests.api.conftest import T0
from tests.conftest import PASSWORD

URL = "/api/usage/records/"

pytestmark = pytest.mark.django_db


def _json(client, query="", **headers):
    response = client.get(URL + query, headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def _all_json(client, query="", **headers):
    """Every row, following the cursor from page to page."""
    rows, url = [], URL + query
    while url:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.content
        body = response.json()
        rows += body["results"]
        url = body["next"]
    return rows


def _export(client, fmt, query="", **headers):
    sep = "&" if query else "?"
    response = client.get(f"{URL}{query}{sep}format={fmt}", headers=headers)
    assert response.status_code == 200, response.content
    assert response.streaming
    return response, b"".join(response.streaming_content).decode()


def _csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _jsonl_rows(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def traffic(owner, other_user, staff, owner_key, make_record):
    """Alice: one chat and one api record; Bob: one; the staff user: one."""
    key, _ = owner_key
    return {
        "alice_chat": make_record(owner),
        "alice_api": make_record(owner, source="api", api_key=key),
        "bob": make_record(other_user),
        "sam": make_record(staff),
    }


def _ids(rows):
    return {row["request_id"] for row in rows}


def _expected(*records):
    return {str(record.request_id) for record in records}


# --- who sees what ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_anonymous_gets_a_401_with_a_json_body(client, traffic, fmt):
    response = client.get(f"{URL}?format={fmt}")

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["type"] == "authentication_error"
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_a_user_sees_only_their_own_records_in_every_format(
    client, owner, traffic, fmt
):
    client.force_login(owner)
    if fmt == "json":
        rows = _json(client)["results"]
    else:
        _, text = _export(client, fmt)
        rows = _csv_rows(text) if fmt == "csv" else _jsonl_rows(text)

    assert _ids(rows) == _expected(traffic["alice_chat"], traffic["alice_api"])
    assert {row["user"] for row in rows} == {"alice"}


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_the_other_user_never_sees_alices_records(client, other_user, traffic, fmt):
    client.force_login(other_user)
    if fmt == "json":
        rows = _json(client)["results"]
    else:
        rows = (
            _csv_rows(_export(client, fmt)[1])
            if fmt == "csv"
            else _jsonl_rows(_export(client, fmt)[1])
        )

    assert _ids(rows) == _expected(traffic["bob"])


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_staff_see_everyones_records(client, staff, traffic, fmt):
    client.force_login(staff)
    if fmt == "json":
        rows = _json(client)["results"]
    else:
        rows = (
            _csv_rows(_export(client, fmt)[1])
            if fmt == "csv"
            else _jsonl_rows(_export(client, fmt)[1])
        )

    assert _ids(rows) == _expected(*traffic.values())


@pytest.mark.parametrize("fmt", ["json", "csv", "jsonl"])
def test_an_api_key_sees_all_of_its_users_records_and_no_one_elses(
    client, traffic, bearer, fmt
):
    if fmt == "json":
        rows = _json(client, **bearer)["results"]
    else:
        text = _export(client, fmt, **bearer)[1]
        rows = _csv_rows(text) if fmt == "csv" else _jsonl_rows(text)

    # The key stands for Alice: her chat usage too, not only the key's own.
    assert _ids(rows) == _expected(traffic["alice_chat"], traffic["alice_api"])


def test_a_staff_users_api_key_sees_everything(client, staff, traffic):
    _, raw = ApiKey.generate(staff, "ops")

    rows = _json(client, Authorization=f"Bearer {raw}")["results"]

    assert _ids(rows) == _expected(*traffic.values())


def test_a_revoked_key_is_refused(client, traffic, owner_key, bearer):
    key, _ = owner_key
    key.revoked_at = timezone.now()
    key.save()

    response = client.get(URL, headers=bearer)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_the_key_of_a_deactivated_user_is_refused(client, owner, traffic, bearer):
    owner.is_active = False
    owner.save()

    assert client.get(URL, headers=bearer).status_code == 401


@pytest.mark.parametrize(
    "header",
    ["Bearer llms-not-a-key", "Bearer " + "x" * 5000, "Bearer "],
)
def test_a_wrong_key_is_a_401_that_does_not_echo_it(client, traffic, header):
    response = client.get(URL, headers={"Authorization": header})

    assert response.status_code == 401
    assert "llms-not-a-key" not in response.content.decode()


def test_a_key_use_is_noted_on_the_key(client, owner_key, bearer):
    key, _ = owner_key

    client.get(URL, headers=bearer)

    key.refresh_from_db()
    assert key.last_used_at is not None


def test_the_session_of_a_signed_in_user_works(client, owner, traffic):
    assert client.login(username="alice", password=PASSWORD)

    assert len(_json(client)["results"]) == 2


def test_a_user_naming_another_user_is_refused(client, owner, other_user, traffic):
    client.force_login(owner)

    for value in ("bob", str(other_user.pk), "nobody"):
        response = client.get(f"{URL}?user={value}")
        assert response.status_code == 403
        assert response.json()["error"]["param"] == "user"


def test_a_user_may_name_themselves(client, owner, traffic):
    client.force_login(owner)

    rows = _json(client, "?user=alice")["results"]

    assert len(rows) == 2


# --- fields -------------------------------------------------------------------


TRAIL = [
    {
        "endpoint": "west",
        "outcome": "failed",
        "started_ms": 0.4,
        "duration_ms": 12.3,
        "reason": "http_503",
        "status_code": 503,
    },
    {"endpoint": "east", "outcome": "ok", "started_ms": 12.9, "duration_ms": 799.0},
]


def test_a_record_carries_what_a_spreadsheet_needs(
    client, owner, owner_key, make_record, endpoint
):
    key, _ = owner_key
    record = make_record(
        owner,
        source="api",
        api_key=key,
        endpoint=endpoint,
        endpoint_name="east",
        fallback_hops=[
            {"endpoint": "west", "reason": "503", "to_endpoint": "east"},
        ],
        trail=[{**TRAIL[0], "endpoint_id": 7}, TRAIL[1]],
        tokens_estimated=True,
        prompt_tokens=120,
        completion_tokens=30,
        latency_ms=812.5,
        ttft_ms=95.0,
        cost=Decimal("0.004200"),
        attempts=2,
        error_type="",
    )
    client.force_login(owner)

    (row,) = _json(client)["results"]

    assert row == {
        "request_id": str(record.request_id),
        "created_at": record.created_at.isoformat().replace("+00:00", "Z"),
        "user": "alice",
        "api_key": "alice-laptop",
        "source": "api",
        "model": "gpt-test",
        "endpoint": "east",
        "upstream_model": "gpt-test-up",
        "fallback_hops": 1,
        "fallback_path": ["west"],
        "status": "ok",
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "estimated": True,
        "latency_ms": 812.5,
        "ttft_ms": 95.0,
        "cost": "0.004200",
        "error_type": "",
        "attempts": 2,
        "conversation_id": None,
        # endpoint_id is internal: the API names endpoints.
        "trail": TRAIL,
    }


# --- filters ------------------------------------------------------------------


@pytest.fixture
def varied(owner, other_user, owner_key, make_record, endpoint):
    key, _ = owner_key
    return {
        "early": make_record(owner, created_at=T0),
        "late": make_record(owner, created_at=T0 + timedelta(days=2)),
        "api": make_record(owner, source="api", api_key=key),
        "other_model": make_record(owner, model_name="llama"),
        "west": make_record(owner, endpoint_name="west"),
        "east_by_id": make_record(owner, endpoint=endpoint, endpoint_name="renamed"),
        "error": make_record(owner, status="error", error_type="timeout"),
        "cached": make_record(owner, status="cached"),
        "estimated": make_record(owner, tokens_estimated=True),
        "bob": make_record(other_user),
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("since=2026-11-04T09:00:00Z", ["late"]),
        # A naive time is UTC.
        ("since=2026-11-04T09:00:00", ["late"]),
        ("since=2026-11-04T10:00:00%2B01:00", ["late"]),
        ("until=2026-11-02T09:00:30Z", ["early"]),
        ("source=api", ["api"]),
        ("model=llama", ["other_model"]),
        ("endpoint=west", ["west"]),
        ("status=error", ["error"]),
        ("cached=true", ["cached"]),
        ("estimated=true", ["estimated"]),
        ("user=bob", ["bob"]),
    ],
)
def test_each_filter_selects_its_records(client, staff, varied, query, expected):
    client.force_login(staff)

    rows = _json(client, "?" + query)["results"]

    assert _ids(rows) == _expected(*(varied[name] for name in expected))


def test_the_api_key_and_endpoint_id_filters(
    client, staff, varied, owner_key, endpoint
):
    client.force_login(staff)
    key, _ = owner_key

    by_key = _json(client, f"?api_key={key.pk}")["results"]
    by_endpoint = _json(client, f"?endpoint={endpoint.pk}")["results"]

    assert _ids(by_key) == _expected(varied["api"])
    assert _ids(by_endpoint) == _expected(varied["east_by_id"])


def test_false_flags_exclude(client, staff, varied):
    client.force_login(staff)

    not_cached = _json(client, "?cached=false&page_size=1000")["results"]

    assert str(varied["cached"].request_id) not in _ids(not_cached)
    assert len(not_cached) == len(varied) - 1


def test_the_export_takes_the_same_filters(client, staff, varied):
    client.force_login(staff)

    _, text = _export(client, "csv", "?status=error")

    assert _ids(_csv_rows(text)) == _expected(varied["error"])


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=yesterday", "since"),
        ("until=2026-13-45T99:00:00Z", "until"),
        ("since=2026-11-02T10:00:00Z&until=2026-11-02T09:00:00Z", "until"),
        ("since=2026-11-02T10:00:00Z&until=2026-11-02T10:00:00Z", "until"),
        ("status=finished", "status"),
        ("source=email", "source"),
        ("cached=maybe", "cached"),
        ("estimated=2", "estimated"),
        ("api_key=abc", "api_key"),
        ("api_key=0", "api_key"),
        ("api_key=99999999999999999999999", "api_key"),
        ("model=" + "m" * 201, "model"),
        ("page_size=1001", "page_size"),
        ("page_size=0", "page_size"),
        ("page_size=-5", "page_size"),
        ("page_size=ten", "page_size"),
        ("format=xml", "format"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=cD1ub3RhZGF0ZQ%3D%3D", "cursor"),  # p=notadate
        ("sinse=2026-11-02T09:00:00Z", "sinse"),
        # Offsets no place has (PostgreSQL refuses them), and a time that
        # leaves the calendar once in UTC.
        ("since=0032-02-25T17:41:22-16:03", "since"),
        ("until=0001-01-01T00:00:00%2B14:00", "until"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(client, staff, varied, query, param):
    client.force_login(staff)

    response = client.get(f"{URL}?{query}")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_bad_input_on_an_export_is_a_json_400(client, staff, varied):
    client.force_login(staff)

    response = client.get(f"{URL}?format=csv&since=nope")

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["param"] == "since"


def test_a_staff_user_naming_an_unknown_user_gets_no_rows(client, staff, varied):
    client.force_login(staff)

    assert _json(client, "?user=nobody")["results"] == []


def test_an_accept_header_naming_no_format_is_a_406(client, owner, traffic):
    client.force_login(owner)

    response = client.get(URL, headers={"Accept": "application/xml"})

    assert response.status_code == 406
    assert response.json()["error"]["type"] == "not_acceptable"


def test_an_unknown_api_path_is_a_json_404(client, owner):
    client.force_login(owner)

    response = client.get("/api/usage/nothing/")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --- pagination ---------------------------------------------------------------


def test_pages_follow_time_order_and_default_to_100_rows(client, owner, make_record):
    for _ in range(105):
        make_record(owner)
    client.force_login(owner)

    first = _json(client)
    rest = client.get(first["next"]).json()

    assert len(first["results"]) == 100
    assert len(rest["results"]) == 5
    times = [row["created_at"] for row in first["results"] + rest["results"]]
    assert times == sorted(times)
    assert rest["next"] is None


def test_a_page_size_up_to_the_cap_is_honoured(client, owner, make_record):
    for _ in range(3):
        make_record(owner)
    client.force_login(owner)

    assert len(_json(client, "?page_size=2")["results"]) == 2
    assert len(_json(client, "?page_size=1000")["results"]) == 3


def test_a_walk_is_stable_under_an_insert_between_pages(client, owner, make_record):
    records = [make_record(owner) for _ in range(6)]
    client.force_login(owner)

    first = _json(client, "?page_size=3")
    # A request that finishes now, while the caller is between pages.
    newest = make_record(owner, created_at=timezone.now())
    rest = _all_json_from(client, first["next"])

    walked = [row["request_id"] for row in first["results"] + rest]
    assert walked == [str(r.request_id) for r in [*records, newest]]


def test_records_at_the_same_instant_are_neither_repeated_nor_skipped(
    client, owner, make_record
):
    records = [make_record(owner, created_at=T0) for _ in range(5)]
    client.force_login(owner)

    walked = _all_json(client, "?page_size=2")

    assert sorted(_ids(walked)) == sorted(_expected(*records))
    assert len(walked) == 5


def _all_json_from(client, url):
    rows = []
    while url:
        body = client.get(url).json()
        rows += body["results"]
        url = body["next"]
    return rows


def test_a_page_costs_the_same_queries_whatever_its_size(
    client, owner, owner_key, make_record, endpoint, django_assert_num_queries
):
    key, _ = owner_key
    for n in range(40):
        make_record(owner, api_key=key if n % 2 else None, endpoint=endpoint)
    client.force_login(owner)

    # Session + user, then the page: no query per row.
    with django_assert_num_queries(3):
        small = _json(client, "?page_size=2")
    with django_assert_num_queries(3):
        large = _json(client, "?page_size=40")

    assert len(small["results"]) == 2
    assert len(large["results"]) == 40


# --- exports ------------------------------------------------------------------


def test_csv_gives_back_the_numbers_of_json(client, owner, owner_key, make_record):
    key, _ = owner_key
    for n in range(30):
        make_record(
            owner,
            api_key=key if n % 3 else None,
            latency_ms=None if n % 5 == 0 else 1000 / (n + 3),
            cost=None if n % 7 == 0 else Decimal("0.000001") * (n * 37 + 1),
            fallback_hops=[{"endpoint": "west"}, {"endpoint": "north"}] * (n % 2),
        )
    client.force_login(owner)

    pages = _all_json(client, "?page_size=7")
    _, text = _export(client, "csv")
    table = _csv_rows(text)

    assert len(table) == len(pages) == 30
    for row, page_row in zip(table, pages, strict=True):
        assert row["request_id"] == page_row["request_id"]
        assert row["created_at"] == page_row["created_at"]
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "attempts"):
            assert int(row[name]) == page_row[name]
        for name in ("latency_ms", "ttft_ms"):
            expected = page_row[name]
            assert (float(row[name]) if row[name] else None) == expected
        assert (Decimal(row["cost"]) if row["cost"] else None) == (
            Decimal(page_row["cost"]) if page_row["cost"] is not None else None
        )
        assert int(row["fallback_hops"]) == page_row["fallback_hops"]
        assert row["estimated"] == str(page_row["estimated"]).lower()


def test_jsonl_lines_equal_the_json_rows(client, owner, make_record):
    for _ in range(12):
        make_record(owner)
    client.force_login(owner)

    pages = _all_json(client, "?page_size=5")
    _, text = _export(client, "jsonl")

    assert _jsonl_rows(text) == pages


def test_the_export_streams_the_whole_range_not_one_page(client, owner, make_record):
    for _ in range(250):
        make_record(owner)
    client.force_login(owner)

    _, text = _export(client, "csv", "?page_size=10")

    assert len(_csv_rows(text)) == 250


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("text/csv", "text/csv"),
        ("application/jsonl", "application/jsonl"),
        ("application/x-ndjson", "application/jsonl"),
    ],
)
def test_the_accept_header_picks_the_export(
    client, owner, traffic, accept, content_type
):
    client.force_login(owner)

    response = client.get(URL, headers={"Accept": accept})

    assert response.status_code == 200
    assert response["Content-Type"].startswith(content_type)
    assert len(b"".join(response.streaming_content).splitlines()) >= 2


def test_a_download_is_named_after_its_range(client, owner, traffic):
    client.force_login(owner)

    response, _ = _export(
        client, "csv", "?since=2026-11-01T00:00:00Z&until=2026-12-01T01:00:00%2B01:00"
    )

    assert response["Content-Disposition"] == (
        'attachment; filename="llmsite-usage-20261101T000000Z-20261201T000000Z.csv"'
    )
    jsonl, _ = _export(client, "jsonl")
    assert jsonl["Content-Disposition"] == (
        'attachment; filename="llmsite-usage-start-now.jsonl"'
    )


def test_csv_has_a_header_row_even_when_empty(client, owner):
    client.force_login(owner)

    _, text = _export(client, "csv")

    assert text.splitlines() == [
        "request_id,created_at,user,api_key,source,model,endpoint,upstream_model,"
        "fallback_hops,fallback_path,status,prompt_tokens,completion_tokens,"
        "total_tokens,estimated,latency_ms,ttft_ms,cost,error_type,attempts,"
        "conversation_id,trail"
    ]


def test_a_formula_in_a_cell_is_defused(client, staff, make_record):
    user = get_user_model().objects.create_user("@evil")
    make_record(user, model_name='=HYPERLINK("http://x")', upstream_model="+1")
    client.force_login(staff)

    (row,) = _csv_rows(_export(client, "csv")[1])

    assert row["model"] == '\'=HYPERLINK("http://x")'
    assert row["upstream_model"] == "'+1"
    assert row["user"] == "'@evil"


def test_records_of_deleted_users_and_keys_stay_exportable(
    client, staff, owner, owner_key, make_record
):
    key, _ = owner_key
    make_record(owner, api_key=key)
    key.delete()
    UsageRecord.objects.update(user=None)
    client.force_login(staff)

    (row,) = _csv_rows(_export(client, "csv")[1])
    (json_row,) = _json(client)["results"]

    assert row["user"] == "" and row["api_key"] == ""
    assert json_row["user"] is None and json_row["api_key"] is None


def test_options_is_a_json_405_whatever_the_format(client, owner):
    client.force_login(owner)

    response = client.options(f"{URL}?format=csv")

    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_an_api_key_page_costs_one_query_for_the_key_and_one_for_the_page(
    client, owner, owner_key, bearer, make_record, django_assert_num_queries
):
    for _ in range(30):
        make_record(owner)
    client.get(URL, headers=bearer)  # notes the key's use, once a minute

    with django_assert_num_queries(2):
        body = _json(client, "?page_size=30", **bearer)

    assert len(body["results"]) == 30
