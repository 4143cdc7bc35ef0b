"""Local admission (accounts.metering.headroom), on a real Redis: a caller far from its limits is
admitted without waiting for the store, and the store still holds every admission once recorded;
near a limit, or with a small one, every admission waits for the store; a record that cannot reach
the store turns the next admissions into the store's 503."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from django.conf import settings as django_settings
from django.test import override_settings

from accounts.metering import ratelimit_store
from accounts.metering.budget_store import (
    ReserveLine,
    ReserveRequest,
    Settlement,
    budget_store,
    counter_key,
    reservation_key,
)
from accounts.metering.headroom import VIEW_SECONDS, HeadroomView
from accounts.metering.ratelimit_store import (
    PROCESSES_KEY,
    WINDOW_SECONDS,
    Admitted,
    RedisRateLimitStore,
    Window,
    rate_limit_store,
)
from accounts.metering.ratelimits import KEY_PREFIX, RateLease, rate_limit_acquire, rate_limit_close
from accounts.metering.types import MeteringSubject, RateLimits
from accounts.tests.test_ratelimit_releases import Monitor
from chatbackend.errors import ApplicationError
from chatbackend.liveness import PROCESS_ID

REDIS_URL = django_settings.REDIS_URL

needs_redis = pytest.mark.skipif(not REDIS_URL, reason="local admission is the Redis store's (CI sets REDIS_URL)")


@pytest.fixture
async def subject_id() -> AsyncIterator[int]:
    """A subject id no other test uses; this process is the only one that admits (``PROCESSES_KEY``)."""
    fresh = secrets.randbelow(10**12) + 10**12
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    await client.delete(PROCESSES_KEY)
    yield fresh
    await rate_limit_close()
    keys = [key async for key in client.scan_iter(f"{KEY_PREFIX}:*:{fresh}*")]
    keys += [key async for key in client.scan_iter(f"*:{fresh}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _user(subject_id: int, **limits: int) -> MeteringSubject:
    return MeteringSubject(kind="user", id=subject_id, limits=RateLimits(**limits))


async def _acquire(
    subject: MeteringSubject, *, prompt_tokens: int = 0, budget: ReserveRequest | None = None
) -> RateLease:
    request_id = budget.request_id if budget is not None else f"chatcmpl-{secrets.token_hex(6)}"
    return await rate_limit_acquire(
        request_id=request_id, subjects=[subject], prompt_tokens=prompt_tokens, budget=budget
    )


def _local(lease: RateLease) -> bool:
    return lease._confirmation is not None


async def _requests_counted(store: RedisRateLimitStore, subject: MeteringSubject) -> int:
    return int((await store.storage.get_sliding_window(f"requests:user:{subject.id}", WINDOW_SECONDS))[2])


async def _leases(subject: MeteringSubject) -> int:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        return int(await client.zcard(f"{KEY_PREFIX}:streams:user:{subject.id}"))
    finally:
        await client.aclose()


@needs_redis
async def test_far_from_its_limits_a_caller_is_admitted_locally_and_every_admission_is_recorded(
    subject_id: int,
) -> None:
    subject = _user(subject_id, requests_per_minute=1000, tokens_per_minute=1_000_000, concurrent_streams=100)
    first = await _acquire(subject, prompt_tokens=10)
    assert not _local(first)  # no view of the caller yet: the store answers
    second = await _acquire(subject, prompt_tokens=10)
    assert _local(second)
    # The headers count down as the store's would have.
    assert first.headers["x-ratelimit-remaining-requests"] == "999"
    assert second.headers["x-ratelimit-remaining-requests"] == "998"
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 20)

    await second.confirmed()
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    assert await _requests_counted(store, subject) == 2
    assert await _leases(subject) == 2

    # Released before its record answered: the release waits for it, so no lease is left behind.
    third = await _acquire(subject, prompt_tokens=10)
    assert _local(third)
    await third.release(completion_tokens=7)
    await third.confirmed()
    await asyncio.gather(*store.records)
    await store.flush()
    assert await _leases(subject) == 2

    await first.release(completion_tokens=7)
    await second.release(completion_tokens=7)
    await store.flush()
    assert await _leases(subject) == 0
    tokens = await store.storage.get_sliding_window(f"tokens:user:{subject.id}", WINDOW_SECONDS)
    assert tokens[2] == 3 * (10 + 7)
    # The headers of a local admission count what the store holds, the completions just released included.
    fourth = await _acquire(subject, prompt_tokens=10)
    assert _local(fourth)
    assert fourth.headers["x-ratelimit-remaining-requests"] == "996"
    assert fourth.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 4 * 10 - 3 * 7)
    await fourth.release(completion_tokens=0)


@needs_redis
async def test_the_headers_a_local_admission_sends_count_what_other_processes_admitted_meanwhile(
    subject_id: int,
) -> None:
    subject = _user(subject_id, requests_per_minute=1000, tokens_per_minute=1_000_000)
    first = await _acquire(subject, prompt_tokens=10)
    assert not _local(first)
    assert await first.confirmed_headers() is first.headers  # the store's answer already
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    # Another process admits two requests of 5 tokens: this process's view has not seen them.
    for dimension, amount in (("requests", 1), ("tokens", 5)):
        for _ in range(2):
            assert await store.storage.acquire_sliding_window_entry(
                f"{dimension}:user:{subject.id}", 1_000_000, WINDOW_SECONDS, amount
            )

    second = await _acquire(subject, prompt_tokens=10)
    assert _local(second)
    assert second.headers["x-ratelimit-remaining-requests"] == "998"  # the view's: one too many each
    headers = await second.confirmed_headers()
    assert headers is second.headers
    assert headers["x-ratelimit-limit-requests"] == "1000"
    assert headers["x-ratelimit-remaining-requests"] == "996"
    assert headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 10 - 2 * 5 - 10)
    assert headers["x-ratelimit-reset-requests"].endswith("s"), headers  # a Go duration: "20ms", "1m0s"
    await first.release(completion_tokens=0)
    await second.release(completion_tokens=0)


@needs_redis
async def test_a_failed_record_leaves_a_local_admission_the_headers_of_its_view(subject_id: int) -> None:
    subject = _user(subject_id, requests_per_minute=1000)
    await _acquire(subject)
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    local = await _acquire(subject)
    assert _local(local)
    seen = dict(local.headers)
    assert local._confirmation is not None
    local._confirmation.cancel()  # as when the loop closes under it: no answer
    assert await local.confirmed_headers() == seen
    await local.release(completion_tokens=0)


@needs_redis
async def test_unseen_admissions_stay_within_the_share_of_the_room(subject_id: int) -> None:
    """With share 0.1 and this one process admitting, at most a tenth of the room left is admitted
    without the store; the rest of a burst waits for it, and the store holds every admission."""
    subject = _user(subject_id, requests_per_minute=1000)
    await _acquire(subject)
    burst = await asyncio.gather(*(_acquire(subject) for _ in range(200)))
    # Room 999 after the first: 99 fit in a tenth of it before any record has answered.
    assert sum(_local(lease) for lease in burst) == 99
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    await asyncio.gather(*store.records)
    assert await _requests_counted(store, subject) == 201


@needs_redis
@pytest.mark.parametrize("limits", [{"requests_per_minute": 10}, {"concurrent_streams": 5}])
async def test_a_small_limit_is_always_checked_by_the_store(subject_id: int, limits: dict[str, int]) -> None:
    subject = _user(subject_id, **limits)
    leases = [await _acquire(subject) for _ in range(next(iter(limits.values())))]
    assert not any(_local(lease) for lease in leases)
    with pytest.raises(ApplicationError) as refused:
        await _acquire(subject)
    assert refused.value.code == "rate_limit_exceeded"


def _reserve(subject_id: int, *, limit_units: int, units: int) -> ReserveRequest:
    line = ReserveLine(
        key=counter_key(budget_id=subject_id, subject_kind="user", subject_id=subject_id, period_label="lifetime"),
        limit_units=limit_units,
        token_limit=None,
        units=units,
        tokens=0,
        ttl_seconds=3600,
        start=0.0,
        end=1e12,
        seed_units=0,
        seed_tokens=0,
    )
    return ReserveRequest(f"chatcmpl-{secrets.token_hex(6)}", PROCESS_ID, time.time() + 600, (line,))


@needs_redis
async def test_a_local_admission_records_its_budget_reservation_which_settlement_releases(subject_id: int) -> None:
    subject = _user(subject_id, requests_per_minute=100_000)
    budget = _reserve(subject_id, limit_units=10**9, units=1000)
    key = budget.lines[0].key
    first = await _acquire(subject, budget=budget)
    assert first.budget is not None and first.budget.reserved and not _local(first)
    second_budget = _reserve(subject_id, limit_units=10**9, units=1000)
    second = await _acquire(subject, budget=second_budget)
    assert _local(second) and second.budget is not None and second.budget.reserved

    await second.confirmed()
    counter = budget_store().counter(key)
    assert counter is not None
    assert counter.reserved == 2000
    assert set(counter.holders) == {budget.request_id, second_budget.request_id}
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        assert await client.exists(reservation_key(second_budget.request_id))
    finally:
        await client.aclose()

    now = time.time()
    settled = budget_store().settle([Settlement(r.request_id, now, 400, 0) for r in (budget, second_budget)])
    assert settled == 2
    counter = budget_store().counter(key)
    assert counter is not None and (counter.spent, counter.reserved) == (800, 0)


@needs_redis
async def test_a_budget_near_its_limit_is_reserved_by_the_store(subject_id: int) -> None:
    """A budget worth 10 requests: with share 0.1, no request fits in a tenth of the room left after the
    first, so none is local and the store refuses the 11th exactly."""
    subject = _user(subject_id, requests_per_minute=100_000)
    leases = [await _acquire(subject, budget=_reserve(subject_id, limit_units=10_000, units=1000)) for _ in range(10)]
    assert not any(_local(lease) for lease in leases)
    assert all(lease.budget is not None and lease.budget.reserved for lease in leases)
    refused = await _acquire(subject, budget=_reserve(subject_id, limit_units=10_000, units=1000))
    assert refused.budget is not None and refused.budget.refused == 0


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@needs_redis
async def test_a_record_that_cannot_reach_the_store_drops_the_views_and_fails_the_next_admissions_closed(
    subject_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    subject = _user(subject_id, requests_per_minute=1000)
    await _acquire(subject)
    views = dict(rate_limit_store().views)
    assert views
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0"):
        gone = rate_limit_store()
        gone.views.update(views)  # the view this process had when the store went away
        with caplog.at_level(logging.WARNING, logger="accounts.metering.ratelimits"):
            lease = await _acquire(subject)
            assert _local(lease)
            await lease.confirmed()
        assert "could not be recorded in the metering store" in caplog.text
        assert gone.views == {}
        with pytest.raises(ApplicationError) as unavailable:
            await _acquire(subject)
        assert (unavailable.value.status, unavailable.value.code) == (503, "metering_unavailable")
        await lease.release(completion_tokens=0)


@needs_redis
async def test_records_made_together_share_one_script_call(subject_id: int) -> None:
    subject = _user(subject_id, requests_per_minute=100_000, concurrent_streams=1000)
    await _acquire(subject)
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    async with Monitor(f":{subject_id}") as monitor:
        burst = await asyncio.gather(*(_acquire(subject) for _ in range(20)))
        assert all(_local(lease) for lease in burst)
        await asyncio.gather(*(lease.confirmed() for lease in burst))
        calls = await monitor.stop()
    assert len(calls) == 1, calls  # 20 records, one round trip
    assert await _requests_counted(store, subject) == 21
    assert await _leases(subject) == 21


@needs_redis
async def test_a_reply_that_ends_before_its_record_is_sent_sends_it_at_once(
    subject_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records wait in the process to share script calls; a reply that has ended waits for its own
    (settlement needs the reservation it makes), so confirming sends the queued records at once."""
    monkeypatch.setattr(ratelimit_store, "RECORD_DELAY_SECONDS", 3600)
    subject = _user(subject_id, requests_per_minute=100_000, concurrent_streams=1000)
    await _acquire(subject)
    lease = await _acquire(subject)
    assert _local(lease)
    await asyncio.wait_for(lease.confirmed(), 10)  # not the hour the record would wait
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    assert await _requests_counted(store, subject) == 2
    assert await _leases(subject) == 2


