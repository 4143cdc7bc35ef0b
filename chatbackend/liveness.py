"""Which server processes are alive: each proves it with a heartbeat key in the shared cache.

A reply streams in one process. If that process dies (SIGKILL, OOM, a lost machine), nothing
ends the reply, and its message would stay ``streaming`` for ever. So every process that streams
has an id (``PROCESS_ID``, written on the messages it streams) and, while it runs, sets the cache
key ``chatbackend:alive:<id>`` every ``PROCESS_HEARTBEAT_SECONDS`` with a lifetime of three
beats (``start_heartbeat``). ``process_alive(id)`` is then False only for a process that has not
beaten for three beats: a slow reply in a live process is never taken for an orphan.

The cache is Redis when ``REDIS_URL`` is set, so every process (and the Celery worker that
recovers orphans) sees every heartbeat. With the embedded defaults the cache is in-process: only
this process's own heartbeat is visible, which is right for the one process they run (an orphan
there is a reply of an earlier run, recovered at start-up).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import uuid
import weakref

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

# This process's id: host, pid, and a random part (pids are reused across restarts).
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
BEATS_TO_DEATH = 3

_heartbeats: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = weakref.WeakKeyDictionary()
# The heartbeat start_heartbeat last found or started (done once stopped or cancelled).
_beating: asyncio.Task[None] | None = None


def _key(process_id: str) -> str:
    return f"chatbackend:alive:{process_id}"


def process_alive(process_id: str) -> bool:
    """Return whether process ``process_id`` has beaten within ``BEATS_TO_DEATH`` heartbeats (sync).

    Raises what the cache raises when it is unreachable: not knowing is not "dead".
    """
    return process_id == PROCESS_ID or cache.get(_key(process_id)) is not None


# While the cache is unreachable, the heartbeat is retried this often: a Redis that comes back
# empty (restarted without persistence) learns that this process lives within a second.
RETRY_SECONDS = 1.0


async def _beat() -> None:
    interval = float(settings.PROCESS_HEARTBEAT_SECONDS)
    failing = False
    while True:
        try:
            # Not ``cache.aset`` (``sync_to_async(thread_sensitive=True)``: the executor of whatever
            # request context is current, or asgiref's one shared thread): any worker thread does.
            await sync_to_async(cache.set, thread_sensitive=False)(
                _key(PROCESS_ID), 1, timeout=interval * BEATS_TO_DEATH
            )
        except Exception:  # Redis away for a while: keep trying; orphans wait for the next beat
            if not failing:
                logger.warning("the process heartbeat could not be written; retrying", exc_info=True)
            failing = True
            await asyncio.sleep(min(RETRY_SECONDS, interval))
            continue
        if failing:
            logger.warning("the process heartbeat is written again")
            failing = False
        await asyncio.sleep(interval)


def start_heartbeat() -> None:
    """Start this process's heartbeat in the running event loop, if it is not beating (cheap).

    The heartbeat belongs to the process, not to the request that happens to start it: it runs in
    an empty ``contextvars.Context`` and writes from a worker thread. A task
    inherits its creator's context, and a request's async code under sync middleware runs inside
    ``async_to_sync``, whose executor quits when the request ends: every later beat through
    ``cache.aset`` then failed, for good, and the process's replies looked orphaned to the others.
    The empty context also keeps that request's id off the heartbeat's logs.
    """
    global _beating
    loop = asyncio.get_running_loop()
    task = _beating
    if task is not None and task.get_loop() is loop and not task.done():
        return  # the common case, once per budgeted request: no weak dictionary lookup
    task = _heartbeats.get(loop)
    if task is None or task.done():
        task = _heartbeats[loop] = loop.create_task(_beat(), name="process-heartbeat", context=contextvars.Context())
    _beating = task


async def stop_heartbeat() -> None:
    """Stop this event loop's heartbeat and drop the key: the process is going away (shutdown, tests)."""
    global _beating
    task = _heartbeats.pop(asyncio.get_running_loop(), None)
    if task is _beating:
        _beating = None  # a start while this one stops begins another, as the pop above lets it
    if task is not None:
        task.cancel()
        await asyncio.wait((task,))
    try:
        await cache.adelete(_key(PROCESS_ID))
    except Exception:
        logger.warning("the process heartbeat key could not be deleted", exc_info=True)


__all__ = ["PROCESS_ID", "process_alive", "start_heartbeat", "stop_heartbeat"]
