"""Probe rounds against the simulated upstream: status, counting, scheduling."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db import connection
from django.utils import timezone

from gateway import breaker, crypto
from gateway.models import Endpoint, EndpointStatus, ModelRoute, ProbeMode
from gateway.signals import endpoint_status_changed
from gateway.simulator import Behaviour
from monitoring import probes
from monitoring.conf import Thresholds
from monitoring.models import AlertEvent, AlertKind, ProbeResult, ProbeRollup
from tests.monitoring.conftest import ENDPOINT_KEY

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
THRESHOLDS = Thresholds(slow_ms=500, down_ms=2000, down_after=2)

run_round = async_to_sync(probes.run_round)


@pytest.fixture
def transitions():
    """Every endpoint_status_changed sent, as (name, old, new, reason)."""
    seen: list[tuple[str, str, str, str]] = []

    def receiver(sender, *, endpoint, old_status, new_status, reason, **kwargs):
        seen.append((endpoint.name, old_status, new_status, reason))

    endpoint_status_changed.connect(receiver, dispatch_uid="test-transitions")
    yield seen
    endpoint_status_changed.disconnect(dispatch_uid="test-transitions")


@pytest.mark.parametrize(
    ("ok", "latency_ms", "expected"),
    [
        (True, 0.0, EndpointStatus.CONNECTED),
        (True, 499.9, EndpointStatus.CONNECTED),
        (True, 500.0, EndpointStatus.SLOW),
        (True, 1999.9, EndpointStatus.SLOW),
        (True, 2000.0, EndpointStatus.SLOW),
        (True, 2000.1, EndpointStatus.DISCONNECTED),
        (False, 12.0, EndpointStatus.DISCONNECTED),
        (False, None, EndpointStatus.DISCONNECTED),
    ],
)
def test_it_classifies_a_probe_at_each_threshold(ok, latency_ms, expected):
    assert probes.classify(ok, latency_ms, THRESHOLDS) == expected


def test_the_thresholds_come_from_settings(settings):
    settings.MONITOR_SLOW_MS = 100
    settings.MONITOR_DOWN_MS = 300
    thresholds = Thresholds.from_settings()
    assert probes.classify(True, 150, thresholds) == EndpointStatus.SLOW
    assert probes.classify(True, 301, thresholds) == EndpointStatus.DISCONNECTED


@pytest.mark.parametrize(
    ("current", "failures", "probe", "expected"),
    [
        # Up again at once, whatever came before.
        (EndpointStatus.DISCONNECTED, 5, EndpointStatus.CONNECTED, ("connected", 0)),
        (EndpointStatus.CONNECTED, 1, EndpointStatus.SLOW, ("slow", 0)),
        # One failure is counted, not acted on...
        (EndpointStatus.CONNECTED, 0, EndpointStatus.DISCONNECTED, ("connected", 1)),
        # ...the second in a row marks it down.
        (EndpointStatus.SLOW, 1, EndpointStatus.DISCONNECTED, ("disconnected", 2)),
        # Never up: nothing to flap from.
        (EndpointStatus.UNKNOWN, 0, EndpointStatus.DISCONNECTED, ("disconnected", 1)),
    ],
)
def test_it_marks_an_endpoint_down_only_after_failures_in_a_row(
    current, failures, probe, expected
):
    assert probes.next_health(current, failures, probe, THRESHOLDS) == expected


def test_a_round_probes_every_due_endpoint_and_records_results(
    make_endpoint, fast_monitor, django_capture_on_commit_callbacks, transitions
):
    endpoints = [make_endpoint() for _ in range(3)]
    with django_capture_on_commit_callbacks(execute=True):
        report = run_round()

    assert report.probed == 3
    assert report.by_status == {"connected": 3}
    for endpoint in endpoints:
        endpoint.refresh_from_db()
        assert endpoint.status == EndpointStatus.CONNECTED
        assert endpoint.last_checked_at is not None
        assert endpoint.last_latency_ms < 150
        assert endpoint.next_probe_at == pytest.approx(
            endpoint.last_checked_at + timedelta(seconds=300), abs=timedelta(seconds=2)
        )
    results = ProbeResult.objects.order_by("endpoint_id")
    assert [(r.endpoint_id, r.status, r.http_status) for r in results] == [
        (e.pk, "connected", 200) for e in endpoints
    ]
    assert sorted(transitions) == [
        (e.name, "unknown", "connected", "probe") for e in endpoints
    ]


def test_a_round_skips_endpoints_not_yet_due_and_disabled_ones(
    make_endpoint, fast_monitor
):
    due = make_endpoint()
    later = make_endpoint(next_probe_at=timezone.now() + timedelta(minutes=5))
    off = make_endpoint(enabled=False)

    report = run_round()

    assert report.probed == 1
    assert set(ProbeResult.objects.values_list("endpoint_id", flat=True)) == {due.pk}
    later.refresh_from_db()
    off.refresh_from_db()
    assert later.status == off.status == EndpointStatus.UNKNOWN


def test_a_claimed_endpoint_is_not_claimed_again(make_endpoint, fast_monitor):
    make_endpoint()
    first = probes.claim_due()
    second = probes.claim_due()
    assert len(first) == 1
    assert second == []


def test_slow_and_too_slow_answers_are_classified_from_real_latency(
    upstream, make_endpoint, fast_monitor
):
    fast = make_endpoint()
    slow = make_endpoint()
    too_slow = make_endpoint()
    upstream.set_behaviour(Behaviour(latency=0.25), prefix="e/2")
    upstream.set_behaviour(Behaviour(latency=0.7), prefix="e/3")

    run_round()

    outcome = {r.endpoint_id: r for r in ProbeResult.objects.all()}
    assert outcome[fast.pk].status == EndpointStatus.CONNECTED
    assert outcome[slow.pk].status == EndpointStatus.SLOW
    assert 250 <= outcome[slow.pk].latency_ms < 600
    assert outcome[too_slow.pk].status == EndpointStatus.DISCONNECTED
    assert "over 600 ms" in outcome[too_slow.pk].error
    too_slow.refresh_from_db()
    assert too_slow.status == EndpointStatus.DISCONNECTED


def test_failures_are_counted_then_mark_it_down_and_recovery_is_detected(
    upstream,
    make_endpoint,
    fast_monitor,
    django_capture_on_commit_callbacks,
    transitions,
):
    endpoint = make_endpoint(status=EndpointStatus.CONNECTED)
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="e/1")

    with time_machine.travel(T0, tick=False) as clock:
        with django_capture_on_commit_callbacks(execute=True):
            run_round()
        endpoint.refresh_from_db()
        # One failure: counted, still connected, looked at again soon.
        assert endpoint.status == EndpointStatus.CONNECTED
        assert endpoint.probe_failures == 1
        assert endpoint.next_probe_at == T0 + timedelta(seconds=30)
        assert transitions == []

        clock.shift(31)
        with django_capture_on_commit_callbacks(execute=True):
            run_round()
        endpoint.refresh_from_db()
        assert endpoint.status == EndpointStatus.DISCONNECTED
        assert endpoint.probe_failures == 2
        assert endpoint.status_changed_at == T0 + timedelta(seconds=31)
        assert endpoint.next_probe_at == T0 + timedelta(seconds=31 + 300)

        # Still failing: no second transition.
        clock.shift(301)
        with django_capture_on_commit_callbacks(execute=True):
            run_round()
        endpoint.refresh_from_db()
        assert endpoint.probe_failures == 3

        upstream.set_behaviour(Behaviour(), prefix="e/1")
        clock.shift(301)
        with django_capture_on_commit_callbacks(execute=True):
            run_round()
        endpoint.refresh_from_db()

    assert endpoint.status == EndpointStatus.CONNECTED
    assert endpoint.probe_failures == 0
    assert transitions == [
        (endpoint.name, "connected", "disconnected", "probe"),
        (endpoint.name, "disconnected", "connected", "probe"),
    ]
    errors = list(
        ProbeResult.objects.order_by("checked_at").values_list("http_status", "status")
    )
    assert errors == [
        (503, "disconnected"),
        (503, "disconnected"),
        (503, "disconnected"),
        (200, "connected"),
    ]


def test_a_healthy_probe_reenables_an_endpoint_the_breaker_disabled(
    make_endpoint, fast_monitor, django_capture_on_commit_callbacks, transitions
):
    endpoint = make_endpoint(
        status=EndpointStatus.DISCONNECTED,
        consecutive_failures=3,
        disabled_until=timezone.now() + timedelta(minutes=1),
    )

    with django_capture_on_commit_callbacks(execute=True):
        report = run_round()

    endpoint.refresh_from_db()
    assert report.reenabled == 1
    assert endpoint.disabled_until is None
    assert endpoint.consecutive_failures == 0
    assert endpoint.status == EndpointStatus.CONNECTED
    # Announced once, by whichever got there first.
    assert len(transitions) == 1
    assert transitions[0][1:3] == ("disconnected", "connected")


def test_a_failing_probe_leaves_the_breaker_alone(
    upstream, make_endpoint, fast_monitor
):
    until = timezone.now() + timedelta(minutes=1)
    endpoint = make_endpoint(
        status=EndpointStatus.DISCONNECTED, consecutive_failures=3, disabled_until=until
    )
    upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")

    run_round()

    endpoint.refresh_from_db()
    assert endpoint.disabled_until == until
    assert endpoint.consecutive_failures == 3


def circuit_after_a_round(endpoint: Endpoint) -> tuple[datetime, datetime]:
    """Run one round at T0; the endpoint's disabled_until and next_probe_at after."""
    with time_machine.travel(T0, tick=False):
        run_round()
    endpoint.refresh_from_db()
    return endpoint.disabled_until, endpoint.next_probe_at


