"""Usage records: one `UsageEntry` per request, written exactly once.

At the end, one `UsageEntry` per request becomes one UsageRecord, the
release of its reservations down to the real count, and its share of the
hourly UsageRollup, all in one transaction; `request_id` is unique, so nothing
can be counted twice, and a batch that fails is retried entry by entry with
that check. Async callers hand their entry to a per-process group commit: it
gathers entries for USAGE_WRITE_DELAY_MS (50 ms) and writes them in one
transaction on a writer thread of its own. The request does not wait for it:
measured on SQLite, one write per request (a thread hop and a commit) cost as
much as the rest of the gateway together, while one write per few dozen
requests costs a few tens of microseconds each (bench/accounting_overhead.py).
What that trades away: a process killed without warning loses the entries of
its last ~50 ms (a clean shutdown writes them; the sweeper settles the rest),
and a request's reservation is released up to that much later, which can only
refuse, never overspend (and a refusal first settles this process's queue and
looks again).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.utils import timezone

from gateway.accounting import storable
from gateway.accounting.budgets import Settlement, _settle, drop_holds
from gateway.accounting.rollups import _add_to_rollups
from gateway.models import (
    ApiKey,
    BudgetCounter,
    BudgetScope,
    Endpoint,
    UsageRecord,
    UsageStatus,
)

logger = logging.getLogger("gateway.accounting")


# Entries per write transaction; more wait for the next one.
MAX_BATCH = 500

# --- Usage records ------------------------------------------------------------


@dataclass(slots=True)
class UsageEntry:
    """What one request leaves behind: its record and the settling of its budgets."""

    model_name: str
    status: str
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=timezone.now)
    source: str = "chat"
    user_id: int | None = None
    api_key_id: int | None = None
    conversation_id: uuid.UUID | None = None
    endpoint_id: int | None = None
    endpoint_name: str = ""
    upstream_model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_type: str = ""
    error_message: str = ""
    attempts: int = 0
    fallback_hops: list[dict[str, Any]] = field(default_factory=list)
    trail: list[dict[str, Any]] = field(default_factory=list)
    cost: Decimal | None = None
    settlements: list[Settlement] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The UsageRecord's column values (by attname), each one storable.

        Whatever reached the entry, every value fits its column on every
        backend: one value a column refuses would lose the whole batch.
        """
        request_id = storable.optional_uuid(self.request_id)
        return {
            "request_id": request_id or uuid.uuid4(),
            "created_at": storable.moment(self.created_at),
            "source": storable.text(self.source, 8),
            "user_id": storable.optional_id(self.user_id),
            "api_key_id": storable.optional_id(self.api_key_id),
            "conversation_id": storable.optional_uuid(self.conversation_id),
            "model_name": storable.text(self.model_name, 200),
            "endpoint_id": storable.optional_id(self.endpoint_id),
            "endpoint_name": storable.text(self.endpoint_name, 100),
            "upstream_model": storable.text(self.upstream_model, 200),
            "prompt_tokens": storable.integer(self.prompt_tokens, storable.INT_MAX),
            "completion_tokens": storable.integer(
                self.completion_tokens, storable.INT_MAX
            ),
            "tokens_estimated": bool(self.tokens_estimated),
            "latency_ms": storable.duration(self.latency_ms),
            "ttft_ms": storable.duration(self.ttft_ms),
            "status": _status(self.status),
            "error_type": storable.text(self.error_type, 64),
            "error_message": storable.text(self.error_message, 500),
            "attempts": storable.integer(self.attempts, storable.SMALL_MAX),
            "fallback_hops": storable.json_list(self.fallback_hops),
            "trail": storable.json_list(self.trail),
            "cost": storable.decimal(self.cost, 14, 6),
        }

    def storable_settlements(self) -> list[Settlement]:
        """Settlements whose numbers a counter can add without overflowing."""
        return [
            Settlement(
                s.counter_id,
                s.budget,
                storable.integer(s.reserved, storable.BIG_MAX >> 8),
                # No more than a record can state: its two token columns.
                storable.integer(s.used, 2 * storable.INT_MAX),
                s.held,
            )
            for s in self.settlements
        ]

    def minimal(self, problem: BaseException) -> UsageEntry:
        """The same request in a form that stores whatever went wrong with it.

        Its tokens are what it reserved, so a budget counts no less than the
        request could have used; everything upstream said is left out.
        """
        caller_reserved = [
            s.reserved
            for s in self.settlements
            if s.budget.scope != BudgetScope.ENDPOINT
        ]
        return UsageEntry(
            model_name=storable.text(self.model_name, 200)
            .encode("ascii", "replace")
            .decode(),
            status=UsageStatus.ERROR,
            request_id=self.request_id,
            created_at=storable.moment(self.created_at),
            source=storable.text(self.source, 8),
            user_id=storable.optional_id(self.user_id),
            api_key_id=storable.optional_id(self.api_key_id),
            conversation_id=storable.optional_uuid(self.conversation_id),
            completion_tokens=storable.integer(
                max(caller_reserved, default=0), storable.INT_MAX
            ),
            tokens_estimated=True,
            error_type=f"unstorable_record:{type(problem).__name__}",
            error_message="The request's record could not be stored as it was.",
            settlements=[
                Settlement(s.counter_id, s.budget, s.reserved, s.reserved, s.held)
                for s in self.storable_settlements()
            ],
        )


