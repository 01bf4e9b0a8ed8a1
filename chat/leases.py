"""Cross-process claims on running answers, kept in Django's cache.

Two claims are taken before an answer starts, both with ``cache.add`` (atomic on
the local-memory and the Redis cache):

- ``chat:gen:<conversation>``: one answer per conversation at a time; its value
  names the channel of the web process running it, so a socket served by
  another process can join the stream or stop it;
- ``chat:slot:<user>:<n>``: one of the user's CHAT_MAX_CONCURRENT_GENERATIONS
  slots, so the limit holds across every web process.

Claims expire after CHAT_LEASE_SECONDS unless the running process renews them
(every third of that), so a process that dies (``kill -9``, a lost machine)
blocks its users' conversations for at most that long; an answer it left
unfinished then shows as interrupted, with Retry (chat.actions.open_conversation).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.core.cache import cache

from chat.conf import chat_settings
from chat.errors import ChatError


def lease_seconds() -> float:
    """How long a claim lasts unless renewed."""
    return chat_settings().lease_seconds


def renew_seconds() -> float:
    """How often claims are renewed: a missed renewal does not lose them."""
    return lease_seconds() / 3


def conversation_key(conversation_id: uuid.UUID) -> str:
    """The cache key naming the process that runs a conversation's answer."""
    return f"chat:gen:{conversation_id}"


@dataclass(frozen=True, slots=True)
class Lease:
    """The claims held by one running answer."""

    conversation_key: str
    slot_key: str
    owner: str

    def as_items(self) -> dict[str, str]:
        return {self.conversation_key: self.owner, self.slot_key: self.owner}


def claim(user_id: int, conversation_id: uuid.UUID, limit: int, owner: str) -> Lease:
    """Take the conversation and one of the user's slots, or raise ChatError."""
    key = conversation_key(conversation_id)
    ttl = lease_seconds()
    if not cache.add(key, owner, ttl):
        raise ChatError(
            "busy",
            "An answer is already being written in this conversation. "
            "Wait for it or stop it first.",
        )
    for index in range(limit):
        slot = f"chat:slot:{user_id}:{index}"
        if cache.add(slot, owner, ttl):
            return Lease(key, slot, owner)
    cache.delete(key)
    answers = "answer" if limit == 1 else "answers"
    raise ChatError(
        "too_many_generations",
        f"You already have {limit} {answers} being written. "
        "Wait for one to finish or stop it, then try again.",
    )


def renew(leases: list[Lease]) -> None:
    """Extend the claims of answers that are still running."""
    items: dict[str, str] = {}
    for lease in leases:
        items.update(lease.as_items())
    if items:
        cache.set_many(items, lease_seconds())


def release(lease: Lease) -> None:
    """Give the claims back once the answer has been stored."""
    cache.delete_many([lease.conversation_key, lease.slot_key])


def owner_of(conversation_id: uuid.UUID) -> str | None:
    """The channel of the process running this conversation's answer, if any."""
    return cache.get(conversation_key(conversation_id))
