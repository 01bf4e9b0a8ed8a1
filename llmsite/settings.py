"""Settings for llmsite, read from the environment (see README: Configuration).

With no environment at all this runs on a laptop: SQLite, the in-memory channel
layer and the local-memory cache. DATABASE_URL and REDIS_URL switch to
PostgreSQL and Redis. A bad value stops the process at start.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise ImproperlyConfigured(f"{name} must be a positive number, got {value!r}")
    return value


def _ratio(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise ImproperlyConfigured(f"{name} must be between 0 and 1, got {value!r}")
    return value


def _env_int(name: str, default: int) -> int:
    try:
        return env.int(name, default=default)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a whole number, got {env.str(name)!r}"
        ) from None


def _env_float(name: str, default: float) -> float:
    try:
        return env.float(name, default=default)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a number, got {env.str(name)!r}"
        ) from None


def _env_bool(name: str, default: bool) -> bool:
    raw = env.str(name, default="").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}")


DATA_DIR = Path(env.str("DATA_DIR", default=str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = _env_bool("DEBUG", False)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one kept in DATA_DIR across restarts."""
    key = env.str("SECRET_KEY", default="")
    if key:
        if len(key) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long")
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
SECRET_KEY_FROM_FILE = not env.str("SECRET_KEY", default="")
# Keys for encrypting endpoint API keys at rest; the first encrypts, all decrypt.
# Empty: derived from SECRET_KEY.
FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[])

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
for _origin in CSRF_TRUSTED_ORIGINS:
    if "://" not in _origin:
        raise ImproperlyConfigured(
            f"CSRF_TRUSTED_ORIGINS entries need a scheme, e.g. https://{_origin}"
        )

# How many web processes serve this deployment; only used by system checks
# that catch per-process state (in-memory channel layer, local cache).
WEB_CONCURRENCY = _env_int("WEB_CONCURRENCY", 1)

INSTALLED_APPS = [
    # daphne's app only gives `manage.py runserver` an ASGI server; anywhere
    # else, importing it (Twisted and pyOpenSSL, about 20 MiB) would weigh on
    # every process, uvicorn's and the monitor's included.  The daphne command
    # imports its server itself.
    *(["daphne"] if sys.argv[1:2] == ["runserver"] else []),
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "gateway",
    "chat",
    "monitoring",
    "api",
    "accounts",
    "llmsite",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Requests under /v1/ (the API, authenticated by key: no session, cookie, CSRF
# or messages) go through this list instead (llmsite/lean.py). Async middleware
# only: each sync one would cost thread hops on every API request. The first
# keeps what Security, Common and XFrameOptions do to API responses.
LEAN_MIDDLEWARE = [
    "llmsite.lean.HostAndHeadersMiddleware",
]

ROOT_URLCONF = "llmsite.urls"
ASGI_APPLICATION = "llmsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite by default, anything DATABASE_URL names otherwise.
try:
    DATABASES = {
        "default": env.db_url(
            "DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
        )
    }
except Exception as exc:  # django-environ raises several types for a bad URL
    raise ImproperlyConfigured(
        f"DATABASE_URL is not a valid database URL: {exc}"
    ) from exc
DATABASE_ENGINE = DATABASES["default"]["ENGINE"]
if DATABASE_ENGINE not in {
    "django.db.backends.sqlite3",
    "django.db.backends.postgresql",
}:
    raise ImproperlyConfigured(
        "DATABASE_URL is not a valid database URL: use postgres://... or sqlite:///..."
    )
if DATABASE_ENGINE == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets readers run during a write; IMMEDIATE takes the write lock at
        # BEGIN, so concurrent writers queue instead of failing mid-transaction.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # Opening a SQLite connection costs about a millisecond; keep it per thread.
    DATABASES["default"]["CONN_MAX_AGE"] = _env_int("DATABASE_CONN_MAX_AGE", 600)
elif DATABASE_ENGINE == "django.db.backends.postgresql":
    DATABASES["default"]["CONN_MAX_AGE"] = _env_int("DATABASE_CONN_MAX_AGE", 0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if _env_bool("DATABASE_POOL", False):
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = True
        DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis, when given, carries the channel layer and Django's cache, so rate
# limits, breaker hints and streams are shared by every web process.
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(
        "REDIS_URL must start with redis://, rediss:// or unix://"
    )

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="llmsite"),
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times out idle socket reads after 5 s, which would
                # crash every consumer waiting on the layer (channels_redis#422).
                "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
                "prefix": env.str("CACHE_KEY_PREFIX", default="llmsite") + ":asgi",
            },
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "llmsite",
        }
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

