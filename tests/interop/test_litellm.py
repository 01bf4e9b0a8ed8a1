"""The LiteLLM proxy as a real upstream: the openai SDK on /v1, and the chat.

One proxy serves the module, on a YAML config of model groups that need no
network: `mock_response` answers (or raises LiteLLM's own errors), and one group
forwards to a simulated upstream behind it, so a 429 with Retry-After and a
broken stream come from a real provider call. Router retries are off, so each
request to LiteLLM is one attempt and our own retries are the ones counted.
"""

# Some fixtures are shared with the gateway's tests, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from chat.generation import registry
from gateway import api, router
from gateway import client as upstream_client
from gateway.models import ApiKey, Endpoint, ModelRoute, UsageRecord
from gateway.simulator import Behaviour, SimulatedUpstream, generated_tokens
from scripts import peers
from tests.chat.test_consumer_streams import connect, frames_until, send, text_of
from tests.gateway.test_api import live_asgi_url, wait_for_records  # noqa: F401
from tests.gateway.test_litellm_wire import retry_waits  # noqa: F401 - fixture
from tests.gateway.usage_support import close_thread_connections, forget_process_state
from tests.interop.conftest import PeerProcess, free_port, require_peer

pytestmark = pytest.mark.django_db(transaction=True)

MASTER_KEY = f"sk-litellm-{secrets.token_hex(16)}"
ANSWER = "Hello from LiteLLM, a mock answer."
MODEL = "house-model"
MESSAGES = [{"role": "user", "content": "Tell me something."}]
# The simulator behind the proxy answers 8 tokens.
FORWARDED_ANSWER = "".join(generated_tokens(8))
CONFIG = """\
model_list:
  - model_name: mock-answer
    litellm_params:
      model: openai/mock-answer
      api_key: unused
      mock_response: "{answer}"
  - model_name: mock-rate-limit
    litellm_params:
      model: openai/mock-rate-limit
      api_key: unused
      mock_response: litellm.RateLimitError
  - model_name: mock-server-error
    litellm_params:
      model: openai/mock-server-error
      api_key: unused
      mock_response: litellm.InternalServerError
  - model_name: mock-context-window
    litellm_params:
      model: openai/mock-context-window
      api_key: unused
      mock_response: litellm.ContextWindowExceededError
  - model_name: forwarded
    litellm_params:
      model: openai/sim-small
      api_key: sk-provider-{provider_key}
      api_base: {behind}
router_settings:
  num_retries: 0
litellm_settings:
  num_retries: 0
general_settings:
  master_key: {master_key}
"""


@pytest.fixture(scope="module")
def behind() -> Iterator[SimulatedUpstream]:
    """The provider behind the proxy's `forwarded` group."""
    server = SimulatedUpstream(behaviour=Behaviour(completion_tokens=8))
    with server.run_in_thread():
        yield server


@pytest.fixture(scope="module")
def litellm(tmp_path_factory, behind) -> Iterator[PeerProcess]:
    """One LiteLLM proxy worker for the module, ready on its liveliness probe."""
    require_peer("litellm")
    workdir = tmp_path_factory.mktemp("litellm")
    config = workdir / "config.yaml"
    config.write_text(
        CONFIG.format(
            answer=ANSWER,
            behind=behind.base_url,
            provider_key=secrets.token_hex(8),
            master_key=MASTER_KEY,
        )
    )
    port = free_port()
    proxy = PeerProcess(
        peers.litellm_argv(config, port), peers.litellm_env(), workdir / "log", port
    )
    try:
        proxy.wait_ready("/health/liveliness")
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(autouse=True)
def _isolated(settings, behind):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    api.forget_keys()
    behind.reset()
    yield
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


def add_route(
    litellm: PeerProcess,
    group: str,
    priority: int = 1,
    *,
    name: str = "litellm",
    api_key: str = MASTER_KEY,
    **fields: Any,
) -> Endpoint:
    """An endpoint on the proxy with the master key, MODEL routed to `group`."""
    endpoint = Endpoint.objects.create(
        name=name,
        base_url=f"{litellm.base_url}/v1",
        api_key=api_key,
        priority=priority,
        timeout=10,
        **{"max_retries": 1, **fields},
    )
    ModelRoute.objects.create(
        model_name=MODEL, endpoint=endpoint, upstream_model=group, priority=priority
    )
    router.forget_routes()
    return endpoint


