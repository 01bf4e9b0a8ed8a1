"""Usage records as CSV or JSON Lines, streamed with flat memory.

One place shapes a record for every consumer: the REST API's JSON pages and
exports (api.views.records) and the admin's "Download CSV". Rows come from
`values_list(...).iterator()` (a server-side cursor on PostgreSQL, chunked
reads on SQLite), never model instances, and leave in ~64 KiB chunks.

Under ASGI, Django's StreamingHttpResponse reads a *sync* iterator to the end
into a list before sending anything (django.http.response, `__aiter__`), so
an ASGI response must get `aiter_chunks(...)`: it pulls one chunk at a time
through `sync_to_async`, whose per-call cost (~0.1 ms) is spread over the
hundreds of rows of a chunk. A WSGI response (and Django's test client) takes
the sync iterator as it is.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import F, Func, QuerySet, TextField

# (column name, ORM path). The order is the CSV's column order.
_SOURCE: tuple[tuple[str, str], ...] = (
    ("request_id", "request_id"),
    ("created_at", "created_at"),
    ("user", "user__username"),
    ("api_key", "api_key__name"),
    ("source", "source"),
    ("model", "model_name"),
    ("endpoint", "endpoint_name"),
    ("upstream_model", "upstream_model"),
    ("fallback_hops", "fallback_hops"),
    ("status", "status"),
    ("prompt_tokens", "prompt_tokens"),
    ("completion_tokens", "completion_tokens"),
    ("estimated", "tokens_estimated"),
    ("latency_ms", "latency_ms"),
    ("ttft_ms", "ttft_ms"),
    ("cost", "cost"),
    ("error_type", "error_type"),
    ("attempts", "attempts"),
    ("conversation_id", "conversation_id"),
    ("trail", "trail"),
)
FIELDS: tuple[str, ...] = tuple(path for _, path in _SOURCE)

# Output columns: fallback_hops becomes a count and the path of endpoints that
# failed over; total_tokens is added after the two counts. The trail (every
# attempt: endpoint, outcome, status, duration) is a list of objects in JSON
# and one cell in CSV, "primary:failed:503:12ms > backup:ok:240ms".
COLUMNS: tuple[str, ...] = (
    "request_id",
    "created_at",
    "user",
    "api_key",
    "source",
    "model",
    "endpoint",
    "upstream_model",
    "fallback_hops",
    "fallback_path",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "estimated",
    "latency_ms",
    "ttft_ms",
    "cost",
    "error_type",
    "attempts",
    "conversation_id",
    "trail",
)

CHUNK_BYTES = 64 * 1024
DB_CHUNK_ROWS = 2000
# Rows shaped per csv.writerows call: large enough to amortise the call.
_BATCH_ROWS = 256

# A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def columns() -> tuple[str, ...]:
    """The header row, in column order."""
    return COLUMNS


def rows(queryset: QuerySet) -> Iterator[tuple[Any, ...]]:
    """The queryset's records as raw tuples in FIELDS order, read in chunks."""
    return queryset.values_list(*FIELDS).iterator(chunk_size=DB_CHUNK_ROWS)


def _timestamp(value: datetime) -> str:
    # The same text DRF writes for a UTC time, so CSV and JSON agree.
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _path(hops: Any) -> list[str]:
    if not isinstance(hops, list):
        return []
    return [
        "" if hop.get("endpoint") is None else str(hop["endpoint"])
        for hop in hops
        if isinstance(hop, dict)
    ]


# A trail step's fields and the JSON types each may have; anything else a
# hand-edited or older row holds is left out rather than passed on.
_STEP_FIELDS: dict[str, tuple[type, ...]] = {
    "endpoint": (str,),
    "outcome": (str,),
    "started_ms": (int, float),
    "duration_ms": (int, float),
    "reason": (str,),
    "status_code": (int,),
    "mid_stream": (bool,),
}


# A duration past this (11 days) is not one an attempt can take: left out.
_MAX_DURATION_MS = 1e9


def _typed(value: Any, kinds: tuple[type, ...]) -> bool:
    if not isinstance(value, kinds):
        return False
    if isinstance(value, bool):
        # JSON's true is a Python int too; only a bool field may hold one.
        return bool in kinds
    # Python's JSON reads NaN and Infinity; no duration is either.
    return not isinstance(value, float) or math.isfinite(value)


def clean_trail(steps: Any) -> list[dict[str, Any]]:
    """Each attempt or skip of a request: endpoint, outcome, times, why."""
    if not isinstance(steps, list):
        return []
    return [
        {
            name: step[name]
            for name, kinds in _STEP_FIELDS.items()
            if name in step and _typed(step[name], kinds)
        }
        for step in steps
        if isinstance(step, dict)
    ]


def _step_text(step: dict[str, Any]) -> str:
    """One trail step as a CSV cell shows it: endpoint:outcome[:status]:Nms."""
    parts = [step.get("endpoint", ""), step.get("outcome", "")]
    status = step.get("status_code")
    if status is not None and 100 <= status <= 599:
        parts.append(str(status))
    duration = step.get("duration_ms")
    if duration is not None and 0 <= duration < _MAX_DURATION_MS:
        parts.append(f"{math.floor(duration)}ms")
    return ":".join(parts)


