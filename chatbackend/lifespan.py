"""The ASGI lifespan protocol: what the server process does when it starts and before it exits.

Spec: https://asgi.readthedocs.io/en/latest/specs/lifespan.html. Run the server with
``--lifespan on`` (uvicorn) so that it sends these events; Channels' router has no lifespan
handler, so ``chatbackend.asgi`` puts ``LifespanApp`` in front of it.

- **shutdown**: uvicorn sends it on SIGTERM/SIGINT after its graceful wait
  (``--timeout-graceful-shutdown``: open streams run on for that long, no new connection is
  accepted) and after it cancelled what was still running: a cancelled request ends its reply
  with the text sent so far (``chatbackend.handlers``). ``llm.streaming.replies_shutdown``
  then ends every reply still open as ``cancelled`` with its text so far, waits until every
  reply's end (message, usage) is written and the usage queue is sent, and only then is the
  shutdown complete: uvicorn exits right after (it re-raises the signal), so anything not written
  by then would be lost.
- **startup**: replies are accepted (again: tests run the app twice in one process), a stop signal
  marks the process stopping before the server's own handler runs (``chatbackend.stopping``: it
  tells a server's 1012 close of a WebSocket from a client's), the process
  heartbeat starts (``chatbackend.liveness``), and on the embedded defaults (no Redis, no celery
  beat, one process) replies an earlier run left ``streaming`` are recovered
  (``conversations.services.reply_recover_orphans``).

daphne sends no lifespan events: on SIGTERM it cancels every connection's task at once and waits
for them; a cancelled request ends its reply and waits for its end to be written before the task
ends, and ``accounts.usage`` sends the usage queue at exit. So replies are saved there too, only
without a grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

from accounts.metering.ratelimits import rate_limit_close
from conversations.services import reply_recover_orphans
from llm.providers.openai_compatible import aclose_clients
from llm.routing import cooldown_store_close
from llm.streaming import replies_accepting, replies_shutdown

from . import broadcast
from .asyncdb import run_sync
from .liveness import start_heartbeat, stop_heartbeat
from .stopping import server_stopping_set, watch_stop_signals

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def startup() -> None:
    """Prepare this process to serve: heartbeat, replies accepted; on the embedded defaults, recover orphans."""
    replies_accepting(True)
    server_stopping_set(False)
    watch_stop_signals()  # after the server installed its own handlers: ours runs first, then its
    start_heartbeat()
    if not settings.REDIS_URL:
        # One process, no celery beat: a reply left "streaming" by an earlier run is an orphan now.
        recovered = await run_sync(reply_recover_orphans, orphan_after_seconds=0)
        if recovered:
            logger.warning("recovered %d replies left streaming by an earlier run", recovered)


async def shutdown() -> None:
    """Finish this process's replies and write everything they produced, before the process exits."""
    server_stopping_set(True)  # also when the shutdown came without a signal
    ended = await replies_shutdown()
    if ended:
        logger.warning("the shutdown ended %d open replies as cancelled; their text and usage are saved", ended)
    await stop_heartbeat()
    await broadcast.stop_listening()  # or the process's exit would wait on the listener's receive
    await aclose_clients()
    await rate_limit_close()  # after the replies: their ends gave their stream slots back
    await cooldown_store_close()


class LifespanApp:
    """Answer ``lifespan`` scopes with ``startup`` / ``shutdown``; pass every other scope to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        phases = {"lifespan.startup": startup, "lifespan.shutdown": shutdown}
        while True:
            phase = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
            try:
                await phases[phase]()
            except Exception as exc:
                logger.exception("%s failed", phase)
                await send({"type": f"{phase}.failed", "message": str(exc)})
                return
            await send({"type": f"{phase}.complete"})
            if phase == "lifespan.shutdown":
                return


__all__ = ["LifespanApp", "shutdown", "startup"]
