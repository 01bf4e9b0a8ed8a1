"""A complete /v1: JSON errors on every path, models.retrieve, embeddings, checks."""

# The fixtures are shared with test_api, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from gateway import client, router
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    Endpoint,
    ModelRoute,
    RouteKind,
)
from gateway.simulator import Behaviour, SimulatedUpstream, embedding_vector
from tests.gateway.test_api import (  # noqa: F401 - fixtures
    MESSAGES,
    MODEL,
    _isolated,
    add_route,
    alice,
    alice_key,
    backup,
    live_asgi_url,
    post,
    primary,
    records,
    route,
    wait_for_records,
)

pytestmark = pytest.mark.django_db(transaction=True)

EMBED = "house-embed"
# What makes `add_route`'s route serve embeddings.
EMBEDDING = {
    "model_name": EMBED,
    "upstream_model": "sim-embed",
    "kind": RouteKind.EMBEDDING,
}


@pytest.fixture
async def embed_routes(primary, backup):
    yield (
        await add_route("embed-primary", primary, 1, **EMBEDDING),
        await add_route("embed-backup", backup, 2, **EMBEDDING),
    )
    await client.aclose_all()


async def embed(program, body: object):
    data = body if isinstance(body, str) else json.dumps(body)
    return await program.post("/v1/embeddings", data)


# --- Unknown paths and wrong methods --------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/", "/v1/completions", "/v1/chat/completions/", "/v1/no/such/thing"],
)
async def test_an_unknown_path_gets_openai_json_404(alice, path):
    response = await alice.get(path)

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "unknown_url"
    assert error["type"] == "invalid_request_error"
    assert path in error["message"]


async def test_a_post_to_an_unknown_path_gets_404_not_a_csrf_page(alice):
    response = await alice.post("/v1/assistants", "{}")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("get", "/v1/chat/completions", "POST"),
        ("get", "/v1/embeddings", "POST"),
        ("post", "/v1/models", "GET"),
        ("post", "/v1/models/house-model", "GET"),
    ],
)
async def test_a_wrong_method_gets_405_with_a_json_body(alice, method, path, allowed):
    if method == "get":
        response = await alice.get(path)
    else:
        response = await alice.post(path, "{}")

    assert response.status_code == 405
    assert response["Allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


# --- models.retrieve and the kinds of models -------------------------------------


@pytest.mark.parametrize("name", ["org/model:v1", "llama3.1:8b", "a/b/c"])
async def test_a_model_is_retrieved_by_a_name_with_slashes_and_colons(
    primary, alice, name
):
    endpoint = await Endpoint.objects.acreate(name="p", base_url=primary.base_url)
    await ModelRoute.objects.acreate(
        model_name=name, endpoint=endpoint, upstream_model="sim-small"
    )

    response = await alice.get(f"/v1/models/{name}")

    assert response.status_code == 200
    assert response.json() == {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "llmsite",
        "llmsite": {"kinds": ["chat"]},
    }


async def test_a_disabled_or_unknown_model_is_a_404_naming_the_model(primary, alice):
    endpoint = await Endpoint.objects.acreate(
        name="off", base_url=primary.base_url, enabled=False
    )
    await ModelRoute.objects.acreate(
        model_name="hidden", endpoint=endpoint, upstream_model="sim-small"
    )

    for name in ("hidden", "never-heard-of"):
        response = await alice.get(f"/v1/models/{name}")
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "model"
        assert response.json()["error"]["code"] == "model_not_found"


async def test_retrieving_a_model_needs_a_key(route):
    from django.test import AsyncClient

    response = await AsyncClient().get(f"/v1/models/{MODEL}")

    assert response.status_code == 401


async def test_models_say_which_serve_chat_and_which_embeddings(
    route, embed_routes, alice
):
    response = await alice.get("/v1/models")

    kinds = {
        model["id"]: model["llmsite"]["kinds"] for model in response.json()["data"]
    }
    assert kinds == {MODEL: ["chat"], EMBED: ["embedding"]}


async def test_a_chat_never_goes_to_an_embedding_route(embed_routes, alice):
    response = await post(alice, {"model": EMBED, "messages": MESSAGES})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_embeddings_never_go_to_a_chat_route(route, alice):
    response = await embed(alice, {"model": MODEL, "input": "hello"})

    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


# --- Embeddings -------------------------------------------------------------------


async def test_embeddings_answer_in_openai_shape_with_one_record(
    embed_routes, alice, alice_key, primary
):
    response = await embed(alice, {"model": EMBED, "input": ["red fox", "blue whale"]})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == EMBED
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == embedding_vector("red fox")
    assert body["data"][1]["embedding"] == embedding_vector("blue whale")
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    assert body["llmsite"]["endpoint"] == "embed-primary"
    assert primary.requests[-1].json["model"] == "sim-embed"
    [record] = await records()
    assert record.status == "ok"
    assert record.model_name == EMBED
    assert record.api_key_id == alice_key[0].pk
    assert record.prompt_tokens == body["usage"]["prompt_tokens"]
    assert record.completion_tokens == 0
    assert record.endpoint_name == "embed-primary"


async def test_embeddings_fail_over_like_chat(embed_routes, alice, primary):
    primary.set_behaviour(Behaviour(fault="status", fault_status=503))

    response = await embed(alice, {"model": EMBED, "input": "hello"})

    assert response.status_code == 200
    body = response.json()
    assert body["llmsite"]["endpoint"] == "embed-backup"
    assert [(hop["from"], hop["to"]) for hop in body["llmsite"]["fallbacks"]] == [
        ("embed-primary", "embed-backup")
    ]
    assert response["X-LLMSite-Fallbacks"] == "1"
    [record] = await records()
    assert [hop["endpoint"] for hop in record.fallback_hops] == ["embed-primary"]
    assert [step["outcome"] for step in record.trail] == ["failed", "ok"]


async def test_embeddings_with_every_route_down_get_503(
    embed_routes, alice, primary, backup
):
    for server in (primary, backup):
        server.set_behaviour(Behaviour(fault="status", fault_status=500))

    response = await embed(alice, {"model": EMBED, "input": "hello"})

    assert response.status_code == 503
    [record] = await records()
    assert record.status == "error"


async def test_base64_vectors_pass_through(embed_routes, alice):
    import base64
    import struct

    response = await embed(
        alice,
        {"model": EMBED, "input": "hi", "encoding_format": "base64", "dimensions": 4},
    )

    assert response.status_code == 200
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    assert struct.unpack("<4f", raw) == pytest.approx(
        embedding_vector("hi", 4), abs=1e-6
    )


async def test_embeddings_reserve_the_input_alone_against_the_budget(
    embed_routes, alice, owner
):
    # A chat would reserve the route's 2,000 output tokens on top and be refused.
    await Budget.objects.acreate(scope="user", user=owner, token_limit=100)

    fits = await embed(alice, {"model": EMBED, "input": "word " * 40})
    too_big = await embed(alice, {"model": EMBED, "input": "word " * 200})

    assert fits.status_code == 200
    assert too_big.status_code == 429
    assert too_big.json()["error"]["type"] == "insufficient_quota"
    ok, rejected = await records()
    assert (ok.status, rejected.status) == ("ok", "rejected")
    assert 0 < ok.prompt_tokens <= 100
    counter = await BudgetCounter.objects.aget(budget__user=owner)
    assert (counter.used_tokens, counter.reserved_tokens) == (ok.prompt_tokens, 0)


async def test_an_input_longer_than_the_window_is_a_400_on_input(embed_routes, alice):
    await ModelRoute.objects.filter(model_name=EMBED).aupdate(
        context_window=256, max_output_tokens=1
    )
    await sync_to_async(router.forget_routes)()

    response = await embed(alice, {"model": EMBED, "input": ["fine", "word " * 400]})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": EMBED}, "input"),
        ({"model": EMBED, "input": ""}, "input"),
        ({"model": EMBED, "input": []}, "input"),
        ({"model": EMBED, "input": ["ok", ""]}, "input[1]"),
        ({"model": EMBED, "input": ["ok", 3]}, "input[1]"),
        ({"model": EMBED, "input": [[1, -2]]}, "input[0]"),
        ({"model": EMBED, "input": ["x"] * 2049}, "input"),
        ({"model": EMBED, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": EMBED, "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": EMBED, "input": "x", "dimensions": True}, "dimensions"),
        ({"input": "x"}, "model"),
    ],
)
async def test_a_bad_embeddings_body_gets_400_naming_the_param(
    embed_routes, alice, primary, body, param
):
    response = await embed(alice, body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert primary.requests == []


# --- Parameters checked before anything goes upstream ----------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"seed": "42"}, "seed"),
    ],
)
async def test_a_parameter_out_of_range_is_refused_before_upstream(
    route, alice, primary, params, param
):
    response = await post(alice, {"model": MODEL, "messages": MESSAGES, **params})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert primary.requests == []