_VALIDATORS = "django.contrib.auth.password_validation."
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": _VALIDATORS + "UserAttributeSimilarityValidator"},
    {"NAME": _VALIDATORS + "MinimumLengthValidator"},
    {"NAME": _VALIDATORS + "CommonPasswordValidator"},
    {"NAME": _VALIDATORS + "NumericPasswordValidator"},
]
LOGIN_URL = "login"
# Login throttling (llmsite.throttle): failures counted per username and per
# client address; reaching a limit locks that one for LOGIN_LOCKOUT_MINUTES.
# 0 turns a limit off.
LOGIN_FAILURE_LIMIT = _env_int("LOGIN_FAILURE_LIMIT", 10)
LOGIN_FAILURE_LIMIT_PER_ADDRESS = _env_int("LOGIN_FAILURE_LIMIT_PER_ADDRESS", 50)
LOGIN_LOCKOUT_MINUTES = _positive(
    "LOGIN_LOCKOUT_MINUTES", _env_float("LOGIN_LOCKOUT_MINUTES", 15)
)
if LOGIN_FAILURE_LIMIT < 0 or LOGIN_FAILURE_LIMIT_PER_ADDRESS < 0:
    raise ImproperlyConfigured("LOGIN_FAILURE_LIMIT values must be 0 or more")
# The cache alias holding the counts; shared by every process on Redis.
LOGIN_THROTTLE_CACHE = env.str("LOGIN_THROTTLE_CACHE", default="default")
LOGIN_REDIRECT_URL = "/chat/"
LOGOUT_REDIRECT_URL = "login"

# --- Each user's own account (accounts) --------------------------------------

# Users create and revoke their own /v1 keys on their account page; when off,
# the page lists their keys and says an administrator issues them.
SELF_SERVICE_API_KEYS = _env_bool("SELF_SERVICE_API_KEYS", True)
# Active (not revoked) keys one user may hold at once.
API_KEYS_PER_USER = _env_int("API_KEYS_PER_USER", 20)
# A sign-up page linked from the login page; off: the URL is a 404.
SIGNUP_ENABLED = _env_bool("SIGNUP_ENABLED", False)
# Password reset requests per email address and per client address, and
# sign-up attempts per client address, each per hour (0: no limit).
PASSWORD_RESET_LIMIT = _env_int("PASSWORD_RESET_LIMIT", 3)
PASSWORD_RESET_LIMIT_PER_ADDRESS = _env_int("PASSWORD_RESET_LIMIT_PER_ADDRESS", 20)
SIGNUP_LIMIT_PER_ADDRESS = _env_int("SIGNUP_LIMIT_PER_ADDRESS", 10)
if API_KEYS_PER_USER < 1:
    raise ImproperlyConfigured("API_KEYS_PER_USER must be 1 or more")
for _name in (
    "PASSWORD_RESET_LIMIT",
    "PASSWORD_RESET_LIMIT_PER_ADDRESS",
    "SIGNUP_LIMIT_PER_ADDRESS",
):
    if globals()[_name] < 0:
        raise ImproperlyConfigured(f"{_name} must be 0 or more")
