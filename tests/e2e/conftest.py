"""Browser tests: a live daphne, a simulated upstream and the system Chromium.

The server runs in a thread of the test process, on the test database, so
tests create users and endpoints with the ORM and the server sees them. It is
daphne by default; ``E2E_SERVER=uvicorn`` runs the same tests under uvicorn.

Fixtures for any browser test:

- ``live_server_url``: the base URL of the running server;
- ``browser`` (per module) and ``page`` (a fresh context per test);
- ``login(page, user)``: signs in through the real login form;
- ``screenshot(page, name)``: saves ``test-artifacts/e2e/<name>.png``;
- ``simulator``: the session's simulated upstream, reset for every test;
- ``sim_model``: endpoints "primary" and "fallback" on it serving SIM_MODEL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from gateway import router
from gateway.models import Endpoint, ModelRoute
from gateway.simulator import Behaviour, SimulatedUpstream
from tests.conftest import PASSWORD

SIM_MODEL = "sim-chat"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(django_settings.BASE_DIR) / "test-artifacts" / "e2e"
# The simulator's pace in these tests: slow enough to watch, stop and reload
# mid-answer, fast enough to keep the suite short.
TOKENS_PER_SECOND = 40


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Let browser tests use the ORM while Playwright's loop is marked running.

    Playwright's sync API runs its event loop in the main thread, so between
    its calls Django sees a running loop and refuses ORM calls. The variable is
    set for the browser tests only, setup and teardown (the flush) included.
    """
    if item.get_closest_marker("e2e") is None:
        return (yield)
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        return (yield)
    finally:
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the browser tests where there is no Chromium to drive."""
    if Path(CHROMIUM).exists():
        return
    skip = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM}")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


# --- The live server ------------------------------------------------------------


class _Daphne:
    """daphne's Server on its Twisted reactor, in a daemon thread."""

    def __init__(self, application: Any) -> None:
        from daphne.server import Server

        self.server = Server(
            application=application,
            endpoints=["tcp:port=0:interface=127.0.0.1"],
            signal_handlers=False,
            verbosity=0,
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.listening_addresses:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("daphne did not start listening")
            time.sleep(0.02)
        return self.server.listening_addresses[0][1]

    def stop(self) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(reactor.stop)
        self.thread.join(timeout=10)


class _Uvicorn:
    """uvicorn's Server on an asyncio loop, in a daemon thread."""

    def __init__(self, application: Any) -> None:
        import uvicorn

        config = uvicorn.Config(
            application, host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve()), daemon=True
        )

    def start(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server_url(django_db_setup) -> Iterator[str]:
    """Start the ASGI application once per session, on the test database.

    The server's threads reach the database only while a test marked
    ``django_db(transaction=True)`` runs, like the test itself.
    """
    from llmsite.asgi import application

    kind = os.environ.get("E2E_SERVER", "daphne")
    server = _Uvicorn(application) if kind == "uvicorn" else _Daphne(application)
    port = server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# --- The browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The system Chromium, headless, once per test module.

    Not once per session: while Playwright's sync API is active, the main
    thread looks like it runs an event loop, which would break the async tests
    of other folders that run after these.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def _artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def page(browser, live_server_url) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page, failing on script errors.

    The page's Content-Security-Policy is bypassed: Playwright's string
    predicates need eval, and model output must be harmless through the
    sanitizer alone. test_the_page_works_under_its_own_policy covers the CSP.
    """
    context = browser.new_context(
        base_url=live_server_url, viewport=None, bypass_csp=True
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.script_errors = errors
    yield page
    context.close()
    assert not errors, f"script errors in the page: {errors}"


@pytest.fixture
def screenshot(_artifacts: Path) -> Callable[[Any, str], Path]:
    """Save a full-page screenshot under test-artifacts/e2e/."""

    def take(page: Any, name: str) -> Path:
        path = _artifacts / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


@pytest.fixture
def login() -> Callable[[Any, Any], None]:
    """Sign a user in through the login form and land on the chat page."""

    def sign_in(page: Any, user: Any, next_path: str = "/chat/") -> None:
        page.goto(f"/accounts/login/?next={next_path}")
        page.fill("#id_username", user.get_username())
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"**{next_path}")

    return sign_in


# --- The simulated upstream --------------------------------------------------------


@pytest.fixture(scope="session")
def _simulator_session() -> Iterator[SimulatedUpstream]:
    server = SimulatedUpstream(
        behaviour=Behaviour(tokens_per_second=TOKENS_PER_SECOND, completion_tokens=40)
    )
    with server.run_in_thread():
        yield server


@pytest.fixture
def simulator(_simulator_session: SimulatedUpstream) -> SimulatedUpstream:
    """The simulated upstream, back to its initial behaviour."""
    _simulator_session.reset()
    return _simulator_session


@pytest.fixture
def sim_model(simulator, settings) -> tuple[Endpoint, Endpoint]:
    """SIM_MODEL served by "primary" (/e/primary) and then "fallback" (/e/fallback)."""
    # Browser tests send many messages a minute; limits have their own tests.
    settings.RATE_LIMIT_RPM = 10_000
    primary = Endpoint.objects.create(
        name="primary",
        base_url=simulator.base_url_for("/e/primary"),
        priority=1,
        timeout=10,
        max_retries=1,
    )
    fallback = Endpoint.objects.create(
        name="fallback",
        base_url=simulator.base_url_for("/e/fallback"),
        priority=2,
        timeout=10,
        max_retries=1,
    )
    for priority, endpoint in enumerate((primary, fallback), start=1):
        ModelRoute.objects.create(
            model_name=SIM_MODEL,
            endpoint=endpoint,
            upstream_model="sim-small",
            priority=priority,
        )
    router.forget_routes()
    return primary, fallback
