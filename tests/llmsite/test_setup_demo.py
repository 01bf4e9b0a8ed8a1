"""setup_demo: the first admin and the demo endpoints of `make run`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from chat.attachments import models_taking_images
from gateway.models import Endpoint, ModelRoute

pytestmark = pytest.mark.django_db


def _setup(*args: str) -> str:
    out = io.StringIO()
    call_command("setup_demo", *args, stdout=out)
    return out.getvalue()


def test_it_creates_an_admin_once_and_prints_the_password_once(client):
    first = _setup()
    second = _setup()

    password = first.split("with password ")[1].split(" ")[0]
    assert client.login(username="admin", password=password)
    assert get_user_model().objects.get(username="admin").is_superuser
    assert "password" not in second


def test_demo_endpoints_form_a_fallback_chain_and_are_not_duplicated():
    _setup()
    _setup()

    chain = ModelRoute.objects.filter(model_name="demo-chat").order_by("priority")
    assert [r.endpoint.name for r in chain] == ["demo-primary", "demo-fallback"]
    # Distinct path prefixes let a /sim directive script one endpoint alone.
    assert [r.endpoint.base_url for r in chain] == [
        "http://127.0.0.1:9101/primary/v1",
        "http://127.0.0.1:9102/fallback/v1",
    ]
    embed = ModelRoute.objects.filter(model_name="demo-embed").order_by("priority")
    assert [(r.endpoint.name, r.kind) for r in embed] == [
        ("demo-primary", "embedding"),
        ("demo-fallback", "embedding"),
    ]


def test_the_demo_chat_takes_images_on_every_route():
    _setup()

    assert "demo-chat" in models_taking_images()


def test_the_demo_upstreams_serve_every_model_the_demo_routes_to():
    # scripts/run.sh starts the simulated upstreams with an explicit model list;
    # they must answer for smollm2 too when the llama.cpp server is gone.
    _setup("--model-port", "9103")
    script = (Path(__file__).resolve().parents[2] / "scripts" / "run.sh").read_text()
    served = set(re.findall(r"--models ([\w,.-]+)", script)[0].split(","))
    simulated = ModelRoute.objects.filter(endpoint__name__startswith="demo-")
    assert simulated.filter(model_name="smollm2").exists()
    assert set(simulated.values_list("upstream_model", flat=True)) <= served


def test_make_run_registers_no_real_model():
    _setup()

    assert not ModelRoute.objects.filter(model_name="smollm2").exists()
    assert not Endpoint.objects.filter(name="llama-smollm2").exists()


def test_the_real_model_goes_first_with_the_simulator_behind_it_once():
    _setup("--model-port", "9103")
    out = _setup("--model-port", "9103")

    chain = ModelRoute.objects.filter(model_name="smollm2").order_by("priority")
    assert [(r.endpoint.name, r.upstream_model) for r in chain] == [
        ("llama-smollm2", "smollm2"),
        ("demo-fallback", "sim-small"),
    ]
    assert chain[0].endpoint.base_url == "http://127.0.0.1:9103/v1"
    # SmolLM2's real window on both, so a failover sees the same conversation.
    assert [r.context_window for r in chain] == [2048, 2048]
    assert all(r.max_output_tokens < r.context_window for r in chain)
    assert "SmolLM2 on the llama.cpp server on port 9103" in out


def test_make_run_after_make_run_model_turns_the_real_model_off_until_next_time():
    _setup("--model-port", "9103")

    out = _setup()

    assert not ModelRoute.objects.filter(model_name="smollm2", enabled=True).exists()
    assert not Endpoint.objects.get(name="llama-smollm2").enabled
    assert "'smollm2' turned off" in out
    assert "turned off" not in _setup()

    _setup("--model-port", "9103")
    assert ModelRoute.objects.filter(model_name="smollm2", enabled=True).count() == 2
    assert Endpoint.objects.get(name="llama-smollm2").enabled


def test_run_sh_starts_the_model_server_on_the_port_it_registers():
    script = (Path(__file__).resolve().parents[2] / "scripts" / "run.sh").read_text()

    assert "MODEL_PORT=${DEMO_MODEL_PORT:-9103}" in script
    assert '--model-port "$MODEL_PORT"' in script
    assert 'scripts.peers serve llama --port "$MODEL_PORT"' in script


def test_a_configured_real_endpoint_goes_first_with_its_key(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "https://llm.example.com/v1/")
    monkeypatch.setenv("LLM_API_KEY", "sk-real")
    monkeypatch.setenv("LLM_MODEL", "big-model")

    _setup()

    configured = Endpoint.objects.get(name="configured")
    assert configured.base_url == "https://llm.example.com/v1"
    assert configured.api_key == "sk-real"
    chain = ModelRoute.objects.filter(model_name="big-model").order_by("priority")
    assert [r.endpoint.name for r in chain] == ["configured", "demo-primary"]


def test_a_plain_http_llm_base_url_off_this_machine_is_refused_before_any_write(
    monkeypatch,
):
    monkeypatch.setenv("LLM_BASE_URL", "http://10.0.0.5:8000/v1")
    monkeypatch.setenv("LLM_API_KEY", "sk-real")

    with pytest.raises(CommandError) as caught:
        _setup()

    assert str(caught.value) == (
        "LLM_BASE_URL: Plain http:// to 10.0.0.5 would send the API key in clear. "
        "Use https://, or set LLM_ALLOW_PLAIN_HTTP=true if its network is trusted."
    )
    assert not Endpoint.objects.exists()
    assert not get_user_model().objects.exists()


def test_llm_allow_plain_http_opts_in_with_a_warning(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "http://10.0.0.5:8000/v1")
    monkeypatch.setenv("LLM_ALLOW_PLAIN_HTTP", "true")

    out = _setup()

    configured = Endpoint.objects.get(name="configured")
    assert configured.base_url == "http://10.0.0.5:8000/v1"
    assert configured.allow_plain_http is True
    assert "plain HTTP: its API key travels in clear" in out


def test_a_local_llm_base_url_needs_no_opt_in(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "http://localhost:11434/v1")

    _setup()

    configured = Endpoint.objects.get(name="configured")
    assert configured.allow_plain_http is False
    assert not configured.sends_in_clear


def test_a_mistyped_opt_in_is_a_loud_error(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "https://llm.example.com/v1")
    monkeypatch.setenv("LLM_ALLOW_PLAIN_HTTP", "sure")

    with pytest.raises(CommandError, match="LLM_ALLOW_PLAIN_HTTP must be true or"):
        _setup()
