"""Rate limits: requests and tokens per minute per user, API key and endpoint.

Each limit is a GCRA counter (the "generic cell rate algorithm", a token bucket
kept as one timestamp): a limit of L per minute lets a request of cost n
through when the bucket's theoretical arrival time, pushed n * 60 / L seconds
further, stays within one minute of now. A full minute's allowance may be
used at once; after that requests are spread evenly, and a refusal knows
exactly when the next one fits (its retry_after).

The counters live in Django's cache. On Redis every check is one Lua script,
one round trip, atomic across all web processes: every limit of a request is
checked and charged together, or none is. On other backends (local memory: one
process) a process-wide lock makes the same read-check-write atomic.

Tokens are charged as they become known: prompt tokens when the request is
admitted, the rest when it settles (`settle_caller`), so a limit holds over
time without refusing requests for output they may never produce.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cache as memoize
from typing import Any, Generic, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from gateway.models import ApiKey, UserLimits

PERIOD = 60.0
KEY_PREFIX = "rl"

T = TypeVar("T")


# --- Policy lookups -----------------------------------------------------------


class LocalTTLCache(Generic[T]):
    """A per-process map with expiry, for settings rows read on every request.

    Saves through the ORM clear it at once in the saving process; other
    processes see a change within GATEWAY_POLICY_CACHE_SECONDS.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, T]] = {}

    def get(self, key: Hashable) -> T | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def set(self, key: Hashable, value: T) -> None:
        ttl = float(getattr(settings, "GATEWAY_POLICY_CACHE_SECONDS", 5))
        if ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            # Wholesale is enough: it refills at one query per active caller.
            self._entries.clear()
        self._entries[key] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True, slots=True)
class CallerLimits:
    """The requests and tokens per minute of a user and of an API key; 0: none."""

    user_rpm: int
    user_tpm: int
    key_rpm: int
    key_tpm: int


_caller_limits: LocalTTLCache[CallerLimits] = LocalTTLCache()


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def caller_limits(user_id: int | None, api_key_id: int | None) -> CallerLimits:
    """The limits that apply to a caller: its own rows, else the settings."""
    cache_key = (user_id, api_key_id)
    cached = _caller_limits.get(cache_key)
    if cached is not None:
        return cached
    rpm, tpm = settings.RATE_LIMIT_RPM, settings.RATE_LIMIT_TPM
    user_row = (
        UserLimits.objects.filter(user_id=user_id)
        .values_list("rpm_limit", "tpm_limit")
        .first()
        if user_id is not None
        else None
    )
    key_row = (
        ApiKey.objects.filter(pk=api_key_id)
        .values_list("rpm_limit", "tpm_limit")
        .first()
        if api_key_id is not None
        else None
    )
    user_rpm, user_tpm = user_row or (None, None)
    key_rpm, key_tpm = key_row or (None, None)
    limits = CallerLimits(
        user_rpm=_or_default(user_rpm, rpm) if user_id is not None else 0,
        user_tpm=_or_default(user_tpm, tpm) if user_id is not None else 0,
        key_rpm=_or_default(key_rpm, rpm) if api_key_id is not None else 0,
        key_tpm=_or_default(key_tpm, tpm) if api_key_id is not None else 0,
    )
    _caller_limits.set(cache_key, limits)
    return limits


def read_users_limits(user_ids: Sequence[int]) -> None:
    """`caller_limits` of several users (no API key) read in one query, and kept."""
    missing = {u for u in user_ids if _caller_limits.get((u, None)) is None}
    if not missing:
        return
    rpm, tpm = settings.RATE_LIMIT_RPM, settings.RATE_LIMIT_TPM
    rows = {
        user_id: (user_rpm, user_tpm)
        for user_id, user_rpm, user_tpm in UserLimits.objects.filter(
            user_id__in=missing
        ).values_list("user_id", "rpm_limit", "tpm_limit")
    }
    for user_id in missing:
        user_rpm, user_tpm = rows.get(user_id, (None, None))
        _caller_limits.set(
            (user_id, None),
            CallerLimits(
                user_rpm=_or_default(user_rpm, rpm),
                user_tpm=_or_default(user_tpm, tpm),
                key_rpm=0,
                key_tpm=0,
            ),
        )


