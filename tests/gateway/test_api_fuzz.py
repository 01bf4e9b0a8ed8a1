"""Fuzzing /v1/chat/completions: whatever the body, never a 500 and never a traceback.

Hypothesis draws OpenAI chat bodies, valid ones and mutated ones (wrong types,
missing keys, NUL, lone surrogates, deep nesting, huge and non-finite
numbers, broken JSON), and posts them with a valid key against a fake
upstream. The answer must be a completion, a stream ending in [DONE], or
OpenAI's error object; nothing may be logged at ERROR.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway import api, client
from gateway.models import ApiKey
from tests.gateway.usage_support import (
    FakeUpstream,
    close_thread_connections,
    forget_process_state,
    make_route,
)

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "chat-model"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- Strategies ---------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "x\udfffy", "\u2028", "<|endoftext|>"]
)
TEXT = st.one_of(st.text(max_size=30), HOSTILE_TEXT)
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 1e308]),
)
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBER, TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)


def parts_for(role: str) -> st.SearchStrategy[dict[str, Any]]:
    text = st.builds(lambda t: {"type": "text", "text": t}, TEXT)
    image = st.builds(
        lambda url, detail: {
            "type": "image_url",
            "image_url": {"url": url}
            if detail is None
            else {"url": url, "detail": detail},
        },
        st.sampled_from(["https://example.com/a.png", "data:image/png;base64,AA"]),
        st.sampled_from([None, "auto", "low", "high"]),
    )
    audio = st.just(
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    )
    file = st.just({"type": "file", "file": {"file_id": "file-1"}})
    refusal = st.builds(lambda t: {"type": "refusal", "refusal": t}, TEXT)
    if role == "user":
        return st.one_of(text, image, audio, file)
    if role == "assistant":
        return st.one_of(text, refusal)
    return text


def content_for(role: str) -> st.SearchStrategy[Any]:
    return st.one_of(TEXT, st.lists(parts_for(role), min_size=1, max_size=3))


TOOL_CALL = st.builds(
    lambda call_id, name, arguments: {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    },
    st.sampled_from(["call_1", "call_2"]),
    st.sampled_from(["lookup", "zoom"]),
    st.sampled_from(["{}", '{"q": "x"}', "not json"]),
)


def message_for(role: str) -> st.SearchStrategy[dict[str, Any]]:
    base = st.fixed_dictionaries(
        {"role": st.just(role), "content": content_for(role)},
        optional={"name": st.sampled_from(["alice", "bob"])},
    )
    if role == "assistant":
        return st.one_of(
            base,
            st.fixed_dictionaries(
                {
                    "role": st.just(role),
                    "content": st.none(),
                    "tool_calls": st.lists(TOOL_CALL, min_size=1, max_size=2),
                }
            ),
        )
    if role == "tool":
        return st.fixed_dictionaries(
            {
                "role": st.just(role),
                "content": content_for(role),
                "tool_call_id": st.just("call_1"),
            }
        )
    if role == "function":
        return st.fixed_dictionaries(
            {"role": st.just(role), "name": st.just("lookup"), "content": TEXT}
        )
    return base


VALID_MESSAGE = st.sampled_from(
    ["system", "developer", "user", "assistant", "tool", "function"]
).flatmap(message_for)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """The value with one thing broken somewhere inside it."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        change = draw(st.sampled_from(["drop", "junk", "recurse", "add"]))
        copy = dict(value)
        if change == "drop":
            del copy[key]
        elif change == "junk":
            copy[key] = draw(JUNK)
        elif change == "recurse":
            copy[key] = draw(mutated(value[key]))
        else:
            copy[draw(TEXT)] = draw(JUNK)
        return copy
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        copy = list(value)
        copy[index] = draw(mutated(value[index]))
        return copy
    return draw(JUNK)


PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "stream": st.one_of(st.booleans(), JUNK),
        "stream_options": st.one_of(
            st.just({"include_usage": True}), st.just({"include_usage": False}), JUNK
        ),
        "temperature": st.one_of(st.floats(0, 2), NUMBER, st.booleans()),
        "top_p": st.one_of(st.floats(0, 1), NUMBER),
        "max_tokens": st.one_of(st.integers(1, 50), NUMBER, st.booleans(), TEXT),
        "max_completion_tokens": st.one_of(st.integers(1, 50), NUMBER),
        "n": st.one_of(st.just(1), NUMBER, st.booleans()),
        "seed": NUMBER,
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), JUNK),
        "tools": st.one_of(st.just([{"type": "function"}]), JUNK),
        "tool_choice": st.one_of(st.just("auto"), JUNK),
        "logit_bias": st.one_of(st.dictionaries(TEXT, NUMBER, max_size=2), JUNK),
        "user": TEXT,
        "metadata": JUNK,
    },
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A chat completion body, valid or broken in one of many ways."""
    messages = draw(st.lists(VALID_MESSAGE, min_size=1, max_size=4))
    body: dict[str, Any] = {
        "model": draw(st.one_of(st.just(MODEL), st.just(MODEL), TEXT)),
        "messages": messages,
        **draw(PARAMS),
    }
    shape = draw(
        st.sampled_from(["valid", "valid", "mutated", "mutated", "deep", "raw"])
    )
    if shape == "mutated":
        body = draw(mutated(body))
    text = json.dumps(body, allow_nan=True) if isinstance(body, dict) else "null"
    if shape == "deep":
        depth = draw(st.sampled_from([63, 65, 1_000, 5_000]))
        text = text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    elif shape == "raw":
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", "]", "\\", '"', "{" * 3000]))
    return text.encode("utf-8", "surrogatepass")


# --- The test -------------------------------------------------------------------------


@pytest.fixture
def program(settings, owner):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    api.forget_keys()
    make_route("primary", max_output_tokens=50)
    _, raw = ApiKey.generate(owner, "fuzzer")
    upstream = FakeUpstream()
    with client.pools.use_transport(upstream.transport()):
        yield {"Authorization": f"Bearer {raw}"}
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


async def exchange(headers: dict[str, str], raw: bytes) -> tuple[int, str, bytes]:
    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=raw,
        content_type="application/json",
        headers=headers,
    )
    if response.streaming:
        content = b"".join([part async for part in response.streaming_content])
    else:
        content = response.content
    await client.aclose_all()
    return response.status_code, response.get("Content-Type", ""), content


def check_answer(status: int, content_type: str, content: bytes) -> None:
    assert status < 500, content[:500]
    if status != 200:
        error = json.loads(content)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        return
    if content_type.startswith("text/event-stream"):
        lines = [
            line.removeprefix("data: ")
            for line in content.decode().splitlines()
            if line.startswith("data: ")
        ]
        assert lines[-1] == "[DONE]"
        events = [json.loads(line) for line in lines[:-1]]
        assert all(event.get("object") == "chat.completion.chunk" for event in events)
        return
    completion = json.loads(content)
    assert completion["object"] == "chat.completion"
    assert isinstance(completion["choices"][0]["message"]["content"], str)


@FUZZ
@given(raw=bodies())
def test_no_body_gets_a_500_or_logs_an_error(program, raw, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        status, content_type, content = async_to_sync(exchange)(program, raw)

    event(f"status {status}")
    check_answer(status, content_type, content)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if r.exc_info]
