"""Stop a streaming reply from any server process, and relay a reply so that it can be stopped.

A reply streams in one process (an SSE response or a WebSocket consumer) while the stop request
(``POST /api/conversations/{id}/messages/{message_id}/stop/``) may land on another. So while a
reply streams, its process is a member of the channel layer group ``reply-stop.<message_id>``,
and ``reply_stop`` sends ``{"type": "reply.stop", "message_id": ...}`` to that group.
``InMemoryChannelLayer`` covers one process (the embedded default); ``channels_redis`` covers
many.

Each process (each event loop) has one channel and one task receiving on it, started with its
first reply; it hands a stop request to the ``ReplyStopper`` registered for that message. A
stream therefore costs one ``group_add`` and one ``group_discard``, and no task or receive of
its own. That is also why no receive is cancelled per stream: on Python 3.11, ``asyncio.wait_for``
(used by redis-py to send a command) can swallow a cancellation, and a cancelled ``receive``
then hangs for channels_redis' whole 5 s ``BZPOPMIN`` before failing.

A stop interrupts the upstream wait at once by cancelling the streaming task only while it
awaits the upstream (``ReplyStopper.waiting``); the cancellation is absorbed in
``stoppable_chunks``, which then ends quietly. ``conversations.streaming`` persists the reply
as ``cancelled`` with its text so far, as it does when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer

from accounts.models import User
from chatbackend.errors import ApplicationError, NotFoundError
from llm.providers import ChatChunk

from .models import Message
from .selectors import message_list
from .streaming import Reply

logger = logging.getLogger(__name__)

STOP_EVENT_TYPE = "reply.stop"


def stop_group(message_id: int) -> str:
    """Return the channel layer group a reply's process listens on for stop requests."""
    return f"reply-stop.{message_id}"


def reply_stop(*, user: User, conversation_id: int, message_id: int) -> None:
    """Ask the process streaming reply ``message_id`` to stop it, wherever that process runs.

    Sync (a DRF view calls it). Raises ``NotFoundError`` (404) when the conversation is not
    visible to ``user`` or ``message_id`` is not one of its assistant messages still
    ``streaming``; ``ApplicationError`` (503) when no channel layer is configured. Returns once
    the request is sent: the reply ends ``cancelled`` shortly after.
    """
    streaming = message_list(user=user, conversation_id=conversation_id).filter(
        pk=message_id, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING
    )
    if not streaming.exists():
        raise NotFoundError("No reply with this id is streaming in this conversation.", code="reply_not_streaming")
    layer = get_channel_layer()
    if layer is None:
        raise ApplicationError("Stopping replies needs a channel layer.", code="stop_unavailable", status=503)
    async_to_sync(layer.group_send)(stop_group(message_id), {"type": STOP_EVENT_TYPE, "message_id": message_id})


class ReplyStopper:
    """The stop switch of one streaming reply, run by ``task``.

    ``request()`` may come from anywhere in the event loop (a stop listener, a WebSocket frame).
    It cancels ``task`` only while ``waiting`` is True, i.e. while the task awaits the upstream
    inside ``stoppable_chunks``; otherwise the task sees ``requested`` at its next check. Either
    way nothing is cancelled outside the code that expects it. ``task`` may be set after
    construction, before the reply starts (a consumer creates the task that runs the reply).
    """

    __slots__ = ("_interrupted", "requested", "task", "waiting")

    def __init__(self, task: asyncio.Task[Any] | None = None) -> None:
        self.task = task
        self.requested = False
        self.waiting = False
        self._interrupted = False

    def request(self) -> None:
        """Stop the reply: interrupt the upstream wait now, or before the next one. Idempotent."""
        if self.requested:
            return
        self.requested = True
        if self.waiting and self.task is not None:
            self._interrupted = True
            self.task.cancel()

    def absorb(self) -> bool:
        """Return True when the ``CancelledError`` being handled was this stop's, and clear it.

        Call in ``except asyncio.CancelledError``. False (re-raise!) when the cancellation came
        from elsewhere — the client went away or the server shuts down — even if it coincides
        with a stop.
        """
        if not self._interrupted or self.task is None:
            return False
        self._interrupted = False
        return self.task.uncancel() == 0