@needs_redis
async def test_records_and_releases_waiting_together_go_in_one_call(
    subject_id: int, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """When the releases' delay ends first, the records waiting then go with them, and the other way round."""
    monkeypatch.setattr(ratelimit_store, "RECORD_DELAY_SECONDS", 3600)
    settings.RATE_LIMIT_RELEASE_BATCH_SECONDS = 0.05
    subject = _user(subject_id, requests_per_minute=100_000, tokens_per_minute=1_000_000, concurrent_streams=1000)
    first = await _acquire(subject, prompt_tokens=10)  # the store's answer: the caller's view
    assert not _local(first)
    async with Monitor(f":{subject_id}") as monitor:
        await first.release(completion_tokens=5)  # waits up to 0.05 s for a carrier
        second = await _acquire(subject, prompt_tokens=10)
        assert _local(second)  # its record would wait an hour
        assert second._confirmation is not None
        await asyncio.wait((second._confirmation,), timeout=10)
        calls = await monitor.stop()
    store = rate_limit_store()
    assert isinstance(store, RedisRateLimitStore)
    assert len(calls) == 1, calls
    assert calls[0].split()[1].strip('"') == store._admit.sha
    assert first.request_id in calls[0] and second.request_id in calls[0]
    assert await _leases(subject) == 1  # the first's lease freed, the second's taken
    assert await _requests_counted(store, subject) == 2


def _answer(call: int, used: int) -> Admitted:
    return Admitted([True], [Window(0, 0.0, used, 60.0)], None, call=call)


def test_an_answer_of_an_earlier_call_does_not_replace_a_later_ones() -> None:
    """Calls on different connections may answer out of order: the view keeps the later call's figures."""
    view = HeadroomView.of((100,), ["requests:user:1"], _answer(call=2, used=10), now=0.0)
    assert view is not None
    assert view.merge(_answer(call=1, used=5), now=0.1)
    assert view.used == [10]
    assert view.merge(_answer(call=3, used=12), now=0.2)
    assert view.used == [12]


def test_released_tokens_count_until_an_answer_of_their_call_holds_them() -> None:
    view = HeadroomView.of((1000,), ["tokens:user:1"], _answer(call=1, used=100), now=0.0)
    assert view is not None
    carrier = view.released([("tokens:user:1", 30), ("tokens:user:2", 5)])
    assert view.pending_window(0).current == 130 and view.counts() == [130]  # waiting in this process
    carrier[0] = 2  # sent with call 2
    assert view.pending_window(0).current == 130 and view.counts() == [130]
    view.merge(_answer(call=2, used=130), now=0.1)  # call 2's answer holds them
    assert not view.releases and view.unsent == [0]
    assert view.pending_window(0).current == 130 and view.counts() == [130]
    # A view too old is not used: the next admission waits for the store.
    assert view.take([1], share=0.1, now=0.1 + VIEW_SECONDS / 2)
    assert not view.take([1], share=0.1, now=0.1 + VIEW_SECONDS * 2)
