"""Budgets and usage records: reserve before the call, write exactly once after.

One package, split by job:

- `budgets`: which budgets apply, the reservation before the call (one
  conditional UPDATE per budget, all or none), settling, budget status;
- `usage`: `UsageEntry`, the group-committed writer that turns each into
  exactly one UsageRecord and settles its reservation in the same transaction,
  and that never loses a record to a value a column cannot store;
- `rollups`: the hourly rollups the writer keeps, their rebuild and pruning;
- `sweeper`: reservations are recorded as BudgetHold rows, so that the
  monitor's sweeper can release what a killed process held
  (`sweep_abandoned`);
- `storable`: what makes any value fit its column before it is written.

Everything is importable from `gateway.accounting` as before the split.
"""

from __future__ import annotations

from gateway.accounting.budgets import (
    BudgetExhausted,
    BudgetRef,
    BudgetState,
    Hold,
    HoldRequest,
    Reservation,
    Settlement,
    abudget_status,
    acaller_budgets,
    aendpoint_budgets,
    areserve,
    budget_ref,
    budget_states,
    budget_status,
    caller_budgets,
    endpoint_budgets,
    forget_budgets,
    format_reset,
    period_bounds,
    read_users_budgets,
    release,
    reserve,
    settlements_for,
)
from gateway.accounting.rollups import (
    ROLLUP_BUCKETS,
    ROLLUP_GROUPS,
    Rebuilt,
    RollupQuery,
    atokens_used_today,
    dimensions_hash,
    hour_of,
    micros,
    parse_day_or_time,
    prune_cutoff,
    prune_usage,
    rebuild_rollups,
    tokens_used_today,
    usage_rollups,
)
from gateway.accounting.sweeper import sweep_abandoned
from gateway.accounting.usage import (
    MAX_BATCH,
    UsageEntry,
    Written,
    _write_batch,
    arecord_usage,
    close_writer,
    flush,
    hurry,
    pending,
    record_usage,
    submit_usage,
    write_delay,
    write_usage,
)

__all__ = [
    "MAX_BATCH",
    "ROLLUP_BUCKETS",
    "ROLLUP_GROUPS",
    "BudgetExhausted",
    "BudgetRef",
    "BudgetState",
    "Hold",
    "HoldRequest",
    "Rebuilt",
    "Reservation",
    "RollupQuery",
    "Settlement",
    "UsageEntry",
    "Written",
    "_write_batch",
    "abudget_status",
    "acaller_budgets",
    "aendpoint_budgets",
    "arecord_usage",
    "areserve",
    "atokens_used_today",
    "budget_ref",
    "budget_states",
    "budget_status",
    "caller_budgets",
    "close_writer",
    "dimensions_hash",
    "endpoint_budgets",
    "flush",
    "forget_budgets",
    "format_reset",
    "hour_of",
    "hurry",
    "micros",
    "parse_day_or_time",
    "pending",
    "period_bounds",
    "prune_cutoff",
    "prune_usage",
    "read_users_budgets",
    "rebuild_rollups",
    "record_usage",
    "release",
    "reserve",
    "settlements_for",
    "submit_usage",
    "sweep_abandoned",
    "tokens_used_today",
    "usage_rollups",
    "write_delay",
    "write_usage",
]