async def acaller_limits(user_id: int | None, api_key_id: int | None) -> CallerLimits:
    """`caller_limits` from async code; no thread hop while the entry is cached."""
    cached = _caller_limits.get((user_id, api_key_id))
    if cached is not None:
        return cached
    return await sync_to_async(caller_limits)(user_id, api_key_id)


@receiver(post_save, sender=UserLimits)
@receiver(post_delete, sender=UserLimits)
@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _forget_caller_limits(**kwargs: Any) -> None:
    _caller_limits.clear()


@dataclass(frozen=True, slots=True)
class EffectiveLimit:
    """One per-minute limit as it applies, and where it comes from, for the admin."""

    per_minute: int  # 0: none
    # "default", "user override" or "key override".
    source: str

    def __str__(self) -> str:
        if self.source == "default":
            value = f"{self.per_minute:,}" if self.per_minute else "none"
            return f"default ({value})"
        value = f"{self.per_minute:,}" if self.per_minute else "no limit"
        return f"{value}, {self.source}"


def _tightest(*candidates: EffectiveLimit) -> EffectiveLimit:
    """The limit that binds first among those that apply together (0: none)."""
    set_ = [c for c in candidates if c.per_minute]
    if set_:
        return min(set_, key=lambda c: c.per_minute)
    # None limits: say why (an override to none beats "the default is none").
    overridden = [c for c in candidates if c.source != "default"]
    return (overridden or list(candidates))[0]


def effective_limits(
    user_row: tuple[int | None, int | None] | None,
    key_row: tuple[int | None, int | None] | None = None,
    *,
    through_key: bool = False,
) -> tuple[EffectiveLimit, EffectiveLimit]:
    """The requests and tokens per minute that bind a user, or one of their keys.

    `user_row` and `key_row` are the (rpm_limit, tpm_limit) overrides, None
    where there are none. A key's requests count against the key's limits and
    its owner's together, so the tighter of both binds; `caller_limits` is the
    same rule at request time.
    """
    defaults = (settings.RATE_LIMIT_RPM, settings.RATE_LIMIT_TPM)
    found = []
    for index, default in enumerate(defaults):
        user_value = None if user_row is None else user_row[index]
        user = (
            EffectiveLimit(default, "default")
            if user_value is None
            else EffectiveLimit(user_value, "user override")
        )
        if not through_key:
            found.append(user)
            continue
        key_value = None if key_row is None else key_row[index]
        key = (
            EffectiveLimit(default, "default")
            if key_value is None
            else EffectiveLimit(key_value, "key override")
        )
        found.append(_tightest(key, user))
    return found[0], found[1]


