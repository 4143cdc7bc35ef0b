"""The conversation WebSocket, ``/ws/conversations/{id}/`` (``docs/api.md``, "WebSocket").

Client frames: ``message.send`` ``{content}``, ``reply.stop``, ``ping``. Server frames:
``reply.start``, ``reply.delta``, ``reply.done``, ``error``, ``pong``. Closes 4401 when the
connection did not authenticate (``accounts.websocket.TokenAuthMiddleware``) and 4404 when the
conversation is not visible to the user; both after accepting, since a WebSocket refused during
the handshake reaches browsers as a bare 1006.

A consumer handles one message at a time, so the reply streams in its own task: the consumer
stays free to see ``reply.stop`` and the disconnect, and cancels the task on either
(FIELD-NOTES, "Channels"). Deltas go straight from that task to the socket, never through the
channel layer. The layer carries only stop requests from other processes, received by the
process-wide listener of ``conversations.stop``, so a socket needs no channel of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from functools import partial
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from accounts.websocket import BEARER_SUBPROTOCOL_PREFIX
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, NotFoundError

from .payloads import reply_message_data, reply_start_data, track_message
from .selectors import conversation_get_for
from .serializers import clean_message_content
from .services import reply_start
from .sse import delta_data
from .stop import ReplyStopper, listen_for_stop, stoppable_chunks
from .streaming import ReplyPlan, open_reply

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


class ConversationConsumer(AsyncJsonWebsocketConsumer):
    """Chat in one conversation over a WebSocket: one streamed reply at a time."""

    # No channel per socket: nothing is sent to a socket through the layer (stop requests reach
    # ``conversations.stop``'s listener), so a connection costs no channel, group or receive task.
    channel_layer_alias = None  # type: ignore[assignment]
    conversation_id: int
    _reply_task: asyncio.Task[None] | None = None
    _stopper: ReplyStopper | None = None
    _refused = False  # closed with 4401/4404: frames still in flight are ignored

    async def connect(self) -> None:
        self.conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        user = self.scope.get("user")
        close_code = None
        if self.scope.get("auth_error") is not None or user is None or not user.is_authenticated:
            close_code = CLOSE_UNAUTHENTICATED
        else:
            try:
                await run_sync(conversation_get_for, user=user, conversation_id=self.conversation_id)
            except NotFoundError:
                close_code = CLOSE_NOT_FOUND
        await self.accept(self._subprotocol())
        if close_code is not None:
            self._refused = True
            await self.close(code=close_code)

    def _subprotocol(self) -> str | None:
        # A browser fails the handshake unless the server picks one of the subprotocols it offered.
        # Prefer one that is not the credential (as Kubernetes does with its bearer subprotocol), so
        # the token is not echoed; a client that offered only ``bearer.<token>`` gets that back.
        offered = list(self.scope.get("subprotocols") or ())
        for protocol in offered:
            if not protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
                return protocol
        return offered[0] if offered else None

    async def disconnect(self, code: int) -> None:
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
            frame = json.loads(text_data)
        except ValueError:
            await self._send_error(ApplicationError("The frame is not valid JSON.", code="invalid_json"))
            return
        if not isinstance(frame, dict):
            await self._send_error(ApplicationError("A frame must be a JSON object.", code="invalid_frame"))
            return
        await self.receive_json(frame)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        kind = content.get("type")
        if kind == "message.send":
            await self._start_reply(content.get("content"))
        elif kind == "reply.stop":
            if self._stopper is not None:  # nothing streaming: stopping is a no-op
                self._stopper.request()
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self._send_error(
                ApplicationError(f"Unknown frame type {kind!r}.", code="unknown_frame_type", param="type")
            )

    async def _start_reply(self, content: Any) -> None:
        if self._reply_task is not None and not self._reply_task.done():
            await self._send_error(
                ApplicationError("A reply is already streaming on this socket.", code="reply_in_progress", status=409)
            )
            return
        try:
            content = clean_message_content(content)
        except ApplicationError as exc:
            await self._send_error(exc)
            return
        stopper = ReplyStopper()
        self._stopper = stopper
        self._reply_task = stopper.task = asyncio.create_task(self._reply(content, stopper))

    async def _reply(self, content: str, stopper: ReplyStopper) -> None:
        """Stream one reply to the socket: ``reply.start``, deltas, then ``reply.done`` or ``error``."""
        try:
            await self._stream_reply(content, stopper)
        except ApplicationError as exc:
            await self._send_error(exc)
        except Exception:  # a bug: tell the client rather than leave it waiting
            logger.exception("the WebSocket reply failed")
            await self._send_error(ApplicationError("The reply failed.", code="internal_error", status=500))
        finally:
            if self._stopper is stopper:
                self._stopper = None

    async def _stream_reply(self, content: str, stopper: ReplyStopper) -> None:
        begin = partial(
            _reply_start_for_socket,
            user=self.scope["user"],
            api_key=self.scope.get("api_key"),
            conversation_id=self.conversation_id,
            content=content,
        )
        reply = await open_reply(begin)
        info = reply.plan.info
        try:
            # Listening before ``reply.start``: a client that has seen the start can stop the reply.
            async with listen_for_stop(info["message_id"], stopper):
                await self.send_json({"type": "reply.start", **reply_start_data(info)})
                async with aclosing(stoppable_chunks(reply, stopper)) as chunks:
                    async for chunk in chunks:
                        if chunk is not None and (chunk.content or chunk.reasoning_content):
                            await self.send_json({"type": "reply.delta", **delta_data(chunk)})
        except ApplicationError as exc:
            await reply.aclose()  # ended already by ``stoppable_chunks``: a no-op
            await self._send_error(exc, reply_message_data(reply))
            return
        finally:
            await reply.aclose()  # a no-op once the reply has ended
        # Built from what the reply wrote: no read-back (``conversations.payloads``).
        await self.send_json({"type": "reply.done", "message": reply_message_data(reply)})

    async def _send_error(self, exc: ApplicationError, message: dict[str, Any] | None = None) -> None:
        await self.send_json({"type": "error", **exc.as_dict(), "message": message})


def _reply_start_for_socket(**kwargs: Any) -> ReplyPlan:
    """``reply_start``, its plan noting the end's write (for the ``reply.done`` message)."""
    return track_message(reply_start(**kwargs))
