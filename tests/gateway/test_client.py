"""The upstream client against httpx.MockTransport: errors, SSE, pool, secrets."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import httpx
import pytest
import time_machine

from gateway import client
from gateway.client import (
    APIClientError,
    APIConnectionError,
    APIDeadlineError,
    APIEndpointError,
    APIRateLimitError,
    APIRequestError,
    APIResponseError,
    APIServerError,
    APIStreamLimitError,
    APITimeoutError,
    ClientPools,
    EndpointConfig,
    PoolLimits,
    SSEDecoder,
)
from gateway.models import Endpoint

SECRET = "sk-test-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Hello"}]


def make_config(**overrides) -> EndpointConfig:
    values = {
        "id": 1,
        "name": "primary",
        "base_url": "https://llm.example/v1/",
        "api_key": SECRET,
        "timeout": 5.0,
        "connect_timeout": 1.0,
        "extra_headers": (("X-Tenant", "acme-tenant-secret"),),
    }
    values.update(overrides)
    return EndpointConfig(**values)


def completion(text: str = "Hi there", **extra) -> dict:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
    body.update(extra)
    return body


def sse(*events: object, done: bool = True) -> bytes:
    out = b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class Upstream:
    """A scripted upstream: each request takes the next response."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.content:
            self.bodies.append(json.loads(request.content))
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response


class ChunkStream(httpx.AsyncByteStream):
    """A response body delivered in given pieces; records whether it was closed."""

    def __init__(self, *pieces: bytes | Exception, then_wait: bool = False) -> None:
        self.pieces = pieces
        self.then_wait = then_wait
        self.closed = False
        self.sent = 0

    async def __aiter__(self):
        for piece in self.pieces:
            if isinstance(piece, Exception):
                raise piece
            self.sent += 1
            yield piece
        if self.then_wait:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


def sse_response(*pieces: bytes | Exception, **kwargs) -> httpx.Response:
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        stream=ChunkStream(*pieces, **kwargs),
    )


@pytest.fixture(autouse=True)
def _fresh_pools():
    client._no_stream_usage.clear()
    yield
    client._no_stream_usage.clear()


@pytest.fixture
def upstream():
    """Install a scripted upstream as the transport of every new pool."""
    installed: list[Upstream] = []

    def install(*responses: httpx.Response | Exception) -> Upstream:
        scripted = Upstream(*responses)
        installed.append(scripted)
        client.pools.transport = httpx.MockTransport(scripted)
        return scripted

    yield install
    client.pools.transport = None


async def collect(config: EndpointConfig, **kwargs) -> list[dict]:
    return [c async for c in client.stream_completion(config, {"messages": MESSAGES})]


# --- The endpoint snapshot ----------------------------------------------------


def test_the_api_key_never_shows_in_the_config_repr():
    config = make_config()

    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert "acme-tenant-secret" not in repr(config)
    assert "primary" in repr(config)


def test_it_snapshots_an_endpoint_row_with_its_decrypted_key():
    endpoint = Endpoint(
        id=7,
        name="openai",
        base_url="https://api.openai.com/v1/",
        extra_headers={"OpenAI-Organization": "org-1"},
        max_retries=2,
        supports_stream_usage=False,
    )
    endpoint.api_key = SECRET

    config = EndpointConfig.from_model(endpoint)

    assert config.api_key == SECRET
    assert config.chat_url == "https://api.openai.com/v1/chat/completions"
    assert config.extra_headers == (("OpenAI-Organization", "org-1"),)
    assert (config.max_retries, config.supports_stream_usage) == (2, False)
    assert config.request_headers()["Authorization"] == f"Bearer {SECRET}"


def test_an_endpoint_without_a_key_sends_no_authorization():
    config = make_config(api_key="")

    assert "Authorization" not in config.request_headers()


# --- Plain completions --------------------------------------------------------


async def test_it_posts_a_completion_with_key_headers_and_model(upstream):
    scripted = upstream(httpx.Response(200, json=completion("Hi there")))

    body = await client.create_completion(
        make_config(), {"model": "gpt-4o-mini", "messages": MESSAGES}
    )

    assert body["choices"][0]["message"]["content"] == "Hi there"
    request = scripted.requests[0]
    assert str(request.url) == "https://llm.example/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["x-tenant"] == "acme-tenant-secret"
    assert scripted.bodies[0] == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": False,
    }


