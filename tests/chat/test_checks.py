"""The chat's system checks catch settings that would make it unusable."""

from __future__ import annotations

from chat.checks import check_chat_settings


def test_sane_defaults_pass():
    assert check_chat_settings() == []


def test_a_zero_limit_is_an_error(settings):
    settings.CHAT_MAX_CONCURRENT_GENERATIONS = 0
    settings.CHAT_RESUME_GRACE_SECONDS = -1

    errors = check_chat_settings()

    assert [e.id for e in errors] == ["chat.E001", "chat.E001"]
    assert "CHAT_MAX_CONCURRENT_GENERATIONS" in errors[0].msg
    assert "CHAT_RESUME_GRACE_SECONDS" in errors[1].msg
