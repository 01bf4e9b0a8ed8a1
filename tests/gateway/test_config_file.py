"""Endpoints, routes and budgets from a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from gateway.config_file import ConfigFileError, export_text, import_text
from gateway.models import Budget, Endpoint, ModelDefaults, ModelRoute

pytestmark = pytest.mark.django_db

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "llm_api.example.toml"

VALID = """
[[endpoints]]
name = "primary"
base_url = "http://127.0.0.1:9101/v1"
api_key = "sk-primary"
priority = 1

[[endpoints]]
name = "fallback"
base_url = "http://127.0.0.1:9102/v1"
priority = 2
timeout = 30

[[routes]]
model = "chat"
endpoint = "primary"
upstream_model = "gpt-4o-mini"
priority = 1
input_price_per_1k = 0.00015

[[routes]]
model = "chat"
endpoint = "fallback"
upstream_model = "llama3"
priority = 2
context_window = 16000

[[budgets]]
scope = "endpoint"
endpoint = "primary"
token_limit = 100000
"""


def test_it_imports_endpoints_routes_and_budgets():
    summary = import_text(VALID)

    assert summary.created == {
        "endpoints": 2,
        "routes": 2,
        "budgets": 1,
        "model_defaults": 0,
    }
    primary = Endpoint.objects.get(name="primary")
    assert primary.api_key == "sk-primary"
    assert Endpoint.objects.get(name="fallback").timeout == 30
    chain = list(ModelRoute.objects.filter(model_name="chat").order_by("priority"))
    assert [r.endpoint.name for r in chain] == ["primary", "fallback"]
    assert chain[1].context_window == 16000
    assert chain[1].max_output_tokens == 2000
    assert Budget.objects.get(endpoint=primary).token_limit == 100000


def test_the_failover_settings_import_and_export():
    text = VALID.replace(
        "timeout = 30",
        "timeout = 30\nconnect_timeout = 2\nfirst_token_timeout = 8\n"
        "request_timeout = 90\nretries_before_failover = 1",
    ).replace("context_window = 16000", "context_window = 16000\nhedge_after_ms = 1500")

    import_text(text)

    fallback = Endpoint.objects.get(name="fallback")
    assert (
        fallback.connect_timeout,
        fallback.first_token_timeout,
        fallback.timeout,
        fallback.request_timeout,
        fallback.retries_before_failover,
    ) == (2, 8, 30, 90, 1)
    assert ModelRoute.objects.get(endpoint=fallback).hedge_after_ms == 1500
    exported = export_text()
    assert "first_token_timeout = 8.0" in exported
    assert "hedge_after_ms = 1500" in exported
    assert import_text(exported).unchanged == {
        "endpoints": 2,
        "routes": 2,
        "budgets": 1,
        "model_defaults": 0,
    }


def test_a_bad_failover_setting_names_its_line_and_field():
    bad = VALID.replace("timeout = 30", "timeout = 30\nfirst_token_timeout = 0")

    with pytest.raises(ConfigFileError) as caught:
        import_text(bad)

    assert any("first_token_timeout" in p for p in caught.value.problems)
    assert Endpoint.objects.count() == 0


def test_importing_twice_updates_and_never_duplicates():
    import_text(VALID)
    second = import_text(VALID.replace("timeout = 30", "timeout = 45"))

    assert Endpoint.objects.count() == 2
    assert ModelRoute.objects.count() == 2
    assert Budget.objects.count() == 1
    assert second.updated["endpoints"] == 1
    assert second.unchanged["routes"] == 2
    assert Endpoint.objects.get(name="fallback").timeout == 45


def test_a_bad_file_names_line_and_field_and_changes_nothing():
    bad = VALID.replace("timeout = 30", "timeout = -5").replace(
        'endpoint = "fallback"\nupstream_model', 'endpoint = "nowhere"\nupstream_model'
    )

    with pytest.raises(ConfigFileError) as caught:
        import_text(bad)

    problems = "\n".join(caught.value.problems)
    assert "line 12: endpoints[2].timeout" in problems
    assert "routes[2].endpoint: no endpoint named 'nowhere'" in problems
    assert Endpoint.objects.count() == 0
    assert ModelRoute.objects.count() == 0


def test_a_syntax_error_reports_its_line():
    with pytest.raises(ConfigFileError, match=r"line 3"):
        import_text('[[endpoints]]\nname = "a"\nbase_url = \n')


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(ConfigFileError, match=r"endpoints\[1\]\.tiemout: unknown key"):
        import_text(
            '[[endpoints]]\nname = "a"\nbase_url = "https://x/v1"\ntiemout = 3\n'
        )


def test_output_reservation_must_fit_the_window():
    text = VALID.replace("context_window = 16000", "context_window = 1000")

    with pytest.raises(ConfigFileError, match=r"routes\[2\]\.max_output_tokens"):
        import_text(
            text.replace("priority = 2\ncontext", "max_output_tokens = 1000\ncontext")
        )


def test_api_key_env_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PRIMARY_KEY", "sk-from-env")
    import_text(VALID.replace('api_key = "sk-primary"', 'api_key_env = "PRIMARY_KEY"'))

    assert Endpoint.objects.get(name="primary").api_key == "sk-from-env"


def test_a_missing_key_variable_is_an_error(monkeypatch):
    monkeypatch.delenv("PRIMARY_KEY", raising=False)

    with pytest.raises(ConfigFileError, match="PRIMARY_KEY' is not set"):
        import_text(
            VALID.replace('api_key = "sk-primary"', 'api_key_env = "PRIMARY_KEY"')
        )


def test_export_round_trips_without_secrets():
    import_text(VALID)
    exported = export_text()

    assert "sk-primary" not in exported
    summary = import_text(exported)
    assert summary.created == {
        "endpoints": 0,
        "routes": 0,
        "budgets": 0,
        "model_defaults": 0,
    }
    assert summary.updated == {
        "endpoints": 0,
        "routes": 0,
        "budgets": 0,
        "model_defaults": 0,
    }
    assert Endpoint.objects.get(name="primary").api_key == "sk-primary"


def test_the_shipped_example_imports(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")

    call_command("import_endpoints", str(EXAMPLE))

    assert ModelRoute.objects.filter(model_name="assistant").count() == 2
    assert Budget.objects.get(scope="global").token_limit is None


def test_the_command_reports_problems_as_a_command_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[routes]]\nmodel = "x"\nendpoint = "missing"\n')

    with pytest.raises(CommandError, match="nothing changed"):
        call_command("import_endpoints", str(path))


# --- HTTPS only --------------------------------------------------------------------

PLAIN_HTTP = """
[[endpoints]]
name = "secure"
base_url = "https://api.example.com/v1"

