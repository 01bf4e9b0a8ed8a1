"""Fitting a conversation into one route's context window.

The budget for the prompt is the route's context window minus the tokens
reserved for the answer (``max_output_tokens``).  Against that budget:

- at ``CONTEXT_WARN_RATIO`` (80 %) the status carries a warning;
- at ``CONTEXT_COMPRESS_RATIO`` (90 %) older turns are shortened and then left
  out until the prompt is at or under ``CONTEXT_TARGET_RATIO`` (60 %), so the
  next few turns fit without trimming again.

What is always kept: every system (or developer) message, and the newest user
turn, meaning the last user message and everything after it (the tool calls
and tool results of the turn in progress).  Without a user message, the last
message counts as the newest turn.  When these alone exceed the budget,
ContextWindowExceeded is raised so the router can try a route with a larger
window; fitting is done per route, since routes of one chain can differ.

Older messages are grouped into turns (a user message with the answers and
tool messages that follow it) and handled a turn at a time, so no answer is
kept without its question.  The order is: least important first, then oldest
first; turns holding a pinned message come last.

1. Shortening: an unpinned older message whose text content exceeds
   COMPRESS_MIN_TOKENS is cut to its first and last COMPRESS_KEEP_TOKENS tokens
   with a marker in between.  Long messages cost the most, and keeping their
   beginning and end keeps more of the conversation than leaving out a turn.
2. Leaving out: whole turns, in the order above, until the target is reached.
   Pinned turns are left out only when everything else is gone and the prompt
   still exceeds the budget itself: the target is a comfort margin, and a pin
   is worth more than that margin.

The fitted list keeps the original order and the kind of items given: plain
OpenAI dicts come back as dicts (copied only when shortened), ContextMessage
objects as ContextMessage objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import ENVIRONMENT_VARIABLE, settings

from gateway.tokens import (
    BYTES_PER_ESTIMATED_TOKEN,
    REPLY_PRIMING_TOKENS,
    TokenCounter,
    counter_for,
)

DEFAULT_CONTEXT_WINDOW = 8000
DEFAULT_MAX_OUTPUT_TOKENS = 2000
DEFAULT_WARN_RATIO = 0.8
DEFAULT_COMPRESS_RATIO = 0.9
DEFAULT_TARGET_RATIO = 0.6
COMPRESS_MIN_TOKENS = 1000
COMPRESS_KEEP_TOKENS = 200
SYSTEM_ROLES = frozenset({"system", "developer"})

# Float ratios times integer budgets land a hair off whole numbers (0.7 * 100
# is 70.00000000000001); the slack keeps "exactly 80 %" on the right side.
_EPSILON = 1e-9


@dataclass(slots=True)
class ContextMessage:
    """One message of a conversation, with what fitting needs to know about it."""

    role: str
    content: Any
    id: Any = None
    pinned: bool = False
    importance: int = 0
    # The content's tokens for the model being fitted, when already known;
    # the per-message overhead is added on top.
    tokens: int | None = None
    name: str | None = None

    @classmethod
    def from_dict(cls, message: Mapping[str, Any]) -> ContextMessage:
        """Build one from an OpenAI-style message dict."""
        return cls(
            role=message.get("role") or "",
            content=message.get("content"),
            name=message.get("name"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the OpenAI-style message dict to send upstream."""
        message = {"role": self.role, "content": self.content}
        if self.name:
            message["name"] = self.name
        return message


class ContextWindowExceeded(Exception):
    """The system prompt and newest turn alone do not fit a route's window."""

    # The error code OpenAI uses for the same condition, so API clients know it.
    code = "context_length_exceeded"

    def __init__(
        self,
        *,
        required: int,
        limit: int,
        window: int,
        reserved_output: int,
        model: str,
    ):
        self.required = required
        self.limit = limit
        self.window = window
        self.reserved_output = reserved_output
        self.model = model
        super().__init__(
            f"The system prompt and newest message need {required:,} tokens, but "
            f"{model or 'this route'} leaves {max(limit, 0):,} for the prompt "
            f"({window:,}-token window minus {reserved_output:,} reserved for "
            f"the answer)."
        )


