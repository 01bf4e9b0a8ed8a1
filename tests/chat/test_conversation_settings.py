"""A conversation's settings: validation, the model's limits, defaults, history."""

from __future__ import annotations

import pytest

from chat import actions, conversation_settings
from chat.conversation_settings import ConversationSettings, check_for_model, parse
from chat.errors import ChatError
from chat.generation import _new_settings
from chat.models import Conversation
from chat.protocol import Send
from gateway.models import Endpoint, ModelDefaults, ModelRoute
from tests.chat.conftest import MODEL

# Far more tokens than a 300-token window holds, whatever the counting.
LONG_PROMPT = "Always answer as a pirate would, matey. " * 200


def refused(value) -> ChatError:
    with pytest.raises(ChatError) as caught:
        parse(value)
    return caught.value


# --- Validation ---------------------------------------------------------------


def test_valid_settings_are_kept_and_only_set_parameters_go_upstream():
    settings = parse({"system_prompt": "Be brief.", "temperature": 0.2, "top_p": 1})

    assert settings == ConversationSettings("Be brief.", 0.2, 1.0, None)
    assert settings.params() == {"temperature": 0.2, "top_p": 1.0}


def test_missing_and_null_settings_leave_the_models_defaults():
    assert parse({}) == ConversationSettings()
    assert parse({"temperature": None, "max_tokens": None}).params() == {}


@pytest.mark.parametrize(
    ("field", "value", "range_text"),
    [
        ("temperature", 2.01, "from 0 to 2"),
        ("temperature", -1, "from 0 to 2"),
        ("temperature", "0.5", "from 0 to 2"),
        ("temperature", True, "from 0 to 2"),
        ("top_p", 1.5, "from 0 to 1"),
        ("max_tokens", 0, "from 1 to 1,000,000"),
        ("max_tokens", 2.5, "from 1 to 1,000,000"),
        ("max_tokens", 10**7, "from 1 to 1,000,000"),
        ("max_tokens", False, "from 1 to 1,000,000"),
    ],
)
def test_an_out_of_range_parameter_is_refused_with_its_range(field, value, range_text):
    error = refused({field: value})

    assert error.code == "invalid"
    assert field in error.message and range_text in error.message


def test_unknown_settings_and_a_non_object_are_refused():
    assert "'seed'" in refused({"seed": 4}).message
    assert refused(["system_prompt"]).code == "invalid"
    assert refused({"system_prompt": 42}).code == "invalid"


def test_a_system_prompt_over_the_limit_is_refused_with_the_limit(settings):
    settings.CHAT_MAX_SYSTEM_PROMPT_CHARS = 100

    error = refused({"system_prompt": "x" * 101})

    assert error.code == "too_large"
    assert "101" in error.message and "100" in error.message


def test_a_blank_system_prompt_is_no_system_prompt():
    assert parse({"system_prompt": "  \n "}).system_prompt == ""


# --- The model's routes -------------------------------------------------------


@pytest.fixture
def small_and_large(db):
    """Two routes of MODEL: a 300-token window and (disabled) a 100k one."""
    endpoint = Endpoint.objects.create(name="small", base_url="http://127.0.0.1:9/v1")
    large = Endpoint.objects.create(name="large", base_url="http://127.0.0.1:9/v2")
    ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model="sim-small",
        context_window=300,
        max_output_tokens=100,
    )
    return ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=large,
        upstream_model="sim-large",
        context_window=100_000,
        max_output_tokens=4000,
        enabled=False,
    )


def test_a_system_prompt_too_large_for_every_route_is_refused(small_and_large):
    with pytest.raises(ChatError) as caught:
        check_for_model(ConversationSettings(LONG_PROMPT), MODEL)

    assert caught.value.code == "context_too_large"
    assert "room for 200" in caught.value.message


def test_a_system_prompt_fitting_one_enabled_route_is_accepted(small_and_large):
    small_and_large.enabled = True
    small_and_large.save()

    check_for_model(ConversationSettings(LONG_PROMPT, max_tokens=4000), MODEL)


def test_max_tokens_above_every_routes_limit_is_refused_with_the_limit(
    small_and_large,
):
    with pytest.raises(ChatError) as caught:
        check_for_model(ConversationSettings(max_tokens=101), MODEL)

    assert caught.value.code == "invalid"
    assert "at most 100" in caught.value.message
    # Only when asked: the router caps it per route otherwise.
    check_for_model(ConversationSettings(max_tokens=101), MODEL, max_tokens=False)


def test_the_picker_shows_each_models_largest_window_and_its_defaults(
    small_and_large,
):
    small_and_large.enabled = True
    small_and_large.save()
    ModelDefaults.objects.create(model_name=MODEL, temperature=0.1)

    [info] = conversation_settings.model_info()

    assert (info["name"], info["context_window"], info["max_output_tokens"]) == (
        MODEL,
        100_000,
        4000,
    )
    assert info["defaults"]["temperature"] == 0.1


# --- New conversations ----------------------------------------------------------------


def test_a_new_conversation_sends_its_system_prompt_first(owner):
    settings = ConversationSettings("Be brief.", temperature=0.5)

    turn = actions.plan_send(owner, None, "Hello", MODEL, settings=settings)

    assert [(m.role, m.content) for m in turn.history] == [
        ("system", "Be brief."),
        ("user", "Hello"),
    ]
    assert turn.conversation.temperature == 0.5
    assert turn.params == {}  # set once checked against the model (prepare)
    assert not Conversation.objects.exists()


def test_a_new_chat_without_settings_takes_the_models_defaults(db):
    ModelDefaults.objects.create(model_name=MODEL, system_prompt="Be kind.", top_p=0.4)

    chosen = _new_settings(Send(None, "Hi", MODEL))

    assert chosen == ConversationSettings("Be kind.", None, 0.4, None)


def test_settings_sent_with_a_new_chat_replace_the_models_defaults(db):
    ModelDefaults.objects.create(model_name=MODEL, system_prompt="Be kind.")
    sent = ConversationSettings(temperature=1.0)

    assert _new_settings(Send(None, "Hi", MODEL, settings=sent)) == sent
