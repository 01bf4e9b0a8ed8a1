"""Events the gateway raises for other apps (alerts, dashboards) to act on.

The gateway knows nothing of its listeners; monitoring connects to these.
Both are sent once per transition, after the transaction that caused it commits.
"""

from __future__ import annotations

from django.dispatch import Signal

# sender=Budget; kwargs: counter (BudgetCounter), level ("warning" | "exhausted"),
# used (int), limit (int), resets_at (datetime).
budget_threshold_crossed = Signal()

# sender=Endpoint; kwargs: endpoint (Endpoint), old_status (str), new_status (str),
# reason (str): "probe", "breaker_open", "breaker_closed", "reenabled".
endpoint_status_changed = Signal()

# sender=BudgetHold; kwargs: request_ids (list[uuid.UUID]). Requests whose process
# died before settling them: the sweeper released their reservations and wrote
# their records (status error, error_type "interrupted"). Sent on commit; the
# chat marks their answers interrupted.
requests_abandoned = Signal()