@pytest.mark.parametrize(
    ("status", "error_class", "permanent", "retryable"),
    [
        (500, APIServerError, False, True),
        (502, APIServerError, False, True),
        (503, APIServerError, False, True),
        (429, APIRateLimitError, False, True),
        (408, APITimeoutError, False, True),
        (400, APIRequestError, True, False),
        (413, APIRequestError, True, False),
        (422, APIRequestError, True, False),
        (401, APIEndpointError, False, False),
        (403, APIEndpointError, False, False),
        (404, APIEndpointError, False, False),
    ],
)
async def test_each_status_maps_to_its_error_class(
    upstream, status, error_class, permanent, retryable
):
    upstream(
        httpx.Response(status, json={"error": {"message": f"upstream said {status}"}})
    )

    with pytest.raises(error_class) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    error = caught.value
    assert isinstance(error, APIClientError)
    assert error.status_code == status
    assert error.permanent is permanent
    assert error.retryable is retryable
    assert f"upstream said {status}" in str(error)
    assert error.endpoint == "primary"


async def test_a_429_carries_retry_after_in_seconds(upstream):
    upstream(httpx.Response(429, headers={"retry-after": "7"}, json={}))

    with pytest.raises(APIRateLimitError) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    assert caught.value.retry_after == 7.0


async def test_retry_after_ms_wins_over_whole_seconds(upstream):
    upstream(
        httpx.Response(
            429, headers={"retry-after": "2", "retry-after-ms": "1500"}, json={}
        )
    )

    with pytest.raises(APIRateLimitError) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    assert caught.value.retry_after == 1.5


@time_machine.travel(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC), tick=False)
async def test_retry_after_may_be_an_http_date(upstream):
    upstream(
        httpx.Response(
            503, headers={"retry-after": "Sun, 01 Mar 2026 12:00:45 GMT"}, json={}
        )
    )

    with pytest.raises(APIServerError) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    assert caught.value.retry_after == 45.0


async def test_errors_never_contain_the_api_key_and_bodies_are_cut(upstream):
    echoed = f"Incorrect API key provided: {SECRET}. " + "x" * 5000
    upstream(httpx.Response(401, json={"error": {"message": echoed}}))

    with pytest.raises(APIEndpointError) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    text = str(caught.value) + repr(caught.value)
    assert SECRET not in text
    assert "[redacted]" in text
    assert len(caught.value.message) < client.BODY_EXCERPT_CHARS + 100


@pytest.mark.parametrize(
    ("exc", "error_class"),
    [
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.ConnectTimeout("slow"), APITimeoutError),
        (httpx.ReadTimeout("slow"), APITimeoutError),
        (httpx.PoolTimeout("busy"), APITimeoutError),
        (httpx.RemoteProtocolError("dropped"), APIConnectionError),
        (httpx.ReadError("reset"), APIConnectionError),
        (httpx.UnsupportedProtocol("ftp"), APIEndpointError),
    ],
)
async def test_transport_failures_map_to_transient_errors(upstream, exc, error_class):
    upstream(exc)

    with pytest.raises(error_class) as caught:
        await client.create_completion(make_config(), {"messages": MESSAGES})

    assert caught.value.permanent is False


async def test_a_plain_response_over_the_size_limit_is_refused(upstream, settings):
    settings.GATEWAY_MAX_RESPONSE_BYTES = 1000
    upstream(httpx.Response(200, json=completion("x" * 5000)))

    with pytest.raises(APIResponseError, match="limit"):
        await client.create_completion(make_config(), {"messages": MESSAGES})


@pytest.mark.parametrize(
    "body",
    [b'{"choices": [{"message": ', b"[1, 2]", b'{"object": "chat.completion"}'],
)
async def test_a_malformed_plain_response_is_a_response_error(upstream, body):
    upstream(
        httpx.Response(200, headers={"content-type": "application/json"}, content=body)
    )

    with pytest.raises(APIResponseError):
        await client.create_completion(make_config(), {"messages": MESSAGES})


