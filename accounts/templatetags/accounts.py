"""Template tags for pages outside the app that link to its optional parts."""

from __future__ import annotations

from django import template
from django.conf import settings

register = template.Library()


@register.simple_tag
def signup_enabled() -> bool:
    """Whether the sign-up page exists (SIGNUP_ENABLED, read at render time)."""
    return bool(settings.SIGNUP_ENABLED)