@dataclass(frozen=True, slots=True)
class ContextStatus:
    """How full the context is after fitting, for the UI and the usage record."""

    tokens: int
    limit: int
    window: int
    reserved_output: int
    percent: float
    warning: bool
    compressed: bool
    compressed_ids: tuple[Any, ...]
    dropped_ids: tuple[Any, ...]
    conversation_tokens: int
    method: str

    @property
    def dropped_count(self) -> int:
        """How many messages were left out."""
        return len(self.dropped_ids)

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-ready values."""
        return {
            "tokens": self.tokens,
            "limit": self.limit,
            "window": self.window,
            "reserved_output": self.reserved_output,
            "percent": self.percent,
            "warning": self.warning,
            "compressed": self.compressed,
            "compressed_ids": list(self.compressed_ids),
            "dropped_ids": list(self.dropped_ids),
            "dropped_count": self.dropped_count,
            "conversation_tokens": self.conversation_tokens,
            "method": self.method,
        }


class FittedContext(NamedTuple):
    """The messages to send, in their original order, and the status."""

    messages: list[Any]
    status: ContextStatus


class _Item:
    __slots__ = (
        "content",
        "content_tokens",
        "cost",
        "id",
        "importance",
        "index",
        "pinned",
        "protected",
        "role",
        "source",
    )

    def __init__(self, index: int, source: Any, counter: TokenCounter, cache: dict):
        self.index = index
        self.source = source
        if isinstance(source, ContextMessage):
            self.role = source.role
            self.content = source.content
            self.id = index if source.id is None else source.id
            self.pinned = source.pinned
            self.importance = source.importance
            known = source.tokens
            envelope = cache.get((source.role, source.name))
            if envelope is None:
                envelope = cache[(source.role, source.name)] = counter.envelope(
                    source.role, source.name
                )
        else:
            self.role = source.get("role") or ""
            self.content = source.get("content")
            self.id = index
            self.pinned = False
            self.importance = 0
            known = None
            envelope = counter.dict_envelope(source)
        if known is None:
            known = _count_content(self.content, counter, cache)
        self.content_tokens = known
        self.cost = envelope + known
        self.protected = self.role in SYSTEM_ROLES


def _count_content(content: Any, counter: TokenCounter, cache: dict) -> int:
    # Repeated texts ("ok", "thanks", a pasted snippet) are counted once.
    if not isinstance(content, str):
        return counter.content(content)
    tokens = cache.get(content)
    if tokens is None:
        tokens = cache[content] = counter.text(content)
    return tokens


def _shorten(text: str, counter: TokenCounter) -> str | None:
    keep = COMPRESS_KEEP_TOKENS
    encoding = counter.encoding
    # The text itself decides, not a count passed in with it: a head and a
    # tail that overlap would repeat the text instead of shortening it.
    if encoding is not None:
        ids = encoding.encode_ordinary(text)
        omitted = len(ids) - 2 * keep
        if omitted <= 0:
            return None
        # A cut can fall inside a multi-byte character; drop its stray bytes.
        head = encoding.decode_bytes(ids[:keep]).decode("utf-8", "ignore")
        tail = encoding.decode_bytes(ids[-keep:]).decode("utf-8", "ignore")
    else:
        chars = keep * BYTES_PER_ESTIMATED_TOKEN
        if len(text) <= 2 * chars:
            return None
        head, tail = text[:chars], text[-chars:]
        omitted = counter.text(text[chars:-chars])
    return (
        f"{head.rstrip()}\n\n[… {omitted:,} tokens left out to fit the context "
        f"window …]\n\n{tail.lstrip()}"
    )


def _compress(item: _Item, counter: TokenCounter) -> int:
    """Shorten an item in place and return the tokens saved."""
    text = _shorten(item.content, counter)
    if text is None:
        return 0
    tokens = counter.text(text)
    saved = item.content_tokens - tokens
    if saved <= 0:
        return 0
    if isinstance(item.source, ContextMessage):
        item.source = dataclasses.replace(item.source, content=text, tokens=tokens)
    else:
        item.source = {**item.source, "content": text}
    item.content = text
    item.content_tokens = tokens
    item.cost -= saved
    return saved


class _Turn:
    __slots__ = ("items", "pinned", "sort_key")

    def __init__(self, first: _Item):
        self.items = [first]

    def close(self) -> None:
        # A turn is as important as its most important message.
        self.pinned = any(item.pinned for item in self.items)
        importance = max(item.importance for item in self.items)
        self.sort_key = (self.pinned, importance, self.items[0].index)


def _ratio(name: str, default: float, override: float | None) -> float:
    if override is not None:
        return float(override)
    # Plain unit tests and scripts run without Django settings; a configured
    # module that has not been read yet still counts.
    if settings.configured or os.environ.get(ENVIRONMENT_VARIABLE):
        return float(getattr(settings, name, default))
    return default


def _older_turns(items: list[_Item]) -> list[_Turn]:
    """Mark the newest turn as kept and group the older messages into turns."""
    newest = len(items) - 1
    for item in reversed(items):
        if item.role == "user":
            newest = item.index
            break
    turns: list[_Turn] = []
    current: _Turn | None = None
    for item in items:
        if item.index >= newest:
            item.protected = True
        if item.protected:
            current = None
        elif current is None or item.role == "user":
            current = _Turn(item)
            turns.append(current)
        else:
            current.items.append(item)
    for turn in turns:
        turn.close()
    return turns


def fit_context(
    messages: Sequence[ContextMessage | Mapping[str, Any]],
    *,
    model: str,
    context_window: int | None = None,
    max_output_tokens: int | None = None,
    warn_ratio: float | None = None,
    compress_ratio: float | None = None,
    target_ratio: float | None = None,
) -> FittedContext:
    """Fit a conversation into a route's window; raise ContextWindowExceeded."""
    window = DEFAULT_CONTEXT_WINDOW if context_window is None else int(context_window)
    reserved = (
        DEFAULT_MAX_OUTPUT_TOKENS
        if max_output_tokens is None
        else int(max_output_tokens)
    )
    if window <= 0 or reserved < 0:
        raise ValueError(
            f"Invalid window: context_window={window}, max_output_tokens={reserved}."
        )
    warn = _ratio("CONTEXT_WARN_RATIO", DEFAULT_WARN_RATIO, warn_ratio)
    trim = _ratio("CONTEXT_COMPRESS_RATIO", DEFAULT_COMPRESS_RATIO, compress_ratio)
    target = _ratio("CONTEXT_TARGET_RATIO", DEFAULT_TARGET_RATIO, target_ratio)
    if not (0 < target < trim <= 1 and 0 < warn <= 1):
        raise ValueError(
            "Context ratios need 0 < target < compress <= 1 and 0 < warn <= 1; got "
            f"warn={warn}, compress={trim}, target={target}."
        )

    limit = window - reserved
    counter = counter_for(model)
    cache: dict = {}
    items = [_Item(i, m, counter, cache) for i, m in enumerate(messages)]
    turns = _older_turns(items)

    used = REPLY_PRIMING_TOKENS + sum(item.cost for item in items)
    conversation_tokens = used
    required = REPLY_PRIMING_TOKENS + sum(i.cost for i in items if i.protected)
    if required > limit:
        raise ContextWindowExceeded(
            required=required,
            limit=limit,
            window=window,
            reserved_output=reserved,
            model=model,
        )

    dropped: set[int] = set()
    compressed: set[int] = set()
    if used >= math.ceil(trim * limit - _EPSILON):
        goal = math.floor(target * limit + _EPSILON)
        turns.sort(key=lambda turn: turn.sort_key)
        for turn in turns:
            if used <= goal or turn.pinned:
                break
            for item in turn.items:
                if used <= goal:
                    break
                if item.content_tokens > COMPRESS_MIN_TOKENS and isinstance(
                    item.content, str
                ):
                    saved = _compress(item, counter)
                    if saved:
                        used -= saved
                        compressed.add(item.index)
        for turn in turns:
            if used <= goal or (turn.pinned and used <= limit):
                break
            for item in turn.items:
                used -= item.cost
                dropped.add(item.index)

    kept = [item for item in items if item.index not in dropped]
    status = ContextStatus(
        tokens=used,
        limit=limit,
        window=window,
        reserved_output=reserved,
        percent=round(used * 100 / limit, 1),
        warning=conversation_tokens >= math.ceil(warn * limit - _EPSILON),
        compressed=bool(compressed - dropped),
        compressed_ids=tuple(i.id for i in kept if i.index in compressed),
        dropped_ids=tuple(i.id for i in items if i.index in dropped),
        conversation_tokens=conversation_tokens,
        method=counter.method.value,
    )
    return FittedContext([item.source for item in kept], status)