@pytest.fixture
def sdk(owner, live_asgi_url):
    """The official openai SDK on our /v1, with Alice's key, retrying nothing."""
    openai = pytest.importorskip("openai")
    _, raw = ApiKey.generate(owner, "sdk")
    return openai.OpenAI(base_url=live_asgi_url, api_key=raw, max_retries=0)


def text_of_chunks(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- /v1 through the openai SDK -----------------------------------------------------


def test_a_plain_answer_and_its_usage_come_through(litellm, sdk):
    add_route(litellm, "mock-answer")

    answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL
    [record] = wait_for_records(1)
    assert (record.status, record.endpoint_name) == ("ok", "litellm")
    assert record.upstream_model == "mock-answer"
    # LiteLLM's own counts, not ours.
    assert not record.tokens_estimated
    assert (record.prompt_tokens, record.completion_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    assert answer.usage.completion_tokens > 0


def test_a_streamed_answer_ends_with_litellms_usage_when_asked(litellm, sdk):
    add_route(litellm, "mock-answer")

    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert text_of_chunks(chunks) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    [record] = wait_for_records(1)
    assert record.status == "ok"
    assert not record.tokens_estimated
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_a_stream_without_usage_from_litellm_is_recorded_as_estimated(litellm, sdk):
    # An endpoint not asked for stream usage: LiteLLM then sends none.
    add_route(litellm, "mock-answer", supports_stream_usage=False)

    chunks = list(
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    )

    assert text_of_chunks(chunks) == ANSWER
    assert all(c.usage is None for c in chunks)
    [record] = wait_for_records(1)
    assert record.status == "ok"
    assert record.tokens_estimated
    assert record.completion_tokens > 0


def test_litellms_refusal_is_a_clear_error_without_its_key(litellm, sdk):
    openai = pytest.importorskip("openai")
    add_route(litellm, "mock-context-window")

    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    message = refused.value.body["message"]
    assert "context window exceeded" in message
    assert MASTER_KEY not in str(refused.value.body)
    [record] = wait_for_records(1)
    assert record.status == "error"
    assert "context window exceeded" in record.error_message
    assert MASTER_KEY not in record.error_message
    # A request that is wrong is not sent again.
    assert record.attempts == 1


def test_a_wrong_key_for_litellm_fails_over_and_is_never_shown(litellm, sdk):
    wrong = f"sk-wrong-{secrets.token_hex(8)}"
    add_route(litellm, "mock-answer", api_key=wrong)
    add_route(litellm, "mock-answer", 2, name="litellm-backup")

    answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert answer.choices[0].message.content == ANSWER
    assert answer.model_extra["llmsite"]["endpoint"] == "litellm-backup"
    [record] = wait_for_records(1)
    assert record.endpoint_name == "litellm-backup"
    [hop] = record.fallback_hops
    assert (hop["endpoint"], hop["reason"]) == ("litellm", "endpoint_rejected")
    assert wrong not in str(record.trail) + str(record.fallback_hops)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_429_from_litellm_fails_over_to_the_second_route(litellm, sdk, stream):
    add_route(litellm, "mock-rate-limit")
    add_route(litellm, "mock-answer", 2, name="litellm-backup")

    if stream:
        chunks = list(
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        )
        text = text_of_chunks(chunks)
        summary = chunks[0].model_extra["llmsite"]
    else:
        answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        text = answer.choices[0].message.content
        summary = answer.model_extra["llmsite"]

    assert text == ANSWER
    [fallback] = summary["fallbacks"]
    assert (fallback["from"], fallback["to"], fallback["status_code"]) == (
        "litellm",
        "litellm-backup",
        429,
    )
    [record] = wait_for_records(1)
    assert (record.status, record.endpoint_name) == ("ok", "litellm-backup")
    [hop] = record.fallback_hops
    assert (hop["endpoint"], hop["reason"], hop["status_code"]) == (
        "litellm",
        "rate_limited",
        429,
    )


def test_a_429_with_nowhere_else_to_go_ends_with_a_clear_error(litellm, sdk):
    openai = pytest.importorskip("openai")
    add_route(litellm, "mock-rate-limit", max_retries=1)

    with pytest.raises(openai.APIStatusError) as failed:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert failed.value.status_code == 503
    assert failed.value.code == "all_endpoints_unavailable"
    message = failed.value.body["message"]
    assert message.startswith(
        "Every endpoint for 'house-model' is unavailable (last: litellm: rate limited"
    )
    assert message.endswith("; retry in 10 s.")
    # LiteLLM named no time: the gateway's own default.
    assert failed.value.response.headers["retry-after"] == "10"
    assert MASTER_KEY not in failed.value.response.text
    [record] = wait_for_records(1)
    assert record.status == "error"
    assert [(step["outcome"], step["reason"]) for step in record.trail] == [
        ("failed", "rate_limited")
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_5xx_from_litellm_fails_over(litellm, sdk, stream):
    add_route(litellm, "mock-server-error")
    add_route(litellm, "mock-answer", 2, name="litellm-backup")

    answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)

    text = text_of_chunks(list(answer)) if stream else answer.choices[0].message.content
    assert text == ANSWER
    [record] = wait_for_records(1)
    assert (record.status, record.endpoint_name) == ("ok", "litellm-backup")
    [hop] = record.fallback_hops
    assert (hop["endpoint"], hop["reason"], hop["status_code"]) == (
        "litellm",
        "server_error",
        500,
    )


def test_a_stream_litellm_breaks_off_continues_on_the_second_route(
    litellm, behind, sdk
):
    add_route(litellm, "forwarded")
    add_route(litellm, "mock-answer", 2, name="litellm-backup")
    # The provider drops the connection after 3 tokens; LiteLLM says so in an
    # error event with a string code, and sends no [DONE].
    behind.set_behaviour(
        Behaviour(completion_tokens=8, fault="drop", fault_after_tokens=3)
    )

    chunks = list(
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    )

    text = text_of_chunks(chunks)
    assert text.startswith("".join(generated_tokens(3)))
    assert text.endswith(ANSWER)
    [record] = wait_for_records(1)
    assert (record.status, record.endpoint_name) == ("ok", "litellm-backup")
    [hop] = record.fallback_hops
    assert (hop["endpoint"], hop["mid_stream"], hop["status_code"]) == (
        "litellm",
        True,
        500,
    )


# --- The chat websocket -------------------------------------------------------------


@pytest.fixture
async def alice_tab(owner):
    client = Client()
    await client.aforce_login(owner)
    tab = await connect(client.cookies["sessionid"].value)
    yield tab
    await tab.disconnect()
    for generation in registry.running():
        generation.stop()
        await generation.wait()
    await registry.aclose()
    await upstream_client.aclose_all()


async def test_a_chat_answer_from_litellm_streams_and_is_recorded(litellm, alice_tab):
    await sync_to_async(add_route)(litellm, "mock-answer")

    await send(alice_tab)
    frames = await frames_until(alice_tab, "done", "error")

    done = frames[-1]
    assert done["type"] == "done"
    assert text_of(frames) == ANSWER
    assert done["endpoint"] == "litellm"
    assert done["usage"]["estimated"] is False
    record = await UsageRecord.objects.aget()
    assert record.status == "ok"
    assert record.completion_tokens == done["usage"]["completion_tokens"]


async def test_a_chat_waits_out_litellms_forwarded_retry_after(
    litellm, behind, alice_tab, retry_waits
):
    await sync_to_async(add_route)(litellm, "forwarded", max_retries=2)
    # LiteLLM passes the provider's Retry-After on as llm_provider-retry-after.
    behind.script(Behaviour(fault="status", fault_status=429, retry_after=3))

    await send(alice_tab)
    frames = await frames_until(alice_tab, "done", "error")

    assert retry_waits == [3.0]
    status = next(f for f in frames if f["type"] == "status")
    assert status["text"] == "waiting for litellm's rate limit (3 s)…"
    assert frames[-1]["type"] == "done"
    assert text_of(frames) == FORWARDED_ANSWER
    record = await UsageRecord.objects.aget()
    assert (record.status, record.attempts) == ("ok", 2)
    assert [(step["outcome"], step.get("reason")) for step in record.trail] == [
        ("failed", "rate_limited"),
        ("ok", None),
    ]
