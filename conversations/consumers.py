"""The conversation WebSocket, ``/ws/conversations/{id}/`` (``docs/api.md``, "WebSocket").

Client frames: ``message.send`` ``{content}``, ``message.edit`` ``{message_id, content}``,
``message.regenerate`` ``{message_id}`` (``conversations.services``: a sibling and its reply),
``reply.stop``, ``ping``. Server frames:
``reply.start``, ``reply.delta``, ``reply.done``, ``error``, ``pong``. Closes 4401 when the
connection did not authenticate (``accounts.websocket.TokenAuthMiddleware``), or, after an
``error`` frame, when its API key expired before a ``message.send``; 4403 when its API key lacks
the ``chat`` scope (``accounts.scopes``); 4404 when the conversation is not visible to the user;
all after accepting, since a WebSocket refused during the handshake reaches browsers as a bare 1006.

A consumer handles one message at a time, so the reply streams in its own task: the consumer
stays free to see ``reply.stop`` (``Reply.stop()``) and the disconnect (the task is cancelled)
(FIELD-NOTES, "Channels"). Deltas go straight from that task to the socket, never through the
channel layer. The layer carries only stop requests from other processes, received by the
process-wide listener of ``chatbackend.broadcast``, so a socket needs no channel of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer

from accounts.audit import audit_request
from accounts.models import APIKey
from accounts.revocation import watch_credential
from accounts.scopes import api_key_scope_check, role_scope_check
from accounts.selectors import AuthenticationFailed, api_key_check_unexpired
from accounts.websocket import BEARER_SUBPROTOCOL_PREFIX
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, NotFoundError
from chatbackend.parsers import JSONParseError, json_loads
from chatbackend.stopping import server_stopping
from llm.streaming import open_reply, server_shutdown_error

from .payloads import ConversationReply, error_payload, reply_event
from .selectors import conversation_get_for
from .serializers import clean_message_content
from .services import ConversationReplyPlan, reply_edit_start, reply_regenerate_start, reply_start

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# The close code of a server that is stopping (RFC 6455, section 7.4.1: 1012 "Service Restart"):
# uvicorn closes its open WebSockets with it at shutdown. A client may close with it too, and
# uvicorn reports both alike: only ``server_stopping()`` says the server closed it.
CLOSE_SERVICE_RESTART = 1012

# Closes started by a revocation, kept until done (a task nobody references may be collected).
_closing: set[asyncio.Future[None]] = set()


def _chosen_subprotocol(scope: dict[str, Any]) -> str | None:
    """Return the subprotocol to accept of those the client offered (None when it offered none).

    A browser fails the handshake unless the server picks one of the subprotocols it offered.
    Prefer one that is not the credential (as Kubernetes does with its bearer subprotocol), so the
    token is not echoed; a client that offered only ``bearer.<token>`` gets that back.
    """
    offered = list(scope.get("subprotocols") or ())
    for protocol in offered:
        if not protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
            return protocol
    return offered[0] if offered else None


class UnknownRouteConsumer(AsyncWebsocketConsumer):
    """Every WebSocket URL no route matches: accepted, then closed with 4404, as a conversation not
    visible is (``ConversationConsumer``), so a client reads why. Without it Channels' ``URLRouter``
    raises for the path and the server answers the handshake with a 500."""

    # No channel layer (Channels skips it for None): this consumer only closes. The stubs type it str.
    channel_layer_alias = None  # type: ignore[assignment]

    async def connect(self) -> None:
        await self.accept(_chosen_subprotocol(self.scope))
        await self.close(code=CLOSE_NOT_FOUND)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        return  # frames sent before the close arrived: ignored


class ConversationConsumer(AsyncJsonWebsocketConsumer):
    """Chat in one conversation over a WebSocket: one streamed reply at a time."""

    # No channel per socket: nothing is sent to a socket through the layer (stop requests reach
    # ``chatbackend.broadcast``'s listener), so a connection costs no channel, group or receive task.
    channel_layer_alias = None  # type: ignore[assignment]
    conversation_id: int
    _reply_task: asyncio.Task[None] | None = None
    _reply: ConversationReply | None = None
    _stop_requested = False  # a ``reply.stop`` that came before the reply had started
    _refused = False  # closed with 4401/4404: frames still in flight are ignored
    _watch: contextlib.AbstractContextManager[None] | None = None

    async def connect(self) -> None:
        self.conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        user = self.scope.get("user")
        principal = self.scope.get("principal")
        close_code = None
        if self.scope.get("auth_error") is not None or principal is None or user is None:
            close_code = CLOSE_UNAUTHENTICATED
        elif not self._may_chat():
            close_code = CLOSE_FORBIDDEN
        else:
            try:
                # The socket chats: only the conversation's owner may open it. Another organization's
                # conversation is audited with this connection's client IP and path (the scope).
                with audit_request(self.scope):
                    await run_sync(
                        conversation_get_for, actor=principal, conversation_id=self.conversation_id, to_change=True
                    )
            except NotFoundError:
                close_code = CLOSE_NOT_FOUND
            except ApplicationError:
                close_code = CLOSE_FORBIDDEN
        await self.accept(self._subprotocol())
        if close_code is not None:
            self._refused = True
            await self.close(code=close_code)
            return
        # A revoked key, a deactivated user or a logout closes the socket, from any process.
        self._watch = watch_credential(
            user_id=user.pk,
            api_key_id=getattr(self.scope.get("api_key"), "pk", None),
            session_id=self.scope.get("session_id"),
            on_revoked=self._credential_revoked,
        )
        self._watch.__enter__()

    def _may_chat(self) -> bool:
        """Return False for an API key without the ``chat`` scope, or an organization's viewer
        (``accounts.scopes``): the socket only chats."""
        try:
            api_key_scope_check(self.scope.get("api_key"), APIKey.Scope.CHAT, action="a conversation WebSocket")
            principal = self.scope.get("principal")
            role_scope_check(
                principal.acting.role if principal is not None else None,
                APIKey.Scope.CHAT,
                action="a conversation WebSocket",
            )
        except ApplicationError:
            return False
        return True

    def _credential_revoked(self) -> None:
        """Close with 4401 (and stop the reply, persisted ``cancelled``): the credential was revoked."""
        if self._refused:
            return
        self._refused = True
        reason = AuthenticationFailed("The credential of this connection was revoked.", code="credential_revoked")
        if self._reply is not None:
            self._reply.stop(reason)
        elif self._reply_task is not None and not self._reply_task.done():
            self._stop_requested = True
        closing = asyncio.ensure_future(self.close(code=CLOSE_UNAUTHENTICATED))
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)

    def _subprotocol(self) -> str | None:
        return _chosen_subprotocol(self.scope)

    async def disconnect(self, code: int) -> None:
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None
        if code == CLOSE_SERVICE_RESTART and server_stopping() and self._reply is not None:
            self._reply.stop(server_shutdown_error())  # the server is stopping, not the client
        task = self._reply_task
        if task is not None and not task.done():
            task.cancel()  # the reply is persisted ``cancelled`` with its text so far
            await asyncio.wait((task,))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        # Not the parent's: a frame that is not JSON must get an ``error`` frame, not kill the socket.
        if self._refused:
            return
        if text_data is None:
            await self._send_error(ApplicationError("Frames must be JSON text.", code="invalid_frame"))
            return
        try:
            frame = json_loads(text_data)
        except JSONParseError as exc:
            await self._send_error(ApplicationError(f"The frame is not valid JSON: {exc}", code="invalid_json"))
            return
        if not isinstance(frame, dict):
            await self._send_error(ApplicationError("A frame must be a JSON object.", code="invalid_frame"))
            return
        await self.receive_json(frame)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        kind = content.get("type")
        if kind in ("message.send", "message.edit", "message.regenerate"):
            await self._start_reply(kind, content)
        elif kind == "reply.stop":
            self._stop()
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self._send_error(
                ApplicationError(f"Unknown frame type {kind!r}.", code="unknown_frame_type", param="type")
            )

    def _stop(self) -> None:
        if self._reply is not None:
            self._reply.stop()
        elif self._reply_task is not None and not self._reply_task.done():
            self._stop_requested = True  # the reply is starting: stop it as soon as it exists
        # else nothing streams: stopping is a no-op

    async def _start_reply(self, kind: str, frame: dict[str, Any]) -> None:
        """Start the reply a ``message.send``, ``message.edit`` or ``message.regenerate`` frame asks for."""
        if self._reply_task is not None and not self._reply_task.done():
            await self._send_error(
                ApplicationError("A reply is already streaming on this socket.", code="reply_in_progress", status=409)
            )
            return
        api_key = self.scope.get("api_key")
        if api_key is not None:
            try:  # expiry is a moment, not a change: checked at each use of an open socket's key
                api_key_check_unexpired(api_key)
            except AuthenticationFailed as exc:
                await self._send_error(exc)
                self._refused = True
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return
        actor, conversation_id = self.scope["principal"], self.conversation_id
        try:
            if kind == "message.send":
                content = clean_message_content(frame.get("content"))
                begin = run_sync(reply_start, actor=actor, conversation_id=conversation_id, content=content)
            elif kind == "message.edit":
                message_id = _frame_message_id(frame.get("message_id"))
                content = clean_message_content(frame.get("content"))
                begin = run_sync(
                    reply_edit_start,
                    actor=actor,
                    conversation_id=conversation_id,
                    message_id=message_id,
                    content=content,
                )
            else:
                message_id = _frame_message_id(frame.get("message_id"))
                begin = run_sync(
                    reply_regenerate_start, actor=actor, conversation_id=conversation_id, message_id=message_id
                )
        except ApplicationError as exc:
            await self._send_error(exc)
            return
        self._stop_requested = False
        self._reply_task = asyncio.create_task(self._stream_reply(begin))

    async def _stream_reply(self, begin: Awaitable[ConversationReplyPlan]) -> None:
        """Stream one reply to the socket: ``reply.start``, deltas, then ``reply.done`` or ``error``."""
        try:
            async with open_reply(begin) as reply:
                self._reply = reply
                if self._stop_requested:
                    reply.stop()
                async for event in reply.events():
                    payload = reply_event(reply, event)
                    if payload is not None:
                        await self._send_event(*payload)
        except ApplicationError as exc:  # the start failed: nothing was written
            await self._send_error(exc)
        except Exception:  # a bug: tell the client rather than leave it waiting
            logger.exception("the WebSocket reply failed")
            await self._send_error(ApplicationError("The reply failed.", code="internal_error", status=500))
        finally:
            self._reply = None

    async def _send_error(self, exc: ApplicationError) -> None:
        await self._send_event(*error_payload(exc))

    async def _send_event(self, name: str, data: dict[str, Any]) -> None:
        """Send one event as a frame: ``{"type": name, **data}`` (the SSE events' names and payloads)."""
        await self.send_json({"type": name, **data})


def _frame_message_id(value: Any) -> int:
    """Return a frame's ``message_id``: a positive integer; ``ApplicationError`` 400 otherwise."""
    if type(value) is not int or value < 1:
        raise ApplicationError("'message_id' must be a message id.", code="invalid_message_id", param="message_id")
    return value