[[endpoints]]
name = "lan"
priority = 2
base_url = "http://10.0.0.5:8000/v1"
"""


def test_plain_http_off_this_machine_is_an_error_naming_line_and_field():
    with pytest.raises(ConfigFileError) as caught:
        import_text(PLAIN_HTTP)

    assert caught.value.problems == [
        "line 9: endpoints[2].base_url: Plain http:// to 10.0.0.5 would send the "
        "API key in clear. Use https://, or set allow_plain_http = true if its "
        "network is trusted"
    ]
    assert Endpoint.objects.count() == 0


def test_allow_plain_http_in_the_file_opts_in_and_export_writes_it_back():
    import_text(PLAIN_HTTP.replace("priority = 2\n", "allow_plain_http = true\n"))

    lan = Endpoint.objects.get(name="lan")
    assert (lan.base_url, lan.allow_plain_http) == ("http://10.0.0.5:8000/v1", True)
    assert Endpoint.objects.get(name="secure").allow_plain_http is False
    exported = export_text()
    assert "allow_plain_http = true" in exported
    Endpoint.objects.all().delete()
    summary = import_text(exported)
    assert summary.created["endpoints"] == 2
    assert Endpoint.objects.get(name="lan").allow_plain_http is True


def test_withdrawing_the_opt_in_in_the_file_is_refused_while_the_url_is_http():
    import_text(PLAIN_HTTP.replace("priority = 2\n", "allow_plain_http = true\n"))

    with pytest.raises(ConfigFileError, match=r"line 9: endpoints\[2\]\.base_url"):
        import_text(PLAIN_HTTP.replace("priority = 2\n", "allow_plain_http = false\n"))

    assert Endpoint.objects.get(name="lan").allow_plain_http is True


def test_accepts_images_imports_exports_and_must_be_a_boolean():
    text = VALID.replace(
        'upstream_model = "gpt-4o-mini"',
        'upstream_model = "gpt-4o-mini"\naccepts_images = true',
    )

    import_text(text)

    flags = dict(ModelRoute.objects.values_list("upstream_model", "accepts_images"))
    assert flags == {"gpt-4o-mini": True, "llama3": False}
    exported = export_text()
    assert exported.count("accepts_images = true") == 1
    assert "accepts_images = false" not in exported
    with pytest.raises(ConfigFileError) as caught:
        import_text(text.replace("accepts_images = true", "accepts_images = 1"))
    assert any(
        "accepts_images" in p and "true or false" in p for p in caught.value.problems
    )


# --- Model defaults -------------------------------------------------------------------

DEFAULTS = """
[[model_defaults]]
model = "assistant"
system_prompt = "Answer in French."
temperature = 0.2
max_tokens = 500
"""


def test_model_defaults_import_export_and_import_unchanged():
    summary = import_text(VALID + DEFAULTS)

    assert summary.created["model_defaults"] == 1
    defaults = ModelDefaults.objects.get(model_name="assistant")
    assert (defaults.system_prompt, defaults.temperature, defaults.top_p) == (
        "Answer in French.",
        0.2,
        None,
    )
    assert defaults.max_tokens == 500
    exported = export_text()
    assert "[[model_defaults]]" in exported
    assert import_text(exported).unchanged["model_defaults"] == 1


def test_a_key_left_out_of_model_defaults_clears_it():
    import_text(VALID + DEFAULTS)

    second = import_text(VALID + DEFAULTS.replace("temperature = 0.2\n", ""))

    assert second.updated["model_defaults"] == 1
    assert ModelDefaults.objects.get().temperature is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("temperature = 2.5", "temperature: Ensure this value is less than or equal"),
        ("top_p = -0.1", "top_p: Ensure this value is greater than or equal to 0"),
        ("max_tokens = 0", "max_tokens: Ensure this value is greater than or equal"),
        ("max_tokens = 1.5", "max_tokens: must be a whole number"),
        ('temperature = "hot"', "temperature: must be a number"),
        ("colour = 1", "colour: unknown key"),
    ],
)
def test_bad_model_defaults_name_line_and_key_and_change_nothing(line, expected):
    bad = VALID + f'[[model_defaults]]\nmodel = "assistant"\n{line}\n'

    with pytest.raises(ConfigFileError) as caught:
        import_text(bad)

    assert len(caught.value.problems) == 1
    assert "model_defaults[1]." in caught.value.problems[0]
    assert expected in caught.value.problems[0]
    assert not ModelDefaults.objects.exists()
    assert not Endpoint.objects.exists()


def test_model_defaults_need_a_model_once():
    twice = VALID + DEFAULTS + DEFAULTS

    with pytest.raises(ConfigFileError) as caught:
        import_text(twice)

    assert caught.value.problems[0].endswith("model: 'assistant' appears twice")