# How long a password reset link stays valid (Django's setting, in seconds).
PASSWORD_RESET_TIMEOUT = _env_int("PASSWORD_RESET_TIMEOUT", 3600)
if PASSWORD_RESET_TIMEOUT < 60:
    raise ImproperlyConfigured("PASSWORD_RESET_TIMEOUT must be at least 60 seconds")

LANGUAGE_CODE = "en-us"
# Budgets reset at midnight UTC and every timestamp is stored in UTC.
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
# The ASGI app serves /static/ itself unless a reverse proxy does it.
SERVE_STATIC = _env_bool("SERVE_STATIC", True)

# HTTPS deployments: secure cookies, redirects and HSTS.
HTTPS = _env_bool("HTTPS", False)
SECURE_SSL_REDIRECT = _env_bool("SECURE_SSL_REDIRECT", HTTPS)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = _env_int("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = _env_bool("SECURE_HSTS_PRELOAD", False)
# Behind a reverse proxy we run: X-Forwarded-Proto says whether the browser
# used TLS, and X-Forwarded-For names the client (login throttling).
BEHIND_PROXY = _env_bool("BEHIND_PROXY", False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be a logging level name, got {LOG_LEVEL!r}"
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        name: {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False}
        for name in ("llmsite", "gateway", "chat", "monitoring", "api")
    },
}

# --- Gateway ---------------------------------------------------------------

# Upstream connection pool per endpoint: several clients used round-robin,
# because one httpx client's pool bookkeeping grows with its connections.
GATEWAY_CLIENTS_PER_ENDPOINT = _env_int("GATEWAY_CLIENTS_PER_ENDPOINT", 4)
# Each streamed HTTP/1.1 answer holds a connection for its whole length, so
# this is also how many answers one endpoint can stream at once per process.
GATEWAY_MAX_CONNECTIONS = _env_int("GATEWAY_MAX_CONNECTIONS", 100)
GATEWAY_MAX_KEEPALIVE = _env_int("GATEWAY_MAX_KEEPALIVE", 20)
# --- Bounds on what an upstream sends (gateway.client, gateway.router).
# Whole request, retries and fallbacks included; the reservation sweeper
# counts on no request living longer than this.
GATEWAY_REQUEST_MAX_SECONDS = _positive(
    "GATEWAY_REQUEST_MAX_SECONDS", _env_float("GATEWAY_REQUEST_MAX_SECONDS", 600)
)
# A plain (not streamed) answer, and a JSON answer to a stream request.
GATEWAY_MAX_RESPONSE_BYTES = _positive(
    "GATEWAY_MAX_RESPONSE_BYTES",
    _env_int("GATEWAY_MAX_RESPONSE_BYTES", 10 * 1024 * 1024),
)
# One SSE line or event.
GATEWAY_MAX_SSE_EVENT_BYTES = _positive(
    "GATEWAY_MAX_SSE_EVENT_BYTES",
    _env_int("GATEWAY_MAX_SSE_EVENT_BYTES", 4 * 1024 * 1024),
)
# What a stream may send before its first chunk with content (role-only and
# empty chunks, which the router holds until content comes).
GATEWAY_MAX_BYTES_BEFORE_CONTENT = _positive(
    "GATEWAY_MAX_BYTES_BEFORE_CONTENT",
    _env_int("GATEWAY_MAX_BYTES_BEFORE_CONTENT", 1024 * 1024),
)
GATEWAY_MAX_CHUNKS_BEFORE_CONTENT = _positive(
    "GATEWAY_MAX_CHUNKS_BEFORE_CONTENT",
    _env_int("GATEWAY_MAX_CHUNKS_BEFORE_CONTENT", 1000),
)
# The whole streamed body: a backstop for output that is not text (answer
# text is cut at the request's max_tokens).
GATEWAY_MAX_STREAM_BYTES = _positive(
    "GATEWAY_MAX_STREAM_BYTES", _env_int("GATEWAY_MAX_STREAM_BYTES", 64 * 1024 * 1024)
)
if GATEWAY_MAX_SSE_EVENT_BYTES > GATEWAY_MAX_STREAM_BYTES:
    raise ImproperlyConfigured(
        "GATEWAY_MAX_SSE_EVENT_BYTES must not exceed GATEWAY_MAX_STREAM_BYTES"
    )
