"""The chat websocket: a thin layer between the browser and chat.generation.

The protocol is described in chat/PROTOCOL.md. Every frame is validated; a bad
one gets an ``error`` frame and the socket stays open.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import actions, conversation_settings, frames, protocol, sessions
from chat.errors import ChatError, busy_switching
from chat.generation import check_model, group_name, prepare_for, registry

logger = logging.getLogger(__name__)

# Close code for a refused connection, in the 4000-4999 range for applications.
CLOSE_UNAUTHENTICATED = 4401


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One browser tab's chat connection."""

    registry = registry

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        # The conversation this tab shows, and the answers it listens to
        # (conversation -> "" when the answer runs in this process, else the
        # channel of the process running it).
        self.current: uuid.UUID | None = None
        self.joined: dict[uuid.UUID, str] = {}
        # Frames that arrive while an ``opened`` frame is being prepared wait
        # here so the browser sees the conversation before its running answer.
        self.held: list[str] | None = None
        # Logout, deactivation and a new password close this socket through
        # the user's group (chat.sessions), from whichever process saw them.
        self.session_tag = sessions.session_tag(
            getattr(self.scope.get("session"), "session_key", None)
        )
        if self.channel_layer is not None:
            await self.channel_layer.group_add(
                sessions.user_group(user.pk), self.channel_name
            )
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "user"):
            return
        if self.channel_layer is not None:
            await self.channel_layer.group_discard(
                sessions.user_group(self.user.pk), self.channel_name
            )
        for conversation_id, owner in self.joined.items():
            await self.registry.detach(conversation_id, self, owner)
        self.joined.clear()
        await self._show(None)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Frames of another process's answer skip the base class's per-message
        # database connection check: they touch no database.
        if message["type"] == "chat.frame":
            await self.deliver(message["text"])
            return
        await super().dispatch(message)

    # Listener ------------------------------------------------------------------

    async def deliver(self, text: str) -> None:
        """Send one encoded frame of an answer to this tab."""
        if self.held is not None:
            self.held.append(text)
        else:
            await self.send(text_data=text)

    # Browser -> server -----------------------------------------------------------

    async def receive(
        self,
        text_data: str | None = None,
        bytes_data: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        kind = None
        try:
            data = protocol.decode(text_data, bytes_data)
            kind = data.get("type") if isinstance(data.get("type"), str) else None
            await self.handle(protocol.parse(data))
        except ChatError as exc:
            await self.send_json(exc.frame(request=kind))
        except Exception:
            logger.exception("chat frame %r failed", kind)
            await self.send_json(
                ChatError(
                    "internal_error", "Something went wrong on our side; try again."
                ).frame(request=kind)
            )

    async def handle(self, request: protocol.Request) -> None:
        """Carry out one validated request."""
        if isinstance(request, protocol.Send | protocol.Regenerate | protocol.Edit):
            if request.model is not None:
                await check_model(request.model)
            generation = await self.registry.start(
                self.user, prepare_for(self.user, request), self
            )
            # Forget answers of this process that have ended since.
            self.joined = {
                conversation: owner
                for conversation, owner in self.joined.items()
                if owner or self.registry.get(conversation) is not None
            }
            self.joined[generation.conversation_id] = ""
            await self._show(generation.conversation_id)
        elif isinstance(request, protocol.Stop):
            stopped = await self.registry.stop(self.user.pk, request.conversation_id)
            if not stopped:
                raise ChatError(
                    "not_running", "Nothing is being written in this conversation."
                )
        elif isinstance(request, protocol.Settings):
            saved = await database_sync_to_async(conversation_settings.save)(
                self.user, request.conversation_id, request.settings
            )
            await self.send_json(saved)
        elif isinstance(request, protocol.Open):
            await self._open(request.conversation_id)
        elif isinstance(request, protocol.History):
            page = await database_sync_to_async(actions.message_page)(
                self.user, request.conversation_id, request.before
            )
            await self._send_all(frames.page_frames(page))
        elif isinstance(request, protocol.Switch):
            await self._switch(request)
        else:
            await self.send_json({"type": "pong"})

    async def _open(self, conversation_id: uuid.UUID) -> None:
        self.held = []
        try:
            opened = await database_sync_to_async(actions.open_conversation)(
                self.user,
                conversation_id,
                running=self.registry.get(conversation_id) is not None,
            )
            await self._show(conversation_id)
            # Joining again is harmless: it resends the answer so far, which
            # the page needs since it has just redrawn the conversation.
            owner = await self.registry.attach(conversation_id, self)
            if owner is not None:
                self.joined[conversation_id] = owner
            # Only the newest messages: a big conversation does not fit a frame.
            await self._send_all(frames.page_frames(opened))
            held, self.held = self.held, None
            for text in held:
                await self.send(text_data=text)
        finally:
            self.held = None

    async def _switch(self, request: protocol.Switch) -> None:
        # Checked here as well as by the claim: an answer of this process
        # that is about to end still counts.
        if self.registry.get(request.conversation_id) is not None:
            await database_sync_to_async(actions.owned_conversation)(
                self.user, request.conversation_id
            )
            raise busy_switching()
        opened = await database_sync_to_async(actions.switch_version)(
            self.user, request.conversation_id, request.message_id
        )
        await self._show(request.conversation_id)
        await self._send_all(frames.page_frames(opened))
        if self.channel_layer is not None:
            # Other tabs showing it would otherwise show a path the next
            # message no longer continues from.
            await self.channel_layer.group_send(
                group_name(request.conversation_id),
                {
                    "type": "chat.switched",
                    "conversation_id": str(request.conversation_id),
                    "origin": self.channel_name,
                },
            )

    async def _send_all(self, texts: list[str]) -> None:
        for text in texts:
            await self.send(text_data=text)

    async def _show(self, conversation_id: uuid.UUID | None) -> None:
        # Sockets showing a conversation hear when an answer starts in it.
        if conversation_id == self.current or self.channel_layer is None:
            return
        if self.current is not None:
            await self.channel_layer.group_discard(
                group_name(self.current), self.channel_name
            )
        self.current = conversation_id
        if conversation_id is not None:
            await self.channel_layer.group_add(
                group_name(conversation_id), self.channel_name
            )

    # Channel layer -> server -------------------------------------------------------

    async def chat_started(self, event: dict[str, Any]) -> None:
        """Another tab started an answer in the conversation this tab shows."""
        conversation_id = uuid.UUID(event["conversation_id"])
        if event.get("origin") == self.channel_name or conversation_id != self.current:
            return
        owner = await self.registry.attach(conversation_id, self)
        if owner is not None:
            self.joined[conversation_id] = owner

    async def chat_switched(self, event: dict[str, Any]) -> None:
        """Another tab showed another version: show the path it now shows."""
        if event.get("origin") == self.channel_name:
            return
        if uuid.UUID(event["conversation_id"]) == self.current:
            await self.send_json(
                {"type": "refresh", "conversation_id": event["conversation_id"]}
            )

    async def chat_session_ended(self, event: dict[str, Any]) -> None:
        """The user logged out, was deactivated or changed password: close."""
        if event.get("session") and event["session"] != self.session_tag:
            return  # another session of this user logged out
        if event.get("stop_answers"):
            for generation in self.registry.running():
                if generation.user_id == self.user.pk:
                    generation.stop("stop")
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def chat_ended(self, event: dict[str, Any]) -> None:
        """An answer this tab tried to join had just ended: reload it."""
        await self.send_json(
            {"type": "refresh", "conversation_id": event["conversation_id"]}
        )
