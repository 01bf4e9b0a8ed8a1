"""Admin for endpoints, routes, budgets, API keys and usage."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db import IntegrityError, connections, transaction
from django.db.models import Case, DateTimeField, OuterRef, Subquery, Value, When
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.decorators import method_decorator
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince, timeuntil
from django.views.decorators.http import require_POST

from gateway import client, connection_check, crypto, limits, sanitize, usage_export
from gateway.accounting.budgets import format_reset, period_bounds
from gateway.models import (
    ApiKey,
    Budget,
    BudgetCounter,
    BudgetPeriod,
    BudgetScope,
    Endpoint,
    EndpointStatus,
    ModelDefaults,
    ModelRoute,
    UsageRecord,
    UsageRollup,
    UserLimits,
    clean_extra_headers,
)

# A form may create at most this many routes at once (the model list's cap).
MAX_ROUTES_PER_FORM = client.MAX_MODELS

STATUS_COLOURS = {
    EndpointStatus.CONNECTED: "#1a7f37",
    EndpointStatus.SLOW: "#9a6700",
    EndpointStatus.DISCONNECTED: "#cf222e",
    EndpointStatus.UNKNOWN: "#6e7781",
}


def _limits_row(row: UserLimits | ApiKey | None) -> tuple[int | None, int | None]:
    return (None, None) if row is None else (row.rpm_limit, row.tpm_limit)


def _user_limits_row(user: Any) -> UserLimits | None:
    """A user's overrides, from select_related or one query; None when none."""
    try:
        return user.rate_limits
    except UserLimits.DoesNotExist:
        return None


def rate_limits_text(rpm: limits.EffectiveLimit, tpm: limits.EffectiveLimit) -> str:
    """ "requests/min: default (none) · tokens/min: 5,000, user override"."""
    return f"requests/min: {rpm} · tokens/min: {tpm}"


def status_badge(status: str, label: str) -> str:
    """A status as coloured text: the words carry the meaning, not the colour."""
    colour = STATUS_COLOURS.get(status, "#6e7781")
    return format_html(
        '<span class="llm-status llm-status-{}" style="color:{};font-weight:600">'
        "● {}</span>",
        status,
        colour,
        label,
    )


def transport_badge(endpoint: Endpoint | None) -> str:
    """How requests to an endpoint travel: a warning when in clear over a network."""
    if endpoint is None or not endpoint.base_url:
        return "—"
    if endpoint.sends_in_clear:
        if endpoint.allow_plain_http:
            text = "⚠ Plain HTTP: the API key travels in clear"
            hint = "Allowed for this endpoint: move it to https:// if you can."
        else:
            # Only a row written past validation gets here; the client refuses it.
            text = "⚠ Plain HTTP refused: no request is sent"
            hint = "Use https://, or allow plain HTTP for this endpoint."
        return format_html(
            '<span class="llm-plain-http" style="color:#cf222e;font-weight:600" '
            'title="{}">{}</span>',
            hint,
            text,
        )
    if endpoint.base_url.lower().startswith("https:"):
        return "HTTPS"
    return "HTTP to this machine"