_STATUSES = frozenset(UsageStatus.values)


def _status(value: Any) -> str:
    return value if value in _STATUSES else UsageStatus.ERROR


@dataclass(frozen=True, slots=True)
class Written:
    """A usage record as stored, and the caller's tightest budget room after it."""

    record_id: int
    request_id: uuid.UUID
    budget_remaining: int | None


@lru_cache(maxsize=8)
def _insert_sql(vendor: str, count: int) -> str:
    del vendor  # part of the cache key: quoting is the connection's
    q = connection.ops.quote_name
    fields = _record_fields()
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return (
        f"INSERT INTO {q(UsageRecord._meta.db_table)} "
        f"({', '.join(q(f.column) for f in fields)}) "
        f"VALUES {', '.join([row] * count)} RETURNING {q(UsageRecord._meta.pk.column)}"
    )


@lru_cache(maxsize=1)
def _record_fields() -> tuple[Any, ...]:
    return tuple(f for f in UsageRecord._meta.concrete_fields if not f.primary_key)


_Adapter = tuple[str, Callable[[], Any], Callable[[Any], Any] | None]
_adapters_by_alias: dict[str, list[_Adapter]] = {}


def _adapters(db: Any) -> list[_Adapter]:
    """Per column: its attname, default, and how the driver must be given it."""
    cached = _adapters_by_alias.get(db.alias)
    if cached is not None:
        return cached
    adapters: list[_Adapter] = []
    for f in _record_fields():
        kind = f.get_internal_type()
        adapt: Callable[[Any], Any] | None = None
        if kind == "UUIDField" and not db.features.has_native_uuid_field:
            adapt = _uuid_hex
        elif kind == "DateTimeField":
            adapt = db.ops.adapt_datetimefield_value
        elif kind == "JSONField":
            adapt = functools.partial(db.ops.adapt_json_value, encoder=f.encoder)
        elif kind == "DecimalField":
            adapt = functools.partial(
                db.ops.adapt_decimalfield_value,
                max_digits=f.max_digits,
                decimal_places=f.decimal_places,
            )
        elif kind not in _PLAIN_TYPES:
            adapt = functools.partial(f.get_db_prep_save, connection=db)
        adapters.append((f.attname, f.get_default, adapt))
    _adapters_by_alias[db.alias] = adapters
    return adapters


# Column types whose Python values every driver takes as they are.
_PLAIN_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "BigIntegerField",
        "BooleanField",
        "CharField",
        "FloatField",
        "ForeignKey",
        "IntegerField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SmallIntegerField",
        "TextField",
        "UUIDField",
    }
)