# --- Counters -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter to charge: `per_minute` units, of which this request costs `cost`."""

    key: str
    per_minute: int
    cost: int
    # "requests" or "tokens", and whose: "your account", "this API key", ...
    unit: str
    holder: str
    # Whose limit, for programs: "user", "key" or "endpoint".
    scope: str = ""

    @property
    def increment(self) -> float:
        """Seconds of the window this request uses up."""
        return self.cost * PERIOD / self.per_minute


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a rate-limit check; a refusal says which limit and until when."""

    allowed: bool
    limit: Limit | None = None
    # Seconds until the request would fit; None when it never can (it is
    # larger than the whole per-minute allowance).
    retry_after: float | None = None
    # The counters checked (and watched) and their arrival times once this
    # was decided, at `at`: `states` turns them into what is left, only for
    # the callers that ask (most do not, and it costs microseconds each).
    counters: tuple[Limit, ...] = ()
    tats: tuple[float, ...] = ()
    at: float = 0.0

    @property
    def states(self) -> tuple[LimitState, ...]:
        """What is left of each counter checked; empty when none was."""
        return tuple(
            state_of(limit, tat, self.at)
            for limit, tat in zip(self.counters, self.tats, strict=True)
        )

    @property
    def message(self) -> str:
        """A sentence for the person or program that was refused: whose limit, when.

        "Your limit of 5 requests per minute is used up; it resets in 23 s."
        """
        if self.allowed or self.limit is None:
            return ""
        limit = self.limit
        allowance = f"limit of {_amount(limit.per_minute, limit.unit)} per minute"
        if self.retry_after is None:
            return (
                f"This request needs {_amount(limit.cost, limit.unit)}, more than "
                f"{_whose(limit, start=False)} {allowance}."
            )
        wait = max(1, math.ceil(self.retry_after))
        return f"{_whose(limit)} {allowance} is used up; it resets in {wait} s."


def _amount(count: int, unit: str) -> str:
    """ "1 request", "5 requests", "1,000 tokens"."""
    return f"{count:,} {unit.removesuffix('s') if count == 1 else unit}"


def _whose(limit: Limit, *, start: bool = True) -> str:
    """Whose limit it is, as a possessive: "Your", "This API key's", "demo's"."""
    if limit.scope == "user":
        return "Your" if start else "your"
    if limit.scope == "key":
        return "This API key's" if start else "this API key's"
    # An endpoint's name is written as its admin wrote it.
    return f"{limit.holder}'s"


ALLOWED = Decision(allowed=True)


@dataclass(frozen=True, slots=True)
class LimitState:
    """What is left of one per-minute limit at one instant.

    `remaining` is how many more units (requests or tokens) would be admitted
    now; `resets_in` is the seconds until the limit is whole again (its full
    allowance free), which is what OpenAI's x-ratelimit-reset-* headers say.
    Once something is left, the next unit always fits at once; when nothing
    is, one more unit fits after resets_in - (limit - 1) * 60 / limit seconds.
    """

    scope: str  # "user", "key" or "endpoint"
    kind: str  # "requests" or "tokens"
    limit: int  # per minute
    remaining: int  # never negative
    resets_in: float  # seconds, never negative

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the chat's frames and page."""
        return {
            "scope": self.scope,
            "kind": self.kind,
            "limit": self.limit,
            "remaining": self.remaining,
            "resets_in": round(self.resets_in, 1),
        }


# Float noise allowed when a counter is compared with the window: timestamps
# near 1.8e9 s are exact only to 2.4e-7 s, and sums of 60 / limit are inexact.
_SLACK = 1e-4


def state_of(limit: Limit, tat: float | None, now: float) -> LimitState:
    """The state of a counter whose theoretical arrival time is `tat` (None: idle)."""
    used = 0.0 if tat is None else max(0.0, tat - now)
    free = (PERIOD - used + _SLACK) * limit.per_minute / PERIOD
    remaining = min(limit.per_minute, max(0, math.floor(free)))
    return LimitState(limit.scope, limit.unit, limit.per_minute, remaining, used)