class LargeTablePaginator(Paginator):
    """Counts an unfiltered big table from PostgreSQL's statistics, not COUNT(*)."""

    @cached_property
    def count(self) -> int:
        query = getattr(self.object_list, "query", None)
        connection = connections[getattr(self.object_list, "db", "default")]
        if query is not None and not query.where and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE relname = %s",
                    [self.object_list.model._meta.db_table],
                )
                row = cursor.fetchone()
            if row and row[0] > 10_000:
                return int(row[0])
        return super().count


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders a value back, even after an error."""

    def format_value(self, value: object) -> None:
        return None


def parse_header_lines(text: str) -> dict[str, str]:
    """Headers typed as one ``Name: value`` per line."""
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            # The line is not quoted back: it may hold a secret.
            raise ValidationError(f"Line {number}: write it as Name: value.")
        headers[name.strip()] = value.strip()
    return headers


class EndpointForm(forms.ModelForm):
    """The API key and extra-header values are write-only: never rendered."""

    base_url = forms.URLField(
        max_length=500,
        assume_scheme="https",
        help_text="Up to and including the API version, e.g. https://api.openai.com/v1",
    )

    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="No key stored.",
    )
    clear_api_key = forms.BooleanField(
        label="Remove the stored API key", required=False
    )
    set_extra_headers = forms.CharField(
        label="Add or replace extra headers",
        required=False,
        widget=WriteOnlyTextarea(attrs={"rows": 3, "autocomplete": "off"}),
        help_text=(
            "One <code>Name: value</code> per line, e.g. <code>x-api-key: ...</code>. "
            "Stored encrypted; values are never shown again. A name already set "
            "is replaced."
        ),
    )
    remove_extra_headers = forms.MultipleChoiceField(
        label="Remove extra headers",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=[],
    )

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        names = self.instance.extra_header_names if self.instance.pk else []
        self.fields["remove_extra_headers"].choices = [(n, n) for n in names]
        if self.instance.pk and self.instance.has_api_key:
            # The key itself is never shown: this sentence is all the form says.
            self.fields["api_key"].help_text = "A key is set; leave empty to keep it."
        self._extra_headers: dict[str, str] | None = None

    def clean(self) -> dict[str, object]:
        cleaned = super().clean()
        typed = self.cleaned_data.get("set_extra_headers") or ""
        remove = set(self.cleaned_data.get("remove_extra_headers") or [])
        if not typed.strip() and not remove:
            return cleaned
        try:
            current = self.instance.extra_headers if self.instance.pk else {}
        except (crypto.DecryptionError, ValueError):
            current = {}  # unreadable with today's keys: typed values replace it
        if not isinstance(current, dict):
            current = {}
        try:
            added = parse_header_lines(typed)
        except ValidationError as exc:
            self.add_error("set_extra_headers", exc)
            return cleaned
        replaced = {name.lower() for name in added} | {n.lower() for n in remove}
        headers = {n: v for n, v in current.items() if n.lower() not in replaced}
        headers.update(added)
        try:
            self._extra_headers = clean_extra_headers(headers)
        except ValidationError as exc:
            self.add_error("set_extra_headers", exc)
        return cleaned

    class Meta:
        model = Endpoint
        fields = [
            "name",
            "base_url",
            "allow_plain_http",
            "enabled",
            "priority",
            "connect_timeout",
            "first_token_timeout",
            "timeout",
            "request_timeout",
            "retries_before_failover",
            "max_retries",
            "backoff_multiplier",
            "rpm_limit",
            "tpm_limit",
            "failure_threshold",
            "cooldown_seconds",
            "probe_interval",
            "probe_mode",
            "probe_model",
            "supports_stream_usage",
        ]

    def save(self, commit: bool = True) -> Endpoint:
        endpoint = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            endpoint.api_key = ""
        elif self.cleaned_data.get("api_key"):
            endpoint.api_key = self.cleaned_data["api_key"]
        if self._extra_headers is not None:
            endpoint.extra_headers = self._extra_headers
        if commit:
            endpoint.save()
            self.save_m2m()
        return endpoint


def _time_left(until: datetime, now: datetime) -> str:
    """How long until `until`: seconds under a minute (timeuntil says "0 minutes")."""
    seconds = (until - now).total_seconds()
    if seconds < 60:
        return f"{math.ceil(seconds)} s"
    return timeuntil(until, now)


class ModelRouteInline(admin.TabularInline):
    model = ModelRoute
    extra = 0
    fields = [
        "model_name",
        "kind",
        "upstream_model",
        "priority",
        "enabled",
        "context_window",
        "max_output_tokens",
        "input_price_per_1k",
        "output_price_per_1k",
        "hedge_after_ms",
    ]


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    form = EndpointForm
    # Fits 1280 px: the URL carries its transport warning, and the breaker's
    # failures, pause and rest share one column.
    list_display = [
        "name",
        "url_column",
        "enabled",
        "priority",
        "status_display",
        "last_latency_display",
        "last_check",
        "breaker",
        "has_api_key",
    ]
    list_filter = ["enabled", "status", "allow_plain_http"]
    search_fields = ["name", "base_url"]
    inlines = [ModelRouteInline]
    actions = ["enable", "disable", "reset_breaker"]
    readonly_fields = [
        "transport",
        "status",
        "status_changed_at",
        "consecutive_failures",
        "probe_failures",
        "disabled_until",
        "resting_until",
        "last_checked_at",
        "last_latency_ms",
        "next_probe_at",
        "created_at",
        "updated_at",
        "extra_headers_display",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "base_url",
                    "allow_plain_http",
                    "transport",
                    "api_key",
                    "clear_api_key",
                    "enabled",
                ]
            },
        ),
        (
            "Requests",
            {
                "fields": [
                    "priority",
                    ("connect_timeout", "first_token_timeout"),
                    ("timeout", "request_timeout"),
                    ("retries_before_failover", "max_retries", "backoff_multiplier"),
                    ("rpm_limit", "tpm_limit"),
                    "extra_headers_display",
                    "set_extra_headers",
                    "remove_extra_headers",
                    "supports_stream_usage",
                ]
            },
        ),
        (
            "Health",
            {
                "fields": [
                    ("failure_threshold", "cooldown_seconds"),
                    ("probe_interval", "probe_mode", "probe_model"),
                    ("status", "status_changed_at"),
                    ("consecutive_failures", "probe_failures", "disabled_until"),
                    "resting_until",
                    ("last_checked_at", "last_latency_ms", "next_probe_at"),
                    ("created_at", "updated_at"),
                ]
            },
        ),
    ]

    @admin.display(description="Status", ordering="status")
    def status_display(self, obj: Endpoint) -> str:
        return status_badge(obj.status, obj.get_status_display())

    def get_urls(self) -> list:
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path(
                "<int:object_id>/test-connection/",
                self.admin_site.admin_view(self.test_connection_view),
                name=f"{prefix}_test_connection",
            ),
            path(
                "<int:object_id>/models/",
                self.admin_site.admin_view(self.fetch_models_view),
                name=f"{prefix}_fetch_models",
            ),
            *super().get_urls(),
        ]

    def _endpoint_or_404(self, request: HttpRequest, object_id: int) -> Endpoint:
        endpoint = self.get_object(request, str(object_id))
        if endpoint is None:
            raise Http404("No such endpoint.")
        return endpoint

    def _change_url(self, endpoint: Endpoint) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[endpoint.pk],
        )

    def _report_failure(
        self,
        request: HttpRequest,
        endpoint: Endpoint,
        what: str,
        exc: connection_check.CheckFailed,
    ) -> None:
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        self.message_user(
            request, f"{endpoint.name}: {what}{status}: {exc.message}", messages.ERROR
        )

    @method_decorator(require_POST)
    def test_connection_view(
        self, request: HttpRequest, object_id: int
    ) -> HttpResponse:
        """Ask the endpoint for its models once, now, and say what happened.

        A POST: it sends a request upstream. Nothing is recorded; the monitor's
        probes keep the status history.
        """
        endpoint = self._endpoint_or_404(request, object_id)
        if not self.has_view_permission(request, endpoint):
            raise PermissionDenied
        try:
            result = connection_check.check_connection(endpoint)
        except connection_check.CheckFailed as exc:
            self._report_failure(request, endpoint, "the connection failed", exc)
        else:
            self.message_user(
                request,
                f"{endpoint.name}: connected in {result.latency_ms:,.0f} ms "
                f"(HTTP 200), {result.model_count} model(s) listed.",
                messages.SUCCESS,
            )
        return HttpResponseRedirect(self._change_url(endpoint))

    def fetch_models_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The endpoint's models (GET); routes created from those ticked (POST)."""
        endpoint = self._endpoint_or_404(request, object_id)
        if not self.has_view_permission(request, endpoint):
            raise PermissionDenied
        can_add = request.user.has_perm("gateway.add_modelroute")
        if request.method == "POST":
            if not can_add:
                raise PermissionDenied
            return self._create_routes(request, endpoint)
        try:
            model_ids = connection_check.fetch_model_ids(endpoint)
        except connection_check.CheckFailed as exc:
            self._report_failure(
                request, endpoint, "the models could not be fetched", exc
            )
            return HttpResponseRedirect(self._change_url(endpoint))
        routed = dict(endpoint.routes.values_list("upstream_model", "model_name"))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": endpoint,
            "title": f"Models of {endpoint.name}",
            "models": [
                {"id": model_id, "index": index, "route": routed.get(model_id)}
                for index, model_id in enumerate(model_ids)
            ],
            "can_add": can_add,
            "change_url": self._change_url(endpoint),
        }
        return TemplateResponse(
            request, "admin/gateway/endpoint/fetch_models.html", context
        )

    def _create_routes(self, request: HttpRequest, endpoint: Endpoint) -> HttpResponse:
        """One route per ticked model, under the public name typed next to it."""
        created, problems = [], []
        for picked in request.POST.getlist("pick")[:MAX_ROUTES_PER_FORM]:
            upstream = sanitize.clean_identifier(picked.strip())
            if not upstream:
                continue
            typed = request.POST.get(f"name:{picked}") or ""
            public = sanitize.clean_identifier(typed.strip()) or upstream
            route = ModelRoute(
                model_name=public, endpoint=endpoint, upstream_model=upstream
            )
            try:
                route.full_clean()
                with transaction.atomic():
                    route.save()
            except ValidationError as exc:
                problems.append(f"{public} ({' '.join(exc.messages)})")
                continue
            except IntegrityError:
                # Created by someone else since the check above.
                problems.append(f"{public} (already routed to this endpoint)")
                continue
            created.append(public)
        if created:
            self.message_user(
                request,
                f"{len(created)} route(s) created on {endpoint.name}: "
                f"{', '.join(created)}.",
                messages.SUCCESS,
            )
        if problems:
            self.message_user(
                request, f"Not created: {', '.join(problems)}.", messages.WARNING
            )
        if not created and not problems:
            self.message_user(request, "No model was ticked.", messages.WARNING)
        return HttpResponseRedirect(self._change_url(endpoint))

    @admin.display(description="Transport")
    def transport(self, obj: Endpoint) -> str:
        return transport_badge(obj)

    @admin.display(description="URL", ordering="base_url")
    def url_column(self, obj: Endpoint) -> str:
        if not obj.sends_in_clear:
            return obj.base_url
        return format_html("{}<br>{}", obj.base_url, transport_badge(obj))

    @admin.display(description="Last check", ordering="last_checked_at")
    def last_check(self, obj: Endpoint) -> str:
        if obj.last_checked_at is None:
            return "never"
        return f"{timesince(obj.last_checked_at)} ago"

    @admin.display(description="Breaker")
    def breaker(self, obj: Endpoint) -> str:
        """Failures in a row, and until when requests skip the endpoint, if they do."""
        now = timezone.now()
        parts = []
        if obj.consecutive_failures:
            parts.append(f"{obj.consecutive_failures} failure(s) in a row")
        if obj.disabled_until and obj.disabled_until > now:
            parts.append(f"open for {_time_left(obj.disabled_until, now)}")
        if obj.resting_until and obj.resting_until > now:
            parts.append(f"resting for {_time_left(obj.resting_until, now)}")
        return "; ".join(parts) or "—"

    @admin.display(description="Latency", ordering="last_latency_ms")
    def last_latency_display(self, obj: Endpoint) -> str:
        return "—" if obj.last_latency_ms is None else f"{obj.last_latency_ms:.0f} ms"

    @admin.display(description="Key", boolean=True)
    def has_api_key(self, obj: Endpoint) -> bool:
        return obj.has_api_key

    @admin.display(description="Extra headers")
    def extra_headers_display(self, obj: Endpoint) -> str:
        # Names only: values are write-only, like the API key.
        names = obj.extra_header_names
        if not names:
            return "—"
        return ", ".join(f"{name} (set)" for name in names)

    @admin.action(description="Enable selected endpoints")
    def enable(self, request: HttpRequest, queryset) -> None:
        updated = queryset.update(enabled=True)
        self.message_user(request, f"{updated} endpoint(s) enabled.")

    @admin.action(description="Disable selected endpoints")
    def disable(self, request: HttpRequest, queryset) -> None:
        updated = queryset.update(enabled=False)
        self.message_user(request, f"{updated} endpoint(s) disabled.")

    @admin.action(description="Close the circuit breaker (re-enable now)")
    def reset_breaker(self, request: HttpRequest, queryset) -> None:
        updated = queryset.update(
            consecutive_failures=0, disabled_until=None, resting_until=None
        )
        self.message_user(request, f"Breaker closed on {updated} endpoint(s).")


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    list_display = [
        "model_name",
        "kind",
        "priority",
        "endpoint",
        "upstream_model",
        "enabled",
        "context_window",
        "max_output_tokens",
        "input_price_per_1k",
        "output_price_per_1k",
        "accepts_images",
        "hedge_after_ms",
    ]
    list_filter = ["enabled", "kind", "accepts_images", "model_name", "endpoint"]
    list_select_related = ["endpoint"]
    search_fields = ["model_name", "upstream_model", "endpoint__name"]
    autocomplete_fields = ["endpoint"]