GATEWAY_MAX_BACKOFF = _positive(
    "GATEWAY_MAX_BACKOFF", _env_float("GATEWAY_MAX_BACKOFF", 30)
)
GATEWAY_MAX_RETRY_AFTER = _positive(
    "GATEWAY_MAX_RETRY_AFTER", _env_float("GATEWAY_MAX_RETRY_AFTER", 60)
)
# Degraded mode: the last good answer per model and exact messages.
GATEWAY_RESPONSE_CACHE_TTL = _env_int("GATEWAY_RESPONSE_CACHE_TTL", 24 * 3600)
GATEWAY_RESPONSE_CACHE_MAX_BYTES = _env_int(
    "GATEWAY_RESPONSE_CACHE_MAX_BYTES", 256 * 1024
)
# Routes are read once per this many seconds per process (0: every request);
# saving an endpoint or route clears this process's copy at once.
GATEWAY_ROUTE_CACHE_SECONDS = _env_float("GATEWAY_ROUTE_CACHE_SECONDS", 1.0)

# Context window fitting (fractions of the window left after the reserved output).
CONTEXT_WARN_RATIO = _ratio("CONTEXT_WARN_RATIO", _env_float("CONTEXT_WARN_RATIO", 0.8))
CONTEXT_COMPRESS_RATIO = _ratio(
    "CONTEXT_COMPRESS_RATIO", _env_float("CONTEXT_COMPRESS_RATIO", 0.9)
)
CONTEXT_TARGET_RATIO = _ratio(
    "CONTEXT_TARGET_RATIO", _env_float("CONTEXT_TARGET_RATIO", 0.6)
)
if not CONTEXT_TARGET_RATIO < CONTEXT_COMPRESS_RATIO:
    raise ImproperlyConfigured(
        "CONTEXT_TARGET_RATIO must be below CONTEXT_COMPRESS_RATIO"
    )

# Per-user and per-key rate limits, off by default: the limits that matter are
# the upstream's own, kept per endpoint. An admin who wants them sets these
# (for everyone) or sets them per user and per key. 0: no limit.
RATE_LIMIT_RPM = _env_int("RATE_LIMIT_RPM", 0)
RATE_LIMIT_TPM = _env_int("RATE_LIMIT_TPM", 0)
# The requests and tokens per minute a new endpoint starts with (its
# upstream's limits); each endpoint can change its own. Unset or 0: none.
ENDPOINT_RPM_LIMIT = _env_int("ENDPOINT_RPM_LIMIT", 0) or None
ENDPOINT_TPM_LIMIT = _env_int("ENDPOINT_TPM_LIMIT", 0) or None
for _name in ("RATE_LIMIT_RPM", "RATE_LIMIT_TPM"):
    if globals()[_name] < 0:
        raise ImproperlyConfigured(f"{_name} must be 0 (no limit) or more")
for _name in ("ENDPOINT_RPM_LIMIT", "ENDPOINT_TPM_LIMIT"):
    if (globals()[_name] or 0) < 0:
        raise ImproperlyConfigured(f"{_name} must be 0 (no limit) or more")
# The cache alias that holds rate-limit counters.
RATE_LIMIT_CACHE = env.str("RATE_LIMIT_CACHE", default="default")
# Per-process cache of user/key limits and budget lists; saves clear it at once.
GATEWAY_POLICY_CACHE_SECONDS = _env_float("GATEWAY_POLICY_CACHE_SECONDS", 5.0)
# Usage records are gathered for this long and written in one transaction.
USAGE_WRITE_DELAY_MS = _env_int("USAGE_WRITE_DELAY_MS", 50)

