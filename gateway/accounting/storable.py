"""Values every database stores: the last line of defence of the usage writer.

Upstream data reaches a usage record through the router, which bounds and
validates it; this module does not trust that it did. A NUL in a string, an
integer past the column's range, a NaN or a cost with too many digits makes
PostgreSQL (and sometimes SQLite) refuse the whole transaction, and with it
every record of the batch and the release of their reservations.
"""

from __future__ import annotations

import functools
import json
import math
import re
import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.utils import timezone

# Django's ranges for its integer fields, on every backend alike.
SMALL_MAX = 32767
INT_MAX = 2147483647
BIG_MAX = 9223372036854775807

# NUL and the other C0/C1 controls except tab and newline; DEL too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Keys and strings of fallback hops are short; their JSON as a whole is capped.
JSON_STRING_MAX = 500
JSON_ITEMS_MAX = 32
JSON_DEPTH_MAX = 4
JSON_BYTES_MAX = 16 * 1024


def text(value: Any, max_length: int) -> str:
    """A string a text column takes: no controls, no lone surrogates, capped."""
    if type(value) is str and value.isascii() and value.isprintable():
        return value[:max_length]  # The common case, several times per record.
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:
            return ""
    if not value.isascii():
        # A lone surrogate cannot be encoded as UTF-8 by either driver.
        value = value.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub("", value)[:max_length]


def integer(value: Any, maximum: int, minimum: int = 0) -> int:
    """An int within [minimum, maximum]; anything that is not a number is 0."""
    if type(value) is int:
        return min(max(value, minimum), maximum)
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) else 0
    elif isinstance(value, Decimal):
        value = int(value) if value.is_finite() else 0
    elif not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except (TypeError, ValueError):
            value = 0
    return min(max(value, minimum), maximum)


def optional_id(value: Any) -> int | None:
    """A row id, or None when the value is not one."""
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= BIG_MAX else None


def optional_uuid(value: Any) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID) or value is None:
        return value
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        return None


def duration(value: Any) -> float | None:
    """Milliseconds: finite and non-negative, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return min(number, 1e12)


def decimal(value: Any, max_digits: int, decimal_places: int) -> Decimal | None:
    """A non-negative Decimal that fits the column, or None when it cannot be one."""
    if value is None or isinstance(value, bool):
        return None
    exponent, ceiling = _decimal_bounds(max_digits, decimal_places)
    try:
        number = Decimal(str(value)) if not isinstance(value, Decimal) else value
        if not number.is_finite():
            return None
        return min(max(number, _ZERO), ceiling).quantize(exponent)
    except (InvalidOperation, ValueError, TypeError):
        return None


_ZERO = Decimal(0)


@functools.cache
def _decimal_bounds(max_digits: int, decimal_places: int) -> tuple[Decimal, Decimal]:
    exponent = Decimal(1).scaleb(-decimal_places)
    return exponent, Decimal(10) ** (max_digits - decimal_places) - exponent


def moment(value: Any) -> datetime:
    """An aware datetime, or now."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value
    return timezone.now()


def json_value(value: Any, depth: int = 0) -> Any:
    """JSON of bounded depth, width and strings, with nothing a database refuses."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return max(min(value, 2**53), -(2**53))
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return text(value, JSON_STRING_MAX)
    if depth >= JSON_DEPTH_MAX:
        return None
    if isinstance(value, dict):
        return {
            text(key, 64): json_value(item, depth + 1)
            for key, item in list(value.items())[:JSON_ITEMS_MAX]
        }
    if isinstance(value, list | tuple):
        return [json_value(item, depth + 1) for item in list(value)[:JSON_ITEMS_MAX]]
    return text(value, JSON_STRING_MAX)


def json_list(value: Any) -> list[Any]:
    """A JSON list (fallback hops) within JSON_BYTES_MAX once encoded."""
    if not value or not isinstance(value, list | tuple):
        return []
    items = json_value(list(value))
    # Drop from the end until it fits: the first hops say the most.
    while items and len(json.dumps(items, ensure_ascii=False)) > JSON_BYTES_MAX:
        items = items[: len(items) // 2]
    return items
