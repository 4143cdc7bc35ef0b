"""The configured channel layer on Redis: a receive outlasts a quiet spell, as broadcasts and stops need."""

from __future__ import annotations

import asyncio
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