# How long a web process lets requests and answers in flight finish after
# SIGTERM before it cuts them (partial answer and usage record kept).
SHUTDOWN_GRACE_SECONDS = _env_float("SHUTDOWN_GRACE_SECONDS", 20.0)
if SHUTDOWN_GRACE_SECONDS < 0:
    raise ImproperlyConfigured("SHUTDOWN_GRACE_SECONDS must be 0 or more")

# --- Chat ------------------------------------------------------------------

CHAT_MAX_MESSAGE_CHARS = _env_int("CHAT_MAX_MESSAGE_CHARS", 32_000)
CHAT_MAX_CONCURRENT_GENERATIONS = _env_int("CHAT_MAX_CONCURRENT_GENERATIONS", 2)
# Deltas are coalesced into one websocket frame per this many milliseconds.
CHAT_FRAME_INTERVAL_MS = _env_int("CHAT_FRAME_INTERVAL_MS", 40)
# How long an answer keeps streaming after its last socket left, so a reload or
# a dropped connection can resume it; an explicit stop always cancels at once.
CHAT_RESUME_GRACE_SECONDS = _env_float("CHAT_RESUME_GRACE_SECONDS", 10.0)
if CHAT_RESUME_GRACE_SECONDS < 0:
    raise ImproperlyConfigured("CHAT_RESUME_GRACE_SECONDS must be 0 or more")
# How long a dead web process keeps its conversations "busy" (its claims are
# renewed every third of this while it lives).
CHAT_LEASE_SECONDS = _env_float("CHAT_LEASE_SECONDS", 15.0)
if CHAT_LEASE_SECONDS < 3:
    raise ImproperlyConfigured("CHAT_LEASE_SECONDS must be at least 3")
# Longest system prompt a conversation or preset may hold, in characters, and
# how many presets one user may keep.
CHAT_MAX_SYSTEM_PROMPT_CHARS = _env_int("CHAT_MAX_SYSTEM_PROMPT_CHARS", 16_000)
if not 1 <= CHAT_MAX_SYSTEM_PROMPT_CHARS <= 100_000:
    raise ImproperlyConfigured("CHAT_MAX_SYSTEM_PROMPT_CHARS must be 1 to 100000")
CHAT_MAX_PRESETS = _env_int("CHAT_MAX_PRESETS", 50)
if not 0 <= CHAT_MAX_PRESETS <= 1000:
    raise ImproperlyConfigured("CHAT_MAX_PRESETS must be 0 to 1000")
# Largest websocket frame the server sends (bytes): history is paged and long
# texts are split under it. Daphne drops frames over 1 MiB; keep well below.
CHAT_MAX_SEND_FRAME_BYTES = _env_int("CHAT_MAX_SEND_FRAME_BYTES", 256 * 1024)
if not 16 * 1024 <= CHAT_MAX_SEND_FRAME_BYTES <= 1024 * 1024:
    raise ImproperlyConfigured(
        "CHAT_MAX_SEND_FRAME_BYTES must be between 16384 and 1048576"
    )
# A start frame holds the question whole (the answer so far can be split off
# in chunks): at 6 bytes a character escaped, plus room for the rest.
if CHAT_MAX_MESSAGE_CHARS * 6 + 16 * 1024 > CHAT_MAX_SEND_FRAME_BYTES:
    raise ImproperlyConfigured(
        "CHAT_MAX_SEND_FRAME_BYTES must be at least CHAT_MAX_MESSAGE_CHARS * 6 "
        f"+ 16384 = {CHAT_MAX_MESSAGE_CHARS * 6 + 16 * 1024} bytes"
    )

