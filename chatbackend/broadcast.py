"""Messages to every server process: one channel layer group, one listener per process.

Some state must reach every process that serves requests, whichever process changed it: a stop
request for a reply that streams elsewhere, or "this API key was revoked, drop your cached copy".
``broadcast`` sends a message (a dict with a ``type``) to the channel layer group
``PROCESS_GROUP``; every process (every event loop) has one listener in that group, which hands
each message to the handlers registered for its type with ``on_broadcast``.
``InMemoryChannelLayer`` covers one process (the embedded default); ``channels_redis`` covers many.

One listener per process, not a channel or group per stream: a ``group_add`` and
``group_discard`` per reply were two Redis round trips each and, with a few hundred concurrent
replies, exhausted redis-py's connection pool. A listener is one channel that joins the group
once, and one task that receives on it. Nothing is cancelled per stream either: on Python 3.11,
``asyncio.wait_for`` (used by redis-py to send a command) can swallow a cancellation, and a
cancelled ``receive`` then goes on waiting (``BZPOPMIN`` after ``BZPOPMIN``) until a message
comes: ``stop_listening`` cancels the listener again until it ends.

Group membership expires: channels_redis drops a member ``group_expiry`` (default 86400 s) after
it joined, at the next ``group_send``. So the listener re-joins every ``REJOIN_SECONDS`` (one
cheap ``ZADD`` + ``EXPIRE``), and again as soon as it can after receiving failed. A listener that
lost Redis for a while may have missed messages: when it receives again it dispatches a local
``RESYNC`` message, on which caches drop everything they hold. A process that dies stays a member
until its membership expires; a broadcast then also fills its channel, whose messages expire
(channels_redis ``expiry``) unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer

logger = logging.getLogger(__name__)

# The channel layer group of every process's listener.
PROCESS_GROUP = "chatbackend-processes"
# Dispatched locally (never sent) when a listener receives again after a failure: messages may
# have been missed meanwhile.
RESYNC = "broadcast.resync"
# How often a listener re-joins PROCESS_GROUP, well within channels_redis' group_expiry (1 day).
REJOIN_SECONDS = 3600.0
# After a failed join, how long a listener waits before trying again (callers meanwhile reuse the
# failure instead of each trying, so an outage costs at most one attempt a second).
RETRY_SECONDS = 1.0
# The longest ``stop_listening`` waits for the listener's tasks to end.
STOP_SECONDS = 10.0

Handler = Callable[[dict[str, Any]], None]
_handlers: dict[str, list[Handler]] = {}


def on_broadcast(message_type: str, handler: Handler) -> None:
    """Call ``handler(message)`` for every broadcast message of ``message_type`` this process receives.

    Register at import time (module level). The handler runs on the event loop: it must be quick
    and must not block or raise (an exception is logged and ignored).
    """
    _handlers.setdefault(message_type, []).append(handler)


def dispatch(message: dict[str, Any]) -> None:
    """Hand ``message`` to the handlers of its ``type`` in this process (the listener calls this)."""
    for handler in _handlers.get(message.get("type", ""), ()):
        try:
            handler(message)
        except Exception:
            logger.exception("broadcast handler for %r failed", message.get("type"))


async def broadcast(message: dict[str, Any]) -> None:
    """Send ``message`` (``{"type": ..., ...}``, JSON-serializable) to every process, this one included.

    Raises what the channel layer raises when it is unreachable. Without a channel layer, only
    this process gets it.
    """
    layer = get_channel_layer()
    if layer is None:
        dispatch(message)
        return
    await layer.group_send(PROCESS_GROUP, message)


def broadcast_sync(message: dict[str, Any]) -> None:
    """``broadcast`` from sync code (a DRF view, a signal handler, a Celery task)."""
    async_to_sync(broadcast)(message)


class _Listener:
    """One event loop's membership of ``PROCESS_GROUP``: one channel, one receive task."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel = ""
        self._joining: asyncio.Future[None] | None = None
        self._failed_at = 0.0
        self._rejoin = asyncio.Event()  # set: re-join now rather than at the next REJOIN_SECONDS
        self.tasks: tuple[asyncio.Task[None], ...] = ()

    @property
    def joined(self) -> bool:
        joining = self._joining
        return joining is not None and joining.done() and not joining.cancelled() and joining.exception() is None

    async def start(self) -> None:
        """Join the group and start receiving, on first use; raise if the channel layer fails.

        Concurrent callers share one join, shielded from their cancellation (see the module
        docstring). Once joined this returns at once; after a failure, the next caller more than
        ``RETRY_SECONDS`` later tries again.
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
            await self.layer.group_add(PROCESS_GROUP, self.channel)
        except BaseException:
            self._failed_at = time.monotonic()
            raise
        # The process's listeners, not the request's that joined first: an empty context each
        # (chatbackend.liveness.start_heartbeat says why).
        self.tasks = (
            asyncio.create_task(self._receive(), name="broadcast-listener", context=contextvars.Context()),
            asyncio.create_task(self._keep_joined(), name="broadcast-rejoin", context=contextvars.Context()),
        )

    async def _receive(self) -> None:
        """Receive until cancelled: one cancellation is enough, even one a library swallows.

        The receiving runs in a task of its own, which this one awaits through ``asyncio.shield``
        (no ``wait_for``: the cancellation always reaches here). Once cancelled, it cancels that
        task again until it ends (at most ``STOP_SECONDS``): a cancellation that redis-py swallowed
        inside channels_redis' ``receive`` would otherwise leave it waiting, ``BZPOPMIN`` after
        ``BZPOPMIN``, and an event loop's shutdown (which cancels each task once, then waits for
        all of them) would wait for ever.
        """
        receiving = asyncio.ensure_future(self._receive_forever())
        try:
            await asyncio.shield(receiving)
        except asyncio.CancelledError:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STOP_SECONDS
            while not receiving.done() and loop.time() < deadline:
                receiving.cancel()
                # A further cancellation of this task (``stop_listening`` repeats its own) must
                # not leave the receiving task behind: it is absorbed here, and re-raised below.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((receiving,), timeout=0.1)
            raise

    async def _receive_forever(self) -> None:
        failing = False
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except Exception:
                _raise_if_cancel_swallowed()
                # Redis gone for a while: keep trying; requests are served meanwhile, only without
                # messages from other processes. Logged once per outage, not every second.
                if not failing:
                    logger.warning("receiving broadcast messages failed; retrying every 1 s", exc_info=True)
                failing = True
                self._rejoin.set()  # a Redis that restarted has forgotten the group
                await asyncio.sleep(1)
                continue
            _raise_if_cancel_swallowed()
            if failing:
                failing = False
                logger.warning("receiving broadcast messages again; every lookup cache is cleared")
                dispatch({"type": RESYNC})
            dispatch(message)

    async def _keep_joined(self) -> None:
        """Re-join the group every ``REJOIN_SECONDS``, before channels_redis expires the membership."""
        delay = REJOIN_SECONDS
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rejoin.wait(), delay)  # cancels only an Event wait
            _raise_if_cancel_swallowed()
            self._rejoin.clear()
            try:
                await self.layer.group_add(PROCESS_GROUP, self.channel)
            except Exception:
                _raise_if_cancel_swallowed()
                if not failing:
                    logger.warning(
                        "re-joining the broadcast group failed; retrying every %s s", RETRY_SECONDS, exc_info=True
                    )
                failing = True
                delay = RETRY_SECONDS
            else:
                failing = False
                delay = REJOIN_SECONDS


def _raise_if_cancel_swallowed() -> None:
    """Raise ``CancelledError`` if this task was cancelled but a library swallowed it.

    On Python 3.11, redis-py's ``asyncio.wait_for`` can turn the cancellation of a listener (its
    loop shutting down, ``stop_listening``) into a result or a ``TimeoutError``; a loop that went
    on would never end, and the event loop's shutdown would wait for it for ever. The task still
    counts the request (``Task.cancelling``).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# One listener per event loop: channel layer connections belong to the loop that opened them.
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = weakref.WeakKeyDictionary()


