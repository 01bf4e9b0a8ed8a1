"""/v1/chat/completions refuses malformed bodies with OpenAI's 400, never a 500."""

from __future__ import annotations

import json
import logging

import pytest
from django.test import AsyncClient

from gateway import api, client
from gateway.api import BadRequest, parse_chat_request
from gateway.models import ApiKey
from tests.gateway.usage_support import (
    FakeUpstream,
    close_thread_connections,
    forget_process_state,
    make_route,
)

MODEL = "chat-model"
USER_TURN = {"role": "user", "content": "Hello?"}


def body(**fields) -> dict:
    return {"model": MODEL, "messages": [USER_TURN], **fields}


def refused(data: object) -> BadRequest:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(raw)
    return caught.value


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested(depth: int) -> bytes:
    return json.dumps(body()).encode()[:-1] + b', "x": ' + nested_list(depth) + b"}"


# --- The parser, field by field ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "param"),
    [
        # The cases that gave a 500 with a traceback.
        (
            body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            "messages[0].content[0].text",
        ),
        (body(messages=[{**USER_TURN, "name": 5}]), "messages[0].name"),
        (
            body(messages=[USER_TURN, {"role": "assistant", "tool_calls": 5}]),
            "messages[1].tool_calls",
        ),
        ({"model": "gpt\x00-4o", "messages": [USER_TURN]}, "model"),
        (
            body(messages=[{"role": "user", "content": "bad \ud800 half"}]),
            "messages[0].content",
        ),
        # Shapes of content parts.
        (body(messages=[{"role": "user", "content": []}]), "messages[0].content"),
        (
            body(messages=[{"role": "user", "content": ["hi"]}]),
            "messages[0].content[0]",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "video", "v": 1}]}]),
            "messages[0].content[0].type",
        ),
        (
            body(messages=[{"role": "user", "content": [{"text": "no type"}]}]),
            "messages[0].content[0].type",
        ),
        (
            body(
                messages=[
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    },
                    USER_TURN,
                ]
            ),
            "messages[0].content[0].type",
        ),
        (
            body(
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": 5}]}
                ]
            ),
            "messages[0].content[0].image_url",
        ),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://x/a.png", "detail": 3},
                            }
                        ],
                    }
                ]
            ),
            "messages[0].content[0].image_url.detail",
        ),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AAAA"}}
                        ],
                    }
                ]
            ),
            "messages[0].content[0].input_audio.format",
        ),
        (
            body(
                messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]
            ),
            "messages[0].content[0].file",
        ),
        # Names, tool calls and tool results.
        (body(messages=[{**USER_TURN, "name": "x" * 257}]), "messages[0].name"),
        (
            body(messages=[USER_TURN, {"role": "assistant", "tool_calls": [5]}]),
            "messages[1].tool_calls[0]",
        ),
        (
            body(
                messages=[
                    USER_TURN,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": {"a": 1}},
                            }
                        ],
                    },
                ]
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            body(
                messages=[
                    USER_TURN,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": 1, "type": "function", "function": {}}],
                    },
                ]
            ),
            "messages[1].tool_calls[0].id",
        ),
        (
            body(messages=[{"role": "tool", "content": "42"}]),
            "messages[0].tool_call_id",
        ),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        # Parameters.
        (body(temperature=True), "temperature"),
        (body(temperature=3), "temperature"),
        (body(top_p="0.5"), "top_p"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(max_completion_tokens=2**40), "max_completion_tokens"),
        (body(n=True), "n"),
        (body(seed=2**70), "seed"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (body(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
        (body(tools=5), "tools"),
        (body(logit_bias={"50256": 500}), "logit_bias"),
        (body(metadata={"note": "nul \x00 here"}), "metadata.note"),
    ],
)
def test_a_malformed_field_is_refused_naming_it(data, param):
    error = refused(data)

    assert error.param == param
    assert error.message


def test_a_nul_in_a_key_is_refused():
    assert refused(body(metadata={"a\x00": 1})).param == "metadata"


@pytest.mark.parametrize("depth", [65, 2_000, 100_000])
def test_deep_nesting_is_refused_without_parsing(depth):
    error = refused(nested(depth))

    assert "64 levels" in error.message


def test_nesting_up_to_the_limit_is_accepted():
    # The body object itself is one level.
    assert parse_chat_request(nested(63)).model == MODEL


def test_brackets_inside_strings_do_not_count_as_nesting():
    content = "[" * 5_000 + '"{' * 100
    raw = json.dumps(body(messages=[{"role": "user", "content": content}]))

    chat = parse_chat_request(raw.encode())

    assert chat.messages[0]["content"].startswith("[[[")


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe{}", b'{"model": NaN}', b'{"model": "m", "temperature": 1e999}'],
    ids=["not-utf8", "nan", "infinity"],
)
def test_what_is_not_json_is_refused(raw):
    assert refused(raw).message