def _uuid_hex(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def _insert_records(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """INSERT the records in one statement; their ids, in order.

    bulk_create would do the same with several times the Python per row, which
    is most of what a usage write costs.
    """
    db = connections[UsageRecord.objects.db]
    adapters = _adapters(db)
    params: list[Any] = []
    for row in rows:
        for attname, default, adapt in adapters:
            value = row[attname] if attname in row else default()
            params.append(value if adapt is None else adapt(value))
    with db.cursor() as cursor:
        cursor.execute(_insert_sql(db.vendor, len(rows)), params)
        return [pk for (pk,) in cursor.fetchall()]


# --- Writing ------------------------------------------------------------------


def write_usage(entries: Sequence[UsageEntry]) -> list[Written]:
    """Store records, settle budgets and add to rollups, in one transaction.

    Raises IntegrityError when any record already exists or refers to a row
    that is gone; `record_usage` handles both for a single entry.
    """
    now = timezone.now()
    rows = [entry.row() for entry in entries]
    settlements = [s for entry in entries for s in entry.storable_settlements()]
    held = [
        row["request_id"]
        for entry, row in zip(entries, rows, strict=True)
        if any(s.held for s in entry.settlements)
    ]
    with transaction.atomic():
        if held:
            # Holds first, in the order the sweeper takes them, so that the two
            # never wait on each other; a swept request's record is already
            # stored, so its insert below fails and settles nothing twice.
            drop_holds(held)
        ids = _insert_records(rows)
        remaining = _settle(settlements, now)
        _add_to_rollups(rows)
    written = []
    for entry, pk in zip(entries, ids, strict=True):
        room = [
            remaining[s.counter_id]
            for s in entry.settlements
            if remaining.get(s.counter_id) is not None
            and s.budget.scope != BudgetScope.ENDPOINT
        ]
        written.append(Written(pk, entry.request_id, min(room) if room else None))
    return written


def _drop_missing_references(entry: UsageEntry) -> bool:
    """Clear references to rows deleted while the request ran; whether any were."""
    changed = False
    checks = (
        ("user_id", get_user_model()),
        ("api_key_id", ApiKey),
        ("endpoint_id", Endpoint),
    )
    for attribute, model in checks:
        pk = getattr(entry, attribute)
        if pk is not None and not model._default_manager.filter(pk=pk).exists():
            setattr(entry, attribute, None)
            changed = True
    live = set(
        BudgetCounter.objects.filter(
            pk__in=[s.counter_id for s in entry.settlements]
        ).values_list("pk", flat=True)
    )
    if len(live) != len({s.counter_id for s in entry.settlements}):
        entry.settlements = [s for s in entry.settlements if s.counter_id in live]
        changed = True
    return changed


def _existing(request_id: uuid.UUID) -> int | None:
    return (
        UsageRecord.objects.filter(request_id=request_id)
        .values_list("pk", flat=True)
        .first()
    )


def record_usage(entry: UsageEntry) -> Written:
    """Write one entry exactly once, whatever happened to earlier attempts."""
    for attempt in range(3):
        existing = _existing(entry.request_id)
        if existing is not None:
            # An earlier write committed (its acknowledgement was lost).
            return Written(existing, entry.request_id, None)
        try:
            return write_usage([entry])[0]
        except IntegrityError:
            if _existing(entry.request_id) is not None:
                # Written meanwhile by another writer (the sweeper): loop to it.
                continue
            if attempt or not _drop_missing_references(entry):
                raise
        except (OperationalError, InterfaceError):
            if attempt == 2:
                raise
            connection.close()
            time.sleep(0.05 * 2**attempt)
    existing = _existing(entry.request_id)
    if existing is None:
        raise AssertionError(f"record {entry.request_id} neither written nor found")
    return Written(existing, entry.request_id, None)


def _write_batch(entries: Sequence[UsageEntry]) -> list[Written | BaseException]:
    """The group commit's write: one transaction, or one per entry on failure."""
    try:
        return list(write_usage(entries))
    except Exception as exc:
        if isinstance(exc, OperationalError | InterfaceError):
            connection.close()
        logger.info(
            "Batch of %d usage entries retried one by one: %s", len(entries), exc
        )
    results: list[Written | BaseException] = []
    for entry in entries:
        try:
            results.append(record_usage(entry))
            continue
        except Exception as exc:
            problem = exc
            logger.exception(
                "Usage record %s could not be written; storing it in minimal form",
                entry.request_id,
            )
            if isinstance(exc, OperationalError | InterfaceError):
                connection.close()
        try:
            # The record must exist and the reservation be settled, even if
            # what the request left behind cannot be stored.
            results.append(record_usage(entry.minimal(problem)))
        except Exception as exc:
            logger.exception("Usage record %s is lost", entry.request_id)
            results.append(exc)
    return results


_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _writer_thread() -> ThreadPoolExecutor:
    # One thread, one database connection held between batches: reconnecting
    # per batch would cost more than the batch.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="usage-writer")
        return _executor


def write_delay() -> float:
    """Seconds the writer gathers entries before one transaction writes them all."""
    return max(0.0, float(getattr(settings, "USAGE_WRITE_DELAY_MS", 50)) / 1000)


class _GroupCommit:
    """Per event loop: entries gather for a moment, then one transaction each time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: list[tuple[UsageEntry, asyncio.Future[Written]]] = []
        self.task: asyncio.Task[None] | None = None
        # Set when someone waits for the records: write without gathering.
        self.hurry = asyncio.Event()

    def submit(self, entry: UsageEntry) -> asyncio.Future[Written]:
        future: asyncio.Future[Written] = self.loop.create_future()
        self.queue.append((entry, future))
        if self.task is None:
            # A fresh context: the writer must not inherit a request's
            # thread-sensitive executor, which dies with the request.
            self.task = self.loop.create_task(
                self._run(), context=contextvars.Context()
            )
        return future

    async def _run(self) -> None:
        try:
            while self.queue:
                delay = write_delay()
                if delay and len(self.queue) < MAX_BATCH and not self.hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.hurry.wait(), delay)
                batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
                job = _writer_thread().submit(
                    _outside_transactions, _write_batch, [e for e, _ in batch]
                )
                try:
                    # Shielded: cancelling the wait must not cancel a batch
                    # still queued for the writer thread, or it is lost.
                    results = await asyncio.shield(asyncio.wrap_future(job))
                except asyncio.CancelledError:
                    _resolve(batch, job.result())
                    raise
                _resolve(batch, results)
        except asyncio.CancelledError:
            # The loop is shutting down: write the rest on the writer thread.
            self.drain_blocking()
            raise
        finally:
            self.task = None
            self.hurry.clear()

    def drain_blocking(self) -> None:
        """Write what is queued without the loop (shutdown, or its loop closed)."""
        rest, self.queue = self.queue, []
        if rest:
            _resolve(rest, _on_writer_thread(_write_batch, [e for e, _ in rest]))


def _resolve(
    batch: Sequence[tuple[UsageEntry, asyncio.Future[Written]]],
    results: Sequence[Written | BaseException],
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done() or future.get_loop().is_closed():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


_group_commits: dict[asyncio.AbstractEventLoop, _GroupCommit] = {}


def submit_usage(entry: UsageEntry) -> asyncio.Future[Written]:
    """Queue an entry for this loop's group commit; await the future for its record.

    The write happens whether or not the future is awaited or the awaiting
    task is cancelled, so callers await it under `asyncio.shield`.
    """
    loop = asyncio.get_running_loop()
    writer = _group_commits.get(loop)
    if writer is None:
        for old in [lp for lp in _group_commits if lp.is_closed()]:
            _group_commits.pop(old).drain_blocking()
        writer = _group_commits[loop] = _GroupCommit(loop)
    future = writer.submit(entry)
    # Nobody need await it: a failure is logged by the writer, not by asyncio.
    future.add_done_callback(_retrieved)
    return future


def _retrieved(future: asyncio.Future[Written]) -> None:
    if not future.cancelled():
        future.exception()


async def arecord_usage(entry: UsageEntry) -> Written:
    """Write one entry through the group commit, now, and wait for it."""
    future = submit_usage(entry)
    hurry()
    return await asyncio.shield(future)


def pending() -> bool:
    """Whether entries of this event loop are still to be written."""
    writer = _group_commits.get(asyncio.get_running_loop())
    return writer is not None and writer.task is not None


def hurry() -> None:
    """Write what is queued on this event loop now, without gathering more."""
    writer = _group_commits.get(asyncio.get_running_loop())
    if writer is not None and writer.task is not None:
        writer.hurry.set()


async def flush() -> None:
    """Write what is queued on this event loop now, and wait until it is."""
    writer = _group_commits.get(asyncio.get_running_loop())
    while writer is not None and writer.task is not None:
        writer.hurry.set()
        await asyncio.shield(writer.task)


def _on_writer_thread(function: Any, *args: Any) -> Any:
    try:
        job = _writer_thread().submit(_outside_transactions, function, *args)
    except RuntimeError:
        # At interpreter exit the pool takes no more work; nothing else runs.
        return function(*args)
    return job.result()


def _outside_transactions(function: Callable[..., Any], *args: Any) -> Any:
    """Run a writer job on a connection with no transaction left open, before or after.

    A transaction left open on the writer's connection would turn every later
    batch into a savepoint never committed: records lost, and their locks held
    until the process ends. It takes only one failure at the wrong moment,
    such as the connection check at the end of an atomic block raising after
    its COMMIT: Django then leaves autocommit off, and the next atomic block
    takes that for an enclosing transaction.
    """
    _end_stray_transaction()
    try:
        return function(*args)
    finally:
        _end_stray_transaction()


def _end_stray_transaction() -> None:
    """Commit a transaction left open on this thread's connection, and say so.

    What the writer leaves in one is whole writes (each batch's block ended),
    so committing keeps records that their requests were told are stored; if
    the commit fails, closing the connection rolls it back.
    """
    in_block = connection.in_atomic_block
    if not in_block and (connection.connection is None or connection.autocommit):
        return
    logger.error(
        "The usage writer's connection was left in a transaction (%s); ending it",
        "an atomic block" if in_block else "autocommit off",
    )
    broken = connection.needs_rollback or connection.closed_in_transaction
    connection.atomic_blocks.clear()
    connection.savepoint_ids.clear()
    connection.in_atomic_block = False
    connection.needs_rollback = False
    connection.closed_in_transaction = False
    try:
        if broken:
            raise DatabaseError("the transaction was marked for rollback")
        connection.commit()
        connection.set_autocommit(True)
    except Exception:
        logger.exception("Rolling back the usage writer's stray transaction")
        # Closed outside any atomic block: the database rolls back, and the
        # next connection starts in autocommit.
        connection.close()


def close_writer() -> None:
    """Write anything still queued and close the writer's database connection."""
    for writer in list(_group_commits.values()):
        writer.drain_blocking()
    with _executor_lock:
        executor = _executor
    if executor is not None:
        # A function, so that `connection` is the writer thread's own.
        _on_writer_thread(lambda: connection.close())


atexit.register(close_writer)
