"""Cleaning upstream text: control characters, secrets, then the length cut."""

from __future__ import annotations

import pytest

from gateway import sanitize
from gateway.client import APIServerError, EndpointConfig

KEY = "sk-test-5Jm2Qp8Rw4Tz7Vb1Nc6Xd9"
SECRETS = sanitize.secrets_of(KEY, ["Bearer org-token-Zq81Lm0P", "1", "json"])


def test_a_key_across_the_cut_is_redacted_before_the_text_is_cut():
    text = "x" * 490 + KEY + " and more"

    cleaned = sanitize.clean_text(text, secrets=SECRETS, limit=500)

    assert len(cleaned) == 500
    assert KEY[:8] not in cleaned
    assert cleaned.startswith("x" * 490 + "[redac")


def test_a_key_split_by_control_characters_is_still_found():
    text = f"echo: {KEY[:10]}\x00{KEY[10:20]}\x1b{KEY[20:]} done"

    assert sanitize.clean_text(text, secrets=SECRETS, limit=500) == (
        "echo: [redacted] done"
    )


def test_a_key_split_by_a_control_that_split_takes_for_space_is_redacted():
    for control in ("\x0b", "\x0c", "\x1c", "\x1f", "\x85"):
        text = f"echo: {KEY[:12]}{control}{KEY[12:]} done"

        assert sanitize.clean_text(text, secrets=SECRETS, limit=500) == (
            "echo: [redacted] done"
        ), repr(control)


def test_controls_surrogates_and_bidi_overrides_are_dropped_and_space_collapsed():
    text = "bad\x00 \x07request\r\n\t\u202eevil\ud800 \x85 end\x7f"

    assert sanitize.clean_text(text, limit=100) == "bad request evil end"


def test_bytes_are_decoded_with_replacement():
    assert sanitize.clean_text(b"caf\xc3\xa9 \xff\xfe!", limit=100) == "café ��!"


def test_every_header_value_and_a_bearer_token_inside_one_are_secrets():
    assert "Bearer org-token-Zq81Lm0P" in SECRETS
    assert "org-token-Zq81Lm0P" in SECRETS
    # Too short to be a secret, and would mangle every message.
    assert "1" not in SECRETS
    # A scheme word is not redacted on its own.
    assert "Bearer" not in SECRETS
    text = sanitize.clean_text(
        "token org-token-Zq81Lm0P is not Bearer org-token-Zq81Lm0P",
        secrets=SECRETS,
        limit=200,
    )
    assert text == "token [redacted] is not [redacted]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("model\x00with\tnul", "modelwith nul"),
        (5, ""),
        (None, ""),
        ("m" * 500, "m" * 200),
        (f"leaked-{KEY}", "leaked-[redacted]"),
    ],
)
def test_identifiers_are_strings_cleaned_redacted_and_capped(value, expected):
    assert sanitize.clean_identifier(value, secrets=SECRETS) == expected


def test_answer_text_keeps_its_whitespace_and_loses_only_what_cannot_be_stored():
    assert sanitize.clean_content("line\n\tindent \x1b[1m") == "line\n\tindent \x1b[1m"
    assert sanitize.clean_content("a\x00b\ud800c é") == "abc é"


def test_an_error_built_from_upstream_text_is_always_cleaned():
    config = EndpointConfig(
        id=1,
        name="primary",
        base_url="https://api.example.com/v1",
        api_key=KEY,
        extra_headers=(("X-Org", "org-secret-99"),),
    )

    error = APIServerError(
        "upstream said: " + "y" * 480 + KEY + "\x00 org-secret-99", endpoint=config
    )

    assert KEY[:6] not in error.message and "org-secret" not in error.message
    assert "\x00" not in error.message
    assert len(error.message) <= 560
    assert error.endpoint == "primary"
