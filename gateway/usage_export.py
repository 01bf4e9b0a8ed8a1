"""Usage records as CSV, streamed: a header row, then one row per record.

Rows are read in chunks through a server-side cursor (`iterator`), so memory
stays flat whatever the size of the range. Cells that a spreadsheet would run
as a formula are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from django.db.models import QuerySet

from gateway.models import UsageRecord

CHUNK_ROWS = 2000
COLUMNS = (
    ("request_id", "request_id"),
    ("created_at", "created_at"),
    ("user", "user__username"),
    ("api_key", "api_key__name"),
    ("source", "source"),
    ("model", "model_name"),
    ("endpoint", "endpoint_name"),
    ("upstream_model", "upstream_model"),
    ("attempts", "attempts"),
    ("fallback_hops", "fallback_hops"),
    ("status", "status"),
    ("error_type", "error_type"),
    ("prompt_tokens", "prompt_tokens"),
    ("completion_tokens", "completion_tokens"),
    ("tokens_estimated", "tokens_estimated"),
    ("latency_ms", "latency_ms"),
    ("ttft_ms", "ttft_ms"),
    ("cost", "cost"),
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(name: str, value: Any) -> Any:
    if value is None:
        return ""
    if name == "created_at":
        return value.isoformat()
    if name == "fallback_hops":
        return len(value) if isinstance(value, list) else 0
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def iter_csv(queryset: QuerySet[UsageRecord]) -> Iterator[bytes]:
    """The records of `queryset`, in its order, as CSV bytes, a chunk at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = [name for name, _ in COLUMNS]
    writer.writerow(names)
    rows = queryset.values_list(*(column for _, column in COLUMNS))
    for count, row in enumerate(rows.iterator(chunk_size=CHUNK_ROWS), start=1):
        writer.writerow([_cell(n, v) for n, v in zip(names, row, strict=True)])
        if count % 500 == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
