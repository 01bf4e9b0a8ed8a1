"""JSON from outside: depth checked before parsing, in linear time; bad text refused."""

from __future__ import annotations

import time

import pytest

from gateway import inbound

SIZE = 2_000_000


def outcome(text: str) -> str:
    try:
        inbound.loads(text)
    except inbound.InboundError as exc:
        return exc.message
    return "ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 64 + "]" * 64, "ok"),
        ("[" * 65 + "]" * 65, "The body is nested more than 64 levels deep."),
        ('{"a":' * 65 + "1" + "}" * 65, "The body is nested more than 64 levels deep."),
        ('["' + "[" * 1_000 + '"]', "ok"),
        ('["\\"[[[' + "[" * 100 + '"]', "ok"),
        ("[" * 2_000 + "]", "The body is not valid JSON."),
        ("[" * 100_000, "The body is not valid JSON."),
        ("]" * 100 + "[" * 100, "The body is not valid JSON."),
    ],
    ids=[
        "at-limit",
        "over-limit",
        "objects",
        "brackets-in-a-string",
        "escaped-quote",
        "unclosed",
        "only-openers",
        "inside-out",
    ],
)
def test_depth_is_judged_without_parsing(text, expected):
    assert outcome(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100 + '"\\' * (SIZE // 2),
        "[" * 100 + '"a",' * (SIZE // 4),
        "[" + "[1]," * (SIZE // 4) + "[]]",
        '["' + '\\"[' * (SIZE // 3) + '"]',
    ],
    ids=["unterminated-escapes", "many-strings", "wide", "escaped-quotes"],
)
def test_hostile_megabytes_are_judged_in_linear_time(text):
    started = time.perf_counter()

    outcome(text)

    # Quadratic scanning of 2 MB would take minutes; linear takes well under 1 s.
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"a": ["x", "y\\u0000"]}', "a[1]"),
        ('{"a": {"b": "\\ud800"}}', "a.b"),
        ('{"a": "\\udfff\\ud800"}', "a"),
        ('{"a": [1e999]}', "a[0]"),
    ],
)
def test_bad_values_are_refused_by_path(text, path):
    with pytest.raises(inbound.InboundError) as caught:
        inbound.loads(text)

    assert caught.value.path == path
    assert caught.value.syntax is False


def test_a_valid_surrogate_pair_is_one_character_and_accepted():
    assert inbound.loads('["\\ud83d\\ude00"]') == ["\U0001f600"]


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}'])
def test_non_json_numbers_are_refused(text):
    with pytest.raises(inbound.InboundError) as caught:
        inbound.loads(text)

    assert caught.value.syntax is True
