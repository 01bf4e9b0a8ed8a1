"""Endpoints, model routes and budgets as a TOML file: import and export.

The format (see config/llm_api.example.toml):

    [[endpoints]]           one table per endpoint, keyed by `name`
    [[routes]]              model name → endpoint (by name) → upstream model
    [[budgets]]             token budgets by scope (global, endpoint, user)
    [[model_defaults]]      what a new chat with a model starts with: its
                            system_prompt, temperature, top_p, max_tokens

An endpoint off this machine must use https:// unless its table says
`allow_plain_http = true` (the key would travel in clear otherwise).

Importing is all or nothing and idempotent: endpoints are matched by name,
routes by (model, endpoint), budgets by (scope, target, period), model
defaults by model; a second
import of the same file changes nothing. Secrets do not belong in the file:
`api_key_env` names an environment variable that holds the key.

A file with an `[llm_api]` table is the original spec's layout instead
(config/llm_api.toml): gateway/llm_api_file.py turns it into the tables above,
which are then imported the same way, with errors named by its own keys.
Export always writes this format.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import tomli_w
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction

from gateway import crypto, llm_api_file
from gateway.models import (
    Budget,
    BudgetPeriod,
    BudgetScope,
    Endpoint,
    ModelDefaults,
    ModelRoute,
    clean_extra_headers,
)

# TOML key → model field, for the keys whose names differ.
ENDPOINT_KEYS = {
    "name": "name",
    "base_url": "base_url",
    "allow_plain_http": "allow_plain_http",
    "enabled": "enabled",
    "priority": "priority",
    "connect_timeout": "connect_timeout",
    "first_token_timeout": "first_token_timeout",
    "timeout": "timeout",
    "request_timeout": "request_timeout",
    "retries_before_failover": "retries_before_failover",
    "retries": "max_retries",
    "backoff_multiplier": "backoff_multiplier",
    "rpm_limit": "rpm_limit",
    "tpm_limit": "tpm_limit",
    "failure_threshold": "failure_threshold",
    "cooldown_seconds": "cooldown_seconds",
    "health_interval": "probe_interval",
    "probe_mode": "probe_mode",
    "probe_model": "probe_model",
}
ENDPOINT_SECRET_KEYS = {"api_key", "api_key_env", "extra_headers", "extra_headers_env"}
ROUTE_KEYS = {
    "model": "model_name",
    "endpoint": "endpoint",
    "upstream_model": "upstream_model",
    "priority": "priority",
    "enabled": "enabled",
    "context_window": "context_window",
    "max_output_tokens": "max_output_tokens",
    "input_price_per_1k": "input_price_per_1k",
    "output_price_per_1k": "output_price_per_1k",
    "hedge_after_ms": "hedge_after_ms",
    "accepts_images": "accepts_images",
}
BUDGET_KEYS = {
    "name": "name",
    "scope": "scope",
    "period": "period",
    "token_limit": "token_limit",
    "warning_percent": "warning_percent",
    "enabled": "enabled",
    "endpoint": "endpoint",
    "user": "user",
}
MODEL_DEFAULTS_KEYS = {
    "model": "model_name",
    "system_prompt": "system_prompt",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
}
SECTIONS = {"endpoints", "routes", "budgets", "model_defaults"}


class ConfigFileError(Exception):
    """The file is invalid; `problems` lists each one with its line and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ImportSummary:
    created: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SECTIONS, 0))
    updated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SECTIONS, 0))
    unchanged: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SECTIONS, 0)
    )
    # Keys the file sets that the gateway does not take from it, and why.
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(
            f"{section}: {self.created[section]} created, {self.updated[section]} "
            f"updated, {self.unchanged[section]} unchanged"
            for section in ("endpoints", "routes", "budgets", "model_defaults")
        )


