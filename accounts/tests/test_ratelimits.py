"""Rate limits (accounts.metering.ratelimits) on both stores: Redis (REDIS_URL) and this process's memory."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from django.conf import settings

from accounts.metering.ratelimit_store import WINDOW_SECONDS, RedisRateLimitStore
from accounts.metering.ratelimits import (
    KEY_PREFIX,
    RateLease,
    Window,
    format_reset,
    rate_limit_acquire,
    rate_limit_close,
)
from accounts.metering.types import MeteringSubject, RateLimits
from chatbackend.errors import ApplicationError

REDIS_URL = settings.REDIS_URL


@pytest.fixture
async def ids() -> AsyncIterator[list[int]]:
    """Fresh subject ids (so runs never share counters); their Redis keys are deleted afterwards."""
    fresh = [secrets.randbelow(10**12) + 10**12 for _ in range(3)]
    yield fresh
    if REDIS_URL:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        for subject_id in fresh:
            keys = [key async for key in client.scan_iter(f"{KEY_PREFIX}:*:{subject_id}*")]
            if keys:
                await client.delete(*keys)
        await client.aclose()


def key(subject_id: int, **limits: int) -> MeteringSubject:
    return MeteringSubject(kind="api_key", id=subject_id, limits=RateLimits(**limits))


def user(subject_id: int, **limits: int) -> MeteringSubject:
    return MeteringSubject(kind="user", id=subject_id, limits=RateLimits(**limits))


async def acquire(*subjects: MeteringSubject, prompt_tokens: int = 0, request_id: str = "") -> RateLease:
    return await rate_limit_acquire(
        request_id=request_id or f"chatcmpl-{secrets.token_hex(6)}", subjects=subjects, prompt_tokens=prompt_tokens
    )


async def refusal(*subjects: MeteringSubject, prompt_tokens: int = 0) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await acquire(*subjects, prompt_tokens=prompt_tokens)
    assert caught.value.status == 429
    assert caught.value.code == "rate_limit_exceeded"
    return caught.value


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3725, "1h2m5s")],
)
def test_reset_is_formatted_as_openai_sends_it(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(
    ("window", "limit", "cost", "wait"),
    [
        # Half of the previous minute's 10 still count: 5 used, room for 1 now.
        (Window(previous=10, previous_ttl=30, current=0, current_ttl=90), 10, 1, 0),
        # 10 this minute: they weigh fully until the minute ends (60 s), then fall: the first frees just after.
        (Window(previous=0, previous_ttl=0, current=10, current_ttl=120), 10, 1, 60),
        # 10 from the previous minute (60 s left) and 5 now: the previous half must go, 30 s.
        (Window(previous=10, previous_ttl=60, current=5, current_ttl=100), 10, 1, 30),
        # 8 this minute, 5 wanted of 10: after the roll 60 s on, 8 * (60 - s) / 60 < 6 at s = 15.
        (Window(previous=0, previous_ttl=0, current=8, current_ttl=110), 10, 5, 50 + 15),
    ],
)
def test_retry_after_is_when_the_sliding_window_lets_the_request_in(
    window: Window, limit: int, cost: int, wait: float
) -> None:
    assert window.seconds_until_fits(limit, cost) == pytest.approx(wait, abs=1e-6)


async def test_requests_per_minute_counts_down_then_refuses(store: str, ids: list[int]) -> None:
    subject = key(ids[0], requests_per_minute=3)
    remaining = [(await acquire(subject)).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]

    error = await refusal(subject)
    assert error.type == "requests"
    assert f"Rate limit reached for API key {ids[0]} on requests per min (RPM): Limit 3, Used 3" in error.message
    assert int(error.headers["Retry-After"]) >= 1
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in error.headers


async def test_concurrent_admissions_never_exceed_the_limit(store: str, ids: list[int]) -> None:
    subject = key(ids[0], requests_per_minute=10)
    results = await asyncio.gather(*(acquire(subject) for _ in range(30)), return_exceptions=True)
    admitted = [r for r in results if isinstance(r, RateLease)]
    refused = [r for r in results if isinstance(r, ApplicationError) and r.code == "rate_limit_exceeded"]
    assert (len(admitted), len(refused)) == (10, 20)


async def test_a_refusal_takes_nothing_from_the_other_subjects(store: str, ids: list[int]) -> None:
    api_key, owner = key(ids[0], requests_per_minute=1), user(ids[1], requests_per_minute=5, tokens_per_minute=1000)
    await acquire(api_key, owner, prompt_tokens=100)
    error = await refusal(api_key, owner, prompt_tokens=100)
    assert f"API key {ids[0]}" in error.message

    lease = await acquire(owner, prompt_tokens=100)  # the user's second admission, not its third
    assert lease.headers["x-ratelimit-remaining-requests"] == "3"
    assert lease.headers["x-ratelimit-remaining-tokens"] == "800"


async def test_tokens_per_minute_counts_prompt_then_completion(store: str, ids: list[int]) -> None:
    subject = key(ids[0], tokens_per_minute=100)
    first = await acquire(subject, prompt_tokens=40)
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "60"
    assert "x-ratelimit-limit-requests" not in first.headers
    second = await acquire(subject, prompt_tokens=40)
    assert second.headers["x-ratelimit-remaining-tokens"] == "20"

    error = await refusal(subject, prompt_tokens=40)
    assert error.type == "tokens"
    assert "tokens per min (TPM): Limit 100, Used 80, Requested 40" in error.message

    await first.release(completion_tokens=500)  # over the limit now: even an empty prompt waits
    await first.release(completion_tokens=500)  # idempotent: counted once
    error = await refusal(subject, prompt_tokens=0)
    assert "Used 580" in error.message
    # 580 counted against 100: the current minute must roll into the previous one (Redis: 60 s after
    # the first hit; memory: at the wall clock's next minute, 0-60 s away), whose weight must then fall
    # until what is left of 580 is 100 or less: 60 * (1 - 101 / 580) = 49.6 s more.
    assert int(error.headers["Retry-After"]) >= 50


async def test_completion_tokens_skip_the_subject_that_did_not_generate_them(store: str, ids: list[int]) -> None:
    """A reply a fallback model served: the requested model's tokens per minute get none of its completion."""
    requested = MeteringSubject(kind="model", id=ids[0], limits=RateLimits(tokens_per_minute=1000))
    caller = user(ids[1], tokens_per_minute=1000)
    lease = await acquire(caller, requested, prompt_tokens=10)
    await lease.release(completion_tokens=300, not_for=MeteringSubject(kind="model", id=ids[0]))

    assert (await acquire(requested)).headers["x-ratelimit-remaining-tokens"] == "990"  # the prompt only
    assert (await acquire(caller)).headers["x-ratelimit-remaining-tokens"] == "690"  # prompt and completion


