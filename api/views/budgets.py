"""GET /api/budgets/: every budget the caller may see, used and left this period."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response

from api.exceptions import ParamError
from api.pagination import page_size
from api.views.base import ApiView
from api.views.caller import Caller, caller_of
from gateway.accounting import BudgetState, budget_ref, budget_states
from gateway.models import Budget, BudgetScope


class BudgetSerializer(serializers.Serializer):
    """One budget in its current period; token counts, limit null = no limit."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    scope = serializers.ChoiceField(choices=BudgetScope.choices)
    holder = serializers.CharField(help_text="Whose budget: a user, key or endpoint.")
    period = serializers.CharField()
    period_start = serializers.DateTimeField()
    resets_at = serializers.DateTimeField()
    limit = serializers.IntegerField(allow_null=True)
    used = serializers.IntegerField()
    reserved = serializers.IntegerField(
        help_text="Held by requests still running; settled when they end."
    )
    left = serializers.IntegerField(allow_null=True)
    percent_used = serializers.FloatField(allow_null=True)
    warning_percent = serializers.IntegerField()
    exhausted = serializers.BooleanField(
        help_text="Nothing left: requests are refused until resets_at."
    )


class BudgetPagination(PageNumberPagination):
    """Pages of budgets; a bad page or page size is a 400 naming it."""

    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request: Request) -> int:
        return page_size(request, self.page_size, self.max_page_size)

    def paginate_queryset(
        self, queryset: Any, request: Request, view: Any = None
    ) -> list | None:
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            raise ParamError("page", "No such page.") from exc


def visible_budgets(caller: Caller) -> QuerySet[Budget]:
    """Enabled budgets: staff all; others global, their own and their keys'."""
    budgets = Budget.objects.filter(enabled=True)
    if not caller.is_staff:
        budgets = budgets.filter(
            Q(scope=BudgetScope.GLOBAL)
            | Q(scope=BudgetScope.USER, user_id=caller.user_id)
            | Q(
                scope=BudgetScope.API_KEY,
                api_key__user_id=caller.user_id,
                api_key__revoked_at__isnull=True,
            )
        )
    return budgets.select_related("user", "api_key", "endpoint").order_by("scope", "id")


def _holder(budget: Budget) -> str:
    if budget.scope == BudgetScope.USER and budget.user_id:
        return budget.user.get_username()
    if budget.scope == BudgetScope.API_KEY and budget.api_key_id:
        return budget.api_key.name
    if budget.scope == BudgetScope.ENDPOINT and budget.endpoint_id:
        return budget.endpoint.name
    return "everyone"


def state_row(state: BudgetState) -> dict[str, Any]:
    """A budget's state this period, as the API shows it (budgets and me)."""
    return {
        "id": state.budget_id,
        "scope": state.scope,
        "holder": state.holder,
        "period": state.period,
        "period_start": state.period_start,
        "resets_at": state.resets_at,
        "limit": state.token_limit,
        "used": state.used,
        "reserved": state.reserved,
        "left": state.remaining,
        "percent_used": state.percent_used,
        "exhausted": state.exhausted,
    }


def budget_row(budget: Budget, state: BudgetState) -> dict[str, Any]:
    """One budget and its state, named as staff and its holder know it."""
    return {
        **state_row(state),
        "name": budget.name,
        "holder": _holder(budget),
        "warning_percent": budget.warning_percent,
    }


class BudgetsView(mixins.ListModelMixin, ApiView):
    """Every budget the caller may see, with what is used and left this period."""

    serializer_class = BudgetSerializer
    pagination_class = BudgetPagination
    allowed_params = frozenset({"page"})
    filter_backends: list = []

    def get_queryset(self) -> QuerySet[Budget]:
        return visible_budgets(caller_of(self.request))

    @extend_schema(
        summary="Budgets",
        description="Users see the global budgets, their own and their API keys'; "
        "staff see every budget, endpoint budgets too. Tokens; a null limit "
        "means no limit.",
        operation_id="budgets_list",
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.list(request, *args, **kwargs)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        budgets = list(self.paginate_queryset(self.get_queryset()) or [])
        # One query for the counters of the whole page.
        states = budget_states([budget_ref(b) for b in budgets])
        rows = [budget_row(b, s) for b, s in zip(budgets, states, strict=True)]
        return self.get_paginated_response(BudgetSerializer(rows, many=True).data)
