"""A conversation's settings: its system prompt and sampling parameters.

Everything here is checked on the server, whatever the page already checked:
the ranges are named in the error, the system prompt's length is bounded
(CHAT_MAX_SYSTEM_PROMPT_CHARS) and a system prompt too large for every
enabled route's window of the model is refused before anything is sent or
stored. Null parameters leave the model's own default.

The settings travel the ordinary pipeline: the system prompt is the first
message of the conversation's history (so it counts against the window and
the budget, and the context gauge counts it), and the parameters go into the
upstream request body through ``service.stream_chat(..., params)``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from chat import actions, attachments
from chat.conf import chat_settings
from chat.errors import ChatError
from chat.models import Conversation
from gateway.context import ContextMessage, ContextWindowExceeded, fit_context
from gateway.limits import LocalTTLCache
from gateway.models import (
    MAX_TOKENS_LIMIT,
    TEMPERATURE_MAX,
    TOP_P_MAX,
    ModelDefaults,
    ModelRoute,
    RouteKind,
)

FIELDS = ("system_prompt", "temperature", "top_p", "max_tokens")
PARAMS = ("temperature", "top_p", "max_tokens")


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    """A system prompt and the sampling a conversation asks for."""

    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, obj: Any) -> ConversationSettings:
        """The settings stored on a Conversation, Preset or ModelDefaults."""
        return cls(**{name: getattr(obj, name) for name in FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def params(self) -> dict[str, Any]:
        """What goes into the upstream request body: the parameters set."""
        return {
            name: getattr(self, name)
            for name in PARAMS
            if getattr(self, name) is not None
        }

    def apply(self, obj: Any) -> None:
        """Set these settings on a Conversation or Preset (not saved)."""
        for name in FIELDS:
            setattr(obj, name, getattr(self, name))


# --- Validation -----------------------------------------------------------------


def parse(value: Any) -> ConversationSettings:
    """Validate a ``settings`` object from the browser, or raise ChatError.

    Missing keys (and null) leave a field unset: no system prompt, the
    model's default for a parameter.
    """
    if not isinstance(value, Mapping):
        raise ChatError(
            "invalid",
            "settings must be an object with system_prompt, temperature, top_p "
            "and max_tokens.",
        )
    unknown = sorted(str(key)[:40] for key in value if key not in FIELDS)
    if unknown:
        raise ChatError(
            "invalid",
            f"Unknown setting {unknown[0]!r}; expected {', '.join(FIELDS)}.",
        )
    return ConversationSettings(
        system_prompt=parse_system_prompt(value.get("system_prompt")),
        temperature=_number(value.get("temperature"), "temperature", TEMPERATURE_MAX),
        top_p=_number(value.get("top_p"), "top_p", TOP_P_MAX),
        max_tokens=_max_tokens(value.get("max_tokens")),
    )


def parse_system_prompt(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ChatError("invalid", "system_prompt must be text.")
    limit = chat_settings().max_system_prompt_chars
    if len(value) > limit:
        raise ChatError(
            "too_large",
            f"The system prompt is {len(value):,} characters long; the limit is "
            f"{limit:,}.",
        )
    # Only white space is no system prompt at all.
    return value if value.strip() else ""


def _number(value: Any, name: str, top: float) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= top
    ):
        raise ChatError(
            "invalid", f"{name} must be a number from 0 to {top:g}, or empty."
        )
    return float(value)


def _max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 1 <= value <= MAX_TOKENS_LIMIT
    ):
        raise ChatError(
            "invalid",
            f"max_tokens must be a whole number from 1 to {MAX_TOKENS_LIMIT:,}, "
            "or empty.",
        )
    return value


# --- The model's routes -------------------------------------------------------------


def _routes(model: str) -> list[tuple[str, int, int]]:
    """(upstream model, window, output) of every enabled chat route of a model."""
    return list(
        ModelRoute.objects.filter(
            model_name=model, kind=RouteKind.CHAT, enabled=True, endpoint__enabled=True
        ).values_list("upstream_model", "context_window", "max_output_tokens")
    )


def check_for_model(
    settings: ConversationSettings, model: str, *, max_tokens: bool = True
) -> None:
    """Refuse settings no enabled route of the model can honour.

    ``max_tokens`` above every route's output limit is refused (with the
    limit named) when `max_tokens` is true; a system prompt that does not fit
    any route's window, counted as context fitting counts it, always is.
    A model without routes is left to the ``unknown_model`` check.
    """
    if not settings.system_prompt and (not max_tokens or settings.max_tokens is None):
        return
    routes = _routes(model)
    if not routes:
        return
    if max_tokens and settings.max_tokens is not None:
        allowed = max(output for _, _, output in routes)
        if settings.max_tokens > allowed:
            raise ChatError(
                "invalid",
                f"max_tokens can be at most {allowed:,} with {model[:80]}.",
            )
    if settings.system_prompt:
        system_prompt_fits(settings.system_prompt, model, routes)


def system_prompt_fits(
    system_prompt: str, model: str, routes: list[tuple[str, int, int]] | None = None
) -> None:
    """Raise ``context_too_large`` when no route's window holds the prompt."""
    routes = _routes(model) if routes is None else routes
    needed = room = 0
    for upstream, window, output in routes:
        try:
            fit_context(
                [ContextMessage("system", system_prompt)],
                model=upstream,
                context_window=window,
                max_output_tokens=output,
            )
            return
        except ContextWindowExceeded as exc:
            needed = max(needed, exc.required)
            room = max(room, exc.limit)
    if routes:
        raise ChatError(
            "context_too_large",
            f"The system prompt takes about {needed:,} tokens, but {model[:80]} "
            f"has room for {room:,} before its answer. Shorten the system prompt.",
        )


