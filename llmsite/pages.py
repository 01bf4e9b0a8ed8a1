"""What every page of our own (not the admin's) sends with it."""

from __future__ import annotations

from django.http import HttpResponse

# Model output is rendered as HTML in the chat page. The sanitizer is the first
# line of defence; this policy is the second: no inline script, no plugin, no
# remote image or style, whatever slips through. The usage page keeps to it too.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def with_policy(response: HttpResponse) -> HttpResponse:
    """Add the content security and referrer policies to a page."""
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response["Referrer-Policy"] = "same-origin"
    return response