def _listener() -> _Listener | None:
    layer = get_channel_layer()
    if layer is None:
        return None
    loop = asyncio.get_running_loop()
    listener = _listeners.get(loop)
    if listener is None or listener.layer is not layer:
        listener = _listeners[loop] = _Listener(layer)
    return listener


async def listen() -> bool:
    """Make sure this process receives broadcasts; return whether it does.

    Cheap once joined (no channel layer call). When the channel layer is unreachable, logs a
    warning and returns False: the caller works on, without messages from other processes.
    """
    listener = _listener()
    if listener is None:
        return False
    if listener.joined:
        return True
    try:
        await listener.start()
    except Exception:
        logger.warning("cannot listen for broadcast messages", exc_info=True)
        return False
    return True


def listening() -> bool:
    """Return whether a listener of this process has joined the group (any thread may ask; cheap).

    For sync code that must know whether an invalidation sent from now on will reach this
    process (``chatbackend.lookup_cache``); async code calls ``listen()`` instead.
    """
    try:
        return any(listener.joined for listener in tuple(_listeners.values()))
    except RuntimeError:  # the event loop's thread added a listener meanwhile: say no, this once
        return False


async def stop_listening() -> None:
    """Leave the group and stop this event loop's listener (tests, the server's shutdown); at most
    ``STOP_SECONDS`` (its tasks are left behind after that)."""
    loop = asyncio.get_running_loop()
    listener = _listeners.pop(loop, None)
    if listener is None:
        return
    if listener.channel and listener.joined:
        with contextlib.suppress(Exception):
            await listener.layer.group_discard(PROCESS_GROUP, listener.channel)
    # Cancelled again until they end: Python 3.11's ``asyncio.wait_for`` can swallow one cancellation
    # (module docstring), and the receive would then wait on, ``BZPOPMIN`` after ``BZPOPMIN``, until
    # a message came. Bounded, so that a shutdown never waits on it for more than STOP_SECONDS.
    await _cancel_until_done(set(listener.tasks), STOP_SECONDS)


async def _cancel_until_done(tasks: set[asyncio.Future[Any]], seconds: float) -> None:
    """Cancel ``tasks`` every 0.1 s until they have ended, for at most ``seconds``."""
    loop = asyncio.get_running_loop()
    pending, deadline = tasks, loop.time() + seconds
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


__all__ = [
    "PROCESS_GROUP",
    "RESYNC",
    "broadcast",
    "broadcast_sync",
    "dispatch",
    "listen",
    "listening",
    "on_broadcast",
    "stop_listening",
]
