"""Budgets hold when 200 requests race on PostgreSQL from threads and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from gateway import client
from gateway.context import fit_context
from gateway.models import Budget, BudgetCounter, BudgetScope, UsageRecord
from gateway.service import Caller, Done, Rejected
from tests.gateway.usage_support import (
    FakeUpstream,
    close_thread_connections,
    fire_concurrently,
    forget_process_state,
    make_route,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
        reason="needs PostgreSQL (DATABASE_URL=postgres://...): SQLite serialises "
        "every writer, so it cannot show a race",
    ),
]

MESSAGES = [{"role": "user", "content": "Count to three."}]
OUTPUT = 50


@pytest.fixture(autouse=True)
def _isolated(settings):
    settings.RATE_LIMIT_RPM = 0
    settings.RATE_LIMIT_TPM = 0
    forget_process_state()
    yield
    forget_process_state()
    close_thread_connections()


@pytest.fixture
def per_request():
    """Tokens each request uses: its whole reservation, as upstream reports it."""
    route = make_route("primary", max_output_tokens=OUTPUT)
    _, status = fit_context(
        MESSAGES,
        model=route.upstream_model,
        context_window=route.context_window,
        max_output_tokens=OUTPUT,
    )
    return status.tokens, status.tokens + OUTPUT


def check_outcome(outcomes, owner, budget, per_request):
    done = [o for o in outcomes if isinstance(o, Done)]
    refused = [o for o in outcomes if isinstance(o, Rejected)]
    assert len(done) + len(refused) == 200, [
        o for o in outcomes if not isinstance(o, Done | Rejected)
    ]
    assert len(done) == 50
    assert {r.code for r in refused} == {"budget_exhausted"}
    assert all(r.message.startswith("Budget exhausted") for r in refused)

    counter = BudgetCounter.objects.get(budget=budget)
    assert counter.used_tokens <= budget.token_limit
    assert (counter.used_tokens, counter.reserved_tokens) == (50 * per_request, 0)
    records = UsageRecord.objects.filter(user=owner)
    assert records.count() == 200
    assert records.filter(status="ok").count() == 50
    assert records.filter(status="rejected").count() == 150
    refused_ids = records.filter(status="rejected").values_list("request_id", flat=True)
    assert sorted(refused_ids) == sorted(r.request_id for r in refused)


@pytest.mark.parametrize("with_global", [False, True], ids=["user", "user+global"])
def test_200_racing_threads_never_overspend_a_budget_that_fits_50(
    owner, per_request, with_global
):
    prompt, total = per_request
    if with_global:
        # The global budget is the tighter one: refusals by it must leave
        # nothing reserved on the user's.
        Budget.objects.create(scope=BudgetScope.GLOBAL, token_limit=50 * total)
        mine = Budget.objects.create(
            scope=BudgetScope.USER, user=owner, token_limit=60 * total
        )
    else:
        mine = Budget.objects.create(
            scope=BudgetScope.USER, user=owner, token_limit=50 * total
        )
    upstream = FakeUpstream()
    upstream.behaviour("primary.test").usage_from_request = prompt

    with client.pools.use_transport(upstream.transport()):
        outcomes = fire_concurrently(
            Caller(owner.pk), "chat-model", MESSAGES, threads=4, each=50
        )

    check_outcome(outcomes, owner, mine, total)
    for counter in BudgetCounter.objects.all():
        assert (counter.used_tokens, counter.reserved_tokens) == (50 * total, 0)


def test_200_racing_threads_spend_the_last_tokens_once_and_never_past_them(
    owner, per_request
):
    prompt, total = per_request
    # Room for 50 whole requests and half of one more: one answer is shorter.
    limit = 50 * total + total // 2
    assert total // 2 >= prompt + settings.GATEWAY_BUDGET_MIN_OUTPUT_TOKENS
    mine = Budget.objects.create(scope=BudgetScope.USER, user=owner, token_limit=limit)
    upstream = FakeUpstream()
    # Upstream reports exactly what each request may produce: its max_tokens.
    upstream.behaviour("primary.test").usage_from_request = prompt

    with client.pools.use_transport(upstream.transport()):
        outcomes = fire_concurrently(
            Caller(owner.pk), "chat-model", MESSAGES, threads=4, each=50
        )

    done = [o for o in outcomes if isinstance(o, Done)]
    refused = [o for o in outcomes if isinstance(o, Rejected)]
    assert len(done) + len(refused) == 200
    assert {r.code for r in refused} == {"budget_exhausted"}
    assert (
        sorted(d.completion_tokens for d in done)
        == [total // 2 - prompt] + [OUTPUT] * 50
    )
    counter = BudgetCounter.objects.get(budget=mine)
    assert (counter.used_tokens, counter.reserved_tokens) == (limit, 0)
    assert sorted(body["max_tokens"] for _, body in upstream.requests)[0] == (
        total // 2 - prompt
    )


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import django
    django.setup()
    from gateway import client, service
    from gateway.service import Caller, Done, Rejected
    from tests.gateway.usage_support import FakeUpstream, fire_concurrently

    user_id, prompt, start_at = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    upstream = FakeUpstream()
    upstream.behaviour("primary.test").usage_from_request = prompt
    messages = [{"role": "user", "content": "Count to three."}]
    with client.pools.use_transport(upstream.transport()):
        while time.time() < start_at:
            time.sleep(0.001)
        outcomes = fire_concurrently(
            Caller(user_id), "chat-model", messages, threads=2, each=50
        )
    print(json.dumps({
        "done": sum(isinstance(o, Done) for o in outcomes),
        "refused": [o.code for o in outcomes if isinstance(o, Rejected)],
        "other": [repr(o) for o in outcomes if not isinstance(o, Done | Rejected)],
    }))
    """
)


def test_200_requests_from_two_processes_never_overspend(owner, per_request, tmp_path):
    import time

    prompt, total = per_request
    budget = Budget.objects.create(
        scope=BudgetScope.USER, user=owner, token_limit=50 * total
    )
    db = connection.settings_dict
    url = (
        f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "llmsite.settings",
        "DATABASE_URL": url,
        "DATA_DIR": str(tmp_path),
        "RATE_LIMIT_RPM": "0",
    }
    start_at = time.time() + 3
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(owner.pk), str(prompt), repr(start_at)],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = [json.loads(child.communicate(timeout=120)[0]) for child in children]

    assert [r["other"] for r in reports] == [[], []]
    assert sum(r["done"] for r in reports) == 50
    refused = [code for r in reports for code in r["refused"]]
    assert refused == ["budget_exhausted"] * 150
    counter = BudgetCounter.objects.get(budget=budget)
    assert (counter.used_tokens, counter.reserved_tokens) == (50 * total, 0)
    assert UsageRecord.objects.filter(user=owner).count() == 200
