"""Query-string filters: strict (a bad value is a 400 naming it), never a 500."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import django_filters
from django import forms
from django.db.models import Q, QuerySet
from django_filters.fields import IsoDateTimeField

from api.exceptions import ParamForbidden
from api.permissions import is_staff
from gateway.models import UsageRecord, UsageSource, UsageStatus

# Largest id PostgreSQL's bigint holds: a bigger one would raise in the query.
MAX_ID = 2**63 - 1
MAX_OFFSET = timedelta(hours=14)


class StrictBooleanField(forms.Field):
    """true/false (or 1/0, yes/no); anything else is an error, not "no filter"."""

    TRUE = frozenset({"true", "1", "yes"})
    FALSE = frozenset({"false", "0", "no"})

    def to_python(self, value: Any) -> bool | None:
        if value in (None, ""):
            return None
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise forms.ValidationError("Use true or false.", code="invalid")


class UtcDateTimeField(IsoDateTimeField):
    """ISO 8601; no offset means UTC; the result is in UTC.

    An offset beyond ±14:00 (none exists; PostgreSQL refuses past ±15:59), or
    a time that leaves the years 1-9999 once in UTC, is an error, not a 500.
    """

    def clean(self, value: Any) -> datetime | None:
        moment = super().clean(value)
        if moment is None:
            return None
        offset = moment.utcoffset()
        if offset is not None and abs(offset) > MAX_OFFSET:
            raise forms.ValidationError(
                "The UTC offset must be between -14:00 and +14:00.", code="invalid"
            )
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError(
                "The time is out of range.", code="invalid"
            ) from None


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


class BooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class IdFilter(django_filters.Filter):
    """A positive database id."""

    field_class = forms.IntegerField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


class TimeRangeForm(forms.Form):
    """Checks that `until` comes after `since`."""

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since is not None and until is not None and until <= since:
            self.add_error(
                "until",
                forms.ValidationError(
                    "until must be after since.", code="invalid_range"
                ),
            )
        return data


def _id_or_name(value: str, id_field: str, name_field: str) -> Q:
    """Match a value as an id (when it is one) or as a name."""
    query = Q(**{name_field: value})
    if value.isascii() and value.isdigit() and 0 < int(value) <= MAX_ID:
        query |= Q(**{id_field: int(value)})
    return query


class UsageRecordFilter(django_filters.FilterSet):
    """Filters of /api/usage/records/ and its exports."""

    since = UtcDateTimeFilter(
        field_name="created_at",
        lookup_expr="gte",
        label="Records at or after this time (ISO 8601; no offset means UTC).",
    )
    until = UtcDateTimeFilter(
        field_name="created_at",
        lookup_expr="lt",
        label="Records before this time (ISO 8601; no offset means UTC).",
    )
    user = django_filters.CharFilter(
        method="filter_user",
        max_length=150,
        label="A user's id or username (staff; others may name only themselves).",
    )
    api_key = IdFilter(field_name="api_key_id", label="An API key's id.")
    model = django_filters.CharFilter(
        field_name="model_name", max_length=200, label="The model name asked for."
    )
    endpoint = django_filters.CharFilter(
        method="filter_endpoint",
        max_length=100,
        label="The id or name of the endpoint that answered.",
    )
    status = django_filters.ChoiceFilter(choices=UsageStatus.choices)
    source = django_filters.ChoiceFilter(choices=UsageSource.choices)
    cached = BooleanFilter(
        method="filter_cached", label="Answered from the response cache."
    )
    estimated = BooleanFilter(
        field_name="tokens_estimated",
        label="Token counts estimated (the upstream sent none).",
    )

    class Meta:
        model = UsageRecord
        fields: list[str] = []
        form = TimeRangeForm

    def filter_user(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        request = self.request
        if request is None or not is_staff(request):
            caller = request.user if request is not None else None
            mine = caller is not None and caller.is_authenticated
            if not mine or value not in {str(caller.pk), caller.get_username()}:
                raise ParamForbidden("user", "You may only see your own usage.")
        return queryset.filter(_id_or_name(value, "user_id", "user__username"))

    def filter_endpoint(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(_id_or_name(value, "endpoint_id", "endpoint_name"))

    def filter_cached(self, queryset: QuerySet, name: str, value: bool) -> QuerySet:
        if value:
            return queryset.filter(status=UsageStatus.CACHED)
        return queryset.exclude(status=UsageStatus.CACHED)
