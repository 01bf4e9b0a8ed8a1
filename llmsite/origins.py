"""The websocket origin check: scheme, host and port, not the host alone.

Channels' AllowedHostsOriginValidator compares the Origin's host with
ALLOWED_HOSTS and ignores scheme and port, so a page served by any other
program on the same host (http://127.0.0.1:9999) could open a socket to this
site with the user's session cookie. Here the Origin must equal the site's own
origin, as the browser saw it, or be listed in CSRF_TRUSTED_ORIGINS.

A socket without an Origin header is refused. Browsers always send one, so a
missing Origin is never a cross-site browser attack; but refusing costs
nothing (a program can send the site's own origin) and keeps the rule one line
long, as channels' validator had it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

# Origins longer than this are refused without parsing; real ones are short.
MAX_ORIGIN_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) origin, or None when it is not one."""
    if not value or len(value) > MAX_ORIGIN_LENGTH:
        return None
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def server_origin(scope: dict[str, Any]) -> tuple[str, str, int] | None:
    """The origin a browser sees for this socket's server, from scheme and Host."""
    host = _header(scope, b"host")
    if not host:
        return None
    domain, _ = split_domain_port(host)
    # Host must be one of ALLOWED_HOSTS, as for every HTTP request: otherwise a
    # DNS-rebinding page (evil.example resolving to this server) would pass
    # as its own same origin.
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    if not domain or not validate_host(domain, allowed):
        return None
    secure = scope.get("scheme", "ws") in {"wss", "https"}
    if settings.BEHIND_PROXY:
        # Only a proxy we run can say the browser used TLS.
        forwarded = (_header(scope, b"x-forwarded-proto") or "").split(",")[0]
        if forwarded.strip().lower() in {"https", "wss"}:
            secure = True
        elif forwarded.strip().lower() in {"http", "ws"}:
            secure = False
    return normalize_origin(("https://" if secure else "http://") + host)


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether a websocket handshake comes from this site or a trusted origin."""
    raw = _header(scope, b"origin")
    origin = normalize_origin(raw) if raw is not None else None
    if origin is None:
        return False
    if origin == server_origin(scope):
        return True
    trusted = {normalize_origin(entry) for entry in settings.CSRF_TRUSTED_ORIGINS}
    return origin in trusted


class SameOriginValidator:
    """ASGI middleware refusing websockets whose Origin is not this site's."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SameOriginValidator only handles websockets")
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