class _Locator:
    """Finds the line of table number n (`[[section]]`, `[a.b]`) and of a key in it."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: dict[str, list[int]] = {}
        for number, line in enumerate(self.lines, start=1):
            match = re.match(r"\s*\[\[?\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\]", line)
            if match:
                self.headers.setdefault(match.group(1), []).append(number)

    def line(self, section: str, index: int, key: str | None = None) -> int | None:
        starts = self.headers.get(section, [])
        if index >= len(starts):
            return None
        start = starts[index]
        if key is None:
            return start
        for number in range(start + 1, len(self.lines) + 1):
            text = self.lines[number - 1]
            if re.match(r"\s*\[", text):
                break
            if re.match(rf"\s*{re.escape(key)}\s*=", text):
                return number
        return start


class _Problems:
    """Problems found so far, each named by `where(section, index, key)`."""

    def __init__(self, where: Callable[[str, int, str | None], str]) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, section: str, index: int, key: str | None, message: str) -> None:
        item = f"{self.where(section, index, key)}: {message}"
        # A value one table lends to several (the spec's [llm_api] keys, which
        # every fallback inherits) fails once per borrower: say it once.
        if item not in self.items:
            self.items.append(item)


def _where_in(locator: _Locator) -> Callable[[str, int, str | None], str]:
    """Names a problem in this format: `line 12: endpoints[2].timeout`."""

    def where(section: str, index: int, key: str | None) -> str:
        line = locator.line(section, index, key)
        name = f"{section}[{index + 1}]" + (f".{key}" if key else "")
        return f"line {line}: {name}" if line else name

    return where


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError("must be a number") from None


def _field_errors(
    exc: ValidationError,
    key_of: dict[str, str],
    problems: _Problems,
    section: str,
    i: int,
) -> None:
    reverse = {model_field: key for key, model_field in key_of.items()}
    for model_field, errors in exc.message_dict.items():
        key = reverse.get(model_field)
        for error in errors:
            problems.add(section, i, key, error.rstrip("."))


def _parse(text: str) -> dict[str, Any]:
    """Parse TOML text, or raise ConfigFileError with the line of the syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError([f"not valid TOML: {exc}"]) from None


def load(text: str) -> dict[str, list[dict[str, Any]]]:
    """Parse a file in this format into its sections, or raise ConfigFileError."""
    return _sections(_parse(text))