def cooled_down(make_endpoint, **fields: Any) -> Endpoint:
    """An endpoint whose circuit's cooldown ended at T0, its probe due then."""
    return make_endpoint(
        status=EndpointStatus.DISCONNECTED,
        consecutive_failures=3,
        disabled_until=T0,
        next_probe_at=T0,
        **fields,
    )


def test_a_failing_probe_of_an_open_circuit_comes_back_when_it_ends(
    upstream, make_endpoint, fast_monitor
):
    endpoint = make_endpoint(
        status=EndpointStatus.DISCONNECTED,
        consecutive_failures=3,
        disabled_until=T0 + timedelta(seconds=60),
    )
    upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")

    # Not the probe interval: the circuit's end is when the next probe counts.
    assert circuit_after_a_round(endpoint) == (T0 + timedelta(seconds=60),) * 2


def test_a_probe_after_the_cooldown_is_the_trial_and_a_failure_backs_off(
    upstream, make_endpoint, fast_monitor
):
    endpoint = cooled_down(make_endpoint, cooldown_seconds=60)
    upstream.set_behaviour(Behaviour(fault="status", fault_status=503), prefix="e/1")

    with time_machine.travel(T0, tick=False) as clock:
        report = run_round()
        endpoint.refresh_from_db()
        # Re-opened for another cooldown, and probed again when that ends.
        assert (report.probed, report.reopened) == (1, 1)
        assert endpoint.disabled_until == T0 + timedelta(seconds=60)
        assert endpoint.next_probe_at == T0 + timedelta(seconds=60)
        assert endpoint.consecutive_failures == 4

        # Not a tight loop: nothing is due until the cooldown is over.
        clock.shift(30)
        assert run_round().probed == 0
        clock.shift(30)
        assert run_round().reopened == 1
        endpoint.refresh_from_db()
        assert endpoint.disabled_until == T0 + timedelta(seconds=120)
        assert endpoint.next_probe_at == T0 + timedelta(seconds=120)

        upstream.set_behaviour(Behaviour(), prefix="e/1")
        clock.shift(60)
        report = run_round()

    endpoint.refresh_from_db()
    assert (report.reenabled, report.reopened) == (1, 0)
    assert (endpoint.disabled_until, endpoint.consecutive_failures) == (None, 0)
    assert endpoint.status == EndpointStatus.CONNECTED
    assert endpoint.next_probe_at == T0 + timedelta(seconds=120 + 300)
    assert [r.path for r in upstream.requests] == ["/e/1/v1/models"] * 3


