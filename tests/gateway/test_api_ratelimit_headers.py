"""OpenAI's x-ratelimit-* headers on /v1 answers and refusals."""

from __future__ import annotations

import re

import pytest

from gateway import api, client, limits
from gateway.models import ApiKey, Endpoint, ModelRoute
from gateway.simulator import Behaviour, SimulatedUpstream
from tests.gateway.test_api import (  # noqa: F401 (live_asgi_url: a fixture)
    MESSAGES,
    MODEL,
    Program,
    add_route,
    live_asgi_url,
    post,
    read_events,
)
from tests.gateway.usage_support import close_thread_connections, forget_process_state

pytestmark = pytest.mark.django_db(transaction=True)

HEADERS = [
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 5
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    api.forget_keys()
    yield
    forget_process_state()
    api.forget_keys()
    close_thread_connections()


@pytest.fixture
async def route():
    async with SimulatedUpstream(behaviour=Behaviour(completion_tokens=8)) as server:
        await add_route("primary", server, 1)
        yield
        await client.aclose_all()


@pytest.fixture
def alice_key(owner) -> tuple[ApiKey, str]:
    return ApiKey.generate(owner, "alice's script")


@pytest.fixture
def alice(alice_key) -> Program:
    return Program(f"Bearer {alice_key[1]}")


def seconds(duration: str) -> float:
    """An OpenAI reset duration (20ms, 1.5s, 6m0s, 1h0m0s) in seconds."""
    if duration.endswith("ms"):
        return int(duration.removesuffix("ms")) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s", duration)
    assert match, f"not a duration: {duration!r}"
    hours, minutes, secs = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs)


def ratelimit(response) -> dict[str, str]:
    return {name: response[name] for name in HEADERS if response.has_header(name)}


def body(stream: bool = False, model: str = MODEL) -> dict:
    return {"model": model, "messages": MESSAGES, "stream": stream}


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (0, "0s"),
        (0.0004, "0s"),
        (0.02, "20ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (59.9996, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (-1, "0s"),
    ],
)
def test_resets_are_written_as_openai_writes_durations(elapsed, expected):
    assert api.reset_duration(elapsed) == expected


async def test_each_answer_says_how_many_requests_are_left(route, alice):
    answers = [await post(alice, body()) for _ in range(3)]

    assert [a.status_code for a in answers] == [200] * 3
    assert [a["x-ratelimit-remaining-requests"] for a in answers] == ["4", "3", "2"]
    assert {a["x-ratelimit-limit-requests"] for a in answers} == {"5"}
    # Three of five used, one every 12 s of the minute: whole again in 36 s.
    assert 35 < seconds(answers[-1]["x-ratelimit-reset-requests"]) <= 36
    # No token limit applies, so none is reported.
    assert "x-ratelimit-limit-tokens" not in answers[-1]


async def test_the_tightest_of_the_users_and_the_keys_limits_is_reported(
    route, alice, alice_key
):
    key = alice_key[0]
    key.rpm_limit = 3
    await key.asave()

    answer = await post(alice, body())

    # The user has 4 of 5 left, the key 2 of 3: the key decides.
    assert ratelimit(answer) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20s",
    }


async def test_token_limits_are_reported_once_the_prompt_is_counted(
    route, alice, settings
):
    settings.RATE_LIMIT_TPM = 10_000
    limits._caller_limits.clear()

    answer = await post(alice, body())

    assert answer.status_code == 200
    assert answer["x-ratelimit-limit-tokens"] == "10000"
    prompt = 10_000 - int(answer["x-ratelimit-remaining-tokens"])
    assert 0 < prompt < 100
    # The prompt's share of a minute: 6 ms per token at 10,000 a minute.
    assert seconds(answer["x-ratelimit-reset-tokens"]) == pytest.approx(
        prompt * 0.006, abs=0.002
    )


async def test_no_headers_when_no_limit_applies(route, alice, settings):
    settings.RATE_LIMIT_RPM = 0

    answer = await post(alice, body())
    listing = await alice.get("/v1/models")

    assert answer.status_code == listing.status_code == 200
    assert ratelimit(answer) == {}
    assert ratelimit(listing) == {}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_refusal_says_nothing_is_left_and_when_it_resets(
    route, alice, alice_key, stream
):
    key = alice_key[0]
    key.rpm_limit = 1
    await key.asave()
    first = await post(alice, body(stream))
    if stream:
        await read_events(first)

    refused = await post(alice, body(stream))

    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert refused["x-ratelimit-limit-requests"] == "1"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert 55 < seconds(refused["x-ratelimit-reset-requests"]) <= 60


async def test_a_stream_sends_the_headers_with_its_first_bytes(route, alice, settings):
    settings.RATE_LIMIT_TPM = 10_000
    limits._caller_limits.clear()

    response = await post(alice, body(stream=True))

    # Read before the body: they go out with the status line.
    assert response["x-ratelimit-remaining-requests"] == "4"
    assert int(response["x-ratelimit-remaining-tokens"]) < 10_000
    events = await read_events(response)
    assert events[-1] == "[DONE]"


async def test_an_unknown_model_still_reports_the_request_it_counted(route, alice):
    response = await post(alice, body(model="no-such-model"))

    assert response.status_code == 404
    assert response["x-ratelimit-remaining-requests"] == "4"


async def test_listing_models_reports_the_limits_without_counting(route, alice):
    await post(alice, body())

    listings = [await alice.get("/v1/models") for _ in range(3)]

    assert [r["x-ratelimit-remaining-requests"] for r in listings] == ["4"] * 3
    assert {r["x-ratelimit-limit-requests"] for r in listings} == {"5"}


def test_the_openai_sdk_reads_the_headers(owner, settings, request):
    openai = pytest.importorskip("openai")
    base_url = request.getfixturevalue("live_asgi_url")
    settings.RATE_LIMIT_TPM = 10_000
    _, raw = ApiKey.generate(owner, "sdk")
    with SimulatedUpstream(
        behaviour=Behaviour(completion_tokens=8)
    ).run_in_thread() as upstream:
        endpoint = Endpoint.objects.create(
            name="primary", base_url=upstream.base_url, timeout=5, max_retries=1
        )
        ModelRoute.objects.create(
            model_name=MODEL, endpoint=endpoint, upstream_model="sim-small"
        )
        sdk = openai.OpenAI(base_url=base_url, api_key=raw, max_retries=0)

        raw_response = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        with sdk.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        ) as streamed:
            streamed_headers = dict(streamed.headers)
            list(streamed.iter_lines())

    assert raw_response.parse().choices[0].message.content
    assert raw_response.headers["x-ratelimit-limit-requests"] == "5"
    assert raw_response.headers["x-ratelimit-remaining-requests"] == "4"
    assert raw_response.headers["x-ratelimit-limit-tokens"] == "10000"
    assert seconds(raw_response.headers["x-ratelimit-reset-requests"]) <= 12
    assert streamed_headers["x-ratelimit-remaining-requests"] == "3"
