"""Whether this server process has been told to stop (SIGTERM, SIGINT), for what only the server's
side of a connection can tell apart from a client's.

A WebSocket closed with 1012 ("Service Restart", RFC 6455, section 7.4.1) is what uvicorn reports
for every socket it closes at shutdown, but a client may close with 1012 as well: the close code
alone does not say who stopped the reply (``conversations.consumers``). uvicorn closes its sockets
after the signal, before the ASGI lifespan ``shutdown`` (``chatbackend.lifespan``), so the
signal is the first and only thing the application sees of its shutdown by then.

``watch_stop_signals`` (the lifespan ``startup``) chains a handler in front of the server's own
for SIGTERM and SIGINT: it marks the process stopping and calls the server's handler, which
goes on as before.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_stopping = False


def server_stopping() -> bool:
    """Return whether this process received a stop signal (or ``server_stopping_set(True)``)."""
    return _stopping


def server_stopping_set(stopping: bool = True) -> None:
    """Mark this process stopping (the lifespan ``shutdown``; tests), or serving again (``startup``)."""
    global _stopping
    _stopping = stopping


class _ChainedStopHandler:
    """A signal handler that marks the process stopping, then runs the handler it replaced."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        server_stopping_set(True)
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:  # what the signal would have done without us
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


def watch_stop_signals() -> bool:
    """Chain the stop-marking handler in front of the current SIGTERM and SIGINT handlers (once).

    Return False where no handler can be set (not the main thread, as ``signal.signal`` requires).
    A handler already chained is left as it is, so a second ``startup`` does not chain it twice.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if isinstance(current, _ChainedStopHandler) or current == signal.SIG_IGN:
            continue
        signal.signal(signum, _ChainedStopHandler(current))
    return True


__all__ = ["server_stopping", "server_stopping_set", "watch_stop_signals"]
