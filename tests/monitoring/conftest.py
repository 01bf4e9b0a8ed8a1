"""Fixtures for the monitor: a simulated upstream, endpoints on it, a webhook sink."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.models import Endpoint
from gateway.simulator import SimulatedUpstream

ENDPOINT_KEY = "sk-monitor-test-secret-0123456789"


@pytest.fixture
def upstream() -> Iterator[SimulatedUpstream]:
    """One simulated upstream posing as many endpoints under /e/<n>/v1."""
    server = SimulatedUpstream()
    with server.run_in_thread():
        yield server


@pytest.fixture
def make_endpoint(upstream: SimulatedUpstream):
    """Create an endpoint served by the simulated upstream under its own prefix."""
    numbers = itertools.count(1)

    def make(**fields: Any) -> Endpoint:
        n = next(numbers)
        fields.setdefault("name", f"endpoint-{n}")
        fields.setdefault("base_url", upstream.base_url_for(f"e/{n}"))
        fields.setdefault("api_key", ENDPOINT_KEY)
        return Endpoint.objects.create(**fields)

    return make


@pytest.fixture
def fast_monitor(settings):
    """Small timeouts and thresholds, so tests measure real latencies quickly."""
    settings.MONITOR_PROBE_TIMEOUT = 1.0
    settings.MONITOR_SLOW_MS = 150
    settings.MONITOR_DOWN_MS = 600
    settings.MONITOR_DOWN_AFTER = 2
    settings.MONITOR_RECHECK_SECONDS = 30
    settings.MONITOR_CONCURRENCY = 10
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = ""
    return settings


@dataclass
class WebhookSink:
    """A local HTTP server that records JSON POSTs and answers as scripted."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    # Status codes for the next requests, in order; 200 once they run out.
    replies: list[int] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[WebhookSink]:
    """A webhook receiver on a free local port."""
    lock = threading.Lock()
    sink: WebhookSink

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                status = sink.replies.pop(0) if sink.replies else 200
                sink.received.append(json.loads(body))
                sink.headers.append(dict(self.headers))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = WebhookSink(url=f"http://127.0.0.1:{server.server_port}/hook/token-abc123")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
