"""The one error type of the chat app: a code for programs, a sentence for people."""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    """A request the chat cannot carry out; the socket stays open."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def frame(self, **extra: Any) -> dict[str, Any]:
        """The ``error`` frame that tells the browser about this error."""
        return {
            "type": "error",
            "code": self.code,
            "message": self.message,
            "retry_after": self.retry_after,
            **extra,
        }


def not_found() -> ChatError:
    """Missing and not-yours look the same, so ids reveal nothing."""
    return ChatError("not_found", "That conversation or message does not exist.")


def busy_switching() -> ChatError:
    """Refuse to show another version while the conversation is answered."""
    return ChatError(
        "busy",
        "An answer is being written in this conversation. "
        "Wait for it or stop it first.",
    )


def _seconds(retry_after: float | None) -> str:
    if retry_after is None:
        return "in a moment"
    seconds = max(1, round(retry_after))
    if seconds < 120:
        return f"in {seconds} second{'s' if seconds != 1 else ''}"
    return f"in {round(seconds / 60)} minutes"


def from_service(
    code: str,
    message: str,
    retry_after: float | None,
    *,
    partial: bool = False,
    refused: bool = False,
) -> ChatError:
    """An error of the gateway, worded for the person who asked.

    ``refused``: nothing was stored, the text stays in the browser's input.
    """
    if refused:
        when = "" if code == "rate_limited" else f" Try again {_seconds(retry_after)}."
        if code in ("budget_exhausted", "context_too_large", "model_not_found"):
            when = ""
        text = f"{message}{when} Nothing was sent; your text is still here."
        return ChatError(str(code), text, retry_after=retry_after)
    if code == "all_endpoints_unavailable":
        text = (
            "No endpoint can answer right now: every one is down or failing. "
            f"Your message is saved; try again {_seconds(retry_after)}."
        )
    elif code == "rate_limited":
        # The limiter's sentence already says when to try again.
        text = f"{message} Your message is saved."
    elif code in ("budget_exhausted", "context_too_large"):
        text = message
    elif code == "model_not_found":
        text = "That model is no longer available; pick another one and retry."
    elif partial:
        text = (
            "The endpoint failed while answering, and no other one could take "
            f"over. The text so far is kept. ({message})"
        )
    else:
        text = f"The endpoint could not answer. ({message})"
    return ChatError(str(code), text, retry_after=retry_after)
