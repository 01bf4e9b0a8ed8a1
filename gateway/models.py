"""The gateway's data: endpoints, model routes, budgets, API keys and usage."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from gateway import crypto, transport_policy


class EndpointStatus(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    CONNECTED = "connected", "Connected"
    SLOW = "slow", "Slow"
    DISCONNECTED = "disconnected", "Disconnected"


def default_endpoint_rpm_limit() -> int | None:
    """A new endpoint's requests per minute: ENDPOINT_RPM_LIMIT (None: no limit)."""
    return settings.ENDPOINT_RPM_LIMIT or None


def default_endpoint_tpm_limit() -> int | None:
    """A new endpoint's tokens per minute: ENDPOINT_TPM_LIMIT (None: no limit)."""
    return settings.ENDPOINT_TPM_LIMIT or None


class ProbeMode(models.TextChoices):
    MODELS = "models", "List models (free)"
    COMPLETION = "completion", "One-token completion (costs a request)"


MAX_EXTRA_HEADERS = 20
MAX_HEADER_NAME = 100
MAX_HEADER_VALUE = 4096
# RFC 9110 token characters.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers httpx or the protocol own; an endpoint must not override them.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te"}
)


def clean_extra_headers(value: Any) -> dict[str, str]:
    """Validate extra headers: a small {name: value} map of plain strings."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise ValidationError("Extra headers must be a map of header name to value.")
    if len(value) > MAX_EXTRA_HEADERS:
        raise ValidationError(f"At most {MAX_EXTRA_HEADERS} extra headers.")
    cleaned: dict[str, str] = {}
    for name, header in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValidationError(
                f"{str(name)[:MAX_HEADER_NAME]!r} is not a valid header name."
            )
        if len(name) > MAX_HEADER_NAME:
            raise ValidationError(f"Header names are at most {MAX_HEADER_NAME} long.")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(f"The {name} header cannot be set here.")
        if name.lower() in {n.lower() for n in cleaned}:
            raise ValidationError(f"The {name} header is given twice.")
        # The value is never quoted back: it may be a secret.
        if not isinstance(header, str) or not header.strip():
            raise ValidationError(f"The value of {name} must be a non-empty string.")
        if len(header) > MAX_HEADER_VALUE or any(
            (ord(c) < 32 and c != "\t") or ord(c) == 127 for c in header
        ):
            raise ValidationError(
                f"The value of {name} is too long or holds control characters."
            )
        cleaned[name] = header.strip()
    return cleaned


class Endpoint(models.Model):
    """An OpenAI-compatible upstream server and its health."""

    name = models.CharField(max_length=100, unique=True)
    base_url = models.URLField(
        max_length=500,
        help_text="Up to and including the API version, e.g. https://api.openai.com/v1",
    )
    allow_plain_http = models.BooleanField(
        "allow plain HTTP", default=False, help_text=transport_policy.PLAIN_HTTP_HELP
    )
    # Never read this column directly: use the api_key property.
    api_key_encrypted = models.TextField(blank=True, default="", editable=False)
    enabled = models.BooleanField(default=True)
    priority = models.PositiveSmallIntegerField(
        default=100, help_text="Lower is tried first when routes tie."
    )
    connect_timeout = models.FloatField(
        default=5.0,
        validators=[MinValueValidator(0.1)],
        help_text="Seconds to open a connection.",
    )
    first_token_timeout = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.1)],
        help_text=(
            "Seconds a stream may take to send its first content before the "
            "request fails over. A hung endpoint costs at most this."
        ),
    )
    timeout = models.FloatField(
        "between-chunks timeout",
        default=60.0,
        validators=[MinValueValidator(0.1)],
        help_text="Seconds a stream may go without content once it has begun.",
    )
    request_timeout = models.FloatField(
        default=120.0,
        validators=[MinValueValidator(0.1)],
        help_text=(
            "Seconds one attempt may take in all: a plain answer, or a whole stream."
        ),
    )
    retries_before_failover = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(10)],
        help_text=(
            "Extra attempts on this endpoint before the next route is tried. "
            "Usually 0: failing over is faster than backing off."
        ),
    )
    max_retries = models.PositiveSmallIntegerField(
        "retry attempts",
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text=(
            "Attempts, with exponential backoff, when no other route can take "
            "the request."
        ),
    )
    backoff_multiplier = models.FloatField(
        default=2.0, validators=[MinValueValidator(0)]
    )
    # The upstream's own limits: a new endpoint starts with the settings'.
    rpm_limit = models.PositiveIntegerField(
        "requests per minute",
        null=True,
        blank=True,
        default=default_endpoint_rpm_limit,
        help_text="The upstream's limit. Empty: no limit.",
    )
    tpm_limit = models.PositiveIntegerField(
        "tokens per minute",
        null=True,
        blank=True,
        default=default_endpoint_tpm_limit,
        help_text="The upstream's limit. Empty: no limit.",
    )
    failure_threshold = models.PositiveSmallIntegerField(
        default=3,
        validators=[MinValueValidator(1)],
        help_text="Consecutive failures that open the circuit breaker.",
    )
    cooldown_seconds = models.PositiveIntegerField(
        default=60,
        help_text="How long an endpoint stays disabled once the breaker opens.",
    )
    probe_interval = models.PositiveIntegerField(
        default=300,
        validators=[MinValueValidator(5)],
        help_text="Seconds between probes.",
    )
    probe_mode = models.CharField(
        max_length=16, choices=ProbeMode.choices, default=ProbeMode.MODELS
    )
    probe_model = models.CharField(
        max_length=200, blank=True, help_text="Model for completion probes."
    )
    # Never read this column directly: use the extra_headers property. Header
    # values often carry secrets (x-api-key), so they are stored like the key.
    extra_headers_encrypted = models.TextField(blank=True, default="", editable=False)
    supports_stream_usage = models.BooleanField(
        default=True,
        help_text="Cleared automatically when the endpoint rejects stream_options.",
    )

    # Health, written by the router's circuit breaker and by the monitor.
    status = models.CharField(
        max_length=16, choices=EndpointStatus.choices, default=EndpointStatus.UNKNOWN
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    probe_failures = models.PositiveIntegerField(
        default=0, help_text="Failed probes in a row."
    )
    disabled_until = models.DateTimeField(null=True, blank=True)
    # Set by a 429 whose Retry-After was worth failing over for: requests skip
    # the endpoint until then without calling it. Not a failure: the breaker
    # and the status stay as they are.
    resting_until = models.DateTimeField(null=True, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.FloatField(null=True, blank=True)
    next_probe_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["priority", "name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(timeout__gt=0)
                & Q(connect_timeout__gt=0)
                & Q(first_token_timeout__gt=0)
                & Q(request_timeout__gt=0),
                name="endpoint_timeouts_positive",
            ),
            models.CheckConstraint(
                condition=Q(backoff_multiplier__gte=0),
                name="endpoint_backoff_not_negative",
            ),
        ]
        indexes = [
            # The monitor: enabled endpoints whose next probe is due.
            models.Index(
                fields=["enabled", "next_probe_at"], name="endpoint_probe_due"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        # Spelled out so that no representation can ever carry the key.
        return f"<Endpoint {self.pk}: {self.name} {self.base_url}>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Also here, not only in clean(): code that saves without validating
        # (imports, commands, the shell) must not store a URL the client
        # would send the key to in clear.
        update_fields = kwargs.get("update_fields")
        if update_fields is None or {"base_url", "allow_plain_http"} & set(
            update_fields
        ):
            self.check_https_only()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        super().clean()
        self.check_https_only()

    def check_https_only(self) -> None:
        """Raise ValidationError on base_url if it breaks the HTTPS-only rule."""
        url = self.base_url if isinstance(self.base_url, str) else ""
        if not url.strip():
            return  # A missing or mistyped URL is the field's own error.
        refused = transport_policy.refusal(
            url, allow_plain_http=bool(self.allow_plain_http)
        )
        if refused:
            raise ValidationError(
                {
                    "base_url": ValidationError(
                        refused.message, code="https_only", params=refused.params
                    )
                }
            )

    @property
    def sends_in_clear(self) -> bool:
        """Whether requests (and the key) go over a network unencrypted."""
        url = self.base_url if isinstance(self.base_url, str) else ""
        return transport_policy.sends_in_clear(url)

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted)

    @api_key.setter
    def api_key(self, value: str) -> None:
        self.api_key_encrypted = crypto.encrypt(value or "")

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)

    @property
    def extra_headers(self) -> Any:
        """Headers sent with every request, decrypted: {name: value}."""
        if not self.extra_headers_encrypted:
            return {}
        return json.loads(crypto.decrypt(self.extra_headers_encrypted))

    @extra_headers.setter
    def extra_headers(self, value: Any) -> None:
        self.extra_headers_encrypted = (
            crypto.encrypt(json.dumps(value, sort_keys=True)) if value else ""
        )

    @property
    def extra_header_names(self) -> list[str]:
        """The names of the extra headers, for pages that must not show values."""
        try:
            headers = self.extra_headers
        except (crypto.DecryptionError, ValueError):
            return []
        return sorted(headers) if isinstance(headers, dict) else []


class RouteKind(models.TextChoices):
    """What a route's upstream model does: answer chats or embed text."""

    CHAT = "chat", "chat"
    EMBEDDING = "embedding", "embedding"


