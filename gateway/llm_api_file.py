"""The original spec's `config/llm_api.toml` layout, as endpoints, routes, budgets.

The spec configured one upstream and its fallbacks in a single `[llm_api]`
table (see config/llm_api.toml):

    [llm_api]                the primary endpoint and the defaults:
    endpoint, model          its chat URL and model; context_window,
                             max_tokens_per_request, max_requests_per_minute,
                             request_timeout, retry_attempts, … (see the file)
    [[llm_api.fallbacks]]    one table per fallback: endpoint, model, priority

`translate` maps it onto the project's own format (gateway/config_file.py),
which then imports it like any file: all or nothing, idempotent, every
problem named by the spec's key and line (`line 9: llm_api.request_timeout`).

- The primary becomes the endpoint `name` (default "primary"), each fallback
  an endpoint of its own `name` (default "fallback-N", by position), with the
  fallback's `priority` (default N + 1; the primary is 1).
- One public model name, `model_name` (default: the primary's `model`), gets
  a route to every endpoint, in priority order, each to that endpoint's model.
- A fallback inherits every per-endpoint setting of `[llm_api]` it does not
  set, and its `model`, but never the key or the plain-HTTP opt-in: those
  belong to one server. `accepts_images` (the model takes image parts) is
  inherited only by a fallback that inherits the model too.
- The rate limits are the upstream's, so they become each endpoint's own
  rpm_limit / tpm_limit (0 = none), not a limit on users.
- `daily_token_budget` (0 = unlimited) becomes the global daily budget and
  `token_warning_threshold` its warning percent; without either key the
  budgets are left as they are.
- `temperature`, `top_p` and `system_prompt` (only in [llm_api]) become the
  public model's defaults: what a new chat with it starts with (the chat's
  settings panel can change them per conversation; /v1 callers choose their
  own). Without any of them the model's defaults are left as they are.

Keys the spec had that a gateway does not take from this file (caching,
streaming…) are accepted and reported back as notes, never silently
dropped; any other key is an error, as in the project's format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SECTION = "llm_api"
FALLBACKS = "fallbacks"
FALLBACK_TABLE = f"{SECTION}.{FALLBACKS}"

PRIMARY_NAME = "primary"
PRIMARY_PRIORITY = 1
CHAT_PATH = "/chat/completions"

# Spec key → the project format's key, per section; every one may be set in
# [llm_api] and overridden in a fallback.
ENDPOINT_KEYS = {
    "request_timeout": "request_timeout",
    "retry_attempts": "retries",
    "retry_backoff_multiplier": "backoff_multiplier",
    "max_requests_per_minute": "rpm_limit",
    "max_tokens_per_minute": "tpm_limit",
    "health_check_interval": "health_interval",
}
ROUTE_KEYS = {
    "context_window": "context_window",
    "max_tokens_per_request": "max_output_tokens",
    "accepts_images": "accepts_images",
}
# Belong to one server: set per table, never inherited by a fallback.
OWN_KEYS = {
    "name",
    "endpoint",
    "base_url",
    "api_key",
    "api_key_env",
    "allow_plain_http",
    "priority",
}
# Only in [llm_api]: they describe the whole configuration.
TOP_KEYS = {
    "model_name",
    "daily_token_budget",
    "token_warning_threshold",
    FALLBACKS,
}
# [llm_api] keys that become the public model's defaults for new chats.
MODEL_DEFAULTS_KEYS = {
    "system_prompt": "system_prompt",
    "temperature": "temperature",
    "top_p": "top_p",
}
BUDGET_KEYS = {
    "daily_token_budget": "token_limit",
    "token_warning_threshold": "warning_percent",
}

# The spec's keys that are not this file's business here, and where they live.
NOT_APPLIED = {
    "enable_token_tracking": "usage is always recorded",
    "enable_streaming": "streaming is chosen per request",
    "enable_response_cache": "the degraded-mode cache is set by "
    "GATEWAY_RESPONSE_CACHE_TTL in the environment",
    "cache_ttl": "the degraded-mode cache is set by GATEWAY_RESPONSE_CACHE_TTL "
    "in the environment",
    "enable_health_check": "every enabled endpoint is probed (listing models, "
    "which costs nothing); disable the endpoint to stop it",
    "health_check_timeout": "the probe timeout is MONITOR_PROBE_TIMEOUT in the "
    "environment, for every endpoint",
}

INTEGER_KEYS = {
    "retry_attempts",
    "max_requests_per_minute",
    "max_tokens_per_minute",
    "health_check_interval",
    "context_window",
    "max_tokens_per_request",
    "daily_token_budget",
    "priority",
}
NUMBER_KEYS = {
    "request_timeout",
    "retry_backoff_multiplier",
    "token_warning_threshold",
    "health_check_timeout",
    "temperature",
    "top_p",
}
BOOLEAN_KEYS = {
    "accepts_images",
    "allow_plain_http",
    "enable_token_tracking",
    "enable_streaming",
    "enable_response_cache",
    "enable_health_check",
}
STRING_KEYS = {
    "name",
    "endpoint",
    "base_url",
    "model",
    "model_name",
    "api_key",
    "system_prompt",
}
# 0 means "none" for these, as in the spec ("0 = unlimited").
ZERO_IS_NONE = {
    "max_requests_per_minute",
    "max_tokens_per_minute",
    "daily_token_budget",
}

PER_ENDPOINT = set(ENDPOINT_KEYS) | set(ROUTE_KEYS) | {"model"}
FALLBACK_ALLOWED = PER_ENDPOINT | OWN_KEYS
TOP_ALLOWED = (
    PER_ENDPOINT | OWN_KEYS | TOP_KEYS | set(MODEL_DEFAULTS_KEYS) | set(NOT_APPLIED)
)

# Where a value was written: the table ([llm_api] or fallback number j) and key.
Origin = tuple[int | None, str]


@dataclass
class Translation:
    """The file in the project's format, and how to name its problems."""

    line_of: Callable[[str, int, str | None], int | None]
    sections: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {
            "endpoints": [],
            "routes": [],
            "budgets": [],
            "model_defaults": [],
        }
    )
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (section, index, project key) → where the spec's file set it.
    origins: dict[tuple[str, int, str], Origin] = field(default_factory=dict)
    # Endpoint index → its fallback number, None for the primary.
    tables: list[int | None] = field(default_factory=list)

    def name(self, origin: Origin) -> str:
        """Locate a spec key: `line 9: llm_api.fallbacks[1].request_timeout`."""
        fallback, key = origin
        if fallback is None:
            table, line = SECTION, self.line_of(SECTION, 0, key or None)
        else:
            table = f"{FALLBACK_TABLE}[{fallback + 1}]"
            line = self.line_of(FALLBACK_TABLE, fallback, key or None)
        label = f"{table}.{key}" if key else table
        return f"line {line}: {label}" if line else label

    def where(self, section: str, index: int, key: str | None) -> str:
        """Name a problem the project's importer found in the translated tables."""
        origin = self.origins.get((section, index, key or ""))
        if origin is None:
            # A whole table's problem: its endpoint's table; budgets and model
            # defaults are [llm_api]'s.
            table = (
                self.tables[index]
                if section not in ("budgets", "model_defaults")
                else None
            )
            origin = (table, "")
        return self.name(origin)

    def problem(self, origin: Origin, message: str) -> None:
        item = f"{self.name(origin)}: {message}"
        if item not in self.problems:
            self.problems.append(item)


