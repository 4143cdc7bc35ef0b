"""Rate-limit releases are batched (accounts.metering.ratelimit_store): releases that end together go to
Redis in one script call, an admission carries the releases waiting before it, a failed flush is
logged, and shutdown sends what waits. Counted with Redis' own MONITOR, on a real Redis."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from django.conf import settings as django_settings

from accounts.metering.ratelimit_store import RedisRateLimitStore, rate_limit_store
from accounts.metering.ratelimits import KEY_PREFIX, RateLease, rate_limit_acquire, rate_limit_close
from accounts.metering.types import MeteringSubject, RateLimits

REDIS_URL = django_settings.REDIS_URL

pytestmark = pytest.mark.skipif(not REDIS_URL, reason="release batching is the Redis store's (CI sets REDIS_URL)")


@pytest.fixture
async def subject_id() -> AsyncIterator[int]:
    fresh = secrets.randbelow(10**12) + 10**12
    yield fresh
    await rate_limit_close()
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{KEY_PREFIX}:*:{fresh}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _user(subject_id: int, **limits: int) -> MeteringSubject:
    return MeteringSubject(kind="user", id=subject_id, limits=RateLimits(**limits))


async def _acquire(subject: MeteringSubject, prompt_tokens: int = 0) -> RateLease:
    return await rate_limit_acquire(
        request_id=f"chatcmpl-{secrets.token_hex(6)}", subjects=[subject], prompt_tokens=prompt_tokens
    )


class Monitor:
    """The script calls Redis receives (``MONITOR``) that name ``needle``, until ``stop``."""

    def __init__(self, needle: str) -> None:
        self.needle = needle
        self.marker = f"stop-{secrets.token_hex(8)}"
        self.calls: list[str] = []
        self._client = redis.asyncio.Redis.from_url(REDIS_URL)
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._ready.wait(), 5)
        return self

    async def _listen(self) -> None:
        async with self._client.monitor() as monitor:
            self._ready.set()
            async for event in monitor.listen():
                command = event["command"]
                if self.marker in command:
                    return
                if self.needle in command and command.upper().startswith("EVALSHA"):
                    self.calls.append(command)

    async def stop(self) -> list[str]:
        """Return the calls seen, once every command sent before this one has been seen.

        A call sent twice (the same command again: redis-py's retry after ``NOSCRIPT``, when a test or
        a restart flushed Redis' scripts) counts once."""
        other = redis.asyncio.Redis.from_url(REDIS_URL)
        await other.echo(self.marker)
        await other.aclose()
        assert self._task is not None
        await asyncio.wait_for(self._task, 5)
        return list(dict.fromkeys(self.calls))

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self._client.aclose()


async def _zcard(key: str) -> int:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        return int(await client.zcard(key))
    finally:
        await client.aclose()


async def test_releases_ending_together_share_one_script_call(subject_id: int) -> None:
    subject = _user(subject_id, tokens_per_minute=100_000, concurrent_streams=50)
    leases = [await _acquire(subject, prompt_tokens=10) for _ in range(20)]
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    # Most were admitted locally (accounts.metering.headroom): their records go first, in a call of their own.
    await asyncio.gather(*(lease.confirmed() for lease in leases))
    async with Monitor(f":{subject_id}") as monitor:
        await asyncio.gather(*(lease.release(completion_tokens=5) for lease in leases))
        await store.flush()
        calls = await monitor.stop()
    assert len(calls) == 1, calls  # 20 releases, one round trip
    assert calls[0].split()[1].strip('"') == store._release.sha
    assert await _zcard(f"{KEY_PREFIX}:streams:user:{subject_id}") == 0  # every slot freed
    after = await _acquire(subject)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 20 * 15)  # prompts and completions
    await after.release(completion_tokens=0)


async def test_an_admission_carries_the_releases_waiting_before_it(subject_id: int, settings: Any) -> None:
    settings.RATE_LIMIT_RELEASE_BATCH_SECONDS = 30  # only the admission can send it
    subject = _user(subject_id, requests_per_minute=100, concurrent_streams=1)
    held = await _acquire(subject)
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    async with Monitor(f":{subject_id}") as monitor:
        await held.release(completion_tokens=0)
        assert await _zcard(f"{KEY_PREFIX}:streams:user:{subject_id}") == 1  # waiting in this process
        # The one slot is free for the next admission of this process: its script releases first.
        following = await _acquire(subject)
        calls = await monitor.stop()
    assert len(calls) == 1, calls
    assert calls[0].split()[1].strip('"') == store._admit.sha
    assert held.request_id in calls[0] and following.request_id in calls[0]
    assert following.headers["x-ratelimit-remaining-requests"] == "98"
    await following.release(completion_tokens=0)


async def test_a_release_after_a_carried_one_waits_its_own_delay_for_an_admission(
    subject_id: int, settings: Any
) -> None:
    # The timer the first release started must not send the second one early, alone: the admission
    # that carried the first one stopped it.
    settings.RATE_LIMIT_RELEASE_BATCH_SECONDS = 0.2
    subject = _user(subject_id, requests_per_minute=100, concurrent_streams=1)
    first = await _acquire(subject)
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    async with Monitor(f":{subject_id}") as monitor:
        await first.release(completion_tokens=0)  # waits up to 0.2 s
        second = await _acquire(subject)  # carries it
        await asyncio.sleep(0.12)
        await second.release(completion_tokens=0)  # waits up to 0.2 s from now, not from the first
        await asyncio.sleep(0.12)  # past the first release's 0.2 s
        third = await _acquire(subject)  # carries it
        calls = await monitor.stop()
    assert [call.split()[1].strip('"') for call in calls] == [store._admit.sha] * 2, calls
    assert first.request_id in calls[0] and second.request_id in calls[1]
    await third.release(completion_tokens=0)
    await store.flush()


async def test_shutdown_sends_the_releases_still_waiting(subject_id: int, settings: Any) -> None:
    settings.RATE_LIMIT_RELEASE_BATCH_SECONDS = 30
    subject = _user(subject_id, tokens_per_minute=1000, concurrent_streams=5)
    leases = [await _acquire(subject, prompt_tokens=10) for _ in range(3)]
    for lease in leases:
        await lease.release(completion_tokens=20)
    streams = f"{KEY_PREFIX}:streams:user:{subject_id}"
    assert await _zcard(streams) == 3  # not sent yet

    await rate_limit_close()  # the ASGI lifespan's shutdown does this after the last reply ended
    assert await _zcard(streams) == 0
    after = await _acquire(subject)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 * 30)
    await after.release(completion_tokens=0)


async def test_a_failed_flush_is_logged_with_its_requests(caplog: pytest.LogCaptureFixture, settings: Any) -> None:
    """Redis does not answer: the batch's requests are named in one warning; nothing raises to the
    replies, whose release returned at once (their counters age out, their leases expire)."""
    connections: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 0.2
    store = RedisRateLimitStore(f"redis://127.0.0.1:{port}/0")
    try:
        with caplog.at_level(logging.WARNING, logger="accounts.metering.ratelimit_store"):
            await store.release([("tokens:user:1", 5)], ["streams:user:1"], "chatcmpl-one")
            await store.release([], ["streams:user:1"], "chatcmpl-two")
            await store.flush()
        failures = [r for r in caplog.records if "rate-limit release of" in r.getMessage()]
        assert len(failures) == 1
        assert "chatcmpl-one, chatcmpl-two" in failures[0].getMessage()
        assert store._pending == []
    finally:
        await store.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