class ModelRoute(models.Model):
    """One way to serve a public model name: an endpoint and its upstream model.

    Several routes for one model name form its fallback chain, tried by priority.
    A chat request only ever takes chat routes, an embeddings request only
    embedding routes (`kind`).
    """

    model_name = models.CharField(
        max_length=200, help_text="The name users and programs ask for."
    )
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.CASCADE, related_name="routes"
    )
    upstream_model = models.CharField(
        max_length=200, help_text="The model name the endpoint expects."
    )
    kind = models.CharField(
        max_length=16,
        choices=RouteKind.choices,
        default=RouteKind.CHAT,
        help_text="Chat completions or embeddings: each request takes only its kind.",
    )
    priority = models.PositiveSmallIntegerField(default=100, help_text="Lower first.")
    enabled = models.BooleanField(default=True)
    context_window = models.PositiveIntegerField(
        default=8000, validators=[MinValueValidator(256)]
    )
    max_output_tokens = models.PositiveIntegerField(
        default=2000, validators=[MinValueValidator(1)]
    )
    input_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True
    )
    output_price_per_1k = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True
    )
    accepts_images = models.BooleanField(
        default=False,
        help_text=(
            "The upstream model takes image content parts. The chat offers "
            "images for a model only when all its enabled routes take them."
        ),
    )
    hedge_after_ms = models.PositiveIntegerField(
        "hedge after (ms)",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text=(
            "Empty: off. After this many milliseconds without a first token "
            "from this route, start the next route too and keep whichever "
            "answers first. Both attempts are paid for."
        ),
    )

    class Meta:
        ordering = ["model_name", "priority", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_name", "endpoint"], name="route_unique_model_endpoint"
            ),
            models.CheckConstraint(
                condition=Q(max_output_tokens__lt=models.F("context_window")),
                name="route_output_fits_window",
            ),
        ]
        indexes = [
            # The router: enabled routes of one model name by priority.
            models.Index(
                fields=["model_name", "priority"], name="route_model_priority"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_name} → {self.endpoint_id}:{self.upstream_model}"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal | None:
        """The price of a request on this route, or None when it has no prices."""
        if self.input_price_per_1k is None and self.output_price_per_1k is None:
            return None
        total = (self.input_price_per_1k or Decimal(0)) * prompt_tokens + (
            self.output_price_per_1k or Decimal(0)
        ) * completion_tokens
        return (total / 1000).quantize(Decimal("0.000001"))


def _key_hash(raw_key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough (no stretching).
    return hashlib.sha256(raw_key.encode()).hexdigest()


# The sampling parameters a chat (and a model's defaults) may set, and their
# ranges: the OpenAI API's own. max_tokens is bounded again by the routes.
TEMPERATURE_MAX = 2.0
TOP_P_MAX = 1.0
MAX_TOKENS_LIMIT = 1_000_000


class ModelDefaults(models.Model):
    """What a new chat with a model starts with: a system prompt and sampling.

    Keyed by the public model name (not a route): every route of the model
    shares them. Empty fields leave the upstream's own defaults.
    """

    model_name = models.CharField(
        max_length=200, unique=True, help_text="The public model name, as routed."
    )
    system_prompt = models.TextField(blank=True)
    temperature = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(TEMPERATURE_MAX)],
        help_text="0 to 2; empty: the model's default.",
    )
    top_p = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(TOP_P_MAX)],
        help_text="0 to 1; empty: the model's default.",
    )
    max_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_TOKENS_LIMIT)],
        help_text="Longest answer; never more than a route allows. Empty: the route's.",
    )

    class Meta:
        verbose_name = "model defaults"
        verbose_name_plural = "model defaults"
        ordering = ["model_name"]

    def __str__(self) -> str:
        return self.model_name


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True)


