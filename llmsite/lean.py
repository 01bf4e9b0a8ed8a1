"""A short middleware stack for /v1/, dispatched to at the ASGI level.

Django's built-in middleware are `MiddlewareMixin`s: under the ASGI handler
each of their hooks runs through `sync_to_async`, a hop to a worker thread and
back, about a dozen per request with the full `MIDDLEWARE`. The API needs none
of the session, CSRF, authentication or message middleware (keys authenticate,
never cookies), so requests under `/v1/` go to a second `ASGIHandler` built
from `LEAN_MIDDLEWARE`, whose middleware must all be natively async: loading one
that would run in a thread is an error, so no hop creeps back in before the view.

`HostAndHeadersMiddleware` keeps what the full stack does to /v1 responses:
ALLOWED_HOSTS and DISALLOWED_USER_AGENTS, the HTTPS redirect and HSTS,
X-Content-Type-Options, Referrer-Policy, Cross-Origin-Opener-Policy,
X-Frame-Options and Content-Length, by calling the hooks of Django's own
middleware on the event loop. They do no I/O, so the thread was pure cost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

GetResponse = Callable[[HttpRequest], Awaitable[HttpResponse]]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

LEAN_PATH_PREFIX = "/v1/"


class HostAndHeadersMiddleware:
    """Security, Common and XFrameOptions middleware, run without a thread hop."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        # Tells Django's exception wrapper to await this middleware.
        markcoroutinefunction(self)
        self.security = SecurityMiddleware(get_response)
        # Refuses a Host outside ALLOWED_HOSTS (a 400) and adds Content-Length.
        self.common = CommonMiddleware(get_response)
        self.frame_options = XFrameOptionsMiddleware(get_response)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.security.process_request(request)
        if response is None:
            response = self.common.process_request(request)
        if response is None:
            response = await self.get_response(request)
        response = self.common.process_response(request, response)
        response = self.security.process_response(request, response)
        return self.frame_options.process_response(request, response)


class LeanASGIHandler(ASGIHandler):
    """Django's ASGI handler with the async-only `LEAN_MIDDLEWARE` list."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Only HTTP is served here, not {scope['type']}.")
        # Django wraps each request in its own ThreadSensitiveContext: the
        # first thread-sensitive sync_to_async (the request_started signal's
        # receivers always make one) then starts a thread for that request
        # alone, with a database connection of its own, and leaving the
        # context joins the thread on the event loop. A /v1 request does
        # little synchronous work (cache refreshes, a budget reservation), so
        # it runs on asgiref's one shared thread, like the websocket
        # consumers' database work: no thread per request, and that thread's
        # connection is reused under CONN_MAX_AGE.
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = True) -> None:
        # BaseHandler.load_middleware reads settings.MIDDLEWARE and adapts sync
        # middleware with thread hops; this list admits async middleware only,
        # wired the way Django wires an async-capable one.
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for middleware_path in reversed(settings.LEAN_MIDDLEWARE):
            middleware = import_string(middleware_path)
            # MiddlewareMixin is async-capable only by running its hooks in
            # threads.
            if not getattr(middleware, "async_capable", False) or (
                isinstance(middleware, type) and issubclass(middleware, MiddlewareMixin)
            ):
                raise ImproperlyConfigured(
                    f"LEAN_MIDDLEWARE admits async middleware only, and "
                    f"{middleware_path} would run in a thread."
                )
            instance = middleware(handler)
            if hasattr(instance, "process_view"):
                self._view_middleware.insert(
                    0, self.adapt_method_mode(True, instance.process_view)
                )
            if hasattr(instance, "process_template_response"):
                self._template_response_middleware.append(
                    self.adapt_method_mode(True, instance.process_template_response)
                )
            if hasattr(instance, "process_exception"):
                # Django calls exception middleware synchronously.
                self._exception_middleware.append(
                    self.adapt_method_mode(False, instance.process_exception)
                )
            handler = convert_exception_to_response(instance)
        self._middleware_chain = handler


class LeanPathDispatch:
    """Send HTTP requests under /v1/ to the lean handler, the rest to the full one."""

    def __init__(self, full: ASGIApp, lean: ASGIApp) -> None:
        self.full = full
        self.lean = lean

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The path after the prefix the site is mounted under, as Django sees it.
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] == "http" and path.startswith(LEAN_PATH_PREFIX):
            await self.lean(scope, receive, send)
        else:
            await self.full(scope, receive, send)


def django_http_application() -> LeanPathDispatch:
    """Django for HTTP: the lean stack under /v1/, the full MIDDLEWARE elsewhere.

    Call it once Django is set up; tests use it to serve exactly what the
    servers do.
    """
    return LeanPathDispatch(full=ASGIHandler(), lean=LeanASGIHandler())
