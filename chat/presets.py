"""A user's own presets: saved settings picked for a new conversation.

Every function takes the user and reaches only their presets; another
user's preset is refused exactly like a missing one (``not_found``, 404).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction

from chat.conf import chat_settings
from chat.conversation_settings import ConversationSettings, check_for_model, parse
from chat.errors import ChatError
from chat.models import Preset

NAME_CHARS = Preset._meta.get_field("name").max_length
MODEL_CHARS = Preset._meta.get_field("model_name").max_length


def preset_dict(preset: Preset) -> dict[str, Any]:
    """What the settings panel shows of a preset."""
    return {
        "id": preset.pk,
        "name": preset.name,
        "model": preset.model_name,
        "settings": ConversationSettings.of(preset).to_dict(),
    }


def list_presets(user: Any) -> list[dict[str, Any]]:
    """The user's presets, by name (at most CHAT_MAX_PRESETS of them)."""
    return [preset_dict(p) for p in Preset.objects.filter(user=user)]


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ChatError("invalid", "Give the preset a name.")
    name = " ".join(value.split())
    if len(name) > NAME_CHARS:
        raise ChatError(
            "too_large", f"A preset's name can be at most {NAME_CHARS} characters."
        )
    return name


def _model(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > MODEL_CHARS:
        raise ChatError("invalid", "model must be a model's name, or empty.")
    return value.strip()


@transaction.atomic
def create(user: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """Save a preset: ``{"name", "model" (optional), "settings": {...}}``.

    A preset of the same name is replaced. At most CHAT_MAX_PRESETS a user.
    """
    name = _name(data.get("name"))
    model = _model(data.get("model"))
    settings = parse(data.get("settings", {}))
    if model:
        check_for_model(settings, model)
    # Serialises one user's creations, so two at once cannot pass the cap.
    type(user).objects.select_for_update().filter(pk=user.pk).first()
    preset = Preset.objects.filter(user=user, name=name).first()
    if preset is None:
        limit = chat_settings().max_presets
        if Preset.objects.filter(user=user).count() >= limit:
            raise ChatError(
                "too_many_presets",
                f"You can keep at most {limit} presets; delete one first.",
            )
        preset = Preset(user=user, name=name)
    preset.model_name = model
    settings.apply(preset)
    preset.save()
    return preset_dict(preset)


def delete(user: Any, preset_id: int) -> None:
    """Delete one of the user's presets."""
    deleted, _ = Preset.objects.filter(pk=preset_id, user=user).delete()
    if not deleted:
        raise ChatError("not_found", "That preset does not exist.")
