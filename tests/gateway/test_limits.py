"""Rate limits per user, API key and endpoint, on local memory or shared Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import time_machine

from gateway import limits
from gateway.models import ApiKey, UserLimits
from tests.gateway.usage_support import close_thread_connections

START = "2026-03-02 10:00:00+00:00"


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.RATE_LIMIT_RPM = 5
    settings.RATE_LIMIT_TPM = 0
    limits._caller_limits.clear()
    yield
    limits._caller_limits.clear()
    close_thread_connections()


@pytest.fixture
def frozen():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@dataclass
class FakeEndpoint:
    id: int | None
    name: str = "primary"
    rpm_limit: int | None = None
    tpm_limit: int | None = None


def admitted(user_id, api_key_id=None, tokens=10, times=1):
    """How many of `times` requests are admitted."""
    return sum(
        limits.acquire(
            limits.caller_request_limits(
                user_id, api_key_id, limits.caller_limits(user_id, api_key_id)
            )
            + limits.caller_token_limits(
                user_id,
                api_key_id,
                limits.caller_limits(user_id, api_key_id),
                tokens,
            )
        ).allowed
        for _ in range(times)
    )


async def test_a_user_gets_five_requests_a_minute_then_a_retry_after(db, owner, frozen):
    decisions = [await limits.check_caller(owner.pk, None, 10) for _ in range(6)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    refused = decisions[-1]
    # A minute's allowance spread evenly: the next slot opens in 60 / 5 s.
    assert refused.retry_after == pytest.approx(12.0)
    assert refused.message == (
        "Your limit of 5 requests per minute is used up; it resets in 12 s."
    )


@pytest.mark.django_db
def test_the_window_slides_rather_than_resetting(owner, frozen):
    assert admitted(owner.pk, times=5) == 5

    frozen.shift(11.9)
    assert admitted(owner.pk) == 0
    frozen.shift(0.2)
    assert admitted(owner.pk, times=2) == 1
    frozen.shift(60)
    assert admitted(owner.pk, times=6) == 5


@pytest.mark.django_db
def test_a_users_own_limit_overrides_the_default(owner, other_user, frozen):
    UserLimits.objects.create(user=owner, rpm_limit=2)

    assert admitted(owner.pk, times=4) == 2
    assert admitted(other_user.pk, times=6) == 5


@pytest.mark.django_db
def test_zero_means_no_limit(owner, frozen, settings):
    UserLimits.objects.create(user=owner, rpm_limit=0)

    assert admitted(owner.pk, times=50) == 50


@pytest.mark.django_db
def test_an_api_key_counts_against_its_own_limit_and_its_users(owner, frozen):
    key, _ = ApiKey.generate(owner, "script")
    key.rpm_limit = 3
    key.save()

    assert admitted(owner.pk, key.pk, times=4) == 3
    # The user's own window saw only the three admitted requests.
    assert admitted(owner.pk, times=5) == 2


@pytest.mark.django_db
def test_a_refused_request_charges_none_of_its_counters(owner, frozen):
    key, _ = ApiKey.generate(owner, "script")
    key.rpm_limit = 1
    key.save()

    assert admitted(owner.pk, key.pk, times=10) == 1
    assert admitted(owner.pk, times=10) == 4


@pytest.mark.django_db
def test_tokens_per_minute_refuse_until_the_tokens_have_drained(
    owner, frozen, settings
):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()

    assert admitted(owner.pk, tokens=600) == 1
    decision = limits.acquire(
        limits.caller_token_limits(
            owner.pk, None, limits.caller_limits(owner.pk, None), 600
        )
    )

    assert not decision.allowed
    # 1,200 tokens need 72 s of a 1,000-per-minute allowance: 12 s past the minute.
    assert decision.retry_after == pytest.approx(12.0)
    assert decision.message == (
        "Your limit of 1,000 tokens per minute is used up; it resets in 12 s."
    )


@pytest.mark.django_db
def test_a_request_larger_than_the_whole_allowance_is_told_so(owner, frozen, settings):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()

    decision = limits.acquire(
        limits.caller_token_limits(
            owner.pk, None, limits.caller_limits(owner.pk, None), 1500
        )
    )

    assert decision.retry_after is None
    assert decision.message == (
        "This request needs 1,500 tokens, more than your limit of 1,000 tokens "
        "per minute."
    )


async def test_settling_gives_back_tokens_that_were_not_used(
    db, owner, frozen, settings
):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()

    assert (await limits.check_caller(owner.pk, None, 900)).allowed
    assert not (await limits.check_caller(owner.pk, None, 900)).allowed
    await limits.settle_caller(owner.pk, None, charged=900, used=100)

    assert (await limits.check_caller(owner.pk, None, 850)).allowed


async def test_settling_charges_tokens_learned_after_admission(
    db, owner, frozen, settings
):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()

    assert (await limits.check_caller(owner.pk, None, 100)).allowed
    await limits.settle_caller(owner.pk, None, charged=100, used=950)

    decision = await limits.check_caller(owner.pk, None, 100)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(3.0)


async def test_an_endpoint_over_its_rpm_is_not_admitted(frozen):
    endpoint = FakeEndpoint(id=7, rpm_limit=2)

    assert [await limits.admit_endpoint(endpoint, 100) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    frozen.shift(30)
    assert await limits.admit_endpoint(endpoint, 100)


async def test_an_endpoint_over_its_tpm_is_not_admitted(frozen):
    endpoint = FakeEndpoint(id=7, tpm_limit=1000)

    assert await limits.admit_endpoint(endpoint, 800)
    assert not await limits.admit_endpoint(endpoint, 800)
    limits.settle_endpoint(endpoint, charged=800, used=100)
    assert await limits.admit_endpoint(endpoint, 800)


async def test_an_endpoint_without_limits_is_always_admitted(frozen):
    endpoint = FakeEndpoint(id=7)

    assert all([await limits.admit_endpoint(endpoint, 10**6) for _ in range(100)])


async def test_endpoints_have_separate_counters(frozen):
    first, second = FakeEndpoint(id=1, rpm_limit=1), FakeEndpoint(id=2, rpm_limit=1)

    assert await limits.admit_endpoint(first, 1)
    assert await limits.admit_endpoint(second, 1)
    assert not await limits.admit_endpoint(first, 1)


@pytest.mark.django_db
def test_a_saved_limit_applies_to_the_next_request(owner, frozen):
    assert admitted(owner.pk, times=3) == 3
    UserLimits.objects.create(user=owner, rpm_limit=2)

    assert admitted(owner.pk) == 0


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import django
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    django.setup()
    from gateway import limits
    user_id, start_at = int(sys.argv[1]), float(sys.argv[2])
    policy = limits.CallerLimits(user_rpm=5, user_tpm=0, key_rpm=0, key_tpm=0)
    while time.time() < start_at:
        time.sleep(0.001)
    allowed = 0
    for _ in range(20):
        if limits.acquire(limits.caller_request_limits(user_id, None, policy)).allowed:
            allowed += 1
    print(allowed)
    """
)