class RateLimitOverrides(models.Model):
    """Per-user or per-key rate limits that replace the global defaults."""

    rpm_limit = models.PositiveIntegerField(
        "requests per minute",
        null=True,
        blank=True,
        help_text="Empty: the default (RATE_LIMIT_RPM). 0: no limit.",
    )
    tpm_limit = models.PositiveIntegerField(
        "tokens per minute",
        null=True,
        blank=True,
        help_text="Empty: the default (RATE_LIMIT_TPM). 0: no limit.",
    )

    class Meta:
        abstract = True


class ApiKey(RateLimitOverrides):
    """A personal key for programs calling the /v1 API; only its hash is stored."""

    PREFIX = "llms-"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(
        max_length=16,
        editable=False,
        help_text="The first characters, to recognise it.",
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def generate(cls, user: object, name: str) -> tuple[ApiKey, str]:
        """Create a key; the raw key is returned once and never stored."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            user=user, name=name, prefix=raw[:12], key_hash=_key_hash(raw)
        )
        return key, raw

    @classmethod
    def hash(cls, raw_key: str) -> str:
        return _key_hash(raw_key)

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class BudgetScope(models.TextChoices):
    GLOBAL = "global", "Global"
    USER = "user", "User"
    API_KEY = "api_key", "API key"
    ENDPOINT = "endpoint", "Endpoint"


class BudgetPeriod(models.TextChoices):
    DAILY = "daily", "Daily (resets at midnight UTC)"
    WEEKLY = "weekly", "Weekly (resets Monday 00:00 UTC)"
    MONTHLY = "monthly", "Monthly (resets on the 1st, 00:00 UTC)"


class Budget(models.Model):
    """A token allowance for one scope over a calendar period."""

    name = models.CharField(max_length=100, blank=True)
    scope = models.CharField(max_length=16, choices=BudgetScope.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
    )
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets"
    )
    endpoint = models.ForeignKey(
        Endpoint,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
    )
    period = models.CharField(
        max_length=16, choices=BudgetPeriod.choices, default=BudgetPeriod.DAILY
    )
    token_limit = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Empty: unlimited (usage is still counted)."
    )
    warning_percent = models.PositiveSmallIntegerField(
        default=80, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["scope", "id"]
        constraints = [
            # Exactly the target its scope names, and nothing else.
            models.CheckConstraint(
                condition=(
                    Q(
                        scope="global",
                        user__isnull=True,
                        api_key__isnull=True,
                        endpoint__isnull=True,
                    )
                    | Q(
                        scope="user",
                        user__isnull=False,
                        api_key__isnull=True,
                        endpoint__isnull=True,
                    )
                    | Q(
                        scope="api_key",
                        user__isnull=True,
                        api_key__isnull=False,
                        endpoint__isnull=True,
                    )
                    | Q(
                        scope="endpoint",
                        user__isnull=True,
                        api_key__isnull=True,
                        endpoint__isnull=False,
                    )
                ),
                name="budget_scope_matches_target",
            ),
            models.UniqueConstraint(
                fields=["period"],
                condition=Q(scope="global"),
                name="budget_one_global_per_period",
            ),
            models.UniqueConstraint(
                fields=["user", "period"],
                condition=Q(scope="user"),
                name="budget_one_per_user_period",
            ),
            models.UniqueConstraint(
                fields=["api_key", "period"],
                condition=Q(scope="api_key"),
                name="budget_one_per_key_period",
            ),
            models.UniqueConstraint(
                fields=["endpoint", "period"],
                condition=Q(scope="endpoint"),
                name="budget_one_per_endpoint_period",
            ),
        ]

    def __str__(self) -> str:
        target = self.user or self.api_key or self.endpoint or "everyone"
        limit = f"{self.token_limit:,}" if self.token_limit is not None else "unlimited"
        text = f"{self.get_period_display().split(' ')[0]} {limit} tokens: {target}"
        # The name an admin gave it comes first, where lists and forms show it.
        return f"{self.name} ({text})" if self.name else text


class BudgetCounter(models.Model):
    """Tokens used and reserved against a budget in one period.

    A new period is a new row, so a reset is never a write that can race.
    """

    budget = models.ForeignKey(
        Budget, on_delete=models.CASCADE, related_name="counters"
    )
    period_start = models.DateTimeField()
    used_tokens = models.PositiveBigIntegerField(default=0)
    reserved_tokens = models.PositiveBigIntegerField(default=0)
    warned_at = models.DateTimeField(null=True, blank=True)
    exhausted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "period_start"], name="budget_counter_one_per_period"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.budget_id} @ {self.period_start:%Y-%m-%d}: {self.used_tokens}"


class BudgetHold(models.Model):
    """Tokens one request holds on one counter, until its usage record settles them.

    Written in the transaction that reserves and deleted in the one that
    writes the request's record, so a hold outliving its request is what a
    killed process left behind: the monitor's sweeper releases it once it
    expires. The request's identity is kept so that the sweeper can write
    its record.
    """

    counter = models.ForeignKey(
        BudgetCounter, on_delete=models.CASCADE, related_name="holds"
    )
    request_id = models.UUIDField()
    tokens = models.PositiveBigIntegerField()
    # The web process that reserved (gateway.accounting.owners): the sweeper
    # releases at once the holds of a process of its machine that is gone.
    owner = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    # What the sweeper's record of an abandoned request says.
    user_id = models.BigIntegerField(null=True, blank=True)
    api_key_id = models.BigIntegerField(null=True, blank=True)
    conversation_id = models.UUIDField(null=True, blank=True)
    model_name = models.CharField(max_length=200, blank=True)
    source = models.CharField(max_length=8, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [
            # The usage writer deletes a request's holds as it settles them.
            models.Index(fields=["request_id"], name="budget_hold_request"),
            # The sweeper: holds whose time is up.
            models.Index(fields=["expires_at"], name="budget_hold_expiry"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}: {self.tokens} on counter {self.counter_id}"


class UsageSource(models.TextChoices):
    CHAT = "chat", "Chat"
    API = "api", "API"


class UsageStatus(models.TextChoices):
    OK = "ok", "OK"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"
    REJECTED = "rejected", "Rejected"
    CACHED = "cached", "Cached"


class UsageRecord(models.Model):
    """Exactly one row per request, written when the request ends."""

    # Idempotency: the request's own id, so a retried write cannot duplicate it.
    request_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    source = models.CharField(
        max_length=8, choices=UsageSource.choices, default=UsageSource.CHAT
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # The gateway knows no chat models; this is chat.Conversation's id.
    conversation_id = models.UUIDField(null=True, blank=True)
    model_name = models.CharField(max_length=200)
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Kept as text so records stay readable after an endpoint is deleted.
    endpoint_name = models.CharField(max_length=100, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    tokens_estimated = models.BooleanField(default=False)
    latency_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField("time to first token (ms)", null=True, blank=True)
    status = models.CharField(max_length=16, choices=UsageStatus.choices)
    error_type = models.CharField(max_length=64, blank=True)
    error_message = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    fallback_hops = models.JSONField(default=list, blank=True)
    # Every attempt and skip of the request in order: endpoint, outcome, time.
    trail = models.JSONField(default=list, blank=True)
    cost = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Export and dashboards: one user's, key's, model's or endpoint's
            # records over a time range.
            models.Index(fields=["user", "created_at"], name="usage_user_time"),
            models.Index(fields=["api_key", "created_at"], name="usage_key_time"),
            models.Index(fields=["model_name", "created_at"], name="usage_model_time"),
            models.Index(fields=["endpoint", "created_at"], name="usage_endpoint_time"),
            # Error views: recent failures.
            models.Index(fields=["status", "created_at"], name="usage_status_time"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.model_name} {self.status}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def hop_count(self) -> int:
        return len(self.fallback_hops)


class UserLimits(RateLimitOverrides):
    """Rate limits for one user, instead of RATE_LIMIT_RPM and RATE_LIMIT_TPM."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="rate_limits"
    )

    class Meta:
        verbose_name = "user rate limit"

    def __str__(self) -> str:
        rpm = "default" if self.rpm_limit is None else self.rpm_limit or "unlimited"
        tpm = "default" if self.tpm_limit is None else self.tpm_limit or "unlimited"
        return f"{self.user}: {rpm} rpm, {tpm} tpm"


