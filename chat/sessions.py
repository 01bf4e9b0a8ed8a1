"""Close a user's chat sockets when their sign-in stops being valid.

A websocket is authenticated once, at the handshake; without this an open tab
kept answering after its user was deactivated, logged out or changed password.
Every ChatConsumer joins its user's group (``user_group``); the receivers here
send that group a ``chat.session_ended`` message once the change is committed,
through the channel layer so it reaches sockets in every web process. Each
socket then closes with 4401; the page reconnects, and a handshake whose
session is no longer valid is refused, which sends the browser to the login
page.

Logging out ends one session, so only that session's sockets close (the
message names a hash of its key, never the key). Deactivation, deletion and a
new password end them all; deactivation and deletion also stop the user's
running answers.

Django has no "password changed" signal: pre_save compares the stored hash
with the one being saved. ``QuerySet.update()`` sends no signals and is not
seen; the admin and ``set_password()`` + ``save()`` are.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "chat.session_ended"
# Reasons that also stop the user's running answers.
STOP_ANSWERS = frozenset({"deactivated", "deleted"})
# Attribute pre_save leaves on the instance for post_save.
_PENDING = "_chat_session_ended"


def user_group(user_id: int) -> str:
    """The channel-layer group every chat socket of a user joins."""
    return f"chat.user.{int(user_id)}"


def session_tag(session_key: str | None) -> str:
    """A session's name in channel-layer messages: a hash, not the key itself."""
    if not session_key:
        return ""
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def end_sockets(user_id: int, reason: str, session_key: str | None = None) -> None:
    """Tell every socket of a user (or of one session of theirs) to close."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {
        "type": MESSAGE_TYPE,
        "reason": reason,
        "session": session_tag(session_key),
        "stop_answers": reason in STOP_ANSWERS,
    }
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        # Called on an event loop's own thread (async code saving without
        # sync_to_async): send from a task, since async_to_sync cannot run here.
        task = asyncio.ensure_future(_send(layer, user_id, message))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        return
    try:
        async_to_sync(layer.group_send)(user_group(user_id), message)
    except Exception:
        # The change itself is committed; a channel-layer outage must not turn
        # a logout or a deactivation into an error page.
        logger.exception("closing the chat sockets of user %s failed", user_id)


# Tasks started by end_sockets() on an event loop, kept until they finish.
_pending: set[asyncio.Future[None]] = set()


async def _send(layer: Any, user_id: int, message: dict[str, Any]) -> None:
    try:
        await layer.group_send(user_group(user_id), message)
    except Exception:
        logger.exception("closing the chat sockets of user %s failed", user_id)


def end_sockets_on_commit(
    user_id: int, reason: str, session_key: str | None = None
) -> None:
    """end_sockets() once the current transaction commits (at once outside one)."""
    transaction.on_commit(partial(end_sockets, user_id, reason, session_key))


@receiver(user_logged_out, dispatch_uid="chat.sessions.logged_out")
def _on_logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is None or user.pk is None:
        return
    session = getattr(request, "session", None)
    end_sockets_on_commit(user.pk, "logout", getattr(session, "session_key", None))


@receiver(
    pre_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.sessions.pre_save"
)
def _before_user_saved(
    sender: Any, instance: Any, raw: bool = False, update_fields: Any = None, **kw: Any
) -> None:
    if raw or instance.pk is None:
        return
    # Saving last_login on every sign-in need not read the row again.
    if update_fields is not None and not {"password", "is_active"} & set(update_fields):
        return
    stored = (
        sender._default_manager.filter(pk=instance.pk)
        .values("password", "is_active")
        .first()
    )
    if stored is None:
        return
    if stored["is_active"] and not instance.is_active:
        setattr(instance, _PENDING, "deactivated")
    elif stored["password"] != instance.password:
        setattr(instance, _PENDING, "password")


@receiver(
    post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.sessions.post_save"
)
def _after_user_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
    reason = instance.__dict__.pop(_PENDING, None)
    if reason is not None:
        end_sockets_on_commit(instance.pk, reason)


@receiver(
    post_delete,
    sender=settings.AUTH_USER_MODEL,
    dispatch_uid="chat.sessions.post_delete",
)
def _after_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    if instance.pk is not None:
        end_sockets_on_commit(instance.pk, "deleted")
