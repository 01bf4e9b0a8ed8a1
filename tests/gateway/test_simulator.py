"""The simulated upstream, driven over a real socket with httpx."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.simulator import (
    Behaviour,
    SimulatedUpstream,
    embedding_vector,
    generated_tokens,
    parse_directives,
)

ROOT = Path(__file__).resolve().parents[2]


def chat(content: str = "Hello", **extra: object) -> dict[str, object]:
    return {
        "model": "sim-small",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": content},
        ],
        **extra,
    }


@pytest.fixture
async def upstream() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream() as server:
        yield server


@pytest.fixture
async def client(upstream: SimulatedUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=5) as http:
        yield http


async def read_stream(
    client: httpx.AsyncClient, body: dict[str, object], **kwargs: object
) -> list[str]:
    """Return the payloads of a streamed response's data lines."""
    async with client.stream("POST", "/chat/completions", json=body, **kwargs) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [
            line.removeprefix("data: ")
            async for line in r.aiter_lines()
            if line.startswith("data: ")
        ]


def content_of(payloads: list[str]) -> str:
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    return "".join(
        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
    )


# Shapes


async def test_models_are_listed_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim-small", "sim-large", "sim-embed"]
    assert all(m["object"] == "model" for m in body["data"])
    assert all(m["owned_by"] == "simulator" for m in body["data"])
    assert all(isinstance(m["created"], int) for m in body["data"])


async def test_plain_completion_has_openai_shape_and_usage(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/chat/completions", json=chat("x" * 40, max_tokens=500)
    )

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "sim-small"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "".join(generated_tokens(64))
    # 40 + 9 characters in two messages: 40 // 4 + 4 + 9 // 4 + 4.
    assert body["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 64,
        "total_tokens": 84,
    }


async def test_default_reply_is_markdown_with_a_complete_code_block(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(completion_tokens=80))

    response = await client.post("/chat/completions", json=chat())

    content = response.json()["choices"][0]["message"]["content"]
    assert "**llmsite**" in content
    assert content.count("```") == 2
    assert response.json()["usage"]["completion_tokens"] == 80


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/chat/completions", json=chat(max_tokens=5))

    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["message"]["content"] == "".join(generated_tokens(5))


async def test_stream_sends_role_deltas_stop_then_done(
    client: httpx.AsyncClient,
) -> None:
    payloads = await read_stream(client, chat(stream=True))

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    # One chunk per token, between the role chunk and the final one.
    assert len(chunks) == 64 + 2
    assert content_of(payloads) == "".join(generated_tokens(64))
    assert all("usage" not in c for c in chunks)


async def test_stream_ends_with_a_usage_chunk_only_when_asked(
    client: httpx.AsyncClient,
) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})

    payloads = await read_stream(client, body)

    usage_chunk = json.loads(payloads[-2])
    assert usage_chunk["choices"] == []
    # "Hello" and "Be brief.": 5 // 4 + 4 + 9 // 4 + 4.
    assert usage_chunk["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 64,
        "total_tokens": 75,
    }
    assert json.loads(payloads[-3])["choices"][0]["finish_reason"] == "stop"
    assert payloads[-1] == "[DONE]"


async def test_echo_answers_with_the_last_user_message(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(echo=True))

    payloads = await read_stream(client, chat("Say *this*\nback, please", stream=True))

    assert content_of(payloads) == "Say *this*\nback, please"


async def test_echo_settings_answers_with_the_system_prompt_and_sampling(
    client: httpx.AsyncClient,
) -> None:
    request = chat("/sim echo_settings\nHi", stream=True, temperature=0.3, top_p=1)

    payloads = await read_stream(client, request)

    assert content_of(payloads) == (
        "system: Be brief.\ntemperature: 0.3\ntop_p: 1\nmax_tokens: (none)"
    )


# Pacing: lower bounds only, upper bounds flake on a busy machine.


async def test_ttft_delays_the_first_chunk(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(ttft=0.2, completion_tokens=3))
    started = time.monotonic()
    async with client.stream(
        "POST", "/chat/completions", json=chat(stream=True)
    ) as response:
        headers_at = time.monotonic() - started
        first = await anext(response.aiter_lines())
        first_at = time.monotonic() - started

    assert first.startswith("data: ")
    assert first_at >= 0.2
    assert first_at - headers_at >= 0.15


async def test_tokens_per_second_paces_the_stream(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(tokens_per_second=20, completion_tokens=6))
    started = time.monotonic()

    payloads = await read_stream(client, chat(stream=True))

    # Six tokens at 20/s: five gaps of 50 ms after the first.
    assert time.monotonic() - started >= 0.25
    assert len(payloads) == 6 + 3


