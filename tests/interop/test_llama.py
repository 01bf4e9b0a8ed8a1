"""The llama.cpp server on SmolLM2 as a real upstream, through /v1 and the chat.

Programs reach it with the official `openai` SDK against our /v1 served live,
people through the chat websocket. What this peer does differently from the
simulator is handled by the gateway, and the simulator can pose as it
(`Behaviour.no_stream_usage`, `Behaviour.context_window`), so
tests/gateway/test_api_llama_cpp.py covers the same shapes fast: no usage on
a stream even when asked for, a role-only first chunk, and a prompt over its
window refused with a 400 ``context_length_exceeded``, or, streamed, with a
200 that ends before its first chunk.

SmolLM2 answers at about 130 tokens per second on two cores and reads a
prompt at about the same pace, so every request here asks for a few tokens.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from chat.models import Conversation, Message, MessageRole, MessageStatus
from gateway import router
from gateway.models import (
    ApiKey,
    Endpoint,
    EndpointStatus,
    ModelRoute,
    ProbeMode,
    UsageRecord,
    UsageStatus,
)
from monitoring import probes
from scripts import peers
from tests.chat.test_consumer_streams import (  # noqa: F401 - fixture
    _no_answer_left_running,
    connect,
    frames_until,
    session_cookie,
    text_of,
)
from tests.gateway.test_api import live_asgi_url, wait_for_records  # noqa: F401
from tests.gateway.usage_support import close_thread_connections

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = peers.SMOLLM2_ALIAS
WINDOW = peers.SMOLLM2_CONTEXT
QUESTION = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture
def llama(llama_server, settings) -> Endpoint:
    """The llama.cpp server as the only route for `smollm2`, on its real window."""
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    endpoint = Endpoint.objects.create(
        name="llama",
        base_url=f"{llama_server.base_url}/v1",
        max_retries=1,
        probe_mode=ProbeMode.MODELS,
    )
    ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model=MODEL,
        context_window=WINDOW,
        max_output_tokens=256,
    )
    router.forget_routes()
    yield endpoint
    close_thread_connections()


@pytest.fixture
def sdk(owner, live_asgi_url):  # noqa: F811
    """The official OpenAI client of Alice, on our /v1."""
    openai = pytest.importorskip("openai")
    _, raw = ApiKey.generate(owner, "interop")
    return openai.OpenAI(base_url=live_asgi_url, api_key=raw, max_retries=0)


# --- /v1 with the official SDK -----------------------------------------------------


def test_a_plain_answer_carries_llamas_own_usage(llama, sdk):
    answer = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)

    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 8
    [record] = wait_for_records(1)
    assert record.status == UsageStatus.OK
    assert record.endpoint_name == "llama"
    # llama.cpp counts a plain answer itself: the record keeps its numbers.
    assert record.tokens_estimated is False
    assert (record.prompt_tokens, record.completion_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )


def test_a_streamed_answer_is_counted_here_and_flagged_estimated(llama, sdk):
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    # llama.cpp sends no usage on a stream, even when asked: ours stands in.
    assert chunks[-1].usage.completion_tokens > 0
    [record] = wait_for_records(1)
    assert record.status == UsageStatus.OK
    assert record.tokens_estimated is True
    assert record.completion_tokens == chunks[-1].usage.completion_tokens
    # Asking for stream usage is harmless to llama.cpp: it is not turned off.
    llama.refresh_from_db()
    assert llama.supports_stream_usage is True


def test_a_prompt_over_the_real_window_is_a_clear_error(llama, llama_server, sdk):
    openai = pytest.importorskip("openai")
    # Digits are a token each for SmolLM2 but four to a token in our estimate:
    # the gateway thinks this fits, llama.cpp knows it does not.
    digits = " ".join("1234" for _ in range(900))
    messages = [{"role": "user", "content": digits}]

    with pytest.raises(openai.BadRequestError) as plain:
        sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    with pytest.raises(openai.APIError) as streamed:
        list(
            sdk.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, stream=True
            )
        )

    # Our code for a conversation that does not fit, with llama.cpp's words.
    assert plain.value.code == "context_too_large"
    assert "maximum context length is 2048 tokens" in plain.value.message
    # A stream over the window ends empty with a 200: the error says what that
    # means, and the route is not tried again.
    assert "ended before its first chunk" in streamed.value.message
    assert "context window" in streamed.value.message
    records = wait_for_records(2)
    assert sorted((r.status, r.error_type) for r in records) == [
        (UsageStatus.ERROR, "APIContextLengthError"),
        (UsageStatus.ERROR, "AllEndpointsUnavailable"),
    ]


# --- The chat websocket --------------------------------------------------------------


async def ask(tab, content: str, **fields: Any) -> list[dict[str, Any]]:
    """Send a message to SmolLM2 and read the frames up to the end of its answer."""
    await tab.send_json_to(
        {"type": "send", "conversation_id": None, "content": content, "model": MODEL}
        | fields
    )
    # A long prompt takes SmolLM2 seconds to read before its first token.
    received = []
    while not received or received[-1]["type"] not in ("done", "error"):
        received.append(await tab.receive_json_from(timeout=30))
    return received


SHORT = {"settings": {"max_tokens": 8}}


async def test_the_chat_streams_a_real_answer_with_estimated_usage(llama, owner):
    tab = await connect(await sync_to_async(session_cookie)(owner))

    frames = await ask(tab, "Name one colour.", **SHORT)

    done = frames[-1]
    assert done["type"] == "done", frames
    assert text_of(frames).strip()
    assert done["endpoint"] == "llama"
    assert done["usage"]["estimated"] is True
    record = await UsageRecord.objects.aget()
    assert (record.status, record.tokens_estimated) == (UsageStatus.OK, True)
    assert record.completion_tokens == done["usage"]["completion_tokens"] > 0
    await tab.disconnect()


def disconnects(server) -> int:
    """How many streams llama.cpp saw its client leave, by its own log."""
    return server.log.read_text(errors="replace").count("Disconnected from client")


async def test_stop_cancels_llamas_generation_and_the_record_says_so(
    llama, llama_server, owner
):
    # Room for a long answer: about ten seconds if it ran to the end.
    await ModelRoute.objects.filter(endpoint=llama).aupdate(max_output_tokens=1500)
    router.forget_routes()
    before = disconnects(llama_server)
    tab = await connect(await sync_to_async(session_cookie)(owner))
    await tab.send_json_to(
        {
            "type": "send",
            "conversation_id": None,
            "content": "Write a long story about a lighthouse keeper.",
            "model": MODEL,
            "settings": {"max_tokens": 1500},
        }
    )
    frames = await frames_until(tab, "delta")

    await tab.send_json_to(
        {"type": "stop", "conversation_id": frames[0]["conversation_id"]}
    )
    frames += await frames_until(tab, "done")
    # llama.cpp serves one request at a time: a quick answer now means the
    # stopped one no longer holds the model.
    started = time.monotonic()
    follow_up = await ask(tab, "Name one colour.", **SHORT)
    waited = time.monotonic() - started

    assert frames[-1]["stopped"] is True
    assert follow_up[-1]["type"] == "done"
    assert waited < 3
    assert disconnects(llama_server) == before + 1
    stopped = await Message.objects.filter(role=MessageRole.ASSISTANT).aearliest(
        "created_at"
    )
    assert stopped.status == MessageStatus.PARTIAL
    assert 0 < len(stopped.content) < 2000
    record = await UsageRecord.objects.aget(id=stopped.usage_id)
    assert record.status == UsageStatus.CANCELLED
    assert record.tokens_estimated is True
    assert 0 < record.completion_tokens < 1500
    await tab.disconnect()


async def test_a_conversation_far_over_the_window_is_fitted_and_answered(llama, owner):
    # Half the window for the answer halves the prompt SmolLM2 has to read.
    await ModelRoute.objects.filter(endpoint=llama).aupdate(max_output_tokens=1024)
    router.forget_routes()
    conversation = await Conversation.objects.acreate(
        user=owner, title="Long", model_name=MODEL, max_tokens=4
    )
    # About 5,000 tokens of earlier turns: more than twice SmolLM2's window.
    for n in range(24):
        for role, text in (
            (MessageRole.USER, f"Question {n}: " + "tell me more " * 40),
            (MessageRole.ASSISTANT, f"Answer {n}: " + "here is more " * 40),
        ):
            await Message.objects.acreate(
                conversation=conversation,
                role=role,
                content=text,
                status=MessageStatus.COMPLETE,
            )
    tab = await connect(await sync_to_async(session_cookie)(owner))

    frames = await ask(tab, "Name one colour.", conversation_id=str(conversation.id))

    assert frames[-1]["type"] == "done", frames
    context = next(f for f in frames if f["type"] == "context")
    assert context["status"]["window"] == WINDOW
    assert context["status"]["dropped_count"] > 0
    assert context["status"]["tokens"] <= context["status"]["limit"] < WINDOW
    assert text_of(frames).strip()
    await tab.disconnect()


# --- Health probes -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ProbeMode.MODELS, ProbeMode.COMPLETION])
def test_the_monitor_sees_llama_connected(llama, mode):
    Endpoint.objects.filter(pk=llama.pk).update(probe_mode=mode, probe_model=MODEL)

    report = async_to_sync(probes.run_round)(force=True)

    assert report.probed == 1
    llama.refresh_from_db()
    assert llama.status in (EndpointStatus.CONNECTED, EndpointStatus.SLOW)
    assert llama.last_latency_ms is not None