# Images in the chat: the largest upload (bytes, refused while it is read),
# the most pixels a decoded image may have (decompression bombs), and how many
# images one message may carry.
CHAT_IMAGE_MAX_BYTES = _env_int("CHAT_IMAGE_MAX_BYTES", 5 * 1024 * 1024)
CHAT_IMAGE_MAX_PIXELS = _env_int("CHAT_IMAGE_MAX_PIXELS", 40_000_000)
CHAT_MAX_IMAGES_PER_MESSAGE = _env_int("CHAT_MAX_IMAGES_PER_MESSAGE", 4)
if (
    CHAT_IMAGE_MAX_BYTES < 1024
    or CHAT_IMAGE_MAX_PIXELS < 1
    or not (1 <= CHAT_MAX_IMAGES_PER_MESSAGE <= 20)
):
    raise ImproperlyConfigured(
        "CHAT_IMAGE_MAX_BYTES must be at least 1024, CHAT_IMAGE_MAX_PIXELS at "
        "least 1 and CHAT_MAX_IMAGES_PER_MESSAGE between 1 and 20"
    )

# --- Monitoring ------------------------------------------------------------

# Probes: how many run at once, and the hard cap on each one (seconds).
MONITOR_CONCURRENCY = int(
    _positive("MONITOR_CONCURRENCY", _env_int("MONITOR_CONCURRENCY", 50))
)
MONITOR_PROBE_TIMEOUT = _positive(
    "MONITOR_PROBE_TIMEOUT", _env_float("MONITOR_PROBE_TIMEOUT", 5.0)
)
# Classification: connected below SLOW_MS, slow up to DOWN_MS, disconnected
# above it or on any error; DOWN_AFTER failed probes in a row mark an endpoint
# disconnected (one blip does not), and a failing endpoint is re-probed after
# RECHECK_SECONDS to confirm it quickly.
MONITOR_SLOW_MS = _positive("MONITOR_SLOW_MS", _env_float("MONITOR_SLOW_MS", 500))
MONITOR_DOWN_MS = _positive("MONITOR_DOWN_MS", _env_float("MONITOR_DOWN_MS", 2000))
if not MONITOR_SLOW_MS < MONITOR_DOWN_MS:
    raise ImproperlyConfigured("MONITOR_SLOW_MS must be below MONITOR_DOWN_MS")
MONITOR_DOWN_AFTER = int(
    _positive("MONITOR_DOWN_AFTER", _env_int("MONITOR_DOWN_AFTER", 2))
)
MONITOR_RECHECK_SECONDS = _positive(
    "MONITOR_RECHECK_SECONDS", _env_float("MONITOR_RECHECK_SECONDS", 30)
)
# Probe results and alert history older than this are deleted.
MONITOR_RETENTION_DAYS = int(
    _positive("MONITOR_RETENTION_DAYS", _env_int("MONITOR_RETENTION_DAYS", 30))
)
# The active monitor renews its lease; a standby takes over once it expires.
MONITOR_LEASE_SECONDS = _positive(
    "MONITOR_LEASE_SECONDS", _env_float("MONITOR_LEASE_SECONDS", 30)
)
MONITOR_IDLE_SECONDS = _positive(
    "MONITOR_IDLE_SECONDS", _env_float("MONITOR_IDLE_SECONDS", 1)
)
if not MONITOR_LEASE_SECONDS >= 3 * MONITOR_IDLE_SECONDS:
    raise ImproperlyConfigured(
        "MONITOR_LEASE_SECONDS must be at least three times MONITOR_IDLE_SECONDS"
    )
# How often the active monitor releases the budget reservations of requests
# whose web process died (their holds outlive GATEWAY_REQUEST_MAX_SECONDS).
GATEWAY_SWEEP_SECONDS = _positive(
    "GATEWAY_SWEEP_SECONDS", _env_float("GATEWAY_SWEEP_SECONDS", 30)
)
# A budget with room for a prompt but not its whole answer lowers max_tokens
# to what is left, and refuses only when not even this much answer fits.
GATEWAY_BUDGET_MIN_OUTPUT_TOKENS = int(
    _positive(
        "GATEWAY_BUDGET_MIN_OUTPUT_TOKENS",
        _env_int("GATEWAY_BUDGET_MIN_OUTPUT_TOKENS", 16),
    )
)