def translate(
    data: dict[str, Any], line_of: Callable[[str, int, str | None], int | None]
) -> Translation:
    """Map a parsed `[llm_api]` file onto endpoints, routes and budgets tables.

    `line_of(table, index, key)` finds a key's line in the text. Problems of
    the file's own shape are collected in `problems`; the values they concern
    are left out, so the import reports them together with the rest.
    """
    out = Translation(line_of=line_of)
    top = data[SECTION]
    extra = sorted(set(data) - {SECTION})
    if extra:
        out.problems.append(f"unknown section(s) next to [llm_api]: {', '.join(extra)}")
    if not isinstance(top, dict):
        out.problems.append("llm_api: must be written as an [llm_api] table")
        return out
    fallbacks = top.get(FALLBACKS, [])
    if not isinstance(fallbacks, list) or not all(
        isinstance(f, dict) for f in fallbacks
    ):
        out.problem(
            (None, FALLBACKS), "must be written as [[llm_api.fallbacks]] tables"
        )
        fallbacks = []
    top = _checked(out, None, top, TOP_ALLOWED)
    tables = [(None, top)] + [
        (j, _checked(out, j, table, FALLBACK_ALLOWED))
        for j, table in enumerate(fallbacks)
    ]
    public = top.get("model_name", top.get("model"))
    for key in sorted(set(top) & set(NOT_APPLIED)):
        out.notes.append(f"llm_api.{key}: not applied; {NOT_APPLIED[key]}")
    for index, (fallback, table) in enumerate(tables):
        out.tables.append(fallback)
        _endpoint_and_route(out, index, fallback, top, table, public)
    if set(top) & set(BUDGET_KEYS):
        _budget(out, top)
    if set(top) & set(MODEL_DEFAULTS_KEYS) and isinstance(public, str):
        _model_defaults(out, top, public)
    return out


def _checked(
    out: Translation, fallback: int | None, table: dict[str, Any], allowed: set[str]
) -> dict[str, Any]:
    """The table's known keys whose values have the right type; the rest reported."""
    kept: dict[str, Any] = {}
    for key, value in table.items():
        origin = (fallback, key)
        if key not in allowed:
            where = "[llm_api]" if fallback is None else "a fallback"
            out.problem(
                origin,
                f"unknown key in {where}; expected one of "
                f"{sorted(allowed - {FALLBACKS})}",
            )
            continue
        message = _type_problem(key, value)
        if message:
            out.problem(origin, message)
            continue
        kept[key] = value
    return kept