async def stoppable_chunks(
    reply: Reply, stopper: ReplyStopper, *, keepalive: float | None = None
) -> AsyncGenerator[ChatChunk | None, None]:
    """Yield ``reply``'s chunks until it ends or ``stopper`` is asked to stop.

    Must run in ``stopper.task``; close it with ``contextlib.aclosing``. With ``keepalive``
    (seconds), yield ``None`` each time that long passes without the first chunk, so the caller
    can send a keep-alive (proxies drop idle reads; FIELD-NOTES, "HTTP streaming").
    A stop ends the iteration quietly; the reply is persisted ``cancelled`` with its text so far
    (``reply.outcome``). Raises the ``ApplicationError`` of a failed upstream (persisted
    ``failed``) and re-raises any other ``asyncio.CancelledError`` (persisted ``cancelled``).
    """
    chunks = reply.chunks()
    first: asyncio.Future[ChatChunk] | None = None
    try:
        if keepalive is not None and not stopper.requested:
            # The first chunk in its own task, so that waiting for it can time out without
            # cancelling the upstream request. Later chunks are awaited directly: no task per token.
            first = asyncio.ensure_future(anext(chunks))
            while True:
                stopper.waiting = True
                try:
                    done, _ = await asyncio.wait((first,), timeout=keepalive)
                finally:
                    stopper.waiting = False
                if done:
                    break
                yield None
                if stopper.requested:
                    return
            pending, first = first, None
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            yield chunk
        while not stopper.requested:
            stopper.waiting = True
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            finally:
                stopper.waiting = False
            yield chunk
    except asyncio.CancelledError:
        if not stopper.absorb():
            raise
    finally:
        if first is not None:
            # Its cancellation runs ``chunks``' cleanup, which persists the reply.
            first.cancel()
            await asyncio.wait((first,))
            if not first.cancelled():
                first.exception()  # retrieved: an upstream error here is already persisted ``failed``
        await chunks.aclose()  # type: ignore[attr-defined]  # an async generator, typed as an iterator
        # Persists ``cancelled`` if ``chunks`` never started (a stop before the first wait).
        await reply.aclose()


class _StopListener:
    """The stop requests of one event loop's replies: one channel, one receive task."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel = ""
        self.stoppers: dict[int, ReplyStopper] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Return this loop's channel, starting the receive task on first use."""
        if not self.channel:
            channel = await self.layer.new_channel()
            self.channel = self.channel or channel
        if self._task is None:
            self._task = asyncio.create_task(self._receive(), name="reply-stop-listener")
        return self.channel

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except Exception:
                # Redis gone for a while: keep trying; replies stream on meanwhile, unstoppable remotely.
                logger.warning("receiving stop requests failed; retrying in 1 s", exc_info=True)
                await asyncio.sleep(1)
                continue
            if message.get("type") == STOP_EVENT_TYPE:
                stopper = self.stoppers.get(message.get("message_id"))  # type: ignore[arg-type]
                if stopper is not None:
                    stopper.request()


# One listener per event loop: channel layer connections belong to the loop that opened them.
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StopListener] = weakref.WeakKeyDictionary()


def _listener(layer: BaseChannelLayer) -> _StopListener:
    loop = asyncio.get_running_loop()
    listener = _listeners.get(loop)
    if listener is None or listener.layer is not layer:
        listener = _listeners[loop] = _StopListener(layer)
    return listener


@contextlib.asynccontextmanager
async def listen_for_stop(message_id: int, stopper: ReplyStopper) -> AsyncIterator[None]:
    """Call ``stopper.request()`` when a stop request for ``message_id`` arrives, inside the block.

    Joins ``stop_group(message_id)`` before the block starts (so a client that has seen the
    reply start can stop it) and leaves it after. When the channel layer is unreachable the
    reply still streams, only without cross-process stop (logged).
    """
    layer = get_channel_layer()
    listener = _listener(layer) if layer is not None else None
    group, channel = stop_group(message_id), ""
    if listener is not None:
        listener.stoppers[message_id] = stopper
        try:
            channel = await listener.start()
            await listener.layer.group_add(group, channel)
        except Exception:
            channel = ""
            logger.warning("cannot listen for stop requests of reply %s", message_id, exc_info=True)
    try:
        yield
    finally:
        if listener is not None:
            listener.stoppers.pop(message_id, None)
            if channel:
                try:
                    await listener.layer.group_discard(group, channel)
                except Exception:
                    logger.warning("cannot leave the stop group of reply %s", message_id, exc_info=True)


__all__ = [
    "STOP_EVENT_TYPE",
    "ReplyStopper",
    "listen_for_stop",
    "reply_stop",
    "stop_group",
    "stoppable_chunks",
]
