"""The original spec's `[llm_api]` layout, imported as endpoints, routes, budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

from gateway.config_file import ConfigFileError, export_text, import_text
from gateway.models import Budget, Endpoint, ModelDefaults, ModelRoute

pytestmark = pytest.mark.django_db

CONFIG = Path(__file__).resolve().parents[2] / "config"

SPEC = """\
[llm_api]
endpoint = "http://127.0.0.1:9101/v1/chat/completions"
model = "claude-sonnet-4.5"
api_key = "sk-primary"
context_window = 8000
max_tokens_per_request = 2000
max_requests_per_minute = 5
request_timeout = 120
health_check_interval = 300
retry_attempts = 3
retry_backoff_multiplier = 2.0
daily_token_budget = 1000000
token_warning_threshold = 0.75

[[llm_api.fallbacks]]
endpoint = "http://127.0.0.1:9102/v1/chat/completions"
model = "gpt-4"
priority = 2
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigFileError) as caught:
        import_text(text)
    return caught.value.problems


def test_the_primary_and_its_fallback_become_endpoints():
    summary = import_text(SPEC)

    assert summary.created == {
        "endpoints": 2,
        "routes": 2,
        "budgets": 1,
        "model_defaults": 0,
    }
    primary = Endpoint.objects.get(name="primary")
    assert primary.base_url == "http://127.0.0.1:9101/v1"
    assert primary.api_key == "sk-primary"
    assert primary.priority == 1
    fallback = Endpoint.objects.get(name="fallback-1")
    assert (fallback.base_url, fallback.priority) == ("http://127.0.0.1:9102/v1", 2)
    assert fallback.api_key == ""  # a key belongs to one server


def test_one_public_model_routes_to_every_endpoint_in_priority_order():
    import_text(SPEC)

    chain = list(
        ModelRoute.objects.filter(model_name="claude-sonnet-4.5").order_by("priority")
    )
    assert [(r.endpoint.name, r.upstream_model, r.priority) for r in chain] == [
        ("primary", "claude-sonnet-4.5", 1),
        ("fallback-1", "gpt-4", 2),
    ]
    assert {(r.context_window, r.max_output_tokens) for r in chain} == {(8000, 2000)}


def test_model_name_sets_the_public_name():
    import_text(
        SPEC.replace('model = "claude', 'model_name = "assistant"\nmodel = "claude')
    )

    assert set(ModelRoute.objects.values_list("model_name", flat=True)) == {"assistant"}


def test_timeout_retries_backoff_limits_and_probes_apply_to_every_endpoint():
    import_text(SPEC)

    for endpoint in Endpoint.objects.all():
        assert (
            endpoint.request_timeout,
            endpoint.max_retries,
            endpoint.backoff_multiplier,
            endpoint.rpm_limit,
            endpoint.tpm_limit,
            endpoint.probe_interval,
        ) == (120, 3, 2.0, 5, None, 300), endpoint.name


def test_a_fallback_overrides_what_it_sets_and_zero_lifts_a_limit():
    import_text(SPEC)
    text = SPEC + (
        'name = "local"\nrequest_timeout = 30\nmax_requests_per_minute = 0\n'
        "max_tokens_per_minute = 40000\ncontext_window = 4096\n"
    )

    import_text(text)

    local = Endpoint.objects.get(name="local")
    assert (local.request_timeout, local.rpm_limit, local.tpm_limit) == (
        30,
        None,
        40000,
    )
    assert ModelRoute.objects.get(endpoint=local).context_window == 4096
    assert Endpoint.objects.get(name="primary").rpm_limit == 5


def test_the_budget_is_a_global_daily_one_with_its_warning_percent():
    import_text(SPEC)

    budget = Budget.objects.get()
    assert (budget.scope, budget.period, budget.token_limit) == (
        "global",
        "daily",
        1_000_000,
    )
    assert budget.warning_percent == 75


def test_a_zero_budget_is_unlimited_and_no_budget_keys_leave_budgets_alone():
    import_text(SPEC.replace("daily_token_budget = 1000000", "daily_token_budget = 0"))
    assert Budget.objects.get().token_limit is None

    Budget.objects.update(token_limit=500)
    import_text(
        SPEC.replace("daily_token_budget = 1000000\n", "").replace(
            "token_warning_threshold = 0.75\n", ""
        )
    )
    assert Budget.objects.get().token_limit == 500