def test_an_endpoint_without_a_cooldown_is_not_probed_in_a_tight_loop(
    upstream, make_endpoint, fast_monitor
):
    endpoint = cooled_down(make_endpoint, cooldown_seconds=0)
    upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")

    # The clock runs: the re-opened "cooldown" ends just after the probe began.
    with time_machine.travel(T0, tick=True):
        assert run_round().reopened == 1

    endpoint.refresh_from_db()
    checked_at = ProbeResult.objects.get().checked_at
    assert endpoint.disabled_until > checked_at
    assert endpoint.next_probe_at == checked_at + probes.REPROBE_GAP


def test_a_trial_a_live_request_holds_is_left_to_it(
    upstream, make_endpoint, fast_monitor
):
    endpoint = cooled_down(make_endpoint)
    upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")
    lease = T0 + timedelta(seconds=20)
    real_claim_trial = breaker.claim_trial

    async def claimed_first(config, now=None):
        # A web process takes the trial between the claim and the probe.
        await Endpoint.objects.filter(pk=config.id).aupdate(disabled_until=lease)
        return await real_claim_trial(config, now)

    with (
        mock.patch.object(breaker, "claim_trial", claimed_first),
        time_machine.travel(T0, tick=False),
    ):
        report = run_round()

    endpoint.refresh_from_db()
    assert report.reopened == 0
    assert (endpoint.disabled_until, endpoint.consecutive_failures) == (lease, 3)
    # Looked at again when that trial's lease runs out.
    assert endpoint.next_probe_at == lease


