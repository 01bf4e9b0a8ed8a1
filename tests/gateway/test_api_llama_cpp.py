"""/v1 against the simulator posing as the llama.cpp server (its wire quirks).

tests/interop/test_llama.py meets the real server; these cover the same
shapes in milliseconds: no usage on a stream even when asked for, a first
chunk with a role and no content key, and a prompt over its window refused
with a 400 ``context_length_exceeded`` when plain, or as a 200 stream that
ends without a chunk.
"""

from __future__ import annotations

import pytest

from gateway import client, router
from gateway.models import ApiKey, Endpoint
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens
from tests.gateway.test_api import (  # noqa: F401 - fixtures
    MESSAGES,
    MODEL,
    Program,
    _isolated,
    add_route,
    post,
    read_events,
    records,
)

pytestmark = pytest.mark.django_db(transaction=True)

LLAMA_CPP = Behaviour(
    completion_tokens=8, no_stream_usage=True, bare_role_chunk=True, context_window=50
)
# About 250 estimated tokens: over the simulated window of 50.
TOO_LONG = [{"role": "user", "content": "word " * 200}]


@pytest.fixture
def program(owner) -> Program:
    """Alice's program, with a key of its own."""
    return Program(f"Bearer {ApiKey.generate(owner, 'llama')[1]}")


@pytest.fixture
async def llama_cpp():
    async with SimulatedUpstream(behaviour=LLAMA_CPP) as server:
        endpoint = await add_route("llama", server, 1)
        # Room to retry, so the test sees that an empty stream is not retried.
        endpoint.max_retries, endpoint.backoff_multiplier = 3, 0
        await endpoint.asave(update_fields=["max_retries", "backoff_multiplier"])
        router.forget_routes()
        yield server
        await client.aclose_all()


async def test_a_stream_without_upstream_usage_is_counted_here_and_flagged(
    llama_cpp, program
):
    response = await post(
        program,
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    events = await read_events(response)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert text == "".join(generated_tokens(8))
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] > 0
    (record,) = await records()
    assert record.status == "ok"
    assert record.tokens_estimated is True
    assert record.completion_tokens == usage["completion_tokens"]


async def test_a_plain_answer_keeps_the_upstream_usage(llama_cpp, program):
    response = await post(program, {"model": MODEL, "messages": MESSAGES})

    assert response.json()["usage"]["completion_tokens"] == 8
    (record,) = await records()
    assert (record.completion_tokens, record.tokens_estimated) == (8, False)


async def test_a_prompt_over_the_upstreams_window_gets_context_too_large(
    llama_cpp, program
):
    response = await post(program, {"model": MODEL, "messages": TOO_LONG})

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_too_large", "messages")
    assert "maximum context length is 50 tokens" in error["message"]
    (record,) = await records()
    assert (record.status, record.error_type) == ("error", "APIContextLengthError")


async def test_an_empty_stream_is_a_clear_error_and_not_retried(llama_cpp, program):
    response = await post(
        program, {"model": MODEL, "messages": TOO_LONG, "stream": True}
    )

    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "llama: the stream ended before its first chunk" in message
    assert "context window" in message
    # Asking again would end the same way: one request went upstream.
    assert llama_cpp.stats.chat_requests == 1


async def test_empty_streams_do_not_open_the_circuit(llama_cpp, program):
    for _ in range(4):
        response = await post(
            program, {"model": MODEL, "messages": TOO_LONG, "stream": True}
        )
        assert response.status_code == 503

    # The server answered each time: the next fitting request still reaches it.
    response = await post(program, {"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
    endpoint = await Endpoint.objects.aget(name="llama")
    assert endpoint.consecutive_failures == 0
