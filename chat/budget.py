"""What the chat page says about the user's token budget."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from gateway import accounting


def remaining_today(user: Any) -> dict[str, Any]:
    """The tightest budget that applies to the user, and their tokens used today.

    ``remaining`` is None when no budget limits the user.
    """
    states = [s for s in accounting.budget_status(user.pk) if s.token_limit is not None]
    used_today = accounting.tokens_used_today(user_id=user.pk)
    if not states:
        return {"remaining": None, "used_today": used_today}
    tightest = min(states, key=lambda s: (s.remaining, s.resets_at))
    return {**tightest.to_dict(), "used_today": used_today}


aremaining_today = sync_to_async(remaining_today)
