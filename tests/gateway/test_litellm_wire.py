"""LiteLLM's wire quirks, posed by the simulated upstream, through /v1.

The interop tests (tests/interop/test_litellm.py) meet them on the real proxy;
these keep them covered in the fast suite.
"""

# The fixtures are shared with test_api, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import json

import httpx
import pytest

from gateway import client, router
from gateway.simulator import Behaviour, generated_tokens
from tests.gateway.test_api import (  # noqa: F401 - fixtures
    ANSWER,
    MESSAGES,
    MODEL,
    _isolated,
    add_route,
    alice,
    alice_key,
    backup,
    post,
    primary,
    read_events,
    records,
    route,
    two_routes,
)
from tests.gateway.test_api_failover import content, stream
from tests.gateway.test_client import make_config

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def retry_waits(monkeypatch) -> list[float]:
    """The router's waits before another attempt, recorded and not slept."""
    waits: list[float] = []
    from_settings = router.RetryPolicy.from_settings

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(
        router.RetryPolicy,
        "from_settings",
        lambda **overrides: from_settings(sleep=sleep, random=lambda: 0.0, **overrides),
    )
    return waits


async def test_sparse_chunks_and_a_usage_chunk_with_a_choice_stream_whole(
    route, primary, alice
):
    primary.set_behaviour(
        Behaviour(completion_tokens=8, sparse_chunks=True, usage_chunk_with_choice=True)
    )

    response = await post(
        alice,
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    events = await read_events(response)
    chunks = events[:-1]
    assert content(events) == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # Our usage chunk has OpenAI's shape whatever upstream's had.
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    [record] = await records()
    assert (record.status, record.completion_tokens) == ("ok", 8)
    assert not record.tokens_estimated


async def test_a_sparse_plain_answer_keeps_its_usage(route, primary, alice):
    primary.set_behaviour(Behaviour(completion_tokens=8, sparse_chunks=True))

    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    body = response.json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["usage"]["completion_tokens"] == 8
    [record] = await records()
    assert not record.tokens_estimated


async def test_a_retry_after_forwarded_from_the_provider_is_waited_out(
    primary, alice, retry_waits
):
    endpoint = await add_route("primary", primary, 1)
    endpoint.max_retries = 2
    await endpoint.asave(update_fields=["max_retries"])
    router.forget_routes()
    primary.script(
        Behaviour(
            fault="status",
            fault_status=429,
            retry_after=3,
            provider_retry_after=True,
            string_error_code=True,
        )
    )

    response = await post(alice, {"model": MODEL, "messages": MESSAGES})

    assert response.status_code == 200
    # Not the backoff of 2 s the endpoint would get without a Retry-After.
    assert retry_waits == [3.0]
    [record] = await records()
    assert (record.status, record.attempts) == ("ok", 2)
    await client.aclose_all()


async def test_an_error_event_with_a_string_code_fails_over_mid_stream(
    two_routes, primary, alice
):
    primary.set_behaviour(
        Behaviour(
            completion_tokens=8,
            fault="drop",
            fault_after_tokens=3,
            drop_as_error_event=True,
        )
    )

    _, events = await stream(alice)

    assert content(events).startswith("".join(generated_tokens(3)))
    [record] = await records()
    assert (record.status, record.endpoint_name) == ("ok", "backup")
    [hop] = record.fallback_hops
    assert (hop["endpoint"], hop["mid_stream"], hop["status_code"]) == (
        "primary",
        True,
        500,
    )


def test_litellms_400_for_a_key_it_cannot_look_up_is_the_endpoints_refusal():
    config = make_config()
    body = {
        "error": {
            "message": "No connected db.",
            "type": "no_db_connection",
            "param": None,
            "code": "400",
        }
    }

    error = client.status_error(config, 400, httpx.Headers(), json.dumps(body).encode())

    assert isinstance(error, client.APIEndpointError)
    assert error.may_fail_over and not error.permanent
    assert "No connected db." in error.message


@pytest.mark.parametrize("error_type", [["no_db_connection"], {"a": 1}, 400, None])
def test_an_error_type_that_is_not_a_string_is_ignored(error_type):
    body = {"error": {"message": "No connected db.", "type": error_type}}

    error = client.status_error(
        make_config(), 400, httpx.Headers(), json.dumps(body).encode()
    )

    assert isinstance(error, client.APIRequestError)