async def test_a_prompt_larger_than_the_limit_is_too_large_for_ever(store: str, ids: list[int]) -> None:
    error = await refusal(key(ids[0], tokens_per_minute=100), prompt_tokens=101)
    assert error.message.startswith(f"Request too large for API key {ids[0]} on tokens per min (TPM)")
    assert "Retry-After" not in error.headers  # waiting cannot help


async def test_concurrent_streams_hold_a_slot_until_release(store: str, ids: list[int]) -> None:
    subject = user(ids[0], concurrent_streams=2)
    first, second = await acquire(subject), await acquire(subject)
    assert first.headers == {}  # OpenAI has no header for concurrency

    error = await refusal(subject)
    assert error.message.startswith(f"Concurrent stream limit reached for user {ids[0]}: Limit 2")
    assert error.headers == {"Retry-After": "1"}

    await first.release(completion_tokens=3)
    await first.release(completion_tokens=3)  # a second release frees nothing more
    third = await acquire(subject)
    await refusal(subject)
    await second.release(completion_tokens=0)
    await third.release(completion_tokens=0)


async def test_a_refused_stream_slot_takes_no_request_quota(store: str, ids: list[int]) -> None:
    subject = key(ids[0], requests_per_minute=5, concurrent_streams=1)
    held = await acquire(subject)
    await refusal(subject)
    await held.release(completion_tokens=0)
    assert (await acquire(subject)).headers["x-ratelimit-remaining-requests"] == "3"


