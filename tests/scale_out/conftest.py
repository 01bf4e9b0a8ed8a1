"""Two daphne processes on one PostgreSQL database and one Redis database.

The tier runs only where DATABASE_URL names PostgreSQL and REDIS_URL is set
(`.ci/run`'s second leg); on the laptop defaults every test is skipped with
the reason (`needs_postgres_and_redis` in each module). The processes start
once for the whole folder: A and B serve the same site, as two processes
behind a load balancer would, and each test speaks to one or both of them
from outside, as a browser or a program does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scale_out import deployment as support


@pytest.fixture(autouse=True)
def _clean_cache() -> Iterator[None]:
    """Leave Redis alone here (overrides tests/conftest.py).

    Clearing this process's cache flushes the Redis database that A and B
    share, and with it their channel layer, claims and rate-limit counters.
    """
    yield


@pytest.fixture(scope="package")
def deployment(tmp_path_factory) -> Iterator[support.Deployment]:
    logs = tmp_path_factory.mktemp("scale-out")
    deployment = support.start(logs)
    try:
        yield deployment
        for name in ("a.log", "b.log"):
            log = (logs / name).read_text(errors="replace")
            assert "Traceback" not in log, log[-3000:]
    finally:
        deployment.site.drop()