async def test_an_error_object_inside_a_200_is_an_error(upstream):
    upstream(httpx.Response(200, json={"error": {"message": "overloaded"}}))

    with pytest.raises(APIServerError, match="overloaded"):
        await client.create_completion(make_config(), {"messages": MESSAGES})


# --- Streaming ----------------------------------------------------------------


async def test_it_streams_chunks_and_asks_for_usage(upstream):
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    scripted = upstream(
        sse_response(
            sse(
                chunk("Hel"),
                chunk("lo"),
                chunk(finish="stop"),
                {"id": "chatcmpl-1", "choices": [], "usage": usage},
            )
        )
    )

    chunks = await collect(make_config())

    assert [c["choices"][0]["delta"].get("content") for c in chunks[:2]] == [
        "Hel",
        "lo",
    ]
    assert chunks[-1]["usage"] == usage
    assert scripted.bodies[0]["stream"] is True
    assert scripted.bodies[0]["stream_options"] == {"include_usage": True}
    assert scripted.requests[0].headers["accept"] == "text/event-stream"


async def test_the_sse_parser_survives_byte_by_byte_delivery(upstream):
    raw = (
        b": keep-alive\r\n\r\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"a\\nb"},'
        b'"finish_reason":null}]}\r\n\r\n'
        b"event: message\r\n"
        b'data: {"choices":[{"index":0,"delta":{},\r\n'
        b'data: "finish_reason":"stop"}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    upstream(sse_response(*[raw[i : i + 1] for i in range(len(raw))]))

    chunks = await collect(make_config())

    assert chunks[0]["choices"][0]["delta"]["content"] == "a\nb"
    # A multi-line data field is one event, joined with a newline.
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert len(chunks) == 2


def test_the_sse_decoder_handles_bare_cr_and_crlf_split_across_reads():
    decoder = SSEDecoder()

    events = decoder.feed(b"data: one\r")
    events += decoder.feed(b"\ndata: two\r")
    events += decoder.feed(b"\r")
    events += decoder.feed(b"data: three\n\n")

    assert events == [(b"message", b"one\ntwo"), (b"message", b"three")]


def test_the_sse_decoder_dispatches_a_last_event_without_a_blank_line():
    decoder = SSEDecoder()

    assert decoder.feed(b"data: x\n\ndata: y") == [(b"message", b"x")]
    assert decoder.flush() == [(b"message", b"y")]


async def test_chunks_without_choices_and_comments_pass_through(upstream):
    upstream(
        sse_response(
            b": ping\n\n",
            sse({"id": "x", "object": "chat.completion.chunk", "choices": []}),
        )
    )

    chunks = await collect(make_config())

    assert chunks == [{"id": "x", "object": "chat.completion.chunk", "choices": []}]


async def test_a_finished_stream_without_done_is_complete(upstream):
    upstream(sse_response(sse(chunk("Hi"), chunk(finish="stop"), done=False)))

    chunks = await collect(make_config())

    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_stream_cut_before_its_end_is_a_connection_error(upstream):
    upstream(sse_response(sse(chunk("Hi"), chunk(" there"), done=False)))

    with pytest.raises(APIConnectionError, match="ended before"):
        await collect(make_config())


async def test_a_dropped_connection_mid_stream_is_a_connection_error(upstream):
    upstream(
        sse_response(sse(chunk("Hi"), done=False), httpx.RemoteProtocolError("cut"))
    )

    with pytest.raises(APIConnectionError, match="dropped"):
        await collect(make_config())


async def test_garbage_in_a_stream_is_a_clear_response_error(upstream):
    upstream(sse_response(sse(chunk("Hi"), b"{this is not json", done=False)))

    with pytest.raises(APIResponseError, match="not JSON"):
        await collect(make_config())


async def test_an_error_event_mid_stream_is_a_server_error(upstream):
    upstream(sse_response(sse(chunk("Hi"), {"error": {"message": "model crashed"}})))

    with pytest.raises(APIServerError, match="model crashed"):
        await collect(make_config())


async def test_a_stall_mid_stream_is_a_timeout(upstream):
    upstream(sse_response(sse(chunk("Hi"), done=False), httpx.ReadTimeout("stall")))

    with pytest.raises(APITimeoutError, match="waiting for data"):
        await collect(make_config())


async def test_an_endless_line_is_refused(upstream, settings):
    settings.GATEWAY_MAX_SSE_EVENT_BYTES = 1024
    upstream(sse_response(b"data: " + b"x" * 4096))

    with pytest.raises(APIResponseError, match="1024-byte limit"):
        await collect(make_config())


async def test_a_json_answer_to_a_stream_request_becomes_chunks(upstream):
    upstream(httpx.Response(200, json=completion("Whole answer")))

    chunks = await collect(make_config())

    assert chunks[0]["choices"][0]["delta"]["content"] == "Whole answer"
    assert chunks[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_a_stream_error_status_maps_like_a_plain_one(upstream):
    upstream(httpx.Response(503, headers={"retry-after": "3"}, json={}))

    with pytest.raises(APIServerError) as caught:
        await collect(make_config())

    assert caught.value.retry_after == 3.0


async def test_stream_options_are_dropped_once_rejected_and_remembered(upstream):
    rejected = httpx.Response(
        400,
        json={"error": {"message": "Unrecognized request argument: stream_options"}},
    )
    scripted = upstream(
        rejected,
        sse_response(sse(chunk("ok"), chunk(finish="stop"))),
        sse_response(sse(chunk("again"), chunk(finish="stop"))),
    )
    seen: list[str] = []

    async def remember(config: EndpointConfig) -> None:
        seen.append(config.name)

    config = make_config()
    first = [
        c
        async for c in client.stream_completion(
            config, {"messages": MESSAGES}, on_stream_usage_rejected=remember
        )
    ]
    second = await collect(config)

    assert first[0]["choices"][0]["delta"]["content"] == "ok"
    assert second[0]["choices"][0]["delta"]["content"] == "again"
    assert "stream_options" in scripted.bodies[0]
    assert "stream_options" not in scripted.bodies[1]
    assert "stream_options" not in scripted.bodies[2]
    assert seen == ["primary"]


async def test_another_400_on_a_stream_is_not_mistaken_for_stream_options(upstream):
    scripted = upstream(
        httpx.Response(400, json={"error": {"message": "messages is required"}})
    )

    with pytest.raises(APIRequestError, match="messages is required"):
        await collect(make_config())

    assert len(scripted.requests) == 1


async def test_an_endpoint_known_not_to_support_usage_is_not_asked(upstream):
    scripted = upstream(sse_response(sse(chunk("ok"), chunk(finish="stop"))))

    await collect(make_config(supports_stream_usage=False))

    assert "stream_options" not in scripted.bodies[0]


async def test_stopping_the_iteration_closes_the_upstream_response(upstream):
    body = ChunkStream(sse(chunk("one"), done=False), then_wait=True)
    upstream(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    )

    stream = client.stream_completion(make_config(), {"messages": MESSAGES})
    first = await anext(stream)
    await stream.aclose()

    assert first["choices"][0]["delta"]["content"] == "one"
    assert body.closed


async def test_cancelling_the_consumer_closes_the_upstream_response(upstream):
    body = ChunkStream(sse(chunk("one"), done=False), then_wait=True)
    upstream(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    )
    received = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream_completion(make_config(), {"messages": MESSAGES}):
            received.set()

    task = asyncio.create_task(consume())
    await received.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert body.closed


# --- Models and health ----------------------------------------------------------


async def test_it_lists_models(upstream):
    scripted = upstream(
        httpx.Response(200, json={"object": "list", "data": [{"id": "gpt-4o"}]})
    )

    models = await client.list_models(make_config())

    assert models == [{"id": "gpt-4o"}]
    assert str(scripted.requests[0].url) == "https://llm.example/v1/models"


async def test_a_health_check_reports_models_and_latency(upstream):
    upstream(httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]}))

    health = await client.health_check(make_config())

    assert health.ok
    assert health.models == ("a", "b")
    assert health.latency_ms >= 0


