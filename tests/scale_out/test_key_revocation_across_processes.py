"""An API key revoked through A: refused there at once, and on B within the bound."""

from __future__ import annotations

import re
import time

import httpx

from tests.scale_out.deployment import POLICY_CACHE_SECONDS
from tests.servers import needs_postgres_and_redis

pytestmark = needs_postgres_and_redis


def test_a_key_revoked_through_a_is_refused_by_both_within_the_policy_cache(
    deployment,
):
    d = deployment
    key = d.keys["revocable"]

    def models(port: int) -> int:
        return httpx.get(
            d.url(port, "/v1/models"),
            headers={"Authorization": f"Bearer {key['raw']}"},
        ).status_code

    # Both processes know the key now, and keep it for a while.
    assert (models(d.a), models(d.b)) == (200, 200)

    page = f"/accounts/keys/{key['id']}/revoke/"
    with httpx.Client(cookies={"sessionid": d.cookie}) as browser:
        form = browser.get(d.url(d.a, page))
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token is not None, form.text[:500]
        revoked = browser.post(
            d.url(d.a, page), data={"csrfmiddlewaretoken": token.group(1)}
        )
    assert revoked.status_code == 302, revoked.text[:500]
    revoked_at = time.monotonic()

    assert models(d.a) == 401
    while models(d.b) != 401:
        assert time.monotonic() - revoked_at < POLICY_CACHE_SECONDS + 1
        time.sleep(0.05)
    assert models(d.a) == 401