async def test_latency_delays_the_response_headers(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(latency=0.2))
    started = time.monotonic()

    response = await client.get("/models")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_plain_answer_waits_as_long_as_the_stream_would(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(
        Behaviour(ttft=0.1, tokens_per_second=50, completion_tokens=11)
    )
    started = time.monotonic()

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.1 + 10 / 50


# Faults


async def test_status_fault_answers_with_an_openai_error_and_retry_after(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="status", fault_status=429, retry_after=1.5))

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1500"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


async def test_status_fault_without_retry_after_sends_no_header(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await client.post("/chat/completions", json=chat(stream=True))

    assert response.status_code == 503
    assert "retry-after" not in response.headers
    assert response.json()["error"]["type"] == "server_error"


async def test_drop_closes_the_stream_after_the_given_tokens(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="drop", fault_after_tokens=3))
    lines = []

    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST", "/chat/completions", json=chat(stream=True)
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))

    # The role chunk and three tokens arrived, then the connection closed.
    assert len(lines) == 4
    assert content_of(lines) == "".join(generated_tokens(3))


async def test_drop_on_a_plain_request_closes_before_headers(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="drop"))

    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=chat())


async def test_malformed_stream_sends_a_non_json_data_line(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="malformed", fault_after_tokens=2))

    payloads = await read_stream(client, chat(stream=True))

    garbage = payloads[3]
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbage)
    assert content_of(payloads[:3]) == "".join(generated_tokens(2))


async def test_malformed_plain_answer_is_a_200_that_is_not_json(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="malformed"))

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_stall_holds_the_stream_until_the_client_times_out(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="stall", fault_after_tokens=2))
    lines = []

    with pytest.raises(httpx.ReadTimeout):
        async with client.stream(
            "POST", "/chat/completions", json=chat(stream=True), timeout=0.3
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)

    assert len(lines) == 3
    await upstream.wait_for_disconnects(1, timeout=2)
    assert upstream.stats.open_streams == 0


async def test_stall_on_a_plain_request_sends_no_headers(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="stall"))

    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=chat(), timeout=0.3)

    await upstream.wait_for_disconnects(1, timeout=2)


async def test_reject_stream_options_refuses_only_requests_that_send_them(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="reject_stream_options"))
    asked = chat(stream=True, stream_options={"include_usage": True})

    refused = await client.post("/chat/completions", json=asked)
    payloads = await read_stream(client, chat(stream=True))

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "stream_options"
    assert payloads[-1] == "[DONE]"


# Selecting behaviour