def test_a_circuit_opened_while_a_probe_ran_keeps_its_earlier_probe(
    upstream, make_endpoint, fast_monitor, monkeypatch
):
    endpoint = make_endpoint(
        status=EndpointStatus.CONNECTED, failure_threshold=1, cooldown_seconds=60
    )
    upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")
    real_probe_all = probes.probe_all

    async def opened_meanwhile(targets, **kwargs):
        outcomes = await real_probe_all(targets, **kwargs)
        await breaker.record_failure(endpoint.pk, threshold=1, cooldown_seconds=60)
        return outcomes

    monkeypatch.setattr(probes, "probe_all", opened_meanwhile)

    assert circuit_after_a_round(endpoint) == (T0 + timedelta(seconds=60),) * 2


def test_one_hanging_endpoint_does_not_delay_the_others(
    upstream, make_endpoint, fast_monitor
):
    fast_monitor.MONITOR_PROBE_TIMEOUT = 0.5
    fast_monitor.MONITOR_CONCURRENCY = 4
    endpoints = [make_endpoint() for _ in range(24)]
    hanging = endpoints[5]
    upstream.set_behaviour(Behaviour(fault="stall"), prefix="e/6")

    started = time.perf_counter()
    report = run_round()
    elapsed = time.perf_counter() - started

    # The stall never ends: the round is bounded by the probe timeout alone.
    assert elapsed < 0.5 + 1.5
    assert report.by_status == {"connected": 23, "disconnected": 1}
    hung = ProbeResult.objects.get(endpoint=hanging)
    assert hung.error == "no answer within 0.5 s"
    assert 450 <= hung.latency_ms < 1000
    others = ProbeResult.objects.exclude(endpoint=hanging)
    assert max(others.values_list("latency_ms", flat=True)) < 150


def test_a_completion_probe_asks_for_one_token_of_the_first_route_model(
    upstream, make_endpoint, fast_monitor
):
    endpoint = make_endpoint(probe_mode=ProbeMode.COMPLETION)
    ModelRoute.objects.create(
        model_name="chat", endpoint=endpoint, upstream_model="sim-large", priority=1
    )
    ModelRoute.objects.create(
        model_name="other", endpoint=endpoint, upstream_model="sim-small", priority=5
    )

    run_round()

    request = upstream.requests[-1]
    assert request.path == "/e/1/v1/chat/completions"
    assert request.json["model"] == "sim-large"
    assert request.json["max_tokens"] == 1
    assert ProbeResult.objects.get().status == EndpointStatus.CONNECTED


def test_a_probe_sends_the_key_but_never_records_it(
    upstream, make_endpoint, fast_monitor
):
    upstream.api_key = "the-right-key-for-this-upstream"
    endpoint = make_endpoint()

    run_round()

    result = ProbeResult.objects.get(endpoint=endpoint)
    assert result.status == EndpointStatus.DISCONNECTED
    assert result.http_status == 401
    assert "sk-monitor-test-secret" not in result.error
    endpoint.refresh_from_db()
    assert endpoint.status == EndpointStatus.DISCONNECTED


