"""Release the reservations of requests whose process died before settling them.

Every reservation is recorded as BudgetHold rows in the transaction that
reserves, and those rows are deleted in the transaction that writes the
request's usage record. A hold still there after its `expires_at` (the
whole-request cap plus a margin) belongs to a request that can no longer be
running: its web process was killed (kill -9, out of memory, a lost host).
A hold whose web process ran on this machine and is gone (`owners`) is swept
at once, without waiting for the cap.

The sweep is safe with several sweepers and with a late usage writer: each
request's holds are deleted first, and only what that DELETE removed is
released, so of all the parties that race for a hold exactly one settles it.
The writer deletes holds before inserting its record, in the same order, and
a swept request's record already exists, so a late write stores nothing twice.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from gateway.accounting import owners
from gateway.accounting.budgets import Settlement, _settle, budget_ref
from gateway.accounting.usage import (
    UsageEntry,
    _drop_missing_references,
    write_usage,
)
from gateway.models import BudgetCounter, BudgetHold, UsageRecord, UsageStatus
from gateway.signals import requests_abandoned

logger = logging.getLogger("gateway.accounting")

# Requests settled per sweep; the rest wait for the next one.
SWEEP_BATCH = 200

INTERRUPTED = "interrupted"


def sweep_abandoned(now: datetime | None = None, *, limit: int = SWEEP_BATCH) -> int:
    """Settle the expired holds of requests that are gone; how many requests."""
    now = now or timezone.now()
    due = Q(expires_at__lte=now)
    dead = dead_owners()
    if dead:
        due |= Q(owner__in=dead)
    request_ids = list(
        BudgetHold.objects.filter(due)
        .order_by("expires_at")
        .values_list("request_id", flat=True)[: limit * 4]
    )
    swept: list[uuid.UUID] = []
    for request_id in dict.fromkeys(request_ids):
        if len(swept) >= limit:
            break
        try:
            if _sweep_one(request_id, due, now):
                swept.append(request_id)
        except Exception:
            # One bad request must not keep the others held.
            logger.exception("Abandoned request %s could not be swept", request_id)
    if swept:
        logger.warning(
            "Released the reservations of %d abandoned request(s)", len(swept)
        )
        ids = list(swept)
        transaction.on_commit(
            lambda: requests_abandoned.send(sender=BudgetHold, request_ids=ids)
        )
    return len(swept)


def dead_owners() -> list[str]:
    """The owners of holds that are processes of this machine no longer running."""
    prefix = owners.machine() + ":"
    found = (
        BudgetHold.objects.filter(owner__startswith=prefix)
        .values_list("owner", flat=True)
        .distinct()
    )
    return [owner for owner in found if owners.is_dead_here(owner)]


def _sweep_one(request_id: uuid.UUID, due: Q, now: datetime) -> bool:
    """Delete one request's holds and settle exactly what this delete removed."""
    with transaction.atomic():
        holds = list(
            BudgetHold.objects.filter(due, request_id=request_id).select_related(
                "counter__budget__endpoint"
            )
        )
        if not holds:
            return False
        deleted, _ = BudgetHold.objects.filter(
            pk__in=[hold.pk for hold in holds]
        ).delete()
        if deleted != len(holds):
            # Another sweeper or the writer got some of them first: let the
            # transaction go and look again next time.
            transaction.set_rollback(True)
            return False
        first = holds[0]
        prompt = max(hold.prompt_tokens for hold in holds)
        settlements = _settlements(holds, prompt)
        if UsageRecord.objects.filter(request_id=request_id).exists():
            _settle(settlements, now)
            return True
        entry = UsageEntry(
            model_name=first.model_name,
            status=UsageStatus.ERROR,
            request_id=request_id,
            created_at=first.created_at,
            source=first.source or "chat",
            user_id=first.user_id,
            api_key_id=first.api_key_id,
            conversation_id=first.conversation_id,
            prompt_tokens=prompt,
            tokens_estimated=True,
            error_type=INTERRUPTED,
            error_message=(
                "The request was interrupted: the process serving it stopped "
                f"(held by {first.owner or 'an unknown process'})."
            ),
            settlements=settlements,
        )
        # A user or key deleted since: SQLite checks references only at
        # commit, which would undo the release too.
        _drop_missing_references(entry)
        try:
            with transaction.atomic():
                write_usage([entry])
        except IntegrityError:
            # A record appeared meanwhile: release all the same.
            _settle(entry.settlements, now)
    return True


def _settlements(holds: list[BudgetHold], prompt: int) -> list[Settlement]:
    """Release what each counter holds; count the prompt as used, as it was sent."""
    reserved: dict[int, int] = defaultdict(int)
    counters: dict[int, BudgetCounter] = {}
    for hold in holds:
        reserved[hold.counter_id] += hold.tokens
        counters[hold.counter_id] = hold.counter
    settlements = []
    for counter_id, tokens in reserved.items():
        ref = budget_ref(counters[counter_id].budget)
        settlements.append(Settlement(counter_id, ref, tokens, min(prompt, tokens)))
    return settlements