async def test_script_is_used_once_per_chat_request_in_order(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.script(
        Behaviour(fault="status", fault_status=503),
        Behaviour(reply="second"),
    )

    await client.get("/models")  # not a chat request: leaves the script alone
    first = await client.post("/chat/completions", json=chat())
    second = await client.post("/chat/completions", json=chat())
    third = await client.post("/chat/completions", json=chat())

    assert first.status_code == 503
    assert second.json()["choices"][0]["message"]["content"] == "second"
    assert third.json()["usage"]["completion_tokens"] == 64
    assert upstream.scripted == 0


async def test_directive_sets_a_fault_for_that_request(
    client: httpx.AsyncClient,
) -> None:
    message = "Hi\n/sim fault=status status=503 retry_after=1"

    faulty = await client.post("/chat/completions", json=chat(message))
    normal = await client.post("/chat/completions", json=chat("Hi"))

    assert faulty.status_code == 503
    assert faulty.headers["retry-after"] == "1"
    assert normal.status_code == 200


async def test_directive_reply_is_sent_verbatim_and_the_line_is_not_echoed(
    client: httpx.AsyncClient,
) -> None:
    html = '/sim reply="<img src=x onerror=alert(1)>\\n**done**"'
    echo = "/sim echo\nkeep this line"

    replied = await client.post("/chat/completions", json=chat(html))
    echoed = await read_stream(client, chat(echo, stream=True))

    content = replied.json()["choices"][0]["message"]["content"]
    assert content == "<img src=x onerror=alert(1)>\n**done**"
    assert content_of(echoed) == "keep this line"


async def test_directive_with_times_lets_a_retry_succeed(
    client: httpx.AsyncClient,
) -> None:
    body = chat("Retry me\n/sim fault=status status=503 times=1")

    first = await client.post("/chat/completions", json=body)
    retry = await client.post("/chat/completions", json=body)

    assert first.status_code == 503
    assert retry.status_code == 200


async def test_directive_with_prefix_applies_to_that_endpoint_only(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    body = chat("Fall back\n/sim fault=status status=500 prefix=/a")

    primary = await client.post(
        upstream.base_url_for("/a") + "/chat/completions", json=body
    )
    fallback = await client.post(
        upstream.base_url_for("b") + "/chat/completions", json=body
    )

    assert primary.status_code == 500
    assert fallback.status_code == 200


async def test_bad_directive_is_refused_with_a_message_naming_it(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/chat/completions", json=chat("/sim fault=explode"))

    assert response.status_code == 400
    assert "fault=explode" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("text", "overrides", "rest"),
    [
        ("/sim tps=20 ttft=0.5", {"tokens_per_second": 20.0, "ttft": 0.5}, ""),
        ("a\n  /sim echo  \nb", {"echo": True}, "a\nb"),
        ("/sim fault=none after=3", {"fault": None, "fault_after_tokens": 3}, ""),
        ("/sim reply='two words'", {"reply": "two words"}, ""),
        ("/simulate this", None, "/simulate this"),
    ],
)
def test_directive_syntax(
    text: str, overrides: dict[str, object] | None, rest: str
) -> None:
    directives, remaining = parse_directives(text)

    assert [d.overrides for d in directives] == ([overrides] if overrides else [])
    assert remaining == rest


@pytest.mark.parametrize(
    "line",
    [
        "/sim colour=red",
        "/sim tps=fast",
        "/sim reply='open",
        "/sim times=0",
        "/sim status=200",
    ],
)
def test_directive_syntax_errors_are_reported(line: str) -> None:
    with pytest.raises(ValueError, match="bad /sim directive"):
        parse_directives(line)


async def test_header_overrides_the_default_for_one_request(
    client: httpx.AsyncClient,
) -> None:
    header = {"X-Sim-Behaviour": '{"reply": "from the header", "tokens": 3}'}

    overridden = await client.post("/chat/completions", json=chat(), headers=header)
    normal = await client.post("/chat/completions", json=chat())

    assert overridden.json()["choices"][0]["message"]["content"] == "from the header"
    assert normal.json()["usage"]["completion_tokens"] == 64


async def test_directive_wins_over_header(client: httpx.AsyncClient) -> None:
    header = {"X-Sim-Behaviour": '{"reply": "header"}'}

    response = await client.post(
        "/chat/completions", json=chat("/sim reply=directive"), headers=header
    )

    assert response.json()["choices"][0]["message"]["content"] == "directive"


async def test_control_endpoint_sets_the_default_and_reports_stats(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    root = upstream.root_url

    set_response = await client.post(
        f"{root}/_sim/behaviour", json={"reply": "rescripted"}
    )
    answer = await client.post("/chat/completions", json=chat())
    stats = (await client.get(f"{root}/_sim/stats")).json()
    await client.post(f"{root}/_sim/reset")
    after_reset = await client.post("/chat/completions", json=chat())

    assert set_response.json()["reply"] == "rescripted"
    assert answer.json()["choices"][0]["message"]["content"] == "rescripted"
    assert stats["requests"] == 1
    assert stats["chat_requests"] == 1
    assert stats["open_streams"] == 0
    assert after_reset.json()["usage"]["completion_tokens"] == 64


async def test_control_endpoint_queues_a_script_and_refuses_bad_fields(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    root = upstream.root_url

    queued = await client.post(
        f"{root}/_sim/script", json=[{"fault": "status", "status": 429}, {}]
    )
    refused = await client.post(f"{root}/_sim/behaviour", json={"latncy": 1})
    first = await client.post("/chat/completions", json=chat())

    assert queued.json() == {"queued": 2}
    assert refused.status_code == 400
    assert "latncy" in refused.json()["error"]["message"]
    assert first.status_code == 429


async def test_any_path_prefix_poses_as_its_own_endpoint(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="/e/17")

    down = await client.get(upstream.base_url_for("/e/17") + "/models")
    up = await client.get(upstream.base_url_for("/e/18") + "/models")
    chat_up = await client.post(
        upstream.root_url + "/e/18/v1/chat/completions", json=chat()
    )

    assert down.status_code == 503
    assert up.json()["data"][0]["id"] == "sim-small"
    assert chat_up.status_code == 200
    assert upstream.requests[-1].path == "/e/18/v1/chat/completions"


async def test_unknown_path_model_and_bad_json_get_openai_errors(
    client: httpx.AsyncClient,
) -> None:
    unknown_path = await client.get("/images/generations")
    unknown_model = await client.post(
        "/chat/completions", json={**chat(), "model": "gpt-9"}
    )
    bad_json = await client.post("/chat/completions", content=b"{nope")

    assert unknown_path.status_code == 404
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["code"] == "model_not_found"
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"


async def test_api_key_is_required_when_configured() -> None:
    async with (
        SimulatedUpstream(api_key="sk-sim") as upstream,
        httpx.AsyncClient(base_url=upstream.base_url) as client,
    ):
        missing = await client.get("/models")
        wrong = await client.get("/models", headers={"Authorization": "Bearer no"})
        right = await client.post(
            "/chat/completions",
            json=chat(),
            headers={"Authorization": "Bearer sk-sim"},
        )

    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    assert "sk-sim" not in wrong.text
    assert right.status_code == 200
    assert upstream.requests[-1].headers["authorization"] == "[redacted]"


# Connections


async def test_keep_alive_serves_many_requests_on_one_connection(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    for _ in range(5):
        assert (await client.post("/chat/completions", json=chat())).status_code == 200
    await read_stream(client, chat(stream=True))

    assert upstream.stats.connections == 1
    assert upstream.stats.requests == 6


async def test_a_client_closing_a_stream_early_is_counted(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(tokens_per_second=20, completion_tokens=100))

    async with client.stream(
        "POST", "/chat/completions", json=chat(stream=True)
    ) as response:
        await anext(response.aiter_lines())
        assert upstream.stats.open_streams == 1

    await upstream.wait_for_disconnects(1, timeout=2)
    assert upstream.stats.open_streams == 0
    assert upstream.stats.streams_completed == 0


async def test_a_client_leaving_during_slow_headers_is_counted(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(Behaviour(latency=30))

    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=chat(), timeout=0.2)

    await upstream.wait_for_disconnects(1, timeout=2)


async def test_waiting_for_disconnects_that_never_come_times_out(
    upstream: SimulatedUpstream,
) -> None:
    with pytest.raises(TimeoutError, match="saw 0"):
        await upstream.wait_for_disconnects(1, timeout=0.05)


async def test_stop_ends_open_streams_and_their_connections() -> None:
    upstream = SimulatedUpstream(behaviour=Behaviour(fault="stall"))
    await upstream.start()
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=5) as client:
        request = client.build_request(
            "POST", "/chat/completions", json=chat(stream=True)
        )
        response = await client.send(request, stream=True)
        assert upstream.stats.open_streams == 1

        await upstream.stop()

        with pytest.raises(httpx.TransportError):
            await response.aread()
    assert upstream.stats.open_streams == 0
    assert upstream.stats.open_connections == 0


async def test_recorded_requests_are_bounded() -> None:
    async with (
        SimulatedUpstream(max_recorded=3) as upstream,
        httpx.AsyncClient(base_url=upstream.base_url) as client,
    ):
        for n in range(5):
            await client.post("/chat/completions", json=chat(f"message {n}"))

    recorded = upstream.requests
    assert [r.json["messages"][1]["content"] for r in recorded] == [
        "message 2",
        "message 3",
        "message 4",
    ]


# Running it from sync code and as a command


def test_run_in_thread_serves_sync_clients_and_takes_behaviour_from_them() -> None:
    upstream = SimulatedUpstream()

    with upstream.run_in_thread(), httpx.Client(base_url=upstream.base_url) as client:
        upstream.script(Behaviour(reply="scripted from the test thread"))
        scripted = client.post("/chat/completions", json=chat())
        upstream.set_behaviour(Behaviour(tokens_per_second=50, completion_tokens=50))
        with client.stream(
            "POST", "/chat/completions", json=chat(stream=True)
        ) as response:
            next(response.iter_lines())
        upstream.wait_for_disconnects_sync(1, timeout=2)

    assert scripted.json()["choices"][0]["message"]["content"] == (
        "scripted from the test thread"
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(upstream.base_url + "/models")


def test_command_prints_its_url_serves_and_stops_on_sigterm() -> None:
    # Configured by hand: the command must not depend on the project's settings.
    script = (
        "from django.conf import settings; settings.configure()\n"
        "from gateway.management.commands.simulate_upstream import Command\n"
        "Command().run_from_argv(['manage.py', 'simulate_upstream', '--port', '0',"
        " '--reply', 'from the command', '--models', 'demo'])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        models = httpx.get(f"{base_url}/models").json()
        answer = httpx.post(
            f"{base_url}/chat/completions",
            json={**chat(), "model": "demo"},
        ).json()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)

    assert base_url.startswith("http://127.0.0.1:")
    assert [m["id"] for m in models["data"]] == ["demo"]
    assert answer["choices"][0]["message"]["content"] == "from the command"
    assert process.returncode == 0
    assert "Stopped after 2 requests" in stderr


# Embeddings


async def test_embeddings_are_unit_vectors_that_depend_only_on_the_text(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post(
        "/embeddings", json={"model": "sim-embed", "input": ["cat", "dog", "cat"]}
    )
    again = await client.post(
        "/embeddings", json={"model": "sim-embed", "input": "cat"}
    )

    assert first.status_code == 200
    vectors = [item["embedding"] for item in first.json()["data"]]
    assert vectors[0] == vectors[2] == again.json()["data"][0]["embedding"]
    assert vectors[0] != vectors[1]
    assert len(vectors[0]) == 16
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, abs_tol=1e-4)
    assert first.json()["usage"]["prompt_tokens"] == 3


async def test_embeddings_honour_dimensions_base64_and_faults(
    client: httpx.AsyncClient,
) -> None:
    packed = await client.post(
        "/embeddings",
        json={
            "model": "sim-embed",
            "input": [[1, 2, 3]],
            "dimensions": 3,
            "encoding_format": "base64",
        },
    )
    failing = await client.post(
        "/embeddings",
        json={"model": "sim-embed", "input": "/sim fault=status status=503\nhi"},
    )

    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == pytest.approx(
        embedding_vector("[1, 2, 3]", 3), abs=1e-6
    )
    assert packed.json()["usage"]["prompt_tokens"] == 3
    assert failing.status_code == 503


async def test_sim_images_reports_the_image_parts_it_received(client):
    png = base64.b64encode(b"\x89PNG fake bytes").decode()
    parts = [
        {"type": "text", "text": "/sim images\nWhat is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
    ]

    response = await client.post("/chat/completions", json=chat(parts))

    text = response.json()["choices"][0]["message"]["content"]
    assert text == "Received 2 images: image/png 15 bytes; url."


async def test_sim_images_without_images_says_none_came(client):
    response = await client.post("/chat/completions", json=chat("/sim images\nhi"))

    assert response.json()["choices"][0]["message"]["content"] == ("Received 0 images.")


# LiteLLM's wire quirks


async def test_provider_retry_after_is_sent_under_litellms_prefix_only(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(
        Behaviour(
            fault="status",
            fault_status=429,
            retry_after=1.5,
            provider_retry_after=True,
        )
    )

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 429
    assert response.headers["llm_provider-retry-after"] == "2"
    assert response.headers["llm_provider-retry-after-ms"] == "1500"
    assert "retry-after" not in response.headers
    assert "retry-after-ms" not in response.headers


async def test_string_error_code_gives_the_status_as_a_string(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(
        Behaviour(fault="status", fault_status=429, string_error_code=True)
    )

    response = await client.post("/chat/completions", json=chat())

    assert response.json()["error"]["code"] == "429"


async def test_sparse_chunks_leave_out_what_litellm_leaves_out(
    client: httpx.AsyncClient,
) -> None:
    payloads = await read_stream(
        client,
        chat(
            "/sim tokens=3 sparse_chunks=true",
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    chunks = [json.loads(p) for p in payloads[:-1]]
    assert content_of(payloads) == "".join(generated_tokens(3))
    for chunk in chunks:
        assert "system_fingerprint" not in chunk
        assert "usage" not in chunk or chunk["usage"] is not None
        for choice in chunk["choices"]:
            assert "logprobs" not in choice
    finishes = [c["choices"][0].get("finish_reason", "absent") for c in chunks[:-1]]
    assert finishes == ["absent"] * 4 + ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3

    plain = (
        await client.post("/chat/completions", json=chat("/sim sparse_chunks=true"))
    ).json()
    assert "system_fingerprint" not in plain
    assert "logprobs" not in plain["choices"][0]
    assert "refusal" not in plain["choices"][0]["message"]


async def test_usage_chunk_with_choice_repeats_an_empty_choice(
    client: httpx.AsyncClient,
) -> None:
    payloads = await read_stream(
        client,
        chat(
            "/sim tokens=3 usage_chunk_with_choice=true",
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    last = json.loads(payloads[-2])
    assert last["choices"] == [{"index": 0, "delta": {}}]
    assert last["usage"]["completion_tokens"] == 3


async def test_drop_as_error_event_ends_the_stream_with_an_error_and_no_done(
    upstream: SimulatedUpstream, client: httpx.AsyncClient
) -> None:
    upstream.set_behaviour(
        Behaviour(fault="drop", fault_after_tokens=3, drop_as_error_event=True)
    )

    payloads = await read_stream(client, chat(stream=True))

    assert content_of(payloads[:-1]) == "".join(generated_tokens(3))
    error = json.loads(payloads[-1])["error"]
    assert (error["code"], error["type"]) == ("500", None)
    assert "[DONE]" not in payloads
