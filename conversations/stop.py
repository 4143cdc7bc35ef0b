"""Stop a streaming reply from any server process, and relay a reply so that it can be stopped.

A reply streams in one process (an SSE response or a WebSocket consumer) while the stop request
(``POST /api/conversations/{id}/messages/{message_id}/stop/``) may land on another. So
``reply_stop`` broadcasts ``{"type": "reply.stop", "message_id": ...}`` to the channel layer group
``reply-stop`` (``STOP_GROUP``), of which every serving process is a member; the process that
streams that reply stops it, the others ignore the id. ``InMemoryChannelLayer`` covers one process
(the embedded default); ``channels_redis`` covers many.

Each process (each event loop) has one stop listener: one channel, which joins ``STOP_GROUP`` once,
when the first reply starts, and one task receiving on it, which hands a stop request to the
``ReplyStopper`` registered (in a local dict) for that message. A stream therefore makes no
channel layer call at all: no group of its own (a ``group_add`` and ``group_discard`` per reply
were two Redis round trips each, and with a few hundred concurrent replies exhausted redis-py's
connection pool, leaving those replies unstoppable), no task, no receive. That is also why no
receive is cancelled per stream: on Python 3.11, ``asyncio.wait_for`` (used by redis-py to send a
command) can swallow a cancellation, and a cancelled ``receive`` then hangs for channels_redis'
whole 5 s ``BZPOPMIN`` before failing.

Group membership expires: channels_redis drops a member ``group_expiry`` (default 86400 s) after
it joined, at the next ``group_send``. So the listener re-joins every ``REJOIN_SECONDS`` (an hour:
one cheap ``ZADD`` + ``EXPIRE``), and again as soon as it can after receiving failed (Redis may
have restarted empty). Re-joining on each stop received would not do: a process that received
no stop for a day would drop out of the group for good. A process that dies stays a member until
its membership expires; a stop broadcast then also fills its channel, whose messages expire
(``expiry``) unread: a few bytes, gone in seconds.

A stop interrupts the upstream wait at once by cancelling the streaming task only while it
awaits the upstream (``ReplyStopper.waiting``); the cancellation is absorbed in
``stoppable_chunks``, which then ends quietly. ``conversations.streaming`` persists the reply
as ``cancelled`` with its text so far, as it does when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
# The channel layer group of every process's stop listener; stop requests are broadcast to it.
STOP_GROUP = "reply-stop"
# How often a listener re-joins STOP_GROUP, well within channels_redis' group_expiry (1 day).
REJOIN_SECONDS = 3600.0
# After a failed join, how long a listener waits before trying again (streams meanwhile reuse
# the failure instead of each trying, so an outage costs at most one attempt a second).
RETRY_SECONDS = 1.0


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
    async_to_sync(layer.group_send)(STOP_GROUP, {"type": STOP_EVENT_TYPE, "message_id": message_id})


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
    """The stop requests of one event loop's replies: one channel in ``STOP_GROUP``, one receive task."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel = ""
        self.stoppers: dict[int, ReplyStopper] = {}
        self._joining: asyncio.Future[None] | None = None
        self._failed_at = 0.0
        self._rejoin = asyncio.Event()  # set: re-join now rather than at the next REJOIN_SECONDS
        self._tasks: tuple[asyncio.Task[None], ...] = ()

    async def start(self) -> None:
        """Join ``STOP_GROUP`` and start receiving, on first use; raise if the channel layer fails.

        Concurrent callers share one join, shielded from their cancellation (a stream that ends
        meanwhile must not cancel a Redis command: see the module docstring). Once joined this
        returns at once; after a failure, the next caller more than ``RETRY_SECONDS`` later tries
        again.
        """
        joining = self._joining
        if joining is None or (
            joining.done()
            and (joining.cancelled() or joining.exception() is not None)
            and time.monotonic() - self._failed_at >= RETRY_SECONDS
        ):
            joining = self._joining = asyncio.ensure_future(self._join())
        await asyncio.shield(joining)

    async def _join(self) -> None:
        try:
            if not self.channel:
                self.channel = await self.layer.new_channel()
            await self.layer.group_add(STOP_GROUP, self.channel)
        except BaseException:
            self._failed_at = time.monotonic()
            raise
        self._tasks = (
            asyncio.create_task(self._receive(), name="reply-stop-listener"),
            asyncio.create_task(self._keep_joined(), name="reply-stop-rejoin"),
        )

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except Exception:
                # Redis gone for a while: keep trying; replies stream on meanwhile, unstoppable remotely.
                logger.warning("receiving stop requests failed; retrying in 1 s", exc_info=True)
                self._rejoin.set()  # a Redis that restarted has forgotten the group
                await asyncio.sleep(1)
                continue
            if message.get("type") == STOP_EVENT_TYPE:
                # Every process gets every stop: only the one streaming that reply has its stopper.
                stopper = self.stoppers.get(message.get("message_id"))  # type: ignore[arg-type]
                if stopper is not None:
                    stopper.request()

    async def _keep_joined(self) -> None:
        """Re-join ``STOP_GROUP`` every ``REJOIN_SECONDS``, before channels_redis expires us."""
        delay = REJOIN_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rejoin.wait(), delay)  # cancels only an Event wait
            self._rejoin.clear()
            try:
                await self.layer.group_add(STOP_GROUP, self.channel)
            except Exception:
                logger.warning("re-joining the stop group failed; retrying in %s s", RETRY_SECONDS, exc_info=True)
                delay = RETRY_SECONDS
            else:
                delay = REJOIN_SECONDS


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

    Registers ``stopper`` with this process's listener, which has joined ``STOP_GROUP`` before
    the block starts (so a client that has seen the reply start can stop it); no channel layer
    call of its own once the listener runs. When the channel layer is unreachable the reply
    still streams, only without cross-process stop (logged).
    """
    layer = get_channel_layer()
    listener = _listener(layer) if layer is not None else None
    if listener is not None:
        listener.stoppers[message_id] = stopper
        try:
            await listener.start()
        except Exception:
            logger.warning("cannot listen for stop requests of reply %s", message_id, exc_info=True)
    try:
        yield
    finally:
        if listener is not None and listener.stoppers.get(message_id) is stopper:
            del listener.stoppers[message_id]


__all__ = [
    "STOP_EVENT_TYPE",
    "STOP_GROUP",
    "ReplyStopper",
    "listen_for_stop",
    "reply_stop",
    "stoppable_chunks",
]