async def test_a_failed_health_check_returns_the_error_instead_of_raising(upstream):
    upstream(httpx.Response(503, json={"error": {"message": "down"}}))

    health = await client.health_check(make_config())

    assert not health.ok
    assert isinstance(health.error, APIServerError)
    assert health.status_code == 503


# --- The pool -----------------------------------------------------------------


def test_pool_limits_split_the_endpoint_totals_over_its_clients():
    limits = PoolLimits(clients=4, max_connections=10, max_keepalive=5).per_client()

    assert [lim.max_connections for lim in limits] == [3, 3, 2, 2]
    assert sum(lim.max_connections for lim in limits) == 10
    assert [lim.max_keepalive_connections for lim in limits] == [2, 1, 1, 1]


def test_there_are_never_more_clients_than_connections():
    limits = PoolLimits(clients=8, max_connections=2, max_keepalive=1).per_client()

    assert len(limits) == 2
    assert all(lim.max_keepalive_connections >= 1 for lim in limits)


async def test_clients_are_reused_round_robin_and_never_built_per_request():
    pools = ClientPools(PoolLimits(clients=3, max_connections=6, max_keepalive=3))
    config = make_config()

    pool = pools.pool(config)
    used = [pool.checkout() for _ in range(6)]
    for _ in used:
        pool.checkin()

    assert pools.pool(make_config()) is pool
    assert used[:3] == used[3:]
    assert len({id(c) for c in used}) == 3
    await pools.aclose_all()