class _LocalCounters:
    """GCRA on any Django cache, made atomic by a lock: right for one process."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.lock = threading.Lock()

    def acquire(
        self, limits: Sequence[Limit], watched: Sequence[Limit], now: float
    ) -> tuple[int, float, list[float]]:
        with self.lock:
            keys = [limit.key for limit in [*limits, *watched]]
            stored = self.cache.get_many(keys)
            tats = [max(float(stored.get(key, now)), now) for key in keys]
            after = [
                tat + limit.increment
                for tat, limit in zip(tats[: len(limits)], limits, strict=True)
            ]
            worst, worst_wait = -1, 0.0
            for index, tat in enumerate(after):
                wait = tat - PERIOD - now
                if wait > _SLACK and wait > worst_wait:
                    worst, worst_wait = index, wait
            if worst >= 0:
                return worst, worst_wait, tats
            for limit, tat in zip(limits, after, strict=True):
                self.cache.set(limit.key, tat, math.ceil(tat - now) + 1)
            return -1, 0.0, after + tats[len(limits) :]

    def peek(self, keys: Sequence[str]) -> list[float | None]:
        stored = self.cache.get_many(keys)
        return [None if key not in stored else float(stored[key]) for key in keys]

    def adjust(self, changes: Sequence[tuple[str, float]], now: float) -> None:
        with self.lock:
            stored = self.cache.get_many([key for key, _ in changes])
            for key, seconds in changes:
                tat = max(float(stored.get(key, now)), now) + seconds
                if tat <= now:
                    self.cache.delete(key)
                else:
                    self.cache.set(key, tat, math.ceil(tat - now) + 1)


# KEYS: the counters to charge, then those only to read. ARGV: now, period,
# slack, how many to charge, then each charged counter's increment (seconds).
# Returns {index of the refusing counter (1-based) or 0, seconds to wait, then
# every counter's arrival time as it stands afterwards}, which tell what is
# left of each limit without a second round trip.
# Numbers go back as strings: Redis would truncate a Lua number to an integer.
_ACQUIRE_LUA = """
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local charged = tonumber(ARGV[4])
local worst, worst_wait = 0, 0
local tats, after = {}, {}
for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    tats[i] = tat
    if i <= charged then
        after[i] = tat + tonumber(ARGV[i + 4])
        local wait = after[i] - period - now
        if wait > slack and wait > worst_wait then worst, worst_wait = i, wait end
    end
end
if worst == 0 then
    for i = 1, charged do
        tats[i] = after[i]
        redis.call('SET', KEYS[i], string.format('%.17g', after[i]),
                   'PX', math.ceil((after[i] - now) * 1000) + 1000)
    end
end
local reply = {worst, tostring(worst_wait)}
for i = 1, #KEYS do reply[i + 2] = string.format('%.17g', tats[i]) end
return reply
"""

# KEYS: the counters. ARGV: now, then each counter's change in seconds.
_ADJUST_LUA = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[i + 1])
    if tat <= now then
        redis.call('DEL', key)
    else
        redis.call('SET', key, string.format('%.17g', tat),
                   'PX', math.ceil((tat - now) * 1000) + 1000)
    end
end
return 0
"""