# --- The official SDK against a live server --------------------------------------


def test_the_openai_sdk_retrieves_embeds_and_reads_errors(owner, live_asgi_url):
    openai = pytest.importorskip("openai")
    _, raw = ApiKey.generate(owner, "sdk")
    with SimulatedUpstream().run_in_thread() as upstream:
        endpoint = Endpoint.objects.create(
            name="primary", base_url=upstream.base_url, timeout=5, max_retries=1
        )
        ModelRoute.objects.create(
            model_name=MODEL, endpoint=endpoint, upstream_model="sim-small"
        )
        ModelRoute.objects.create(
            model_name="org/embed:v1",
            endpoint=endpoint,
            upstream_model="sim-embed",
            kind=RouteKind.EMBEDDING,
        )
        sdk = openai.OpenAI(base_url=live_asgi_url, api_key=raw, max_retries=0)

        model = sdk.models.retrieve("org/embed:v1")
        assert model.id == "org/embed:v1"
        # The SDK asks for base64 by default and decodes it back to floats.
        result = sdk.embeddings.create(model="org/embed:v1", input=["a cat", "a dog"])
        assert [item.embedding for item in result.data] == [
            pytest.approx(embedding_vector("a cat"), abs=1e-6),
            pytest.approx(embedding_vector("a dog"), abs=1e-6),
        ]
        assert result.usage.prompt_tokens > 0
        floats = sdk.embeddings.create(
            model="org/embed:v1", input="a cat", encoding_format="float"
        )
        assert floats.data[0].embedding == embedding_vector("a cat")
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.models.retrieve("no-such-model")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError) as unknown:
            sdk.get("/no/such/path", cast_to=object)
        assert unknown.value.body["code"] == "unknown_url"

    found = wait_for_records(2)
    assert sorted((r.model_name, r.status, r.completion_tokens) for r in found) == [
        ("org/embed:v1", "ok", 0),
        ("org/embed:v1", "ok", 0),
    ]