def test_a_second_import_changes_nothing():
    import_text(SPEC)

    summary = import_text(SPEC)

    assert summary.unchanged == {
        "endpoints": 2,
        "routes": 2,
        "budgets": 1,
        "model_defaults": 0,
    }
    assert (
        summary.created
        == summary.updated
        == {
            "endpoints": 0,
            "routes": 0,
            "budgets": 0,
            "model_defaults": 0,
        }
    )
    assert Endpoint.objects.count() == 2


def test_a_changed_value_updates_in_place():
    import_text(SPEC)

    summary = import_text(SPEC.replace("request_timeout = 120", "request_timeout = 90"))

    assert summary.updated["endpoints"] == 2  # the fallback inherits it
    assert set(Endpoint.objects.values_list("request_timeout", flat=True)) == {90}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "max_requests_per_minute = 5",
            "max_requests_per_minute = -5",
            "line 7: llm_api.max_requests_per_minute: must be 0 (none) or a "
            "positive integer",
        ),
        (
            "max_requests_per_minute = 5",
            'max_requests_per_minute = "5"',
            "line 7: llm_api.max_requests_per_minute: must be a whole number",
        ),
        (
            "token_warning_threshold = 0.75",
            "token_warning_threshold = 80",
            "line 13: llm_api.token_warning_threshold: must be a fraction above 0 "
            "and at most 1, e.g. 0.8",
        ),
        (
            "retry_attempts = 3",
            "retry_attempts = 0",
            "line 10: llm_api.retry_attempts: Ensure this value is greater than or "
            "equal to 1",
        ),
        (
            "request_timeout = 120",
            "request_timeout = 0",
            "line 8: llm_api.request_timeout: Ensure this value is greater than or "
            "equal to 0.1",
        ),
        (
            "max_tokens_per_request = 2000",
            "max_tokens_per_request = 9000",
            "line 6: llm_api.max_tokens_per_request: must be smaller than "
            "context_window",
        ),
        (
            "priority = 2",
            "priority = 2\ntiemout = 3",
            "line 19: llm_api.fallbacks[1].tiemout: unknown key in a fallback",
        ),
        (
            'endpoint = "http://127.0.0.1:9102/v1/chat/completions"',
            'endpoint = "http://10.0.0.5/v1/chat/completions"',
            "line 16: llm_api.fallbacks[1].endpoint: Plain http:// to 10.0.0.5",
        ),
    ],
)
def test_a_bad_value_names_its_line_and_key_and_changes_nothing(old, new, expected):
    assert old in SPEC
    problems = _problems(SPEC.replace(old, new))

    assert any(p.startswith(expected) for p in problems), problems
    assert Endpoint.objects.count() == 0
    assert Budget.objects.count() == 0


def test_an_inherited_bad_value_is_reported_once_at_its_own_line():
    problems = _problems(
        SPEC.replace("health_check_interval = 300", "health_check_interval = 1")
    )

    assert problems == [
        "line 9: llm_api.health_check_interval: Ensure this value is greater than "
        "or equal to 5"
    ]


def test_a_missing_key_variable_names_the_fallback(monkeypatch):
    monkeypatch.delenv("LOCAL_KEY", raising=False)

    problems = _problems(SPEC + 'api_key_env = "LOCAL_KEY"\n')

    assert problems == [
        "line 19: llm_api.fallbacks[1].api_key_env: environment variable "
        "'LOCAL_KEY' is not set"
    ]


def test_a_file_with_both_layouts_is_refused():
    both = SPEC + '\n[[endpoints]]\nname = "x"\nbase_url = "https://x/v1"\n'

    assert _problems(both) == [
        "the file mixes two layouts: use either [llm_api] or "
        "[[endpoints]]/[[routes]]/[[budgets]], not both"
    ]


def test_spec_keys_without_a_gateway_meaning_are_reported_not_applied():
    summary = import_text(
        SPEC.replace("[llm_api]\n", "[llm_api]\nenable_streaming = true\n")
    )

    assert summary.notes == [
        "llm_api.enable_streaming: not applied; streaming is chosen per request"
    ]