async def test_leases_are_renewed_while_held_and_expire_with_their_process(
    store: str, ids: list[int], settings
) -> None:  # noqa: ANN001
    settings.RATE_LIMIT_STREAM_LEASE_SECONDS = 0.6
    subject = user(ids[0], concurrent_streams=1)
    await acquire(subject)
    await asyncio.sleep(1.5)  # 2.5 lease times: renewed every 0.2 s, so still held
    await refusal(subject)

    await rate_limit_close()  # as if this process died: nothing renews its lease any more
    await asyncio.sleep(1.0)
    await acquire(subject)


async def test_unlimited_subjects_cost_no_io(settings, ids: list[int]) -> None:  # noqa: ANN001
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 1.0
    try:
        lease = await acquire(key(ids[0]), user(ids[1]), prompt_tokens=10)
        assert lease.headers == {}
        await lease.release(completion_tokens=10)

        with pytest.raises(ApplicationError) as caught:
            await acquire(key(ids[0], requests_per_minute=10))
        assert (caught.value.status, caught.value.code) == (503, "metering_unavailable")

        settings.RATE_LIMIT_FAIL_OPEN = True
        lease = await acquire(key(ids[0], requests_per_minute=10, concurrent_streams=1), prompt_tokens=10)
        assert lease.headers == {}
    finally:
        await rate_limit_close()


async def test_a_hanging_store_is_not_waited_for_again_by_each_request(settings, ids: list[int]) -> None:  # noqa: ANN001
    connections = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 0.2
    limited = key(ids[0], requests_per_minute=10)
    try:
        for _ in range(3):
            with pytest.raises(ApplicationError) as caught:
                await acquire(limited)
            assert (caught.value.status, caught.value.code) == (503, "metering_unavailable")
        assert len(connections) == 1  # the first request found it hanging; the next two did not wait

        settings.RATE_LIMIT_FAIL_OPEN = True
        assert (await acquire(limited)).headers == {}
        assert len(connections) == 1
    finally:
        await rate_limit_close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_limits_internals_used_by_the_store(ids: list[int]) -> None:
    """The Redis store runs ``limits``' own scripts, as functions of its admission script, on ``limits``'
    own keys: an upgrade of ``limits`` that renames or changes them must fail here, not count in the
    wrong place."""
    if not REDIS_URL:
        pytest.skip("the Redis store needs REDIS_URL (CI sets it)")
    from limits.aio.storage.redis.bridge import RedisBridge

    store = RedisRateLimitStore(REDIS_URL)
    try:
        for script in (store._admit.script, store._release.script):
            assert RedisBridge.SCRIPT_ACQUIRE_SLIDING_WINDOW.decode() in script
        assert RedisBridge.SCRIPT_SLIDING_WINDOW.decode() in store._admit.script
        counter = f"requests:api_key:{ids[0]}"
        admitted = await store.admit([(counter, 10, 3)], [], [], "chatcmpl-x")
        assert admitted.hits == [True]
        assert admitted.windows[0] is not None and admitted.windows[0].current == 3
        # limits' public API sees what the batch counted, and the batch sees what limits counted.
        assert (await store.storage.get_sliding_window(counter, WINDOW_SECONDS))[2] == 3
        assert await store.storage.acquire_sliding_window_entry(counter, 10, WINDOW_SECONDS, 2)
        admitted = await store.admit([(counter, 10, 6)], [], [], "chatcmpl-y")
        assert admitted.hits == [False]
        assert admitted.windows[0] is not None and admitted.windows[0].current == 5
    finally:
        await store.close()


async def test_a_redis_that_lost_its_scripts_is_reloaded(store: str, ids: list[int]) -> None:
    """A restarted Redis has no scripts (``NOSCRIPT``): the admission loads them again and goes on."""
    if store != "redis":
        pytest.skip("scripts are a Redis matter")
    subject = key(ids[0], requests_per_minute=5, tokens_per_minute=100, concurrent_streams=2)
    first = await acquire(subject, prompt_tokens=10)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.script_flush()  # what a restart does to the script cache (every client reloads)
    finally:
        await client.aclose()
    second = await acquire(subject, prompt_tokens=10)
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert second.headers["x-ratelimit-remaining-tokens"] == "80"
    await first.release(completion_tokens=5)
    await second.release(completion_tokens=5)
    third = await acquire(subject, prompt_tokens=10)
    assert third.headers["x-ratelimit-remaining-tokens"] == "60"
