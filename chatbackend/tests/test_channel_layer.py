"""The configured channel layer on Redis: a receive outlasts a quiet spell, as broadcasts and stops need."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.conf import settings


@pytest.mark.skipif(not settings.REDIS_URL, reason="the Redis channel layer needs REDIS_URL (CI sets it)")
async def test_a_receive_waits_past_the_layers_blocking_pop_without_failing() -> None:
    """A listener's receive spans several of channels_redis' 5 s BZPOPMINs: none may fail on the socket
    timeout (redis-py 8's default of 5 s did, dropping the connection and what it had popped)."""
    layer: Any = get_channel_layer()
    channel = await layer.new_channel()
    receiving = asyncio.ensure_future(layer.receive(channel))
    try:
        await asyncio.sleep(layer.brpop_timeout + 1)  # one blocking pop has timed out on the server
        assert not receiving.done(), receiving.exception()
        await layer.send(channel, {"type": "broadcast.test"})
        assert await asyncio.wait_for(receiving, 5) == {"type": "broadcast.test"}
    finally:
        receiving.cancel()


@pytest.mark.skipif(not settings.REDIS_URL, reason="the Redis channel layer needs REDIS_URL (CI sets it)")
def test_an_event_loop_with_a_broadcast_listener_shuts_down_without_stop_listening() -> None:
    """An event loop's shutdown cancels each task once and waits for all: the listener must end on
    that one cancellation, even when redis-py swallows it mid-receive (it did: every async test
    that read a budget, and so started the listener, hung at teardown until pytest's timeout)."""
    from chatbackend import broadcast

    async def listen_then_return(pause: float) -> bool:
        joined = await broadcast.listen()
        await asyncio.sleep(pause)  # 0: the receive is still connecting; later: in its blocking pop
        return joined

    finished: list[bool] = []

    def run() -> None:
        for pause in (0.0, 0.01, 0.5):
            finished.append(asyncio.run(listen_then_return(pause)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(3 * broadcast.STOP_SECONDS + 10)
    assert finished == [True, True, True], "asyncio.run() hung: the listener outlived its event loop's shutdown"