def _type_problem(key: str, value: Any) -> str | None:
    # bool is an int to Python, never to a reader of the file.
    if key in INTEGER_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
        if key in ZERO_IS_NONE and value < 0:
            return "must be 0 (none) or a positive integer"
        if value < 0:
            return "must be a positive integer"
    elif key in NUMBER_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if key == "token_warning_threshold" and not 0 < value <= 1:
            return "must be a fraction above 0 and at most 1, e.g. 0.8"
    elif key in BOOLEAN_KEYS:
        if not isinstance(value, bool):
            return "must be true or false"
    elif key in STRING_KEYS and not isinstance(value, str):
        return "must be a string"
    return None


def _endpoint_and_route(
    out: Translation,
    index: int,
    fallback: int | None,
    top: dict[str, Any],
    table: dict[str, Any],
    public: Any,
) -> None:
    def value(key: str) -> tuple[Any, Origin] | None:
        """The table's own value, else the primary's (for what may be inherited)."""
        if key in table:
            return table[key], (fallback, key)
        # Whether images are taken belongs to the model: a fallback naming a
        # model of its own does not inherit it.
        if key == "accepts_images" and "model" in table:
            return None
        if fallback is not None and key in PER_ENDPOINT and key in top:
            return top[key], (None, key)
        return None

    default_name = PRIMARY_NAME if fallback is None else f"fallback-{fallback + 1}"
    name = table.get("name", default_name)
    endpoint: dict[str, Any] = {"name": name}
    _remember(out, "endpoints", index, "name", (fallback, "name"))
    priority = table.get(
        "priority", PRIMARY_PRIORITY if fallback is None else fallback + 2
    )
    endpoint["priority"] = priority
    _remember(out, "endpoints", index, "priority", (fallback, "priority"))

    url = _base_url(out, fallback, table)
    if url is not None:
        endpoint["base_url"] = url
        key = "base_url" if "base_url" in table else "endpoint"
        _remember(out, "endpoints", index, "base_url", (fallback, key))
    for key in ("api_key", "api_key_env", "allow_plain_http"):
        # An empty api_key is the spec's "no key needed": keep what is stored.
        if key in table and table[key] != "":
            endpoint[key] = table[key]
            _remember(out, "endpoints", index, key, (fallback, key))
    for spec_key, key in ENDPOINT_KEYS.items():
        found = value(spec_key)
        if found is None:
            continue
        setting, origin = found
        # 0 is "no limit": cleared, so a re-import also lifts an earlier one.
        endpoint[key] = None if spec_key in ZERO_IS_NONE and setting == 0 else setting
        _remember(out, "endpoints", index, key, origin)
    out.sections["endpoints"].append(endpoint)

    model = value("model")
    route: dict[str, Any] = {
        "model": public if isinstance(public, str) else "",
        "endpoint": name,
        "priority": priority,
    }
    _remember(
        out,
        "routes",
        index,
        "model",
        (None, "model_name" if "model_name" in top else "model"),
    )
    _remember(out, "routes", index, "endpoint", (fallback, "name"))
    _remember(out, "routes", index, "priority", (fallback, "priority"))
    if model is not None:
        route["upstream_model"], origin = model
        _remember(out, "routes", index, "upstream_model", origin)
    for spec_key, key in ROUTE_KEYS.items():
        found = value(spec_key)
        if found is not None:
            route[key], origin = found
            _remember(out, "routes", index, key, origin)
    out.sections["routes"].append(route)


def _base_url(
    out: Translation, fallback: int | None, table: dict[str, Any]
) -> str | None:
    """The API's base URL: the spec named the chat URL itself, so cut its path."""
    if "endpoint" in table and "base_url" in table:
        out.problem(
            (fallback, "base_url"), "give either endpoint or base_url, not both"
        )
        return None
    if "base_url" in table:
        return table["base_url"].rstrip("/")
    if "endpoint" not in table:
        out.problem((fallback, "endpoint"), "is required: the server's URL")
        return None
    url = table["endpoint"].rstrip("/")
    return url.removesuffix(CHAT_PATH)


def _budget(out: Translation, top: dict[str, Any]) -> None:
    budget: dict[str, Any] = {"scope": "global", "period": "daily"}
    if "daily_token_budget" in top and top["daily_token_budget"] != 0:
        budget["token_limit"] = top["daily_token_budget"]
    if "token_warning_threshold" in top:
        budget["warning_percent"] = round(top["token_warning_threshold"] * 100)
    for spec_key, key in BUDGET_KEYS.items():
        _remember(out, "budgets", 0, key, (None, spec_key))
    out.sections["budgets"].append(budget)


def _model_defaults(out: Translation, top: dict[str, Any], public: str) -> None:
    defaults: dict[str, Any] = {"model": public}
    _remember(
        out,
        "model_defaults",
        0,
        "model",
        (None, "model_name" if "model_name" in top else "model"),
    )
    for spec_key, key in MODEL_DEFAULTS_KEYS.items():
        if spec_key in top:
            defaults[key] = top[spec_key]
            _remember(out, "model_defaults", 0, key, (None, spec_key))
    out.sections["model_defaults"].append(defaults)


def _remember(
    out: Translation, section: str, index: int, key: str, origin: Origin
) -> None:
    out.origins[(section, index, key)] = origin
