"""Monitoring in the admin: the status and usage dashboards, probes and alerts.

The dashboards hang off `EndpointHealth`, a proxy of Endpoint, so they get an
entry under "Monitoring" on the admin index and the admin's permissions:

- /admin/monitoring/endpointhealth/             every endpoint's status and uptime
- /admin/monitoring/endpointhealth/<id>/change/ one endpoint's probe history
- /admin/monitoring/endpointhealth/usage/       requests, tokens and budgets

Every page runs a fixed number of queries whatever the data (tests hold them
to it), reading indexes and the usage rollup, never scanning raw records.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from gateway.models import Endpoint, EndpointStatus
from monitoring import alerts, dashboard
from monitoring.models import (
    UP_STATUSES,
    AlertChannel,
    AlertDelivery,
    AlertEvent,
    ChannelKind,
    DeliveryStatus,
    EndpointHealth,
    MonitorLease,
    ProbeResult,
)

STATUS_SYMBOLS = {
    EndpointStatus.CONNECTED: "●",
    EndpointStatus.SLOW: "◐",
    EndpointStatus.DISCONNECTED: "✕",
    EndpointStatus.UNKNOWN: "?",
}
STATUS_PAGE_SIZE = 100
HISTORY_PAGE_SIZE = 50
RECENT_FAILURES = 20


def status_badge(status: str) -> str:
    """A status as a symbol and a word, coloured: never colour alone."""
    label = EndpointStatus(status).label if status in EndpointStatus else status
    return format_html(
        '<span class="mon-status mon-status-{}"><span aria-hidden="true">{}</span> '
        "{}</span>",
        status,
        STATUS_SYMBOLS.get(status, "?"),
        label,
    )


# --- Probe results --------------------------------------------------------------------


@admin.register(ProbeResult)
class ProbeResultAdmin(admin.ModelAdmin):
    list_display = (
        "checked_at",
        "endpoint",
        "status_display",
        "latency",
        "http_status",
    )
    list_filter = ("status",)
    list_select_related = ("endpoint",)
    date_hierarchy = "checked_at"
    show_full_result_count = False
    ordering = ("-checked_at",)
    fields = ("endpoint", "checked_at", "status", "latency_ms", "http_status", "error")
    readonly_fields = fields
    list_per_page = 100

    class Media:
        css = {"all": ("monitoring/dashboard.css",)}

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: ProbeResult) -> str:
        return status_badge(obj.status)

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj: ProbeResult) -> str:
        return f"{obj.latency_ms:.0f} ms" if obj.latency_ms is not None else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: ProbeResult | None = None
    ) -> bool:
        return False


# --- Alerts ---------------------------------------------------------------------------


class AlertChannelForm(forms.ModelForm):
    """A webhook URL often carries a token: it is write-only, like API keys."""

    target = forms.CharField(
        max_length=500,
        required=False,
        help_text=(
            "Email: addresses separated by commas. Webhook: the URL to POST to "
            "(not shown again once saved; leave blank to keep it)."
        ),
    )

    class Meta:
        model = AlertChannel
        fields = (
            "name",
            "kind",
            "target",
            "endpoint_events",
            "budget_events",
            "enabled",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.kind == ChannelKind.WEBHOOK:
            self.initial["target"] = ""
            self.fields["target"].widget.attrs["placeholder"] = (
                self.instance.target_display
            )

    def clean_target(self) -> str:
        target = self.cleaned_data.get("target", "").strip()
        if not target and self.instance.pk:
            return self.instance.target
        if not target:
            raise forms.ValidationError("This field is required.")
        return target


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    form = AlertChannelForm
    list_display = (
        "name",
        "kind",
        "target_shown",
        "endpoint_events",
        "budget_events",
        "enabled",
    )
    list_filter = ("kind", "enabled")
    actions = ("send_test_alert",)

    @admin.display(description="target")
    def target_shown(self, obj: AlertChannel) -> str:
        return obj.target_display

    @admin.action(description="Send a test alert now")
    def send_test_alert(self, request: HttpRequest, queryset: QuerySet) -> None:
        for channel in queryset:
            error = alerts.send_test(channel)
            if error:
                self.message_user(
                    request, f"{channel.name}: {error}", level=messages.ERROR
                )
            else:
                self.message_user(request, f"{channel.name}: test alert sent.")


class AlertDeliveryInline(admin.TabularInline):
    model = AlertDelivery
    fields = (
        "channel_key",
        "status",
        "attempts",
        "next_attempt_at",
        "sent_at",
        "last_error",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _deliveries(status: str) -> Count:
    return Count("deliveries", filter=Q(deliveries__status=status))


@admin.register(AlertEvent)
class AlertEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "kind", "title", "sent", "failed", "pending")
    list_filter = ("kind",)
    date_hierarchy = "created_at"
    show_full_result_count = False
    fields = ("created_at", "kind", "title", "endpoint", "budget", "payload")
    readonly_fields = fields
    inlines = (AlertDeliveryInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # Delivery counts in the same query as the rows: no query per row.
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_sent=_deliveries(DeliveryStatus.SENT),
                n_failed=_deliveries(DeliveryStatus.FAILED),
                n_pending=_deliveries(DeliveryStatus.PENDING),
            )
        )

    @admin.display(description="sent", ordering="n_sent")
    def sent(self, obj: AlertEvent) -> int:
        return obj.n_sent

    @admin.display(description="failed", ordering="n_failed")
    def failed(self, obj: AlertEvent) -> int:
        return obj.n_failed

    @admin.display(description="pending", ordering="n_pending")
    def pending(self, obj: AlertEvent) -> int:
        return obj.n_pending

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: AlertEvent | None = None
    ) -> bool:
        return False


# --- Dashboards -----------------------------------------------------------------------


STATUS_FIELDS = (
    "id",
    "name",
    "enabled",
    "status",
    "status_changed_at",
    "last_checked_at",
    "last_latency_ms",
    "consecutive_failures",
    "probe_failures",
    "disabled_until",
    "next_probe_at",
    "probe_interval",
    "probe_mode",
    # For the plain-HTTP warning.
    "base_url",
    "allow_plain_http",
)


@admin.register(EndpointHealth)
class EndpointHealthAdmin(admin.ModelAdmin):
    """Read-only dashboards over endpoints, probes and usage."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list:
        view = self.admin_site.admin_view
        name = f"{self.opts.app_label}_{self.opts.model_name}_usage"
        return [
            path("usage/", view(self.usage_view), name=name),
            *super().get_urls(),
        ]

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": title,
            "status_url": reverse("admin:monitoring_endpointhealth_changelist"),
            "usage_url": reverse("admin:monitoring_endpointhealth_usage"),
            **extra,
        }

    def _check(self, request: HttpRequest) -> None:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        """Every endpoint's status, uptime and breaker state, with probe charts."""
        self._check(request)
        now = timezone.now()
        endpoints = Endpoint.objects.only(*STATUS_FIELDS).order_by("priority", "name")
        status = request.GET.get("status", "")
        if status in EndpointStatus.values:
            endpoints = endpoints.filter(status=status)
        query = request.GET.get("q", "").strip()
        if query:
            endpoints = endpoints.filter(name__icontains=query)
        page = Paginator(endpoints, STATUS_PAGE_SIZE).get_page(request.GET.get("p"))
        rows = list(page.object_list)
        uptime = dashboard.uptime([e.pk for e in rows], now)
        span = dashboard.parse_range(request.GET, now)
        charted = rows[: dashboard.TOP_SERIES]
        series = dashboard.probe_series([e.pk for e in charted], span)
        counts = dict(
            Endpoint.objects.values_list("status").annotate(n=Count("id")).order_by()
        )
        lease = MonitorLease.objects.filter(name="monitor").first()
        table = [
            {
                "endpoint": e,
                "badge": status_badge(e.status),
                "uptime": uptime.get(e.pk, {}),
                "disabled": e.disabled_until is not None and e.disabled_until > now,
            }
            for e in rows
        ]
        chart = {
            "labels": series["labels"],
            "bucket": series["bucket"],
            "latency": [
                {"label": e.name, "data": series["latency"][e.pk]} for e in charted
            ],
            "outcomes": series["outcomes"],
        }
        context = self._context(
            request,
            "Endpoint status",
            rows=table,
            page=page,
            counts=[
                (s, status_badge(s), counts.get(s, 0)) for s in EndpointStatus.values
            ],
            status_filter=status,
            query=query,
            span=span,
            presets=list(dashboard.PRESETS),
            chart=chart,
            has_probes=bool(series["labels"]),
            lease=lease,
            lease_live=lease is not None and lease.holder and lease.expires_at > now,
            windows=list(dashboard.UPTIME_WINDOWS),
            now=now,
            **(extra_context or {}),
        )
        return TemplateResponse(request, "admin/monitoring/status.html", context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        """One endpoint: probe history, recent failures and its latency chart."""
        self._check(request)
        now = timezone.now()
        endpoint = get_object_or_404(
            Endpoint.objects.only(*STATUS_FIELDS, "timeout"),
            pk=object_id if str(object_id).isdigit() else None,
        )
        probes = ProbeResult.objects.filter(endpoint=endpoint).only(
            "checked_at", "status", "latency_ms", "http_status", "error"
        )
        history = Paginator(probes.order_by("-checked_at"), HISTORY_PAGE_SIZE).get_page(
            request.GET.get("p")
        )
        failures = list(
            probes.exclude(status__in=UP_STATUSES).order_by("-checked_at")[
                :RECENT_FAILURES
            ]
        )
        span = dashboard.parse_range(request.GET, now)
        series = dashboard.probe_series([endpoint.pk], span)
        events = list(AlertEvent.objects.filter(endpoint=endpoint)[:10])
        context = self._context(
            request,
            f"Endpoint “{endpoint.name}”",
            endpoint=endpoint,
            badge=status_badge(endpoint.status),
            uptime=dashboard.uptime([endpoint.pk], now)[endpoint.pk],
            history=history,
            history_rows=[(p, status_badge(p.status)) for p in history.object_list],
            failures=failures,
            events=events,
            span=span,
            presets=list(dashboard.PRESETS),
            chart={
                "labels": series["labels"],
                "bucket": series["bucket"],
                "latency": [
                    {"label": endpoint.name, "data": series["latency"][endpoint.pk]}
                ],
                "outcomes": series["outcomes"],
            },
            has_probes=bool(series["labels"]),
            windows=list(dashboard.UPTIME_WINDOWS),
            disabled=endpoint.disabled_until is not None
            and endpoint.disabled_until > now,
            endpoint_admin_url=_endpoint_admin_url(endpoint.pk),
            **(extra_context or {}),
        )
        return TemplateResponse(request, "admin/monitoring/endpoint.html", context)

    def usage_view(self, request: HttpRequest) -> HttpResponse:
        """Requests, errors, tokens and budgets over a range, from the rollup."""
        self._check(request)
        now = timezone.now()
        span = dashboard.parse_range(request.GET, now, default="7d")
        requests = dashboard.requests_per_hour(span)
        tokens = {
            by: dashboard.tokens_per_day(span, by) for by in dashboard.TOKEN_DIMENSIONS
        }
        budgets = dashboard.budget_use(now)
        context = self._context(
            request,
            "Usage",
            span=span,
            presets=list(dashboard.PRESETS),
            totals=dashboard.usage_totals(span),
            chart={"requests": requests, "tokens": tokens, "budgets": budgets},
            has_requests=bool(requests["labels"]),
            token_dimensions=[
                (by, bool(tokens[by]["labels"])) for by in dashboard.TOKEN_DIMENSIONS
            ],
            budgets=budgets,
        )
        return TemplateResponse(request, "admin/monitoring/usage.html", context)


def _endpoint_admin_url(pk: int) -> str | None:
    """The gateway's own edit page for an endpoint, when it is registered."""
    try:
        return reverse("admin:gateway_endpoint_change", args=[pk])
    except NoReverseMatch:
        return None
