"""The admin finds the dashboards from its index, and a user's usage page."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_the_admin_index_links_the_dashboards(client, staff):
    client.force_login(staff)

    page = client.get("/admin/").content.decode()

    assert '<div class="module" id="dashboards">' in page
    for href in (
        "/admin/monitoring/endpointhealth/",
        "/admin/monitoring/endpointhealth/usage/",
        "/admin/gateway/usagerecord/",
    ):
        assert f'<a href="{href}">' in page


def test_staff_without_the_permissions_see_no_dashboard_links(
    client, django_user_model
):
    clerk = django_user_model.objects.create_user("clerk", password="x", is_staff=True)
    client.force_login(clerk)

    page = client.get("/admin/").content.decode()

    assert 'id="dashboards"' not in page


def test_a_users_admin_page_links_to_their_usage_page(client, staff, owner):
    client.force_login(staff)

    page = client.get(f"/admin/auth/user/{owner.pk}/change/").content.decode()

    assert f'<a href="/usage/?user={owner.pk}" id="user-usage-page">Usage</a>' in page
