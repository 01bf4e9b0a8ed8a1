"""Decoding JSON that comes from outside: programs on /v1, browsers on the socket.

`loads` is `json.loads` with the limits the standard library does not have:

- nesting depth is bounded *before* parsing, by a scan that does not recurse,
  so 100,000 nested brackets are a clean refusal and never a RecursionError;
- NUL characters and lone surrogates are refused in every string and key:
  PostgreSQL cannot store NUL in text, and a lone surrogate cannot be encoded
  as UTF-8 (tiktoken, the database driver and the websocket all fail on it);
- NaN, Infinity and numbers too large for a float are refused: they are not
  JSON, and an upstream would choke on them.

Every refusal is an `InboundError` whose `path` names the value in the style
of OpenAI's ``param`` (``messages[3].content[0].text``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64

# A JSON string literal, escapes included, in the "unrolled loop" form. The
# closing quote is optional: an unterminated string then runs to the end of the
# text (which is not JSON anyway) instead of failing and being retried from
# every later quote, which would take quadratic time.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Outside strings, valid JSON holds only brackets and these: deleting them
# leaves the brackets (objects and arrays nest alike, so "{}" become "[]").
# Anything else left over is not JSON and stops the brackets pairing up.
_BRACKETS_ONLY = str.maketrans("{}", "[]", " \t\n\r,:0123456789+-.eEtruefalsn")
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
# Keys are cut in error paths: a path is repeated in the error message.
_PATH_KEY_CHARS = 64


class InboundError(ValueError):
    """JSON from outside that breaks a rule; `path` names the value, if known.

    `syntax` is true when the text is not acceptable JSON at all (not UTF-8,
    not JSON, too deep, NaN), false when a value in it breaks a rule.
    """

    def __init__(
        self, message: str, path: str | None = None, *, syntax: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.syntax = syntax


def loads(
    data: bytes | str, *, max_depth: int = MAX_DEPTH, what: str = "The body"
) -> Any:
    """Decode JSON from outside, or raise InboundError saying why not.

    `what` starts the sentences of syntax errors ("The body", "That frame").
    """
    if isinstance(data, bytes | bytearray):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InboundError(f"{what} is not valid UTF-8.", syntax=True) from None
    else:
        text = data
    check_depth(text, max_depth, what)
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except InboundError:
        raise
    except (ValueError, RecursionError):
        # ValueError also covers integers beyond Python's 4,300-digit limit.
        raise InboundError(f"{what} is not valid JSON.", syntax=True) from None
    if _may_hold_bad_values(value):
        check_value(value)
    return value


def _may_hold_bad_values(value: Any) -> bool:
    # Serialising is C code, walking is Python: the walk that names the bad
    # value runs only when the serialised form shows a sign of one (NUL comes
    # out escaped, lone surrogates raw, overflowed floats as "Infinity").
    text = json.dumps(value, ensure_ascii=False)
    return "\\u0000" in text or "Infinity" in text or _BAD_CHAR.search(text) is not None


def check_depth(text: str, max_depth: int = MAX_DEPTH, what: str = "The body") -> None:
    """Refuse JSON text nested deeper than max_depth, without parsing it."""
    # Cheap for almost everything: fewer openers than the limit cannot nest deeper.
    if text.count("[") + text.count("{") <= max_depth:
        return
    brackets = _STRING.sub("", text).translate(_BRACKETS_ONLY)
    # Each pass drops the innermost level, at C speed: what is left after
    # max_depth passes is nested deeper, or is not JSON at all.
    for _ in range(max_depth):
        if not brackets:
            return
        shorter = brackets.replace("[]", "")
        if len(shorter) == len(brackets):
            # Brackets outside strings that do not pair up: not JSON. Said
            # here, since the parser would recurse into every unclosed one.
            raise InboundError(f"{what} is not valid JSON.", syntax=True)
        brackets = shorter
    if brackets:
        raise InboundError(
            f"{what} is nested more than {max_depth} levels deep.", syntax=True
        )


def bad_text(text: str) -> str | None:
    """Why a string from outside cannot be accepted, or None when it can."""
    found = _BAD_CHAR.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character"
    return "contains a lone surrogate (not valid Unicode)"


def check_value(value: Any, path: str = "") -> None:
    """Refuse NUL, lone surrogates and non-finite numbers anywhere in a value."""
    # Recursion is safe: loads() bounded the depth before parsing.
    if isinstance(value, str):
        reason = bad_text(value)
        if reason is not None:
            raise InboundError(f"'{path or 'value'}' {reason}.", path or None)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InboundError(
                f"'{path or 'value'}' is not a finite number.", path or None
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            reason = bad_text(key)
            if reason is not None:
                # The key itself cannot be repeated: it is the bad text.
                raise InboundError(
                    f"A key in '{path or 'the body'}' {reason}.", path or None
                )
            name = key if len(key) <= _PATH_KEY_CHARS else key[:_PATH_KEY_CHARS] + "…"
            check_value(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_value(item, f"{path}[{index}]")


def _refuse_constant(name: str) -> Any:
    raise InboundError(f"{name} is not a JSON number.", syntax=True)
