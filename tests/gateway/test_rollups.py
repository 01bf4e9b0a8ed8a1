"""Hourly rollups: kept current by every write, rebuilt exactly, kept when pruning."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.management import CommandError, call_command

from chat.models import Conversation, Message
from gateway import accounting
from gateway.accounting import UsageEntry
from gateway.models import ApiKey, Endpoint, UsageRecord, UsageRollup
from tests.gateway.usage_support import close_thread_connections

pytestmark = pytest.mark.django_db

DAY = datetime(2026, 3, 4, tzinfo=UTC)
COUNTERS = (
    "requests",
    "errors",
    "cancelled",
    "rejected",
    "cached",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_us_sum",
    "latency_count",
    "ttft_us_sum",
    "ttft_count",
)


def mixed_workload(owner, other_user, n=400, seed=7):
    """Entries of every status over three days, two users, a key, two endpoints."""
    rng = random.Random(seed)
    key, _ = ApiKey.generate(owner, "script")
    endpoints = [
        Endpoint.objects.create(name=name, base_url=f"https://{name}.test/v1")
        for name in ("primary", "backup")
    ]
    entries = []
    for _ in range(n):
        status = rng.choice(
            ["ok", "ok", "ok", "error", "cancelled", "rejected", "cached"]
        )
        endpoint = None if status == "rejected" else rng.choice(endpoints)
        user = rng.choice([owner, other_user])
        answered = status in {"ok", "cached", "cancelled"}
        entries.append(
            UsageEntry(
                model_name=rng.choice(["gpt-4o", "sim-small"]),
                status=status,
                created_at=DAY + timedelta(seconds=rng.randrange(3 * 86400)),
                source="api" if user == owner and rng.random() < 0.3 else "chat",
                user_id=user.pk,
                api_key_id=key.pk if user == owner and rng.random() < 0.5 else None,
                endpoint_id=endpoint.pk if endpoint else None,
                endpoint_name=endpoint.name if endpoint else "",
                prompt_tokens=rng.randrange(1, 4000) if status != "rejected" else 0,
                completion_tokens=rng.randrange(0, 900) if answered else 0,
                tokens_estimated=rng.random() < 0.2,
                latency_ms=None if status == "rejected" else rng.uniform(0.3, 9000),
                ttft_ms=rng.uniform(0.1, 800) if answered else None,
                cost=(
                    Decimal(rng.randrange(0, 5_000_000)) / 1_000_000
                    if endpoint and rng.random() < 0.8
                    else None
                ),
            )
        )
    return entries


def write_in_batches(entries, seed=3):
    rng = random.Random(seed)
    index = 0
    while index < len(entries):
        size = rng.randrange(1, 60)
        batch = entries[index : index + size]
        if size == 1:
            accounting.record_usage(batch[0])
        else:
            accounting.write_usage(batch)
        index += size


def rollup_table():
    return {
        (r.bucket, r.dimensions): {c: getattr(r, c) for c in COUNTERS}
        | {
            "user_id": r.user_id,
            "api_key_id": r.api_key_id,
            "model_name": r.model_name,
            "endpoint_id": r.endpoint_id,
            "endpoint_name": r.endpoint_name,
        }
        for r in UsageRollup.objects.all()
    }


def raw_aggregate():
    """The rollups computed from raw records in Python, independently of SQL."""
    table = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    for r in UsageRecord.objects.all():
        key = (
            r.created_at.replace(minute=0, second=0, microsecond=0),
            r.user_id,
            r.api_key_id,
            r.model_name,
            r.endpoint_id,
            r.endpoint_name,
        )
        row = table[key]
        row["requests"] += 1
        row["errors"] += r.status == "error"
        row["cancelled"] += r.status == "cancelled"
        row["rejected"] += r.status == "rejected"
        row["cached"] += r.status == "cached"
        row["estimated"] += r.tokens_estimated
        row["prompt_tokens"] += r.prompt_tokens
        row["completion_tokens"] += r.completion_tokens
        row["cost_micros"] += int((r.cost or 0) * 1_000_000)
        if r.latency_ms is not None:
            row["latency_us_sum"] += int(r.latency_ms * 1000)
            row["latency_count"] += 1
        if r.ttft_ms is not None:
            row["ttft_us_sum"] += int(r.ttft_ms * 1000)
            row["ttft_count"] += 1
    return dict(table)


def live_as_raw_keys():
    return {
        (
            r.bucket,
            r.user_id,
            r.api_key_id,
            r.model_name,
            r.endpoint_id,
            r.endpoint_name,
        ): {c: getattr(r, c) for c in COUNTERS}
        for r in UsageRollup.objects.all()
    }


def test_rollups_equal_the_raw_aggregate_after_a_mixed_workload(owner, other_user):
    entries = mixed_workload(owner, other_user)

    write_in_batches(entries)

    assert UsageRecord.objects.count() == len(entries)
    assert live_as_raw_keys() == raw_aggregate()
    totals = defaultdict(int)
    for row in raw_aggregate().values():
        for name, value in row.items():
            totals[name] += value
    assert totals["requests"] == 400
    assert totals["rejected"] == sum(e.status == "rejected" for e in entries)
    assert totals["cost_micros"] == sum(int((e.cost or 0) * 1_000_000) for e in entries)


def test_latency_sums_stay_within_a_microsecond_per_request(owner, other_user):
    entries = mixed_workload(owner, other_user, n=100)
    write_in_batches(entries)

    summed = sum(UsageRollup.objects.values_list("latency_us_sum", flat=True))
    exact = sum(e.latency_ms for e in entries if e.latency_ms is not None) * 1000

    assert exact - 100 <= summed <= exact


def test_rebuilding_gives_exactly_the_rollups_kept_live(owner, other_user):
    write_in_batches(mixed_workload(owner, other_user))
    live = rollup_table()
    some = UsageRollup.objects.order_by("pk").values_list("pk", flat=True)
    UsageRollup.objects.filter(pk__in=list(some[:20])).delete()
    UsageRollup.objects.filter(pk__in=list(some[20:40])).update(
        requests=999, cost_micros=1
    )

    call_command("rebuild_rollups", "--since", "2026-03-04", "--until", "2026-03-07")

    assert rollup_table() == live


def test_rebuilding_one_range_leaves_the_others_alone(owner, other_user):
    write_in_batches(mixed_workload(owner, other_user))
    live = rollup_table()
    UsageRollup.objects.filter(bucket__gte=DAY + timedelta(days=1)).update(requests=0)
    untouched = {
        k: v for k, v in rollup_table().items() if k[0] >= DAY + timedelta(days=2)
    }

    call_command(
        "rebuild_rollups", "--since", "2026-03-05T00:00", "--until", "2026-03-05T23:30"
    )

    table = rollup_table()
    assert {k: v for k, v in table.items() if k[0] < DAY + timedelta(days=2)} == {
        k: v for k, v in live.items() if k[0] < DAY + timedelta(days=2)
    }
    assert {
        k: v for k, v in table.items() if k[0] >= DAY + timedelta(days=2)
    } == untouched


def test_pruning_keeps_the_rollups_and_a_rebuild_does_not_undo_that(owner, other_user):
    write_in_batches(mixed_workload(owner, other_user))
    live = rollup_table()

    with time_machine.travel(DAY + timedelta(days=3, hours=15), tick=False):
        call_command("prune_usage", "--older-than-days", "1", "--batch-size", "50")
        call_command("rebuild_rollups", "--since", "2026-01-01")

    oldest = UsageRecord.objects.order_by("created_at").first().created_at
    assert oldest >= DAY + timedelta(days=2)
    assert not UsageRecord.objects.filter(
        created_at__lt=DAY + timedelta(days=2)
    ).exists()
    assert rollup_table() == live


def test_pruning_unlinks_chat_messages_from_their_records(owner):
    old = accounting.record_usage(
        UsageEntry(model_name="m", status="ok", created_at=DAY, user_id=owner.pk)
    )
    conversation = Conversation.objects.create(user=owner)
    message = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="hi",
        usage_id=old.record_id,
    )

    with time_machine.travel(DAY + timedelta(days=10), tick=False):
        deleted = accounting.prune_usage(7)

    message.refresh_from_db()
    assert (deleted, message.usage_id) == (1, None)


def test_the_rebuild_command_explains_bad_arguments():
    with pytest.raises(CommandError, match="not a date"):
        call_command("rebuild_rollups", "--since", "yesterday")
    with pytest.raises(CommandError, match="later than"):
        call_command(
            "rebuild_rollups", "--since", "2026-03-05", "--until", "2026-03-04"
        )
    with pytest.raises(CommandError, match="at least 1"):
        call_command("prune_usage", "--older-than-days", "0")


@pytest.mark.django_db(transaction=True)
async def test_concurrent_writes_are_grouped_and_each_written_once(owner):
    entries = [
        UsageEntry(
            model_name="m",
            status="ok",
            user_id=owner.pk,
            prompt_tokens=10,
            completion_tokens=i,
            request_id=uuid.uuid4(),
        )
        for i in range(200)
    ]
    try:
        written = await asyncio.gather(*(accounting.arecord_usage(e) for e in entries))
        # The same entries again: an at-least-once caller changes nothing.
        again = await asyncio.gather(
            *(accounting.arecord_usage(e) for e in entries[:50])
        )

        assert len({w.record_id for w in written}) == 200
        assert [w.record_id for w in again] == [w.record_id for w in written[:50]]
        count = await UsageRecord.objects.acount()
        (rollup,) = [r async for r in UsageRollup.objects.all()]
        assert (count, rollup.requests) == (200, 200)
        assert rollup.completion_tokens == sum(range(200))
    finally:
        close_thread_connections()


@pytest.mark.django_db(transaction=True)
def test_records_still_queued_when_the_loop_shuts_down_are_written(owner, settings):
    settings.USAGE_WRITE_DELAY_MS = 60_000
    entries = [
        UsageEntry(model_name="m", status="ok", user_id=owner.pk) for _ in range(3)
    ]

    async def serve_then_stop():
        for entry in entries:
            accounting.submit_usage(entry)

    try:
        # asyncio.run cancels the writer on its way out, as a server's loop does.
        threading.Thread(target=asyncio.run, args=(serve_then_stop(),)).start()
        for _ in range(200):
            if UsageRecord.objects.count() == 3:
                break
            time.sleep(0.05)
    finally:
        close_thread_connections()

    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == sorted(
        e.request_id for e in entries
    )