class BudgetCounterInline(admin.TabularInline):
    model = BudgetCounter
    extra = 0
    max_num = 0
    can_delete = False
    fields = [
        "period_start",
        "used_tokens",
        "reserved_tokens",
        "warned_at",
        "exhausted_at",
    ]
    readonly_fields = fields
    ordering = ["-period_start"]


# Each scope as a sentence names its budgets.
_BUDGET_KINDS = {
    BudgetScope.GLOBAL: "a global budget",
    BudgetScope.USER: "a user budget",
    BudgetScope.API_KEY: "an API key budget",
    BudgetScope.ENDPOINT: "an endpoint budget",
}
# The field that names each scope's target, and how a sentence names it.
_BUDGET_TARGETS = {
    BudgetScope.USER: ("user", "a user"),
    BudgetScope.API_KEY: ("api_key", "an API key"),
    BudgetScope.ENDPOINT: ("endpoint", "an endpoint"),
}


class BudgetForm(forms.ModelForm):
    """Scope and target checked field by field, in sentences.

    The model's constraints would say the same as `Constraint "..." is
    violated.`; an error on a field makes the form skip the constraint.
    """

    class Meta:
        model = Budget
        fields = [
            "name",
            "scope",
            "user",
            "api_key",
            "endpoint",
            "period",
            "token_limit",
            "warning_percent",
            "enabled",
        ]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        scope = cleaned.get("scope")
        if not scope:
            return cleaned
        kind = _BUDGET_KINDS[BudgetScope(scope)]
        for target_scope, (name, article) in _BUDGET_TARGETS.items():
            if name not in self.fields:
                continue
            given = cleaned.get(name) is not None
            if target_scope == scope and not given:
                self.add_error(name, f"{kind.capitalize()} needs {article}.")
            elif target_scope != scope and given:
                self.add_error(
                    name,
                    f"{kind.capitalize()} is not for {article}: clear this "
                    "field or change the scope.",
                )
        if not self.errors and cleaned.get("period"):
            self._check_one_per_period(scope, kind, cleaned)
        return cleaned

    def _check_one_per_period(
        self, scope: str, kind: str, cleaned: dict[str, Any]
    ) -> None:
        period = cleaned["period"]
        target = _BUDGET_TARGETS.get(scope)
        same = Budget.objects.filter(scope=scope, period=period)
        if target is not None:
            same = same.filter(**{target[0]: cleaned.get(target[0])})
        if self.instance.pk is not None:
            same = same.exclude(pk=self.instance.pk)
        if same.exists():
            whose = "There is" if target is None else "Its target has"
            self.add_error(
                "period",
                f"{whose} already {kind} for this period ({period}); "
                "change that one instead.",
            )


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    form = BudgetForm
    list_display = [
        "__str__",
        "scope",
        "period",
        "token_limit",
        "used_display",
        "left_display",
        "resets_display",
        "warning_percent",
        "enabled",
    ]
    list_filter = ["scope", "period", "enabled"]
    list_select_related = ["user", "api_key", "endpoint"]
    search_fields = ["name", "user__username", "api_key__name", "endpoint__name"]
    autocomplete_fields = ["user", "api_key", "endpoint"]
    inlines = [BudgetCounterInline]

    def get_queryset(self, request: HttpRequest) -> Any:
        # This period's counter of each budget, in the list's own query.
        now = timezone.now()
        start = Case(
            *(
                When(period=period, then=Value(period_bounds(period, now)[0]))
                for period in BudgetPeriod.values
            ),
            output_field=DateTimeField(),
        )
        counter = BudgetCounter.objects.filter(
            budget_id=OuterRef("pk"), period_start=OuterRef("current_start")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(current_start=start)
            .annotate(
                period_used=Subquery(counter.values("used_tokens")[:1]),
                period_reserved=Subquery(counter.values("reserved_tokens")[:1]),
            )
        )

    @admin.display(description="used")
    def used_display(self, budget: Budget) -> str:
        return f"{getattr(budget, 'period_used', None) or 0:,}"

    @admin.display(description="left")
    def left_display(self, budget: Budget) -> str:
        if budget.token_limit is None:
            return "no limit"
        used = getattr(budget, "period_used", None) or 0
        reserved = getattr(budget, "period_reserved", None) or 0
        return f"{max(0, budget.token_limit - used - reserved):,}"

    @admin.display(description="resets at")
    def resets_display(self, budget: Budget) -> str:
        now = timezone.now()
        return format_reset(period_bounds(budget.period, now)[1], now)


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["user", "name", "rpm_limit", "tpm_limit", "revoked_at"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = [
        "name",
        "prefix_display",
        "user",
        "created_at",
        "last_used_at",
        "active",
        "effective_limits",
    ]
    list_filter = ["revoked_at"]
    # user__rate_limits: the owner's limits bind the key's requests too.
    list_select_related = ["user", "user__rate_limits"]
    search_fields = ["name", "prefix", "user__username"]
    autocomplete_fields = ["user"]
    readonly_fields = [
        "prefix_display",
        "created_at",
        "last_used_at",
        "effective_limits",
    ]
    actions = ["revoke"]

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> list[str]:
        # A key belongs to one user for life: its usage, limits and budgets
        # are that user's. Another user gets a key of their own.
        fields = list(super().get_readonly_fields(request, obj))
        return fields if obj is None else ["user", *fields]

    @admin.display(description="Rate limits in effect")
    def effective_limits(self, obj: ApiKey) -> str:
        """The limits a request with this key meets: the key's, or its owner's."""
        if obj.pk is None:
            return "—"
        owner = _user_limits_row(obj.user) if obj.user_id else None
        rpm, tpm = limits.effective_limits(
            _limits_row(owner), _limits_row(obj), through_key=True
        )
        return rate_limits_text(rpm, tpm)

    @admin.display(description="Key")
    def prefix_display(self, obj: ApiKey) -> str:
        return f"{obj.prefix}…" if obj.prefix else "—"

    @admin.display(description="Active", boolean=True)
    def active(self, obj: ApiKey) -> bool:
        return obj.is_active

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return ["user", "name", "rpm_limit", "tpm_limit"]
        return [
            "user",
            "name",
            "prefix_display",
            "rpm_limit",
            "tpm_limit",
            "effective_limits",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw = ApiKey.generate(obj.user, obj.name)
        created.rpm_limit, created.tpm_limit = obj.rpm_limit, obj.tpm_limit
        created.save(update_fields=["rpm_limit", "tpm_limit"])
        # The admin's later steps (log entry, redirect) need the saved row.
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = (
            created.pk,
            created.prefix,
            created.key_hash,
            created.created_at,
        )
        obj._state.adding = False
        # Kept on this request's object only, for response_add: never in a
        # message, the session or a URL, which would put it in a cookie.
        obj._raw_key = raw

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        raw = obj.__dict__.pop("_raw_key", None)
        if raw is None:
            return super().response_add(request, obj, post_url_continue)
        opts = self.opts
        response = TemplateResponse(
            request,
            "admin/gateway/apikey/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": opts,
                "title": "API key created",
                "key": obj,
                "raw_key": raw,
                "change_url": reverse(
                    f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]
                ),
                "changelist_url": reverse(
                    f"admin:{opts.app_label}_{opts.model_name}_changelist"
                ),
            },
        )
        # The page holds the only copy of the key: no cache may keep it.
        add_never_cache_headers(response)
        response["Cache-Control"] = "no-store, no-cache, must-revalidate, private"
        response["Referrer-Policy"] = "no-referrer"
        return response

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset) -> None:
        updated = queryset.filter(revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        self.message_user(request, f"{updated} key(s) revoked.")


def usage_page_url(user_id: int) -> str | None:
    """A user's usage page, for staff, when the site serves one."""
    try:
        return f"{reverse('monitoring:usage')}?{urlencode({'user': user_id})}"
    except NoReverseMatch:
        return None


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    # Fits 1280 px: tokens in one column, times rounded to whole milliseconds.
    list_display = [
        "when",
        "source",
        "user_column",
        "model_name",
        "endpoint_column",
        "status",
        "tokens",
        "latency",
        "ttft",
        "cost",
    ]
    # created_at as a plain filter: the date hierarchy runs DISTINCT over dates,
    # which scans the whole table.
    list_filter = ["status", "source", ("created_at", admin.DateFieldListFilter)]
    list_display_links = ["when"]
    list_select_related = ["user"]
    search_fields = ["model_name", "endpoint_name", "user__username", "=request_id"]
    show_full_result_count = False
    paginator = LargeTablePaginator
    list_per_page = 50
    ordering = ["-created_at"]
    # The record page shows the trail as a table, not as raw JSON.
    exclude = ["trail"]
    readonly_fields = ["trail_table"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="trail")
    def trail_table(self, obj: UsageRecord) -> str:
        """Every endpoint tried or skipped, in order, with outcome and times."""
        steps = usage_export.clean_trail(obj.trail)
        if not steps:
            return "—"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            (
                (
                    step.get("endpoint", "—"),
                    step.get("outcome", "—"),
                    step.get("status_code") or "",
                    (step.get("reason") or "")
                    + (" (mid-answer)" if step.get("mid_stream") else ""),
                    self.milliseconds(step.get("started_ms")),
                    self.milliseconds(step.get("duration_ms")),
                )
                for step in steps
            ),
        )
        return format_html(
            "<table><thead><tr><th>endpoint</th><th>outcome</th><th>status</th>"
            "<th>reason</th><th>started at</th><th>took</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    def get_urls(self) -> list:
        name = f"{self.opts.app_label}_{self.opts.model_name}_export"
        view = self.admin_site.admin_view(self.export_csv_view)
        return [path("export.csv", view, name=name), *super().get_urls()]

    def export_csv_view(self, request: HttpRequest) -> HttpResponse:
        """The list as it is filtered and searched now, every row, as CSV.

        Streamed by the same code as the REST API's export, so memory stays
        flat however many rows the filters leave.
        """
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            # What the list itself does with a filter it does not know.
            url = reverse(
                f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist"
            )
            return HttpResponseRedirect(f"{url}?e=1")
        body: Any = usage_export.iter_csv(changelist.get_queryset(request))
        if isinstance(request, ASGIRequest):
            # Django would read a sync iterator to its end before sending.
            body = usage_export.aiter_chunks(body)
        response = StreamingHttpResponse(body, content_type="text/csv; charset=utf-8")
        name = usage_export.filename(None, timezone.now(), "csv")
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        response["X-Content-Type-Options"] = "nosniff"
        add_never_cache_headers(response)
        return response

    @admin.display(description="created at", ordering="created_at")
    def when(self, obj: UsageRecord) -> str:
        # Numeric and to the second: half the width of "Nov. 30, 2026, 2:48 p.m."
        return timezone.localtime(obj.created_at).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="user", ordering="user__username")
    def user_column(self, obj: UsageRecord) -> str:
        if obj.user is None:
            return "—"
        url = usage_page_url(obj.user_id)
        if url is None:
            return str(obj.user)
        return format_html(
            '<a href="{}" title="This user\'s usage page">{}</a>', url, obj.user
        )

    @admin.display(description="endpoint", ordering="endpoint_name")
    def endpoint_column(self, obj: UsageRecord) -> str:
        if obj.attempts > 1:
            return f"{obj.endpoint_name or '—'} ({obj.attempts} tries)"
        return obj.endpoint_name or "—"

    @admin.display(description="tokens in → out", ordering="completion_tokens")
    def tokens(self, obj: UsageRecord) -> str:
        approx = "≈" if obj.tokens_estimated else ""
        return f"{approx}{obj.prompt_tokens:,} → {approx}{obj.completion_tokens:,}"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj: UsageRecord) -> str:
        return self.milliseconds(obj.latency_ms)

    @admin.display(description="ttft", ordering="ttft_ms")
    def ttft(self, obj: UsageRecord) -> str:
        return self.milliseconds(obj.ttft_ms)

    @staticmethod
    def milliseconds(value: float | None) -> str:
        """A duration for a list column: "2,527 ms", or a dash when unknown."""
        return "—" if value is None else f"{round(value):,} ms"


