"""gateway.usage_export: the CSV / JSON Lines shaping and streaming of usage records."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import AsyncClient

from gateway import usage_export
from gateway.models import UsageRecord
from tests.gateway.usage_support import close_thread_connections

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _fill(count: int, **fields) -> None:
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                created_at=T0 + timedelta(seconds=n),
                model_name="gpt-test",
                endpoint_name="east",
                prompt_tokens=n,
                completion_tokens=2 * n,
                latency_ms=10.0 + n,
                status="ok",
                cost=Decimal("0.000010"),
                **fields,
            )
            for n in range(count)
        ],
        batch_size=2000,
    )


def _peak_bytes(chunks) -> tuple[int, int]:
    """(peak traced memory, bytes produced) while draining an iterator."""
    total = 0
    tracemalloc.start()
    try:
        for chunk in chunks:
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, total


@pytest.mark.django_db
def test_export_memory_stays_flat_as_the_row_count_grows():
    _fill(20_000)
    small = UsageRecord.objects.filter(created_at__lt=T0 + timedelta(seconds=4000))

    peak_small, size_small = _peak_bytes(usage_export.iter_csv(small))
    peak_all, size_all = _peak_bytes(usage_export.iter_csv(UsageRecord.objects.all()))

    assert size_all > 4 * size_small  # five times the rows...
    # ...for about the same memory: a few chunks of rows, never the whole range.
    assert peak_all < 1.5 * peak_small + 256 * 1024


@pytest.mark.django_db
def test_jsonl_memory_stays_flat_too():
    _fill(20_000)
    small = UsageRecord.objects.filter(created_at__lt=T0 + timedelta(seconds=4000))

    peak_small, _ = _peak_bytes(usage_export.iter_jsonl(small))
    peak_all, size_all = _peak_bytes(usage_export.iter_jsonl(UsageRecord.objects.all()))

    assert peak_all < 1.5 * peak_small + 256 * 1024
    assert peak_all < size_all / 2  # the JSON text is never held whole


@pytest.mark.django_db
def test_chunks_are_about_64_kib_not_one_per_row():
    _fill(3000)

    chunks = list(usage_export.iter_csv(UsageRecord.objects.all()))

    assert len(chunks) > 1
    for chunk in chunks[:-1]:
        assert usage_export.CHUNK_BYTES <= len(chunk) < 2 * usage_export.CHUNK_BYTES
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert rows[0] == list(usage_export.columns())
    assert len(rows) == 3001


@pytest.mark.django_db
def test_a_csv_row_and_its_jsonl_line_carry_the_same_values():
    _fill(
        1, tokens_estimated=True, fallback_hops=[{"endpoint": "a"}, {"endpoint": "b"}]
    )

    (row,) = csv.DictReader(
        io.StringIO(b"".join(usage_export.iter_csv(UsageRecord.objects.all())).decode())
    )
    (line,) = b"".join(usage_export.iter_jsonl(UsageRecord.objects.all())).splitlines()
    record = json.loads(line)

    assert list(record) == list(usage_export.columns())
    assert row["fallback_path"] == "a > b"
    assert record["fallback_path"] == ["a", "b"]
    assert row["estimated"] == "true" and record["estimated"] is True
    assert row["cost"] == record["cost"] == "0.000010"
    assert float(row["latency_ms"]) == record["latency_ms"] == 10.0


TRAIL = [
    {
        "endpoint": "primary",
        "outcome": "failed",
        "started_ms": 0.2,
        "duration_ms": 12.9,
        "reason": "http_503",
        "status_code": 503,
    },
    {"endpoint": "fallback", "outcome": "ok", "started_ms": 13.1, "duration_ms": 20.0},
]


@pytest.mark.django_db
def test_the_trail_is_objects_in_json_and_one_readable_cell_in_csv():
    _fill(1, trail=[{**TRAIL[0], "endpoint_id": 1}, TRAIL[1]])

    (row,) = csv.DictReader(
        io.StringIO(b"".join(usage_export.iter_csv(UsageRecord.objects.all())).decode())
    )
    (line,) = b"".join(usage_export.iter_jsonl(UsageRecord.objects.all())).splitlines()

    assert row["trail"] == "primary:failed:503:12ms > fallback:ok:20ms"
    assert json.loads(line)["trail"] == TRAIL


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ({"not": "a list"}, []),
        (["junk", 3, None], []),
        (
            [{"endpoint": 5, "outcome": "ok", "status_code": True, "duration_ms": "1"}],
            [{"outcome": "ok"}],
        ),
        (
            [{"endpoint": "a", "mid_stream": 1, "started_ms": False}],
            [{"endpoint": "a"}],
        ),
        ([{"endpoint": "a", "duration_ms": float("nan")}], [{"endpoint": "a"}]),
    ],
)
def test_a_trail_keeps_only_the_fields_it_knows_with_their_types(stored, shown):
    assert usage_export.clean_trail(stored) == shown


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("=1+2", "'=1+2"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("gpt-4o", "gpt-4o"),
        ("", ""),
    ],
)
def test_text_cells_never_start_a_formula(text, cell):
    assert usage_export._cell(text) == cell


def test_the_file_name_names_the_range_in_utc():
    from datetime import timezone

    plus_two = timezone(timedelta(hours=2))

    name = usage_export.filename(
        datetime(2026, 11, 1, 2, 0, tzinfo=plus_two), None, "csv"
    )

    assert name == "llmsite-usage-20261101T000000Z-now.csv"


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_export_streams_from_an_async_iterator(django_user_model):
    """A sync iterator would be read whole into a list by Django under ASGI."""
    from asgiref.sync import sync_to_async

    staff = await django_user_model.objects.acreate(
        username="sam", is_staff=True, is_superuser=True
    )
    await sync_to_async(_fill)(500)
    client = AsyncClient()
    await client.aforce_login(staff)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = await client.get("/api/usage/records/?format=csv")
        assert response.status_code == 200
        assert response.is_async
        body = b"".join([chunk async for chunk in response.streaming_content])

    assert len(body.decode().splitlines()) == 501
    close_thread_connections()


def _cells(text: str) -> list[list[object]]:
    """CSV cells, numbers as floats: PostgreSQL writes 95.0 as 95."""

    def value(cell: str) -> object:
        try:
            return float(cell)
        except ValueError:
            return cell

    return [[value(cell) for cell in row] for row in csv.reader(io.StringIO(text))]


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the COPY path runs on PostgreSQL"
)
@pytest.mark.django_db
def test_postgresqls_copy_writes_the_cells_python_writes(django_user_model):
    user = django_user_model.objects.create(username="-dash")
    hostile = [
        {"model_name": '=cmd|"/c calc"!A1', "upstream_model": "a,b\nc"},
        {"model_name": "tab", "error_type": "\tboom", "latency_ms": 95.0},
        {"fallback_hops": [{"endpoint": None}, "junk", {"endpoint": "@west"}]},
        {"fallback_hops": {"not": "a list"}, "cost": None, "latency_ms": None},
        {"fallback_hops": [{"endpoint": "+x"}], "user": user},
        {"prompt_tokens": 2**31 - 1, "completion_tokens": 2**31 - 1},
        {"created_at": T0.replace(microsecond=0), "cost": Decimal("12345678.000001")},
        {
            "trail": [
                {
                    "endpoint": "=x",
                    "outcome": "failed",
                    "status_code": 503,
                    "duration_ms": 12.999,
                },
                "junk",
                {"endpoint": 4, "outcome": "ok", "status_code": 99, "duration_ms": -1},
                {
                    "endpoint": "b",
                    "outcome": "ok",
                    "status_code": 503.5,
                    "duration_ms": 1e300,
                },
                {"endpoint": "c,d\ne", "duration_ms": 0.5, "status_code": "503"},
            ]
        },
        {"trail": {"not": "a list"}},
        {"trail": [{"outcome": "skipped", "duration_ms": True}]},
    ]
    for n, fields in enumerate(hostile):
        fields.setdefault("created_at", T0 + timedelta(seconds=n, microseconds=n))
        UsageRecord.objects.create(**{"model_name": "m", "status": "ok", **fields})
    queryset = UsageRecord.objects.order_by("created_at", "id")

    copied = b"".join(usage_export.iter_csv(queryset)).decode()
    shaped = b"".join(usage_export.csv_chunks(usage_export.rows(queryset))).decode()

    assert _cells(copied) == _cells(shaped)
    assert len(_cells(copied)) == len(hostile) + 1
