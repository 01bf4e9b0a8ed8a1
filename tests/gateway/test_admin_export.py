"""The admin's usage records list: "Download CSV" streams the filtered rows."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.http import StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone

from gateway.models import UsageRecord

pytestmark = pytest.mark.django_db

LIST_URL = "/admin/gateway/usagerecord/"
EXPORT_URL = "/admin/gateway/usagerecord/export.csv"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def records(owner, other_user):
    now = timezone.now()
    rows = [
        UsageRecord(
            user=owner if i % 2 else other_user,
            model_name="sim-small" if i % 3 else "sim-large",
            endpoint_name="primary",
            status="error" if i % 5 == 0 else "ok",
            source="api" if i % 4 == 0 else "chat",
            prompt_tokens=10 * i,
            completion_tokens=i,
            created_at=now - timedelta(minutes=i),
        )
        for i in range(1, 121)
    ]
    UsageRecord.objects.bulk_create(rows)
    return rows


def download(response) -> list[dict[str, str]]:
    assert isinstance(response, StreamingHttpResponse)
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


def test_the_list_offers_a_csv_of_what_it_shows(admin_client, records):
    response = admin_client.get(LIST_URL, {"status__exact": "ok", "q": "sim-large"})

    page = response.content.decode()
    assert (
        'href="/admin/gateway/usagerecord/export.csv?q=sim-large&amp;status__exact=ok"'
        in page
    )


def test_the_csv_holds_every_filtered_row_not_one_page(admin_client, records):
    response = admin_client.get(EXPORT_URL, {"status__exact": "ok", "q": "sim-large"})

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith(
        'attachment; filename="llmsite-usage-'
    )
    rows = download(response)
    expected = [r for r in records if r.status == "ok" and r.model_name == "sim-large"]
    assert len(rows) == len(expected) == 32
    assert {row["status"] for row in rows} == {"ok"}
    assert {row["model"] for row in rows} == {"sim-large"}
    assert sum(int(row["prompt_tokens"]) for row in rows) == sum(
        r.prompt_tokens for r in expected
    )
    # Newest first, like the list.
    times = [row["created_at"] for row in rows]
    assert times == sorted(times, reverse=True)


def test_with_no_filter_the_csv_holds_every_row(admin_client, records):
    rows = download(admin_client.get(EXPORT_URL))

    assert len(rows) == 120
    assert {row["user"] for row in rows} == {"alice", "bob"}


def test_an_unknown_filter_goes_back_to_the_list_with_an_error(admin_client, records):
    response = admin_client.get(EXPORT_URL, {"no_such_field": "1"})

    assert response.status_code == 302
    assert response["Location"] == f"{LIST_URL}?e=1"


def test_the_csv_is_for_staff_only(client, owner, records):
    client.force_login(owner)

    response = client.get(EXPORT_URL)

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_each_user_in_the_list_links_to_their_usage_page(admin_client, owner, records):
    page = admin_client.get(LIST_URL).content.decode()

    assert f'<a href="/usage/?user={owner.pk}"' in page
    assert reverse("admin:gateway_usagerecord_export") == EXPORT_URL