def test_sampling_and_system_prompt_become_the_public_models_defaults():
    spec = SPEC.replace(
        "[llm_api]\n",
        '[llm_api]\ntemperature = 0.3\ntop_p = 0.5\nsystem_prompt = "Be brief."\n',
    )

    summary = import_text(spec)

    assert summary.created["model_defaults"] == 1
    defaults = ModelDefaults.objects.get()
    assert (defaults.model_name, defaults.system_prompt) == (
        "claude-sonnet-4.5",
        "Be brief.",
    )
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (
        0.3,
        0.5,
        None,
    )
    assert import_text(spec).unchanged["model_defaults"] == 1


def test_an_out_of_range_temperature_names_its_line_and_range():
    spec = SPEC.replace("[llm_api]\n", "[llm_api]\ntemperature = 3\n")

    problems = _problems(spec)

    assert len(problems) == 1
    assert problems[0].startswith("line 2: llm_api.temperature: ")
    assert "less than or equal to 2" in problems[0]
    assert not ModelDefaults.objects.exists()


def test_export_writes_the_project_format_which_imports_unchanged():
    import_text(SPEC)

    exported = export_text()

    assert "[llm_api]" not in exported
    assert "[[endpoints]]" in exported
    assert import_text(exported).unchanged == {
        "endpoints": 2,
        "routes": 2,
        "budgets": 1,
        "model_defaults": 0,
    }


# --- The shipped files ---------------------------------------------------------------


def test_the_shipped_spec_file_imports_cleanly_and_idempotently(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")

    call_command("import_endpoints", str(CONFIG / "llm_api.toml"))
    call_command("import_endpoints", str(CONFIG / "llm_api.toml"))

    out = capsys.readouterr().out
    assert "endpoints: 0 created, 0 updated, 2 unchanged" in out
    assert "model_defaults: 0 created, 0 updated, 1 unchanged" in out
    assert ModelDefaults.objects.get(model_name="assistant").temperature == 0.7
    primary = Endpoint.objects.get(name="primary")
    assert (primary.base_url, primary.api_key) == (
        "https://api.openai.com/v1",
        "sk-example",
    )
    assert (primary.rpm_limit, primary.request_timeout, primary.probe_interval) == (
        5,
        120,
        300,
    )
    local = Endpoint.objects.get(name="local")
    assert (local.base_url, local.rpm_limit, local.api_key) == (
        "http://127.0.0.1:11434/v1",
        None,
        "",
    )
    chain = ModelRoute.objects.filter(model_name="assistant").order_by("priority")
    assert [
        (r.upstream_model, r.context_window, r.max_output_tokens) for r in chain
    ] == [
        ("gpt-4o-mini", 8000, 2000),
        ("llama3.1:8b", 8000, 2000),
    ]
    assert Budget.objects.get(scope="global").token_limit is None


def test_both_shipped_files_describe_the_same_chain(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example")

    def chain() -> list[tuple]:
        return list(
            ModelRoute.objects.order_by("model_name", "priority").values_list(
                "model_name",
                "upstream_model",
                "context_window",
                "max_output_tokens",
                "accepts_images",
            )
        )

    import_text((CONFIG / "llm_api.example.toml").read_text())
    from_example = chain()
    ModelRoute.objects.all().delete()
    Endpoint.objects.all().delete()
    import_text((CONFIG / "llm_api.toml").read_text())

    assert chain() == from_example


# --- Images ----------------------------------------------------------------------


def test_accepts_images_is_inherited_only_with_the_model():
    text = SPEC.replace(
        "max_tokens_per_request = 2000\n",
        "max_tokens_per_request = 2000\naccepts_images = true\n",
    ) + (
        "\n[[llm_api.fallbacks]]\n"
        'name = "same-model"\n'
        'endpoint = "http://127.0.0.1:9103/v1/chat/completions"\n'
    )

    import_text(text)

    flags = dict(ModelRoute.objects.values_list("endpoint__name", "accepts_images"))
    # The gpt-4 fallback names a model of its own: it says for itself.
    assert flags == {"primary": True, "fallback-1": False, "same-model": True}


def test_accepts_images_must_be_true_or_false():
    text = SPEC.replace(
        "max_tokens_per_request = 2000\n",
        'max_tokens_per_request = 2000\naccepts_images = "yes"\n',
    )

    problems = _problems(text)

    assert any("llm_api.accepts_images" in p and "true or false" in p for p in problems)
    assert not ModelRoute.objects.exists()