async def test_a_changed_endpoint_gets_new_clients_and_the_old_ones_close():
    pools = ClientPools(PoolLimits(clients=2, max_connections=2, max_keepalive=2))
    old = pools.pool(make_config())

    new = pools.pool(make_config(api_key="sk-rotated-key-000000"))
    await asyncio.sleep(0)

    assert new is not old
    assert all(c.is_closed for c in old.clients)
    assert not any(c.is_closed for c in new.clients)
    await pools.aclose_all()
    assert all(c.is_closed for c in new.clients)


def test_each_event_loop_gets_its_own_clients():
    pools = ClientPools()

    async def get():
        return pools.pool(make_config())

    first = asyncio.run(get())
    second = asyncio.run(get())

    assert first is not second
    assert first.clients[0] is not second.clients[0]


async def test_the_transport_hook_reaches_every_new_pool():
    pools = ClientPools()
    scripted = Upstream(httpx.Response(200, json=completion("mocked")))

    with pools.use_transport(httpx.MockTransport(scripted)):
        body = await client.create_completion(
            make_config(), {"messages": MESSAGES}, client_pools=pools
        )

    assert body["choices"][0]["message"]["content"] == "mocked"
    assert pools.transport is None


def test_an_undecryptable_key_leaves_the_endpoint_usable_without_it(caplog):
    endpoint = Endpoint(id=8, name="rotated", base_url="https://x.test/v1")
    endpoint.api_key_encrypted = "fernet:not-a-valid-token"

    config = EndpointConfig.from_model(endpoint)

    assert config.api_key == ""
    assert "rotated" in caplog.text


# --- Bounds on a stream ---------------------------------------------------------


class Paced(httpx.AsyncByteStream):
    """A body that sends `first`, then `piece` every `every` seconds for ever."""

    def __init__(self, first: bytes, piece: bytes, every: float) -> None:
        self.first, self.piece, self.every = first, piece, every
        self.closed = False

    async def __aiter__(self):
        yield self.first
        while True:
            await asyncio.sleep(self.every)
            yield self.piece

    async def aclose(self) -> None:
        self.closed = True


def paced(first: bytes, piece: bytes, every: float = 0.02) -> httpx.Response:
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        stream=Paced(first, piece, every),
    )


async def test_keep_alive_comments_do_not_keep_a_stream_open(upstream):
    upstream(paced(sse(chunk("Hi"), done=False), b": keep-alive\n\n"))
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(APITimeoutError, match=r"no content for 0\.3 s"):
        await collect(make_config(timeout=0.3))

    assert 0.3 <= loop.time() - started < 1.0


async def test_a_stream_gets_its_first_token_timeout_before_any_content(upstream):
    # Role-only chunks keep coming, but no content: the first-token timer
    # (not the longer between-chunks one) ends it.
    upstream(paced(sse(chunk(), done=False), sse(chunk(), done=False), every=0.05))
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(APITimeoutError, match=r"no first token within 0\.3 s"):
        await collect(make_config(first_token_timeout=0.3, timeout=30))

    assert 0.3 <= loop.time() - started < 1.0