def test_an_endpoint_with_unusable_settings_fails_alone(make_endpoint, fast_monitor):
    broken = make_endpoint()
    # Written past the admin's validation, say by a hand-edited import.
    Endpoint.objects.filter(pk=broken.pk).update(
        extra_headers_encrypted=crypto.encrypt('["not", "a", "map"]')
    )
    healthy = make_endpoint()

    report = run_round()

    assert report.probed == 2
    assert ProbeResult.objects.get(endpoint=healthy).status == "connected"
    failed = ProbeResult.objects.get(endpoint=broken)
    assert failed.status == "disconnected"
    assert failed.error.startswith("cannot load its settings")
    # Claimed for its interval, so a bad row is not retried in a tight loop.
    broken.refresh_from_db()
    assert broken.next_probe_at > timezone.now() + timedelta(seconds=200)


def test_an_endpoint_deleted_mid_round_does_not_fail_the_round(
    make_endpoint, fast_monitor
):
    gone = make_endpoint()
    kept = make_endpoint()
    targets = probes.claim_due()
    outcomes = async_to_sync(probes.probe_all)(targets)
    gone.delete()

    report = probes.record(outcomes)

    assert report.results == 1
    assert list(ProbeResult.objects.values_list("endpoint_id", flat=True)) == [kept.pk]


def test_a_status_changed_meanwhile_by_the_breaker_is_respected(
    make_endpoint, fast_monitor, django_capture_on_commit_callbacks, transitions
):
    endpoint = make_endpoint(status=EndpointStatus.CONNECTED)
    targets = probes.claim_due()
    outcomes = async_to_sync(probes.probe_all)(targets)
    # The breaker opened while the probe was in flight.
    Endpoint.objects.filter(pk=endpoint.pk).update(status=EndpointStatus.DISCONNECTED)

    with django_capture_on_commit_callbacks(execute=True):
        report = probes.record(outcomes)

    endpoint.refresh_from_db()
    assert endpoint.status == EndpointStatus.CONNECTED
    assert report.transitions == [(endpoint.pk, "disconnected", "connected")]
    assert transitions == [(endpoint.name, "disconnected", "connected", "probe")]


def test_prune_deletes_only_results_older_than_the_retention(make_endpoint, settings):
    settings.MONITOR_RETENTION_DAYS = 30
    endpoint = make_endpoint()
    now = timezone.now()
    for days in (45, 31, 29, 1):
        ProbeResult.objects.create(
            endpoint=endpoint,
            checked_at=now - timedelta(days=days),
            status=EndpointStatus.CONNECTED,
        )

    assert probes.prune(now, batch=1) == 2

    left = sorted(
        (now - r).days for r in ProbeResult.objects.values_list("checked_at", flat=True)
    )
    assert left == [1, 29]


def test_hourly_rollups_stay_exact_over_several_rounds(
    upstream, make_endpoint, fast_monitor
):
    endpoint = make_endpoint()
    with time_machine.travel(T0, tick=False) as clock:
        run_round()  # 12:00, connected
        upstream.set_behaviour(Behaviour(latency=0.25), prefix="e/1")
        clock.shift(301)
        run_round()  # 12:05, slow
        upstream.set_behaviour(Behaviour(fault="drop"), prefix="e/1")
        clock.shift(3600)
        run_round()  # 13:05, down

    rollups = {r.hour: r for r in ProbeRollup.objects.filter(endpoint=endpoint)}
    noon = rollups[T0]
    assert (noon.probes, noon.up, noon.slow, noon.latency_count) == (2, 2, 1, 2)
    assert 250 < noon.latency_sum_ms < 600
    one = rollups[T0 + timedelta(hours=1)]
    assert (one.probes, one.up, one.slow, one.latency_count) == (1, 0, 0, 0)
    assert one.latency_sum_ms == 0