def _sections(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    unknown = set(data) - SECTIONS
    if unknown:
        raise ConfigFileError(
            [
                f"unknown section(s): {', '.join(sorted(unknown))}; "
                f"expected {', '.join(sorted(SECTIONS))}"
            ]
        )
    for section in SECTIONS:
        value = data.setdefault(section, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigFileError(
                [f"{section}: must be written as [[{section}]] tables"]
            )
    return data


def import_text(text: str, *, dry_run: bool = False) -> ImportSummary:
    """Apply a TOML file in either layout, all or nothing.

    ConfigFileError lists every problem, each with its line and key.
    """
    raw = _parse(text)
    locator = _Locator(text)
    summary = ImportSummary()
    if llm_api_file.SECTION in raw:
        if set(raw) & SECTIONS:
            raise ConfigFileError(
                [
                    "the file mixes two layouts: use either [llm_api] or "
                    "[[endpoints]]/[[routes]]/[[budgets]], not both"
                ]
            )
        spec = llm_api_file.translate(raw, locator.line)
        data = _sections(spec.sections)
        problems = _Problems(spec.where)
        problems.items.extend(spec.problems)
        summary.notes.extend(spec.notes)
    else:
        data = _sections(raw)
        problems = _Problems(_where_in(locator))
    with transaction.atomic():
        endpoints = _import_endpoints(data["endpoints"], problems, summary)
        _import_routes(data["routes"], endpoints, problems, summary)
        _import_budgets(data["budgets"], endpoints, problems, summary)
        _import_model_defaults(data["model_defaults"], problems, summary)
        if problems.items:
            transaction.set_rollback(True)
            raise ConfigFileError(problems.items)
        if dry_run:
            transaction.set_rollback(True)
    return summary


def _unknown_keys(
    table: dict[str, Any], allowed: set[str], problems: _Problems, section: str, i: int
) -> None:
    for key in table:
        if key not in allowed:
            problems.add(
                section, i, key, f"unknown key; expected one of {sorted(allowed)}"
            )


def _save(
    obj: Any, changed: bool, created: bool, section: str, summary: ImportSummary
) -> None:
    if created:
        obj.save()
        summary.created[section] += 1
    elif changed:
        obj.save()
        summary.updated[section] += 1
    else:
        summary.unchanged[section] += 1


def _assign(obj: Any, values: dict[str, Any]) -> bool:
    changed = False
    for name, value in values.items():
        if getattr(obj, name) != value:
            setattr(obj, name, value)
            changed = True
    return changed


def _import_endpoints(
    tables: list[dict[str, Any]], problems: _Problems, summary: ImportSummary
) -> dict[str, Endpoint | None]:
    """The file's endpoints by name; None for one that is invalid."""
    by_name: dict[str, Endpoint | None] = {}
    for i, table in enumerate(tables):
        _unknown_keys(
            table, set(ENDPOINT_KEYS) | ENDPOINT_SECRET_KEYS, problems, "endpoints", i
        )
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.add("endpoints", i, "name", "is required")
            continue
        if name in by_name:
            problems.add("endpoints", i, "name", f"{name!r} appears twice")
            continue
        endpoint = Endpoint.objects.filter(name=name).first()
        created = endpoint is None
        endpoint = endpoint or Endpoint(name=name)
        values = {ENDPOINT_KEYS[k]: v for k, v in table.items() if k in ENDPOINT_KEYS}
        changed = _assign(endpoint, values)
        key = _api_key(table, problems, i)
        if key is not None and (created or key != endpoint.api_key):
            endpoint.api_key = key
            changed = True
        headers = _extra_headers(table, problems, i)
        if headers is not None and (created or headers != _stored_headers(endpoint)):
            endpoint.extra_headers = headers
            changed = True
        try:
            endpoint.full_clean(validate_unique=False)
        except ValidationError as exc:
            _field_errors(
                _https_only_in_toml(exc), ENDPOINT_KEYS, problems, "endpoints", i
            )
            by_name[name] = None
            continue
        except (TypeError, ValueError) as exc:
            problems.add("endpoints", i, None, str(exc))
            by_name[name] = None
            continue
        _save(endpoint, changed, created, "endpoints", summary)
        by_name[name] = endpoint
    return by_name


def _https_only_in_toml(exc: ValidationError) -> ValidationError:
    """The HTTPS-only error worded for the file: which key allows plain HTTP."""
    for error in getattr(exc, "error_dict", {}).get("base_url", []):
        if error.code == "https_only" and error.params and "allow" in error.params:
            error.params = {**error.params, "allow": "set allow_plain_http = true"}
    return exc


def _api_key(table: dict[str, Any], problems: _Problems, i: int) -> str | None:
    if "api_key_env" in table:
        variable = table["api_key_env"]
        if not isinstance(variable, str) or variable not in os.environ:
            problems.add(
                "endpoints",
                i,
                "api_key_env",
                f"environment variable {variable!r} is not set",
            )
            return None
        return os.environ[variable]
    if "api_key" in table:
        if not isinstance(table["api_key"], str):
            problems.add("endpoints", i, "api_key", "must be a string")
            return None
        return table["api_key"]
    return None


def _extra_headers(
    table: dict[str, Any], problems: _Problems, i: int
) -> dict[str, str] | None:
    if "extra_headers" not in table and "extra_headers_env" not in table:
        return None
    headers: dict[str, Any] = {}
    plain = table.get("extra_headers", {})
    if not isinstance(plain, dict):
        problems.add("endpoints", i, "extra_headers", "must be a table of strings")
        return None
    headers.update(plain)
    from_env = table.get("extra_headers_env", {})
    if not isinstance(from_env, dict):
        problems.add(
            "endpoints", i, "extra_headers_env", "must be a table of variable names"
        )
        return None
    for name, variable in from_env.items():
        if not isinstance(variable, str) or variable not in os.environ:
            problems.add(
                "endpoints",
                i,
                "extra_headers_env",
                f"environment variable {str(variable)[:100]!r} for {name[:100]!r} "
                "is not set",
            )
            return None
        headers[name] = os.environ[variable]
    try:
        return clean_extra_headers(headers)
    except ValidationError as exc:
        key = "extra_headers_env" if from_env else "extra_headers"
        for message in exc.messages:
            problems.add("endpoints", i, key, message.rstrip("."))
        return None


def _stored_headers(endpoint: Endpoint) -> Any:
    try:
        return endpoint.extra_headers
    except (crypto.DecryptionError, ValueError):
        return None  # unreadable with today's keys: the file's replace them


def _endpoint_ref(
    name: Any,
    endpoints: dict[str, Endpoint | None],
    problems: _Problems,
    section: str,
    i: int,
) -> Endpoint | None:
    if name in endpoints:
        # None: the endpoint's own problem is reported; its routes and budgets
        # would only repeat it.
        return endpoints[name]
    endpoint = (
        Endpoint.objects.filter(name=name).first() if isinstance(name, str) else None
    )
    if endpoint is None:
        problems.add(section, i, "endpoint", f"no endpoint named {name!r}")
    return endpoint


def _import_routes(
    tables: list[dict[str, Any]],
    endpoints: dict[str, Endpoint | None],
    problems: _Problems,
    summary: ImportSummary,
) -> None:
    for i, table in enumerate(tables):
        _unknown_keys(table, set(ROUTE_KEYS), problems, "routes", i)
        model = table.get("model")
        if not isinstance(model, str) or not model.strip():
            problems.add("routes", i, "model", "is required")
            continue
        endpoint = _endpoint_ref(
            table.get("endpoint"), endpoints, problems, "routes", i
        )
        if endpoint is None:
            continue
        route = ModelRoute.objects.filter(model_name=model, endpoint=endpoint).first()
        created = route is None
        route = route or ModelRoute(model_name=model, endpoint=endpoint)
        values = {
            ROUTE_KEYS[k]: v
            for k, v in table.items()
            if k in ROUTE_KEYS and k not in {"model", "endpoint"}
        }
        values.setdefault("upstream_model", model)
        if not isinstance(values.get("accepts_images", False), bool):
            problems.add("routes", i, "accepts_images", "must be true or false")
            continue
        try:
            for price in ("input_price_per_1k", "output_price_per_1k"):
                if price in values:
                    values[price] = _decimal(values[price])
        except ValueError as exc:
            problems.add("routes", i, price, str(exc))
            continue
        changed = _assign(route, values)
        try:
            route.full_clean(validate_unique=False, validate_constraints=False)
            if route.max_output_tokens >= route.context_window:
                raise ValidationError(
                    {"max_output_tokens": "must be smaller than context_window"}
                )
        except ValidationError as exc:
            _field_errors(exc, ROUTE_KEYS, problems, "routes", i)
            continue
        except (TypeError, ValueError) as exc:
            problems.add("routes", i, None, str(exc))
            continue
        _save(route, changed, created, "routes", summary)


def _import_budgets(
    tables: list[dict[str, Any]],
    endpoints: dict[str, Endpoint | None],
    problems: _Problems,
    summary: ImportSummary,
) -> None:
    users = get_user_model()
    for i, table in enumerate(tables):
        _unknown_keys(table, set(BUDGET_KEYS), problems, "budgets", i)
        scope = table.get("scope", BudgetScope.GLOBAL)
        period = table.get("period", BudgetPeriod.DAILY)
        if scope not in {BudgetScope.GLOBAL, BudgetScope.ENDPOINT, BudgetScope.USER}:
            problems.add("budgets", i, "scope", "must be global, endpoint or user")
            continue
        if period not in BudgetPeriod.values:
            problems.add(
                "budgets", i, "period", f"must be one of {BudgetPeriod.values}"
            )
            continue
        target: dict[str, Any] = {}
        if scope == BudgetScope.ENDPOINT:
            endpoint = _endpoint_ref(
                table.get("endpoint"), endpoints, problems, "budgets", i
            )
            if endpoint is None:
                continue
            target["endpoint"] = endpoint
        elif scope == BudgetScope.USER:
            user = users.objects.filter(username=table.get("user")).first()
            if user is None:
                problems.add(
                    "budgets", i, "user", f"no user named {table.get('user')!r}"
                )
                continue
            target["user"] = user
        budget = Budget.objects.filter(scope=scope, period=period, **target).first()
        created = budget is None
        budget = budget or Budget(scope=scope, period=period, **target)
        values = {
            "name": table.get("name", budget.name or ""),
            "token_limit": table.get("token_limit"),
            "warning_percent": table.get("warning_percent", 80),
            "enabled": table.get("enabled", True),
        }
        changed = _assign(budget, values)
        try:
            budget.full_clean(validate_unique=False, validate_constraints=False)
        except ValidationError as exc:
            _field_errors(exc, BUDGET_KEYS, problems, "budgets", i)
            continue
        except (TypeError, ValueError) as exc:
            problems.add("budgets", i, None, str(exc))
            continue
        _save(budget, changed, created, "budgets", summary)


def _import_model_defaults(
    tables: list[dict[str, Any]], problems: _Problems, summary: ImportSummary
) -> None:
    seen: set[str] = set()
    for i, table in enumerate(tables):
        _unknown_keys(table, set(MODEL_DEFAULTS_KEYS), problems, "model_defaults", i)
        model = table.get("model")
        if not isinstance(model, str) or not model.strip():
            problems.add("model_defaults", i, "model", "is required")
            continue
        if model in seen:
            problems.add("model_defaults", i, "model", f"{model!r} appears twice")
            continue
        seen.add(model)
        defaults = ModelDefaults.objects.filter(model_name=model).first()
        created = defaults is None
        defaults = defaults or ModelDefaults(model_name=model)
        # A key left out of the table clears it: the file says it all.
        values = {
            field: table.get(key, "" if field == "system_prompt" else None)
            for key, field in MODEL_DEFAULTS_KEYS.items()
            if key != "model"
        }
        changed = _assign(defaults, values)
        try:
            for key in ("temperature", "top_p"):
                value = values[key]
                if isinstance(value, bool) or not (
                    value is None or isinstance(value, int | float)
                ):
                    raise ValidationError({key: "must be a number"})
            value = values["max_tokens"]
            if isinstance(value, bool) or not (value is None or isinstance(value, int)):
                raise ValidationError({"max_tokens": "must be a whole number"})
            if not isinstance(values["system_prompt"], str):
                raise ValidationError({"system_prompt": "must be a string"})
            defaults.full_clean(validate_unique=False)
        except ValidationError as exc:
            _field_errors(exc, MODEL_DEFAULTS_KEYS, problems, "model_defaults", i)
            continue
        _save(defaults, changed, created, "model_defaults", summary)


def _drop_none(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if v not in (None, "", {})}


def _comment_safe(text: str) -> str:
    # Names end up in a TOML comment: one line, printable, bounded.
    return "".join(c if c.isprintable() else "?" for c in text)[:100]


def export_text() -> str:
    """Everything importable, as TOML. API keys and header values are never written."""
    endpoints = []
    with_headers = []
    for endpoint in Endpoint.objects.order_by("priority", "name"):
        table = {key: getattr(endpoint, f) for key, f in ENDPOINT_KEYS.items()}
        endpoints.append(_drop_none(table))
        if endpoint.extra_header_names:
            with_headers.append(
                f"#   {_comment_safe(endpoint.name)}: "
                + ", ".join(_comment_safe(n) for n in endpoint.extra_header_names)
            )
    routes = []
    for route in ModelRoute.objects.select_related("endpoint").order_by(
        "model_name", "priority", "id"
    ):
        table = {
            "model": route.model_name,
            "endpoint": route.endpoint.name,
            "upstream_model": route.upstream_model,
            "priority": route.priority,
            "enabled": route.enabled,
            "context_window": route.context_window,
            "max_output_tokens": route.max_output_tokens,
            "input_price_per_1k": (
                float(route.input_price_per_1k) if route.input_price_per_1k else None
            ),
            "output_price_per_1k": (
                float(route.output_price_per_1k) if route.output_price_per_1k else None
            ),
            "hedge_after_ms": route.hedge_after_ms,
            # Written only when set: the default keeps exports of text-only
            # routes as they were.
            "accepts_images": route.accepts_images or None,
        }
        routes.append(_drop_none(table))
    budgets = []
    for budget in Budget.objects.select_related("endpoint", "user").exclude(
        scope=BudgetScope.API_KEY
    ):
        table = {
            "name": budget.name or None,
            "scope": budget.scope,
            "period": budget.period,
            "token_limit": budget.token_limit,
            "warning_percent": budget.warning_percent,
            "enabled": budget.enabled,
            "endpoint": budget.endpoint.name if budget.endpoint else None,
            "user": budget.user.get_username() if budget.user else None,
        }
        budgets.append(_drop_none(table))
    model_defaults = [
        _drop_none(
            {
                key: getattr(defaults, field)
                for key, field in MODEL_DEFAULTS_KEYS.items()
            }
        )
        for defaults in ModelDefaults.objects.order_by("model_name")
    ]
    header = (
        "# llmsite endpoints, model routes, budgets and model defaults "
        "(manage.py export_endpoints).\n# API keys are not exported: importing "
        "keeps the stored ones; add api_key_env to set new ones.\n"
    )
    if with_headers:
        header += (
            "# Extra headers are not exported either (importing keeps them); set\n"
            "# new values with extra_headers_env. Endpoints with extra headers:\n"
            + "\n".join(with_headers)
            + "\n"
        )
    sections = {
        "endpoints": endpoints,
        "routes": routes,
        "budgets": budgets,
        "model_defaults": model_defaults,
    }
    return header + "".join(
        "\n" + tomli_w.dumps({name: tables})
        for name, tables in sections.items()
        if tables
    )