@admin.register(UserLimits)
class UserLimitsAdmin(admin.ModelAdmin):
    list_display = ["user", "rpm_limit", "tpm_limit"]
    list_select_related = ["user"]
    search_fields = ["user__username", "user__email"]
    autocomplete_fields = ["user"]


@admin.register(UsageRollup)
class UsageRollupAdmin(admin.ModelAdmin):
    list_display = [
        "bucket",
        "user",
        "api_key",
        "model_name",
        "endpoint_name",
        "requests",
        "errors",
        "rejected",
        "prompt_tokens",
        "completion_tokens",
        "cost",
    ]
    list_filter = [("bucket", admin.DateFieldListFilter)]
    list_select_related = ["user", "api_key"]
    show_full_result_count = False
    paginator = LargeTablePaginator
    ordering = ["-bucket"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


User = get_user_model()


class RateLimitedUserAdmin(UserAdmin):
    """Django's user admin, plus the rate limits that apply to the user."""

    # Not "rate_limits": that is the user's UserLimits row, which the admin
    # would show instead of this method.
    readonly_fields = [*UserAdmin.readonly_fields, "rate_limits_in_effect"]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        return [*fieldsets, ("Rate limits", {"fields": ["rate_limits_in_effect"]})]

    @admin.display(description="In effect")
    def rate_limits_in_effect(self, obj: Any) -> str:
        """The user's limits and where they come from, with where to change them."""
        row = _user_limits_row(obj)
        rpm, tpm = limits.effective_limits(_limits_row(row))
        if row is None:
            url = reverse("admin:gateway_userlimits_add") + f"?user={obj.pk}"
            action = "set limits for this user"
        else:
            url = reverse("admin:gateway_userlimits_change", args=[row.pk])
            action = "change"
        return format_html(
            '{} (<a href="{}">{}</a>)', rate_limits_text(rpm, tpm), url, action
        )


if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, RateLimitedUserAdmin)


@admin.register(ModelDefaults)
class ModelDefaultsAdmin(admin.ModelAdmin):
    """What a new chat with a model starts with (also set by the config file)."""

    list_display = ("model_name", "temperature", "top_p", "max_tokens")
    search_fields = ("model_name",)
    fields = ("model_name", "system_prompt", "temperature", "top_p", "max_tokens")