async def test_after_the_first_token_the_between_chunks_timeout_applies(upstream):
    upstream(paced(sse(chunk("Hi"), done=False), b": keep-alive\n\n"))
    loop = asyncio.get_running_loop()
    started = loop.time()

    # The first-token timeout is long; it no longer matters once text came.
    with pytest.raises(APITimeoutError, match=r"no content for 0\.3 s"):
        await collect(make_config(first_token_timeout=30, timeout=0.3))

    assert loop.time() - started < 1.0


async def test_one_attempt_ends_at_its_request_timeout(upstream):
    upstream(paced(sse(chunk("Hi"), done=False), sse(chunk(" more"), done=False)))

    with pytest.raises(APITimeoutError, match=r"took longer than 0\.3 s") as caught:
        await collect(make_config(request_timeout=0.3))

    # A timeout of this attempt, not the whole request's deadline.
    assert not isinstance(caught.value, APIDeadlineError)


async def test_a_plain_answer_ends_at_its_request_timeout(upstream):
    upstream(
        httpx.Response(
            200,
            headers={"content-type": "application/json"},
            stream=Paced(b"{", b" ", every=0.05),
        )
    )

    with pytest.raises(APITimeoutError, match=r"no answer within 0\.3 s") as caught:
        await client.create_completion(
            make_config(request_timeout=0.3), {"messages": MESSAGES}
        )

    assert not isinstance(caught.value, APIDeadlineError)


async def test_empty_chunks_do_not_count_as_content(upstream):
    upstream(paced(sse(chunk("Hi"), done=False), sse(chunk(""), done=False)))

    with pytest.raises(APITimeoutError, match="no content"):
        await collect(make_config(timeout=0.3))


async def test_the_deadline_ends_a_stream_that_keeps_sending_content(upstream):
    upstream(paced(sse(chunk("Hi"), done=False), sse(chunk(" more"), done=False)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    stream = client.stream_completion(
        make_config(), {"messages": MESSAGES}, deadline=time.monotonic() + 0.3
    )

    with pytest.raises(APIDeadlineError, match="time limit"):
        async for _ in stream:
            pass

    assert loop.time() - started < 1.0


async def test_a_slow_consumer_is_not_an_idle_upstream(upstream):
    upstream(sse_response(sse(chunk("a"), chunk("b"), chunk("c", finish="stop"))))

    received = []
    async for piece in client.stream_completion(
        make_config(timeout=0.1), {"messages": MESSAGES}
    ):
        received.append(piece)
        await asyncio.sleep(0.25)

    assert [c["choices"][0]["delta"]["content"] for c in received] == ["a", "b", "c"]


async def test_a_cancelled_caller_is_not_reported_as_a_timeout(upstream):
    upstream(sse_response(sse(chunk("Hi"), done=False), then_wait=True))
    task = asyncio.ensure_future(collect(make_config(timeout=0.2)))
    await asyncio.sleep(0.1)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task


async def test_chunks_without_content_are_bounded(upstream, settings):
    settings.GATEWAY_MAX_CHUNKS_BEFORE_CONTENT = 10
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    body = ChunkStream(sse(*[role] * 50, done=False), then_wait=True)
    upstream(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    )

    with pytest.raises(APIStreamLimitError, match="11 chunks without content"):
        await collect(make_config())

    assert body.closed


async def test_bytes_before_content_are_bounded(upstream, settings):
    settings.GATEWAY_MAX_BYTES_BEFORE_CONTENT = 1000
    upstream(paced(b": " + b"x" * 600 + b"\n\n", b": " + b"x" * 600 + b"\n\n"))

    with pytest.raises(APIStreamLimitError, match="before any content"):
        await collect(make_config())


async def test_a_plain_json_body_without_a_choice_list_is_a_response_error(upstream):
    upstream(httpx.Response(200, json={"choices": 5}))

    with pytest.raises(APIResponseError, match="no choices"):
        await collect(make_config())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "1e9"}, 86400.0),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
        ({"retry-after": "-5"}, 0.0),
    ],
)
def test_retry_after_is_a_finite_wait_of_at_most_a_day(headers, expected):
    assert client.parse_retry_after(httpx.Headers(headers)) == expected