def _cost(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def record(row: tuple[Any, ...]) -> dict[str, Any]:
    """One raw row as the JSON object of the API and of JSON Lines."""
    (
        request_id,
        created_at,
        user,
        api_key,
        source,
        model,
        endpoint,
        upstream_model,
        hops,
        status,
        prompt,
        completion,
        estimated,
        latency,
        ttft,
        cost,
        error_type,
        attempts,
        conversation,
        trail,
    ) = row
    path = _path(hops)
    return {
        "request_id": str(request_id),
        "created_at": _timestamp(created_at),
        "user": user,
        "api_key": api_key,
        "source": source,
        "model": model,
        "endpoint": endpoint,
        "upstream_model": upstream_model,
        "fallback_hops": len(path),
        "fallback_path": path,
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": estimated,
        "latency_ms": latency,
        "ttft_ms": ttft,
        "cost": _cost(cost),
        "error_type": error_type,
        "attempts": attempts,
        "conversation_id": None if conversation is None else str(conversation),
        "trail": clean_trail(trail),
    }


def _cell(text: str | None) -> str:
    """A text cell a spreadsheet shows as text, never runs as a formula."""
    if not text:
        return ""
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


# Text cells a caller or an upstream may have written: defused for spreadsheets.
_TEXT_CELLS = (
    "user",
    "api_key",
    "model",
    "endpoint",
    "upstream_model",
    "fallback_path",
    "error_type",
    "trail",
)


def _csv_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """One raw row as CSV cells: the JSON record, flattened and defused."""
    item = record(row)
    item["fallback_path"] = " > ".join(item["fallback_path"])
    item["trail"] = " > ".join(map(_step_text, item["trail"]))
    item["estimated"] = "true" if item["estimated"] else "false"
    for name in _TEXT_CELLS:
        item[name] = _cell(item[name])
    return tuple(item[name] for name in COLUMNS)


def _batches(items: Iterator[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    while batch := list(itertools.islice(items, _BATCH_ROWS)):
        yield batch


def iter_csv(queryset: QuerySet, *, header: bool = True) -> Iterator[bytes]:
    """The queryset's records as CSV (UTF-8, header first) in ~64 KiB chunks.

    On PostgreSQL the server writes the CSV itself (COPY ... TO STDOUT), the
    same cells as csv_chunks but without a Python object per value: several
    times the rows per second. Elsewhere csv_chunks shapes the rows.
    """
    if connections[queryset.db].vendor == "postgresql":
        return _pg_copy_csv(queryset, header=header)
    return csv_chunks(rows(queryset), header=header)


def csv_chunks(
    raw: Iterable[tuple[Any, ...]], *, header: bool = True
) -> Iterator[bytes]:
    """Raw FIELDS-ordered rows as CSV chunks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    for batch in _batches(iter(raw)):
        writer.writerows(map(_csv_row, batch))
        if buffer.tell() >= CHUNK_BYTES:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()


def iter_jsonl(queryset: QuerySet) -> Iterator[bytes]:
    """The queryset's records as JSON Lines (one object a line) in ~64 KiB chunks."""
    return jsonl_chunks(rows(queryset))


def jsonl_chunks(raw: Iterable[tuple[Any, ...]]) -> Iterator[bytes]:
    """Raw FIELDS-ordered rows as JSON Lines chunks."""
    encode = json.JSONEncoder(separators=(",", ":")).encode
    parts: list[str] = []
    size = 0
    for row in raw:
        line = encode(record(row))
        parts.append(line)
        size += len(line) + 1
        if size >= CHUNK_BYTES:
            parts.append("")
            yield "\n".join(parts).encode()
            parts.clear()
            size = 0
    if parts:
        parts.append("")
        yield "\n".join(parts).encode()


def _next(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


async def aiter_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A sync chunk iterator for an ASGI response, one chunk per thread hop.

    Every step runs in the request's one sync thread (thread_sensitive), which
    holds the database connection and the server-side cursor; a client that
    goes away closes the iterator, and with it the cursor.
    """
    step = sync_to_async(_next, thread_sensitive=True)
    try:
        while (chunk := await step(chunks)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()


def filename(since: datetime | None, until: datetime | None, extension: str) -> str:
    """A download's file name naming its time range, e.g. for Content-Disposition."""

    def stamp(value: datetime | None, default: str) -> str:
        if value is None:
            return default
        return value.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")

    return f"llmsite-usage-{stamp(since, 'start')}-{stamp(until, 'now')}.{extension}"


# --- PostgreSQL: COPY ---------------------------------------------------------


class _Sql(Func):
    """One column expression of the COPY query (PostgreSQL only)."""

    output_field = TextField()
    # Only total_tokens takes two fields: prompt::bigint + completion.
    arg_joiner = "::bigint + "

    def __init__(self, template: str, *fields: str) -> None:
        super().__init__(*(F(field) for field in fields), template=template)


_X = "%(expressions)s"
# A leading formula character gets an apostrophe, as _cell does; NULL is "".
_DEFUSE = (
    "CASE WHEN left({0}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') "
    "THEN '''' || {0} ELSE coalesce({0}, '') END"
)
# As isoformat(): microseconds only when there are some, and Z for UTC.
_TIME = (
    f"to_char({_X} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || "
    f"CASE WHEN date_trunc('second', {_X}) = {_X} THEN '' "
    f"ELSE to_char({_X} AT TIME ZONE 'UTC', '.US') END || 'Z'"
)
# The hops that are objects, as _path reads them; most records have none.
_HOPS = (
    f"CASE WHEN {_X} = '[]'::jsonb THEN {{empty}} ELSE "
    "(SELECT {select} FROM jsonb_array_elements(CASE WHEN "
    f"jsonb_typeof({_X}) = 'array' THEN {_X} ELSE '[]'::jsonb "
    "END) AS hop WHERE jsonb_typeof(hop) = 'object') END"
)
_HOP_PATH = _HOPS.format(
    empty="''", select="string_agg(coalesce(hop->>'endpoint', ''), ' > ')"
)
# One trail step as _step_text writes it. A duration is compared as numeric
# first (a float8 cast of 1e400 would fail), then floored as float8: the
# value Python reads from the same JSON number.
_STEP = (
    "CASE WHEN jsonb_typeof(step->'endpoint') = 'string' "
    "THEN step->>'endpoint' ELSE '' END || ':' || "
    "CASE WHEN jsonb_typeof(step->'outcome') = 'string' "
    "THEN step->>'outcome' ELSE '' END || "
    "CASE WHEN jsonb_typeof(step->'status_code') = 'number' "
    "AND step->>'status_code' ~ '^[1-5][0-9][0-9]$' "
    "THEN ':' || (step->>'status_code') ELSE '' END || "
    "CASE WHEN jsonb_typeof(step->'duration_ms') IS DISTINCT FROM 'number' "
    "THEN '' WHEN (step->'duration_ms')::numeric < 0 "
    f"OR (step->'duration_ms')::numeric >= {_MAX_DURATION_MS:.0f} THEN '' "
    "ELSE ':' || floor((step->>'duration_ms')::float8)::bigint || 'ms' END"
)
_TRAIL = (
    f"(SELECT string_agg({_STEP}, ' > ' ORDER BY n) FROM jsonb_array_elements("
    f"CASE WHEN jsonb_typeof({_X}) = 'array' THEN {_X} ELSE '[]'::jsonb END) "
    "WITH ORDINALITY AS t(step, n) WHERE jsonb_typeof(step) = 'object')"
)
# A joined cell (NULL: nothing was joined) defused as _cell does.
_DEFUSE_TEXT = "regexp_replace(coalesce({0}, ''), '^([-=+@\\t\\r])', '''\\1')"
_PG_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (f"{_X}::text", ("request_id",)),
    (_TIME, ("created_at",)),
    (_DEFUSE.format(_X), ("user__username",)),
    (_DEFUSE.format(_X), ("api_key__name",)),
    (_X, ("source",)),
    (_DEFUSE.format(_X), ("model_name",)),
    (_DEFUSE.format(_X), ("endpoint_name",)),
    (_DEFUSE.format(_X), ("upstream_model",)),
    (_HOPS.format(empty="0", select="count(*)"), ("fallback_hops",)),
    (_DEFUSE_TEXT.format(_HOP_PATH), ("fallback_hops",)),
    (_X, ("status",)),
    (_X, ("prompt_tokens",)),
    (_X, ("completion_tokens",)),
    # bigint: two int4 counts can overflow int4 together.
    (_X, ("prompt_tokens", "completion_tokens")),
    (f"CASE WHEN {_X} THEN 'true' ELSE 'false' END", ("tokens_estimated",)),
    (_X, ("latency_ms",)),
    (_X, ("ttft_ms",)),
    (_X, ("cost",)),
    (_DEFUSE.format(_X), ("error_type",)),
    (_X, ("attempts",)),
    (f"{_X}::text", ("conversation_id",)),
    (_DEFUSE_TEXT.format(_TRAIL), ("trail",)),
)


def _pg_copy_csv(queryset: QuerySet, *, header: bool) -> Iterator[bytes]:
    columns = {
        f"c{n}": _Sql(template, *fields)
        for n, (template, fields) in enumerate(_PG_COLUMNS)
    }
    query = queryset.annotate(**columns).values_list(*columns)
    sql, params = query.query.sql_with_params()
    pending = bytearray()
    if header:
        pending += (",".join(COLUMNS) + "\n").encode()
    with connections[queryset.db].cursor() as cursor:
        copy_sql = f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)"
        with cursor.cursor.copy(copy_sql, params or None) as copy:
            for data in copy:
                pending += data
                if len(pending) >= CHUNK_BYTES:
                    yield bytes(pending)
                    pending.clear()
    if pending:
        yield bytes(pending)