def test_a_huge_integer_is_refused_not_crashed():
    raw = b'{"model": "m", "messages": [], "seed": ' + b"9" * 5000 + b"}"

    assert refused(raw).message == "The body is not valid JSON."


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}],
        [
            {
                "role": "user",
                "name": "alice",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64,AA",
                            "detail": "low",
                        },
                    },
                    {
                        "type": "input_audio",
                        "input_audio": {"data": "AA", "format": "wav"},
                    },
                    {"type": "file", "file": {"file_id": "file-1"}},
                ],
            }
        ],
        [
            USER_TURN,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "found"},
            {
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": "No."}],
                "refusal": "No.",
            },
            {"role": "function", "name": "lookup", "content": None},
        ],
    ],
    ids=["developer-parts", "user-parts", "tool-round-trip"],
)
def test_every_documented_shape_is_accepted(messages):
    chat = parse_chat_request(json.dumps(body(messages=messages)).encode())

    assert chat.messages == messages


# --- Through the view -------------------------------------------------------------


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    with client.pools.use_transport(fake.transport()):
        yield fake


@pytest.fixture
def program(transactional_db, settings, owner, upstream):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    api.forget_keys()
    make_route("primary")
    _, raw = ApiKey.generate(owner, "fuzzed script")
    yield AsyncClient(), {"Authorization": f"Bearer {raw}"}
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


async def send(program, raw: bytes):
    http, headers = program
    return await http.post(
        "/v1/chat/completions",
        data=raw,
        content_type="application/json",
        headers=headers,
    )


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(
            body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
        ).encode(),
        json.dumps(body(messages=[{**USER_TURN, "name": 5}])).encode(),
        json.dumps(
            body(messages=[USER_TURN, {"role": "assistant", "tool_calls": 5}])
        ).encode(),
        # json.dumps escapes both as \\u0000 and \\ud83d, as a client would.
        json.dumps({"model": "chat-model\x00", "messages": [USER_TURN]}).encode(),
        json.dumps(body(messages=[{"role": "user", "content": "\ud83d"}])).encode(),
        json.dumps(body()).encode()[:-1] + b', "x": ' + nested_list(2000) + b"}",
    ],
    ids=["part-text", "name", "tool-calls", "nul-model", "surrogate", "deep"],
)
async def test_the_requests_that_gave_500_get_400_and_reach_no_upstream(
    program, upstream, raw, caplog
):
    with caplog.at_level(logging.WARNING):
        response = await send(program, raw)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] or "levels" in error["message"]
    assert upstream.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_tool_round_trip_with_image_parts_is_answered(program, upstream):
    messages = [
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "Look \u00e9\U0001f600"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "zoom", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "zoomed"},
    ]

    response = await send(program, json.dumps(body(messages=messages)).encode())

    assert response.status_code == 200
    assert (
        response.json()["choices"][0]["message"]["content"]
        == "Hello there, how can I help?"
    )
    assert upstream.requests[0][1]["messages"] == messages