def test_prune_drops_rollups_of_hours_past_the_retention(make_endpoint, settings):
    settings.MONITOR_RETENTION_DAYS = 30
    endpoint = make_endpoint()
    now = T0
    for hours in (24 * 31, 24 * 30 + 1, 24 * 30 - 1, 2):
        ProbeRollup.objects.create(
            endpoint=endpoint, hour=now - timedelta(hours=hours), probes=1, up=1
        )

    probes.prune(now)

    left = sorted(
        (now - h) // timedelta(hours=1)
        for h in ProbeRollup.objects.values_list("hour", flat=True)
    )
    assert left == [2, 24 * 30 - 1]


# --- One endpoint never blinds the monitor --------------------------------------------

# What a hostile /models answers: NUL and other control bytes (PostgreSQL
# refuses NUL in text and in JSON), bidirectional overrides, the endpoint's
# key split by a NUL, and far more than a result may hold.
HOSTILE_BODY = (
    b"boom\x00\x01\x1b[31m \xe2\x80\xae reversed "
    + b"sk-monitor-\x00test-secret-0123456789 "
    + b"x" * 5000
)


@pytest.fixture
def hostile_upstream() -> Iterator[str]:
    """A server whose /models answers 500 with HOSTILE_BODY; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(HOSTILE_BODY)))
            self.end_headers()
            self.wfile.write(HOSTILE_BODY)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain words", "plain words"),
        ("nul\x00 and\x07 bell", "nul and bell"),
        ("line\r\nbreaks\tand  tabs", "line breaks and tabs"),
        ("lone \ud800 surrogate", "lone ? surrogate"),
        ("\u202egnp.exe", "gnp.exe"),
        ("zero\u200bwidth", "zerowidth"),
        ("é ü 漢字", "é ü 漢字"),
    ],
)
def test_text_from_an_upstream_is_stripped_before_it_is_stored(text, expected):
    assert probes.storable_text(text, 100) == expected


def test_text_is_redacted_before_it_is_cut():
    secret = "sk-" + "s" * 40
    text = "e" * 90 + secret

    stored = probes.storable_text(text, 100, secrets=(secret,))

    assert stored == "e" * 90 + "[redacted]"
    assert "sk-" not in stored
    assert len(probes.storable_text("x" * 1000, 500)) == 500


def test_a_nul_in_an_error_body_fails_only_its_own_endpoint(
    make_endpoint,
    hostile_upstream,
    fast_monitor,
    django_capture_on_commit_callbacks,
    transitions,
):
    # Healthy endpoints that were down, so their recovery is news.
    healthy = [make_endpoint(status=EndpointStatus.DISCONNECTED) for _ in range(3)]
    hostile = make_endpoint(base_url=hostile_upstream)

    with django_capture_on_commit_callbacks(execute=True):
        report = run_round()

    assert report.probed == 4
    assert report.by_status == {"connected": 3, "disconnected": 1}
    for endpoint in healthy:
        endpoint.refresh_from_db()
        assert endpoint.status == EndpointStatus.CONNECTED
        assert ProbeResult.objects.get(endpoint=endpoint).status == "connected"
    failed = ProbeResult.objects.get(endpoint=hostile)
    assert failed.status == "disconnected"
    assert failed.http_status == 500
    # The escape byte is gone, so "[31m" is harmless text.
    assert failed.error.startswith("server error: boom[31m reversed [redacted] xxx")
    assert len(failed.error) <= probes.ERROR_CHARS
    assert not any(c in failed.error for c in "\x00\x01\x1b\u202e")
    assert ENDPOINT_KEY not in failed.error
    hostile.refresh_from_db()
    assert hostile.status == EndpointStatus.DISCONNECTED
    assert sorted(transitions) == sorted(
        [(e.name, "disconnected", "connected", "probe") for e in healthy]
        + [(hostile.name, "unknown", "disconnected", "probe")]
    )
    alerts = dict(AlertEvent.objects.values_list("endpoint_id", "kind"))
    assert alerts == {
        **{e.pk: AlertKind.ENDPOINT_RECOVERED for e in healthy},
        hostile.pk: AlertKind.ENDPOINT_DOWN,
    }
    down = AlertEvent.objects.get(endpoint=hostile)
    assert down.payload["endpoint"]["error"] == failed.error


def _refuse_writes(table: str, when: str) -> None:
    """Make the database itself refuse some inserts and updates of a table."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION refuse_write() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused by a test trigger'; END $$ "
                "LANGUAGE plpgsql"
            )
            cursor.execute(
                f"CREATE TRIGGER refuse_write BEFORE INSERT OR UPDATE ON {table} "
                f"FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION refuse_write()"
            )
        else:
            for event in ("INSERT", "UPDATE"):
                cursor.execute(
                    f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON {table} "
                    f"WHEN {when} "
                    "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
                )


