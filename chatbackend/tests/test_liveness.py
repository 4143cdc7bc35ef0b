"""The process heartbeat (``chatbackend.liveness``) keeps beating whatever request happened to start it."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.cache import cache

from chatbackend import liveness


@pytest.fixture
async def fast_heartbeat(settings):
    settings.PROCESS_HEARTBEAT_SECONDS = 0.5  # the key lives 1.5 s: a cache timeout is whole seconds
    await liveness.stop_heartbeat()
    yield liveness._key(liveness.PROCESS_ID)
    await liveness.stop_heartbeat()


async def test_a_heartbeat_started_under_a_request_outlives_it(fast_heartbeat, caplog):
    # A request's async code under a sync middleware runs inside async_to_sync: a task it starts
    # inherits that call's executor, which quits when the request ends.
    async def request() -> None:
        liveness.start_heartbeat()

    await sync_to_async(async_to_sync(request))()
    await asyncio.sleep(0.1)
    await cache.adelete(fast_heartbeat)

    await asyncio.sleep(0.7)  # a beat or more

    assert await cache.aget(fast_heartbeat) is not None
    assert "heartbeat could not be written" not in caplog.text