@pytest.mark.skipif(
    not os.environ.get("REDIS_URL"),
    reason="needs REDIS_URL: only Redis shares rate limits between processes",
)
def test_limits_hold_across_two_processes_sharing_redis(tmp_path):
    import time

    root = Path(__file__).resolve().parents[2]
    start_at = time.time() + 2.0
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, "4242", repr(start_at)],
            cwd=root,
            env={**os.environ, "DATA_DIR": str(tmp_path)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    counts = [int(child.communicate(timeout=60)[0].strip()) for child in children]

    # 40 attempts in the same instant from two processes: one allowance of 5.
    assert sum(counts) == 5


# --- What is left -------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
def backend(request, settings):
    """The counters on local memory, then on Redis when there is one."""
    if request.param == "local":
        location = {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "limit-states",
        }
    else:
        if not os.environ.get("REDIS_URL"):
            pytest.skip("needs REDIS_URL")
        location = {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
            "KEY_PREFIX": "limit-states-test",
        }
    settings.CACHES = {**settings.CACHES, "limits": location}
    settings.RATE_LIMIT_CACHE = "limits"
    from django.core.cache import caches

    caches["limits"].clear()
    yield request.param
    caches["limits"].clear()


def state(scope, kind, limit, remaining, resets_in):
    return limits.LimitState(scope, kind, limit, remaining, pytest.approx(resets_in))


@pytest.mark.django_db
def test_an_idle_caller_has_every_limit_whole(backend, owner, frozen):
    assert limits.caller_limit_states(owner.pk, None) == [
        state("user", "requests", 5, 5, 0.0)
    ]


@pytest.mark.django_db
def test_what_is_left_counts_down_with_each_request(backend, owner, frozen):
    assert admitted(owner.pk, times=2) == 2

    # Two of five used: each frees its slot 12 s after the previous one.
    assert limits.caller_limit_states(owner.pk, None) == [
        state("user", "requests", 5, 3, 24.0)
    ]
    frozen.shift(12)
    assert limits.caller_limit_states(owner.pk, None) == [
        state("user", "requests", 5, 4, 12.0)
    ]


@pytest.mark.django_db
def test_reading_what_is_left_counts_nothing(backend, owner, frozen):
    for _ in range(20):
        limits.caller_limit_states(owner.pk, None)

    assert admitted(owner.pk, times=6) == 5
    assert limits.caller_limit_states(owner.pk, None) == [
        state("user", "requests", 5, 0, 60.0)
    ]


@pytest.mark.django_db
def test_a_caller_without_limits_has_no_states(backend, owner, frozen, settings):
    settings.RATE_LIMIT_RPM = 0

    assert limits.caller_limit_states(owner.pk, None) == []
    assert limits.caller_limit_states(None, None) == []


@pytest.mark.django_db
def test_a_keys_states_cover_the_user_and_the_key_requests_then_tokens(
    backend, owner, frozen, settings
):
    settings.RATE_LIMIT_TPM = 1000
    key, _ = ApiKey.generate(owner, "script")
    key.rpm_limit = 3
    key.tpm_limit = 600
    key.save()
    limits._caller_limits.clear()

    assert admitted(owner.pk, key.pk, tokens=150) == 1

    assert limits.caller_limit_states(owner.pk, key.pk) == [
        state("user", "requests", 5, 4, 12.0),
        state("key", "requests", 3, 2, 20.0),
        state("user", "tokens", 1000, 850, 9.0),
        state("key", "tokens", 600, 450, 15.0),
    ]


async def test_the_async_twin_sees_settled_tokens(backend, db, owner, frozen, settings):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()

    assert (await limits.check_caller(owner.pk, None, 100)).allowed
    await limits.settle_caller(owner.pk, None, charged=100, used=1000)

    assert await limits.acaller_limit_states(owner.pk, None) == [
        state("user", "requests", 5, 4, 12.0),
        state("user", "tokens", 1000, 0, 60.0),
    ]


@pytest.mark.django_db
def test_states_can_be_read_for_a_given_instant(backend, owner, frozen):
    import time

    assert admitted(owner.pk, times=5) == 5

    later = time.time() + 30
    assert limits.caller_limit_states(owner.pk, None, now=later) == [
        state("user", "requests", 5, 2, 30.0)
    ]


async def test_a_counted_request_says_what_is_left_of_requests_and_tokens(
    backend, db, owner, frozen, settings
):
    settings.RATE_LIMIT_TPM = 1000
    limits._caller_limits.clear()
    assert (await limits.check_caller_tokens(owner.pk, None, 400)).allowed

    first = await limits.check_caller_requests(owner.pk, None)
    second = await limits.check_caller_requests(owner.pk, None)

    # The tokens are read in the same round trip, not charged.
    assert first.states == (
        state("user", "requests", 5, 4, 12.0),
        state("user", "tokens", 1000, 600, 24.0),
    )
    assert second.states[0] == state("user", "requests", 5, 3, 24.0)
    assert second.states[1] == first.states[1]


@pytest.mark.django_db
def test_a_refusal_says_what_is_left_without_charging_it(backend, owner, frozen):
    key, _ = ApiKey.generate(owner, "script")
    key.rpm_limit = 1
    key.save()
    policy = limits.caller_limits(owner.pk, key.pk)
    counters = limits.caller_request_limits(owner.pk, key.pk, policy)

    assert limits.acquire(counters).allowed
    refused = limits.acquire(counters)

    assert not refused.allowed
    assert refused.states == (
        state("user", "requests", 5, 4, 12.0),
        state("key", "requests", 1, 0, 60.0),
    )


@pytest.mark.django_db
def test_a_request_that_fits_exactly_is_not_refused_by_rounding(backend, owner, frozen):
    # 60 / 7 s per request: seven of them add up to the minute only roughly.
    UserLimits.objects.create(user=owner, rpm_limit=7)

    assert admitted(owner.pk, times=8) == 7
    assert limits.caller_limit_states(owner.pk, None)[0].remaining == 0


# --- Defaults: the upstream's limits are per endpoint -------------------------


def test_out_of_the_box_no_user_or_key_limit_and_no_endpoint_limit():
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RATE_LIMIT_", "ENDPOINT_"))
    }
    script = (
        "import llmsite.settings as s; "
        "print(s.RATE_LIMIT_RPM, s.RATE_LIMIT_TPM, "
        "s.ENDPOINT_RPM_LIMIT, s.ENDPOINT_TPM_LIMIT)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    assert shown == ["0", "0", "None", "None"]


@pytest.mark.django_db
def test_with_no_limits_set_a_user_is_never_refused(owner, frozen, settings):
    settings.RATE_LIMIT_RPM = 0
    limits._caller_limits.clear()

    assert admitted(owner.pk, times=100) == 100
    assert limits.caller_limit_states(owner.pk, None) == []


@pytest.mark.django_db
def test_a_new_endpoint_takes_the_upstream_limits_from_the_settings(settings):
    from gateway.models import Endpoint

    settings.ENDPOINT_RPM_LIMIT = 5
    settings.ENDPOINT_TPM_LIMIT = 40_000
    limited = Endpoint.objects.create(name="a", base_url="https://a.test/v1")
    chosen = Endpoint.objects.create(
        name="b", base_url="https://b.test/v1", rpm_limit=None, tpm_limit=100
    )
    settings.ENDPOINT_RPM_LIMIT = settings.ENDPOINT_TPM_LIMIT = None
    unlimited = Endpoint.objects.create(name="c", base_url="https://c.test/v1")

    assert (limited.rpm_limit, limited.tpm_limit) == (5, 40_000)
    assert (chosen.rpm_limit, chosen.tpm_limit) == (None, 100)
    assert (unlimited.rpm_limit, unlimited.tpm_limit) == (None, None)
    # Changing the setting later leaves existing endpoints as they are.
    limited.refresh_from_db()
    assert limited.rpm_limit == 5


def test_an_endpoint_refusal_names_the_endpoint(frozen):
    endpoint = FakeEndpoint(id=9, name="demo-primary", rpm_limit=5)
    for _ in range(5):
        limits.check_endpoint(endpoint, 10)

    refused = limits.check_endpoint(endpoint, 10)

    assert refused.message == (
        "demo-primary's limit of 5 requests per minute is used up; it resets in 12 s."
    )


@pytest.mark.django_db
def test_a_key_refusal_says_it_is_the_keys_limit(owner, frozen):
    key, _ = ApiKey.generate(owner, "ci")
    key.rpm_limit = 1
    key.save()
    policy = limits.caller_limits(None, key.pk)
    limits.acquire(limits.caller_request_limits(None, key.pk, policy))

    refused = limits.acquire(limits.caller_request_limits(None, key.pk, policy))

    assert refused.message == (
        "This API key's limit of 1 request per minute is used up; it resets in 60 s."
    )


@pytest.mark.parametrize(
    ("defaults", "user_row", "key_row", "through_key", "shown"),
    [
        ((0, 0), None, None, False, ("default (none)", "default (none)")),
        ((5, 0), None, None, False, ("default (5)", "default (none)")),
        ((0, 0), (7, None), None, False, ("7, user override", "default (none)")),
        ((5, 0), (0, None), None, False, ("no limit, user override", "default (none)")),
        ((0, 0), None, None, True, ("default (none)", "default (none)")),
        ((0, 0), None, (3, 900), True, ("3, key override", "900, key override")),
        # The owner's limit binds a key's requests when it is the tighter one.
        ((0, 0), (2, None), (3, None), True, ("2, user override", "default (none)")),
        ((10, 0), (None, None), (4, None), True, ("4, key override", "default (none)")),
    ],
)
def test_effective_limits_say_where_they_come_from(
    settings, defaults, user_row, key_row, through_key, shown
):
    settings.RATE_LIMIT_RPM, settings.RATE_LIMIT_TPM = defaults

    rpm, tpm = limits.effective_limits(user_row, key_row, through_key=through_key)

    assert (str(rpm), str(tpm)) == shown


@pytest.mark.django_db
def test_the_limits_of_several_users_read_together_are_each_ones_own(
    owner, other_user, django_assert_num_queries
):
    UserLimits.objects.create(user=owner, rpm_limit=2, tpm_limit=900)

    with django_assert_num_queries(1):
        limits.read_users_limits([owner.pk, other_user.pk])
        kept = [limits.caller_limits(u, None) for u in (owner.pk, other_user.pk)]

    limits._caller_limits.clear()
    assert kept == [limits.caller_limits(u, None) for u in (owner.pk, other_user.pk)]
    assert (kept[0].user_rpm, kept[0].user_tpm) == (2, 900)
    assert kept[1].user_rpm == 5