# Alerts: sent by the monitor on endpoint down/recovered and budget warnings,
# to these and to the alert channels configured in the admin.
ALERT_EMAILS = env.list("ALERT_EMAILS", default=[])
for _address in ALERT_EMAILS:
    if "@" not in _address:
        raise ImproperlyConfigured(f"ALERT_EMAILS has an invalid address: {_address!r}")
ALERT_WEBHOOK_URL = env.str("ALERT_WEBHOOK_URL", default="")
if ALERT_WEBHOOK_URL and not ALERT_WEBHOOK_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured("ALERT_WEBHOOK_URL must start with http:// or https://")
ALERT_WEBHOOK_TIMEOUT = _positive(
    "ALERT_WEBHOOK_TIMEOUT", _env_float("ALERT_WEBHOOK_TIMEOUT", 10)
)
# A failed delivery is retried after RETRY_SECONDS, doubling each time.
ALERT_MAX_ATTEMPTS = int(
    _positive("ALERT_MAX_ATTEMPTS", _env_int("ALERT_MAX_ATTEMPTS", 4))
)
ALERT_RETRY_SECONDS = _positive(
    "ALERT_RETRY_SECONDS", _env_float("ALERT_RETRY_SECONDS", 30)
)

# Mail for alerts: smtp://user:password@host:587/?tls=True, or consolemail://.
try:
    globals().update(env.email_url("EMAIL_URL", default="consolemail://"))
except Exception as exc:  # django-environ raises several types for a bad URL
    raise ImproperlyConfigured(f"EMAIL_URL is not a valid mail URL: {exc}") from exc
EMAIL_TIMEOUT = _env_int("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="llmsite@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# /metrics answers a request with "Authorization: Bearer <token>" or a staff login.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- REST API (/api/) -------------------------------------------------------

# Rows per page of /api/usage/records/ when the caller names none, and the most
# a caller may ask for; CSV and JSON Lines exports are not paged.
API_PAGE_SIZE = _env_int("API_PAGE_SIZE", 100)
API_MAX_PAGE_SIZE = _env_int("API_MAX_PAGE_SIZE", 1000)
if not 0 < API_PAGE_SIZE <= API_MAX_PAGE_SIZE:
    raise ImproperlyConfigured("API_PAGE_SIZE must be between 1 and API_MAX_PAGE_SIZE")
# How long the sums of closed hours (more than an hour old) of
# /api/usage/rollups/ are kept in the cache; the open hours are always read.
API_ROLLUP_CACHE_SECONDS = _env_float("API_ROLLUP_CACHE_SECONDS", 60.0)
if API_ROLLUP_CACHE_SECONDS < 0:
    raise ImproperlyConfigured("API_ROLLUP_CACHE_SECONDS must be 0 or more")

REST_FRAMEWORK = {
    # The API key first: its authenticate_header makes DRF answer 401, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.ApiKeyAuthentication",
        "api.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: no browsable API (it would render forms and extra queries).
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "api.renderers.StrictContentNegotiation",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_THROTTLE_CLASSES": [],
    # No OPTIONS metadata: the schema describes the API, and a metadata answer
    # would be rendered by whatever format was negotiated (CSV).
    "DEFAULT_METADATA_CLASS": None,
    "EXCEPTION_HANDLER": "api.exceptions.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "api.schema.AutoSchema",
    "DATETIME_FORMAT": "iso-8601",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "llmsite API",
    "DESCRIPTION": (
        "Usage records, rollups, budgets and endpoint status. Sign in with the "
        "browser session or send a personal API key as `Authorization: Bearer "
        'llms-...`. Errors: `{"error": {"message", "type", "code", '
        '"param"}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/",
}
