"""``chatbackend.stopping``: a stop signal marks the process stopping, and the server's own handler still runs."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from chatbackend.stopping import STOP_SIGNALS, server_stopping, server_stopping_set, watch_stop_signals


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    server_stopping_set(False)


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_stop_signal_marks_the_process_stopping_and_runs_the_servers_handler(restored_handlers, signum):
    received: list[int] = []
    signal.signal(signum, lambda sig, frame: received.append(sig))  # the ASGI server's handler
    server_stopping_set(False)

    assert watch_stop_signals()
    assert watch_stop_signals()  # a second startup does not chain the handler twice
    assert not server_stopping()
    signal.raise_signal(signum)

    assert server_stopping()
    assert received == [signum]  # once: the server goes on with its shutdown