class _RedisCounters:
    """GCRA in Redis: every check is one atomic script, shared by all processes."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        # One client on the pool of Django's cache, kept: Django builds a new
        # redis.Redis per call, which costs more than the round trip itself.
        client = cache._cache.get_client(write=True)
        self._client = client
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._adjust = client.register_script(_ADJUST_LUA)

    def acquire(
        self, limits: Sequence[Limit], watched: Sequence[Limit], now: float
    ) -> tuple[int, float, list[float]]:
        keys = [self.cache.make_key(limit.key) for limit in [*limits, *watched]]
        args = [
            repr(now),
            repr(PERIOD),
            repr(_SLACK),
            str(len(limits)),
            *(repr(limit.increment) for limit in limits),
        ]
        index, wait, *tats = self._acquire(keys=keys, args=args)
        return int(index) - 1, float(wait), [float(tat) for tat in tats]

    def peek(self, keys: Sequence[str]) -> list[float | None]:
        # The scripts store plain numbers, which Django's cache would not
        # unpickle: read them raw, all in one MGET.
        values = self._client.mget([self.cache.make_key(key) for key in keys])
        return [None if value is None else float(value) for value in values]

    def adjust(self, changes: Sequence[tuple[str, float]], now: float) -> None:
        keys = [self.cache.make_key(key) for key, _ in changes]
        args = [repr(now), *(repr(seconds) for _, seconds in changes)]
        self._adjust(keys=keys, args=args)


@memoize
def _counters() -> _LocalCounters | _RedisCounters:
    from django.core.cache.backends.redis import RedisCache

    cache = caches[getattr(settings, "RATE_LIMIT_CACHE", "default")]
    if isinstance(cache, RedisCache):
        return _RedisCounters(cache)
    return _LocalCounters(cache)


@receiver(setting_changed)
def _reset_backend(*, setting: str, **kwargs: Any) -> None:
    if setting in {"CACHES", "RATE_LIMIT_CACHE"}:
        _counters.cache_clear()
    if setting in {"RATE_LIMIT_RPM", "RATE_LIMIT_TPM", "GATEWAY_POLICY_CACHE_SECONDS"}:
        _caller_limits.clear()


def acquire(
    limits: Sequence[Limit],
    now: float | None = None,
    *,
    watch: Sequence[Limit] = (),
) -> Decision:
    """Charge every limit, or none of them when one would be exceeded.

    The decision's `states` say what is left of each limit afterwards, and of
    the `watch` limits, read in the same round trip and never charged.
    """
    limits = [limit for limit in limits if limit.per_minute > 0 and limit.cost > 0]
    if not limits:
        return ALLOWED
    for limit in limits:
        if limit.cost > limit.per_minute:
            return Decision(allowed=False, limit=limit, retry_after=None)
    watched = [limit for limit in watch if limit.per_minute > 0]
    at = time.time() if now is None else now
    index, wait, tats = _counters().acquire(limits, watched, at)
    counters, seen = (*limits, *watched), tuple(tats)
    if index < 0:
        return Decision(allowed=True, counters=counters, tats=seen, at=at)
    return Decision(
        allowed=False,
        limit=limits[index],
        retry_after=wait,
        counters=counters,
        tats=seen,
        at=at,
    )


def adjust(changes: Sequence[tuple[Limit, int]], now: float | None = None) -> None:
    """Charge (or refund, when negative) tokens known only after the request."""
    moves = [
        (limit.key, tokens * PERIOD / limit.per_minute)
        for limit, tokens in changes
        if limit.per_minute > 0 and tokens
    ]
    if moves:
        _counters().adjust(moves, time.time() if now is None else now)


# --- Callers and endpoints ----------------------------------------------------


def caller_token_limits(
    user_id: int | None, api_key_id: int | None, limits: CallerLimits, tokens: int
) -> list[Limit]:
    """The tokens-per-minute counters of a caller, charged `tokens`."""
    found = []
    if user_id is not None:
        found.append(
            Limit(
                f"{KEY_PREFIX}:u:{user_id}:t",
                limits.user_tpm,
                tokens,
                "tokens",
                "your account",
                "user",
            )
        )
    if api_key_id is not None:
        found.append(
            Limit(
                f"{KEY_PREFIX}:k:{api_key_id}:t",
                limits.key_tpm,
                tokens,
                "tokens",
                "this API key",
                "key",
            )
        )
    return found


def caller_request_limits(
    user_id: int | None, api_key_id: int | None, limits: CallerLimits
) -> list[Limit]:
    """The requests-per-minute counters of a caller, charged one request."""
    found = []
    if user_id is not None:
        found.append(
            Limit(
                f"{KEY_PREFIX}:u:{user_id}:r",
                limits.user_rpm,
                1,
                "requests",
                "your account",
                "user",
            )
        )
    if api_key_id is not None:
        found.append(
            Limit(
                f"{KEY_PREFIX}:k:{api_key_id}:r",
                limits.key_rpm,
                1,
                "requests",
                "this API key",
                "key",
            )
        )
    return found


def _caller_counters(
    user_id: int | None, api_key_id: int | None, policy: CallerLimits
) -> list[Limit]:
    """Every counter of a caller that has a limit: requests, then tokens."""
    return [
        limit
        for limit in caller_request_limits(user_id, api_key_id, policy)
        + caller_token_limits(user_id, api_key_id, policy, 0)
        if limit.per_minute > 0
    ]


def _read_states(counters: Sequence[Limit], now: float | None) -> list[LimitState]:
    if not counters:
        return []
    tats = _counters().peek([limit.key for limit in counters])
    at = time.time() if now is None else now
    return [state_of(limit, tat, at) for limit, tat in zip(counters, tats, strict=True)]


def caller_limit_states(
    user_id: int | None, api_key_id: int | None, now: float | None = None
) -> list[LimitState]:
    """What is left of every per-minute limit of a caller; reads, never counts.

    One state per limit that applies (none when none does): requests, then
    tokens; the user's before the key's. One cache round trip for them all.
    """
    policy = caller_limits(user_id, api_key_id)
    return _read_states(_caller_counters(user_id, api_key_id, policy), now)


async def acaller_limit_states(
    user_id: int | None, api_key_id: int | None, now: float | None = None
) -> list[LimitState]:
    """`caller_limit_states` from async code."""
    policy = await acaller_limits(user_id, api_key_id)
    return _read_states(_caller_counters(user_id, api_key_id, policy), now)


async def check_caller(
    user_id: int | None, api_key_id: int | None, tokens: int
) -> Decision:
    """Admit one request of `tokens` prompt tokens for a user and/or API key."""
    limits = await acaller_limits(user_id, api_key_id)
    return acquire(
        caller_request_limits(user_id, api_key_id, limits)
        + caller_token_limits(user_id, api_key_id, limits, tokens)
    )


async def check_caller_requests(
    user_id: int | None, api_key_id: int | None
) -> Decision:
    """Count one request against a caller's requests per minute.

    Its states also tell what is left of the caller's tokens per minute, read
    in the same round trip, so a refusal can report them too.
    """
    limits = await acaller_limits(user_id, api_key_id)
    return acquire(
        caller_request_limits(user_id, api_key_id, limits),
        watch=caller_token_limits(user_id, api_key_id, limits, 0),
    )


async def check_caller_tokens(
    user_id: int | None, api_key_id: int | None, tokens: int
) -> Decision:
    """Count prompt tokens against a caller's tokens per minute."""
    limits = await acaller_limits(user_id, api_key_id)
    return acquire(caller_token_limits(user_id, api_key_id, limits, tokens))


