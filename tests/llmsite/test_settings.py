"""Settings read from the environment: defaults, switching, loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRINT_SETTINGS = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps({
    "db": settings.DATABASES["default"]["ENGINE"],
    "db_name": settings.DATABASES["default"]["NAME"],
    "cache": settings.CACHES["default"]["BACKEND"],
    "layer": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "debug": settings.DEBUG,
    "hosts": settings.ALLOWED_HOSTS,
    "ssl_redirect": settings.SECURE_SSL_REDIRECT,
}))
"""


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "HTTPS"}
    }
    env.update(DJANGO_SETTINGS_MODULE="llmsite.settings", DATA_DIR=str(tmp_path))
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _settings(tmp_path: Path, **extra: str) -> dict:
    result = _run(PRINT_SETTINGS, _clean_env(tmp_path, **extra))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_with_no_environment_it_runs_on_sqlite_and_in_memory_backends(tmp_path):
    values = _settings(tmp_path)

    assert values["db"] == "django.db.backends.sqlite3"
    assert values["db_name"] == str(tmp_path / "db.sqlite3")
    assert values["cache"].endswith("LocMemCache")
    assert values["layer"].endswith("InMemoryChannelLayer")
    assert values["debug"] is False
    assert "127.0.0.1" in values["hosts"]


def test_database_and_redis_urls_switch_to_postgresql_and_redis(tmp_path):
    values = _settings(
        tmp_path,
        DATABASE_URL="postgres://app@db.internal:5432/llm",
        REDIS_URL="redis://cache.internal:6379/2",
    )

    assert values["db"] == "django.db.backends.postgresql"
    assert values["db_name"] == "llm"
    assert values["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert values["layer"] == "channels_redis.core.RedisChannelLayer"


def test_https_turns_on_redirects_and_secure_cookies(tmp_path):
    assert _settings(tmp_path, HTTPS="true")["ssl_redirect"] is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEBUG", "perhaps", "DEBUG must be true or false"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL must start with redis://"),
        ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL is not a valid database URL"),
        ("SECRET_KEY", "short", "SECRET_KEY must be at least 32 characters"),
        ("WEB_CONCURRENCY", "two", "WEB_CONCURRENCY must be a whole number"),
        ("CONTEXT_WARN_RATIO", "1.5", "CONTEXT_WARN_RATIO must be between 0 and 1"),
        ("CSRF_TRUSTED_ORIGINS", "chat.example.com", "need a scheme"),
        ("CHAT_MAX_SEND_FRAME_BYTES", "2000000", "between 16384 and 1048576"),
        ("CHAT_MAX_SEND_FRAME_BYTES", "100000", "at least CHAT_MAX_MESSAGE_CHARS"),
    ],
)
def test_a_bad_value_stops_the_process_at_start(tmp_path, name, value, message):
    result = _run(PRINT_SETTINGS, _clean_env(tmp_path, **{name: value}))

    assert result.returncode != 0
    assert message in result.stderr


def test_generated_secret_key_survives_a_restart(tmp_path):
    code = "import django; django.setup(); from django.conf import settings; "
    code += "print(settings.SECRET_KEY)"
    first = _run(code, _clean_env(tmp_path)).stdout
    second = _run(code, _clean_env(tmp_path)).stdout

    assert len(first.strip()) >= 50
    assert first == second


def test_deploy_check_is_clean_with_production_settings(tmp_path):
    env = _clean_env(
        tmp_path,
        SECRET_KEY="x" * 20 + "production-secret-key-value-0123456789",
        HTTPS="true",
        SECURE_HSTS_PRELOAD="true",
        ALLOWED_HOSTS="llm.example.com",
        CSRF_TRUSTED_ORIGINS="https://llm.example.com",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_several_workers_on_per_process_backends_fail_the_system_check(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=_clean_env(tmp_path, WEB_CONCURRENCY="4"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "llmsite.E001" in result.stderr
    assert "llmsite.E002" in result.stderr
