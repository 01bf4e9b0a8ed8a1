"""HTTPS only: an endpoint's key never crosses a network in clear by accident.

A base URL must use https://, except to this machine (loopback: localhost,
*.localhost, 127.0.0.0/8, ::1), where nothing crosses a network, or when the
endpoint explicitly allows plain HTTP. The rule is checked wherever an
endpoint is saved (model validation and save, admin, config import,
setup_demo) and once more by the client before it sends anything.

Hosts written in unusual forms that some resolvers accept ("127.1",
"2130706433", "0x7f.0.0.1") are not recognised as loopback: the rule errs
on the side of asking for HTTPS.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PLAIN_HTTP_HELP = (
    "Allow an http:// URL to a host other than this machine. The API key, the "
    "prompts and the answers then travel in clear over the network: only for a "
    "trusted private network."
)


def is_loopback_host(host: str | None) -> bool:
    """Whether a URL's host names this machine: localhost, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def url_host(url: str) -> str | None:
    """The host of a URL, or None when it has none or cannot be parsed."""
    try:
        return urlsplit(url.strip()).hostname
    except ValueError:
        return None


def sends_in_clear(url: str) -> bool:
    """Whether requests to this URL cross a network unencrypted."""
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return False
    return scheme == "http" and not is_loopback_host(url_host(url))


ALLOW_HINT = "allow plain HTTP for this endpoint"


@dataclass(frozen=True)
class Refusal:
    """Why a base URL breaks the rule: a message template and its parameters."""

    message: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message % self.params if self.params else self.message


# The client asks before every request; endpoints are few.
@functools.lru_cache(maxsize=1024)
def refusal(url: str, *, allow_plain_http: bool) -> Refusal | None:
    """Why this base URL may not be used under the HTTPS-only rule, or None."""
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return Refusal("Enter a valid URL.")
    if scheme == "https":
        return None
    host = url_host(url)
    if scheme != "http" or not host:
        return Refusal("Use an https:// URL.")
    if allow_plain_http or is_loopback_host(host):
        return None
    return Refusal(
        "Plain http:// to %(host)s would send the API key in clear. Use https://, "
        "or %(allow)s if its network is trusted.",
        {"host": host, "allow": ALLOW_HINT},
    )


def plain_http_problem(url: str, *, allow_plain_http: bool) -> str | None:
    """The refusal of this base URL as text, or None when it may be used."""
    found = refusal(url, allow_plain_http=allow_plain_http)
    return None if found is None else str(found)