async def settle_caller(
    user_id: int | None, api_key_id: int | None, charged: int, used: int
) -> None:
    """Bring a caller's token counters from the `charged` tokens to the `used` ones."""
    if used == charged:
        return
    limits = await acaller_limits(user_id, api_key_id)
    adjust(
        [
            (limit, used - charged)
            for limit in caller_token_limits(user_id, api_key_id, limits, 0)
        ]
    )


def endpoint_limits(endpoint: Any, tokens: int) -> list[Limit]:
    """The counters of an endpoint (anything with id, name, rpm_limit, tpm_limit)."""
    found = []
    holder = str(endpoint.name)
    if endpoint.rpm_limit:
        found.append(
            Limit(
                f"{KEY_PREFIX}:e:{endpoint.id}:r",
                endpoint.rpm_limit,
                1,
                "requests",
                holder,
                "endpoint",
            )
        )
    if endpoint.tpm_limit:
        found.append(
            Limit(
                f"{KEY_PREFIX}:e:{endpoint.id}:t",
                endpoint.tpm_limit,
                tokens,
                "tokens",
                holder,
                "endpoint",
            )
        )
    return found


def check_endpoint(endpoint: Any, tokens: int) -> Decision:
    """Admit one upstream request of `tokens` tokens to an endpoint."""
    if not (endpoint.rpm_limit or endpoint.tpm_limit) or endpoint.id is None:
        return ALLOWED
    return acquire(endpoint_limits(endpoint, tokens))


async def admit_endpoint(endpoint: Any, tokens: int) -> bool:
    """The router's `admit` hook: whether an endpoint has room for this request."""
    return check_endpoint(endpoint, tokens).allowed


def settle_endpoint(endpoint: Any, charged: int, used: int) -> None:
    """Bring an endpoint's token counter from the `charged` tokens to the `used`."""
    if used != charged and endpoint.tpm_limit and endpoint.id is not None:
        limits = [lim for lim in endpoint_limits(endpoint, 0) if lim.unit == "tokens"]
        adjust([(limit, used - charged) for limit in limits])
