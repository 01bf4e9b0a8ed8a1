"""Cleaning text that comes from an upstream before it is logged, stored or shown.

Every string an upstream sends that the gateway keeps or repeats (error bodies,
stream lines quoted in errors, error objects inside a stream, httpx exception
text, model names from ``/models``, finish reasons) goes through `clean_text`
or `clean_identifier`, in this order:

1. decode bytes as UTF-8, replacing what is not;
2. drop what a PostgreSQL text column or a terminal cannot take: NUL and the
   other C0/C1 control characters but tab, CR and LF, lone surrogates, bidi
   overrides and zero-width characters;
3. replace the endpoint's secrets (the API key and every extra header value)
   with ``[redacted]``, after step 2 so that a key split by a NUL is found;
4. collapse whitespace (tabs and line breaks become one space) and only then
   cut to the length limit, so no part of a secret can survive at the cut.

Answer text (`clean_content`) keeps its whitespace and only loses NUL and lone
surrogates, which the database cannot store; it is bounded by the router's
output limits rather than here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# Extra header values shorter than this ("1", "on") are not secrets, and
# replacing them would mangle every message.
MIN_SECRET_CHARS = 4
# A part of a multi-word header value ("Bearer <token>") is redacted on its own
# from this length, so a scheme word such as "Bearer" is not.
MIN_SECRET_PART_CHARS = 8
IDENTIFIER_CHARS = 200
ELLIPSIS = "…"

# Deleted outright, before redaction, so a key interrupted by one is whole
# again: every control character but tab, line feed and carriage return (the
# others str.split() takes for whitespace, \x0b, \x0c, \x1c-\x1f and \x85,
# included), lone surrogates, bidi embeddings/overrides/isolates, zero-width
# and invisible formatting characters and the BOM.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ud800-\udfff]"
)
# What a database text column cannot hold, and nothing else.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def secrets_of(api_key: str, header_values: Iterable[str]) -> tuple[str, ...]:
    """The strings to redact for an endpoint, longest first."""
    found: set[str] = set()
    for value in (api_key, *header_values):
        value = value.strip()
        if len(value) >= MIN_SECRET_CHARS:
            found.add(value)
            parts = value.split()
            if len(parts) > 1:
                found.update(p for p in parts if len(p) >= MIN_SECRET_PART_CHARS)
    # Longest first: a part must not break up the whole value's redaction.
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in a text."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def clean_text(
    value: str | bytes | None, *, secrets: Iterable[str] = (), limit: int
) -> str:
    """Upstream text made safe to log, store and show: see the module docstring."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
    else:
        text = value if isinstance(value, str) else str(value)
    text = _UNSAFE.sub("", text)
    text = redact(text, secrets)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS
    return text


def clean_identifier(
    value: object, *, secrets: Iterable[str] = (), limit: int = IDENTIFIER_CHARS
) -> str:
    """A name from upstream (model id, finish reason): a string, cleaned, cut.

    Anything that is not a string gives "", so a number or an object never
    becomes a name.
    """
    if not isinstance(value, str):
        return ""
    if value.isascii() and value.isprintable() and len(value) <= limit:
        # The common case: nothing to strip (printable ASCII has no controls).
        return redact(value, secrets) if secrets else value
    text = redact(" ".join(_UNSAFE.sub("", value).split()), secrets)
    return text[:limit]


def clean_content(text: str) -> str:
    """Answer text without what the database cannot store (NUL, lone surrogates)."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("", text)