# Read for every new conversation, changed by an administrator now and then:
# kept per process like the gateway's other policy rows.
_model_defaults: LocalTTLCache[ConversationSettings] = LocalTTLCache()


def model_defaults(model: str) -> ConversationSettings:
    """What an administrator set for new chats with a model (else nothing)."""
    cached = _model_defaults.get(model)
    if cached is not None:
        return cached
    found = ModelDefaults.objects.filter(model_name=model).first()
    defaults = (
        ConversationSettings() if found is None else ConversationSettings.of(found)
    )
    _model_defaults.set(model, defaults)
    return defaults


@receiver(post_save, sender=ModelDefaults)
@receiver(post_delete, sender=ModelDefaults)
def forget_model_defaults(**kwargs: Any) -> None:
    """Drop this process's cached model defaults (any save through the ORM)."""
    _model_defaults.clear()


def model_info() -> list[dict[str, Any]]:
    """Each model a user can pick, with what the picker and the panel show.

    ``context_window`` and ``max_output_tokens`` are the largest of the
    model's enabled chat routes; ``defaults`` what a new chat starts with;
    ``images`` whether it takes images (chat.attachments).
    """
    models: dict[str, dict[str, Any]] = {}
    rows = ModelRoute.objects.filter(
        kind=RouteKind.CHAT, enabled=True, endpoint__enabled=True
    ).values_list("model_name", "context_window", "max_output_tokens")
    for name, window, output in rows:
        info = models.setdefault(
            name, {"name": name, "context_window": 0, "max_output_tokens": 0}
        )
        info["context_window"] = max(info["context_window"], window)
        info["max_output_tokens"] = max(info["max_output_tokens"], output)
    defaults = all_model_defaults(list(models))
    takes_images = attachments.models_taking_images()
    for name, info in models.items():
        info["defaults"] = defaults.get(name, ConversationSettings().to_dict())
        info["images"] = name in takes_images
    return [models[name] for name in sorted(models)]


def all_model_defaults(models: list[str]) -> dict[str, dict[str, Any]]:
    """The defaults of these models, by model name, for the chat page."""
    return {
        row.model_name: ConversationSettings.of(row).to_dict()
        for row in ModelDefaults.objects.filter(model_name__in=models)
    }


# --- Writes ---------------------------------------------------------------------


@transaction.atomic
def save(
    user: Any, conversation_id: uuid.UUID, settings: ConversationSettings
) -> dict[str, Any]:
    """Store a conversation's settings (the ``settings`` frame); all or nothing.

    Another user's conversation is refused exactly like a missing one.
    """
    conversation = actions.owned_conversation(user, conversation_id)
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if conversation.model_name:
        check_for_model(settings, conversation.model_name)
    settings.apply(conversation)
    conversation.save(update_fields=list(FIELDS))
    return {
        "type": "settings",
        "conversation_id": str(conversation.id),
        "settings": settings.to_dict(),
    }