def _refuse_connected_results_of(endpoint: Endpoint) -> None:
    _refuse_writes(
        ProbeResult._meta.db_table,
        f"NEW.endpoint_id = {endpoint.pk} AND NEW.status = 'connected'",
    )


def test_a_result_the_database_refuses_is_recorded_as_a_failed_probe_alone(
    make_endpoint,
    fast_monitor,
    django_capture_on_commit_callbacks,
    transitions,
    caplog,
):
    endpoints = [make_endpoint(status=EndpointStatus.DISCONNECTED) for _ in range(4)]
    refused = endpoints[1]
    _refuse_connected_results_of(refused)

    with (
        caplog.at_level(logging.WARNING, logger="monitoring.probes"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        report = run_round()

    others = [e for e in endpoints if e != refused]
    results = {r.endpoint_id: r for r in ProbeResult.objects.all()}
    assert {results[e.pk].status for e in others} == {"connected"}
    assert results[refused.pk].status == "disconnected"
    assert results[refused.pk].error.startswith("its result could not be stored (")
    # Each endpoint's transition announced once, the refused one's not at all.
    assert sorted(transitions) == sorted(
        (e.name, "disconnected", "connected", "probe") for e in others
    )
    assert set(AlertEvent.objects.values_list("endpoint_id", flat=True)) == {
        e.pk for e in others
    }
    assert report.transitions and len(report.transitions) == 3
    assert f"Could not store the probe result of endpoint {refused.pk}" in caplog.text
    assert "refused by a test trigger" not in caplog.text


def test_an_endpoint_whose_health_cannot_be_written_is_skipped_alone(
    make_endpoint, fast_monitor, django_capture_on_commit_callbacks, caplog
):
    endpoints = [make_endpoint() for _ in range(3)]
    broken = endpoints[0]
    _refuse_writes(
        Endpoint._meta.db_table,
        f"NEW.id = {broken.pk} AND NEW.last_checked_at IS NOT NULL",
    )

    with (
        caplog.at_level(logging.WARNING, logger="monitoring.probes"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        report = run_round()

    assert report.probed == 3
    assert set(ProbeResult.objects.values_list("endpoint_id", flat=True)) == {
        e.pk for e in endpoints[1:]
    }
    for endpoint in endpoints[1:]:
        endpoint.refresh_from_db()
        assert endpoint.status == EndpointStatus.CONNECTED
    broken.refresh_from_db()
    assert broken.last_checked_at is None
    assert f"Could not record the probe of endpoint {broken.pk}" in caplog.text


def test_a_probe_that_raises_unexpectedly_fails_alone_and_is_logged_redacted(
    make_endpoint, fast_monitor, monkeypatch, caplog
):
    healthy = make_endpoint()
    broken = make_endpoint()
    real_health_check = probes.health_check

    async def health_check(config, **kwargs):
        if config.id == broken.pk:
            raise RuntimeError(f"bug while holding {config.api_key}")
        return await real_health_check(config, **kwargs)

    monkeypatch.setattr(probes, "health_check", health_check)

    with caplog.at_level(logging.ERROR, logger="monitoring.probes"):
        report = run_round()

    assert report.by_status == {"connected": 1, "disconnected": 1}
    assert ProbeResult.objects.get(endpoint=healthy).status == "connected"
    failed = ProbeResult.objects.get(endpoint=broken)
    assert failed.status == "disconnected"
    assert failed.error.startswith("the probe failed unexpectedly (RuntimeError")
    assert f"Probe of endpoint {broken.pk} failed unexpectedly" in caplog.text
    assert "bug while holding [redacted]" in caplog.text
    assert ENDPOINT_KEY not in caplog.text