class UsageRollup(models.Model):
    """Usage per hour, user, API key, model and endpoint, kept current.

    Written in the same transaction as the usage records it counts, so the
    dashboards read these rows instead of scanning UsageRecord; one hour is
    fine enough for "errors per hour" and cheap to sum into days. Sums of
    latency and cost are whole microseconds, so that rebuilding them from raw
    records with SQL gives exactly the same numbers as adding them up live.
    """

    bucket = models.DateTimeField(help_text="Start of the hour, UTC.")
    # A hash of the dimensions below: nullable columns cannot carry a unique
    # constraint that upserts can target on both SQLite and PostgreSQL.
    dimensions = models.CharField(max_length=40, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model_name = models.CharField(max_length=200)
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    endpoint_name = models.CharField(max_length=100, blank=True)

    requests = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    cancelled = models.PositiveBigIntegerField(default=0)
    rejected = models.PositiveBigIntegerField(default=0)
    cached = models.PositiveBigIntegerField(default=0)
    estimated = models.PositiveBigIntegerField(
        default=0, help_text="Requests whose tokens were counted by us, not upstream."
    )
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost_micros = models.BigIntegerField(
        default=0, help_text="Cost in millionths of the price unit."
    )
    latency_us_sum = models.PositiveBigIntegerField(default=0)
    latency_count = models.PositiveBigIntegerField(default=0)
    ttft_us_sum = models.PositiveBigIntegerField(default=0)
    ttft_count = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-bucket"]
        constraints = [
            # The upsert target of every live write.
            models.UniqueConstraint(
                fields=["bucket", "dimensions"], name="usage_rollup_one_per_bucket"
            ),
        ]
        indexes = [
            # "Tokens used today" and per-user charts: one user's buckets.
            models.Index(fields=["user", "bucket"], name="usage_rollup_user_time"),
            models.Index(fields=["api_key", "bucket"], name="usage_rollup_key_time"),
            # Endpoint and model charts over a time range.
            models.Index(fields=["endpoint", "bucket"], name="usage_rollup_ep_time"),
            models.Index(
                fields=["model_name", "bucket"], name="usage_rollup_model_time"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H:00} {self.model_name}: {self.requests}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_micros) / 1_000_000

    @property
    def mean_latency_ms(self) -> float | None:
        return (
            self.latency_us_sum / self.latency_count / 1000
            if self.latency_count
            else None
        )

    @property
    def mean_ttft_ms(self) -> float | None:
        return self.ttft_us_sum / self.ttft_count / 1000 if self.ttft_count else None
