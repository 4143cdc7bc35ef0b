"""Rate limits per user, API key and model: requests per minute, tokens per minute, concurrent streams.

``rate_limit_acquire`` admits a request against every subject that has limits (all must allow
it) and returns a ``RateLease``; the engine calls ``lease.release(completion_tokens=)`` once the
reply has ended. A refusal is ``ApplicationError`` 429 ``rate_limit_exceeded`` with
``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.

Where the counts live
    With ``REDIS_URL``: in Redis, under the key prefix ``chatbackend-ratelimit``, shared by every
    server process. Without it (the embedded defaults): in this process's memory, which is right
    for the one process those defaults run and wrong for several (each would count alone).

Requests and tokens per minute
    The ``limits`` library's sliding window counter (https://limits.readthedocs.io/en/stable/
    strategies.html#sliding-window-counter), through its async storage: its Redis storage (on
    redis-py's asyncio client, ``implementation="redispy"``) or its memory storage. A window's
    count is the current minute's hits plus the previous minute's, weighted by how much of the
    previous minute is still inside the last 60 s, so capacity frees gradually, as OpenAI's
    limits replenish, and never doubles at a window's edge as a fixed window's does. Each admission
    is one atomic Lua script per counter (a hit that would go over the limit adds nothing); the
    moving-window strategy is not used because it stores one entry per unit, i.e. per token.
    Tokens: the prompt's tokens are counted at admission (the request is refused when they do
    not fit); the completion's are added at release whatever the limit, so a reply that went
    over leaves the counter over, and later requests are refused until the window has freed
    enough.

All or nothing
    The counters of every subject are hit concurrently. If any refuses, what the others took is
    given back (the same script, with a negative amount) before the 429 is raised: a request
    refused for its API key's limit does not eat its user's or its model's. Between the hit and
    the give-back (one round trip) another request may see the counter higher than it ends up,
    and be refused too: conservative, never over the limit. A request whose tokens alone exceed a
    tokens-per-minute limit can never be admitted: 429 with OpenAI's "Request too large" message
    and no ``Retry-After``.

Concurrent streams
    Not a ``limits`` feature: a sorted set per subject of leases (member: the request id; score:
    when the lease expires, in Redis' own clock, ``TIME``), taken for all subjects or none in
    one Lua script, removed at release. A lease lasts ``RATE_LIMIT_STREAM_LEASE_SECONDS``
    (default 60); while its stream runs, this process renews all its leases every third of that
    (one script call), so a long stream keeps its slot and the slots of a process that died
    (SIGKILL, OOM) free within that many seconds. The in-process store is a dict with the same
    expiry.

Cost
    A request whose subjects have no limits costs no I/O. One with limits costs two sequential
    round trips (every counter's hit and the stream leases concurrently, then the counters'
    windows for the headers), one command per counter. Measured (2-core machine, local Redis,
    p50 of ``rate_limit_acquire``): 0.27 ms for one counter, 0.45 ms for a key's requests and
    tokens, 0.6 ms with its streams too, 1.1 ms with all three limits on key, user and model;
    0.02 to 0.13 ms in memory. ``limits`` has no batch API; a single script of our own for all
    counters would make it one round trip.

Redis unreachable
    503 ``metering_unavailable`` (fail closed), unless ``RATE_LIMIT_FAIL_OPEN`` lets requests
    through unlimited (logged). A command waits at most ``REDIS_SOCKET_TIMEOUT_SECONDS``; after a
    failure, admissions fail at once for ``UNREACHABLE_RETRY_SECONDS`` without trying Redis, so a
    Redis that hangs does not cost every request that timeout. Failures at release are logged and
    dropped: the counters age out in two minutes, the leases at their expiry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from django.conf import settings
from limits.aio.storage import MemoryStorage, RedisStorage

from chatbackend.errors import ApplicationError

from .types import MeteringSubject

logger = logging.getLogger(__name__)

__all__ = ["RateLease", "rate_limit_acquire", "rate_limit_close", "format_reset"]

KEY_PREFIX = "chatbackend-ratelimit"
WINDOW_SECONDS = 60
# What a forced add (completion tokens, a give-back) passes as the limit, so that it is never refused.
_NO_LIMIT = 2**50
# Retry-After of a concurrent-stream refusal: a slot frees when some stream ends, which no one can foresee.
CONCURRENCY_RETRY_AFTER_SECONDS = 1
# Seconds admissions fail at once after the store was found unreachable, before it is tried again.
UNREACHABLE_RETRY_SECONDS = 1.0
# Redis connections per process (and event loop); more admissions at once wait for one.
MAX_REDIS_CONNECTIONS = 64
# Errors that mean the store cannot answer (redis-py's; the memory store raises none): unreachable,
# and also a Redis that refuses the command (read-only replica during a failover, out of memory).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)

_SUBJECT_NAMES = {"user": "user", "api_key": "API key", "model": "model"}

T = TypeVar("T")


def format_reset(seconds: float) -> str:
    """Return ``seconds`` as OpenAI's ``x-ratelimit-reset-*`` value: Go's duration format.

    E.g. ``0.02`` -> ``"20ms"``, ``1`` -> ``"1s"``, ``1.5`` -> ``"1.5s"``, ``360`` -> ``"6m0s"``,
    ``3725`` -> ``"1h2m5s"`` (https://platform.openai.com/docs/guides/rate-limits, "Rate limits in
    headers"; Go's ``time.Duration.String``). Rounded up to the millisecond; 0 or less is ``"0s"``.
    """
    millis = math.ceil(seconds * 1000 - 1e-6)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True, slots=True)
class _Window:
    """One counter's sliding window: counts and seconds to live of the previous and current minute."""

    previous: int
    previous_ttl: float
    current: int
    current_ttl: float

    def used(self) -> float:
        """Return the weighted count, as ``limits`` computes it."""
        return max(0.0, self.previous * self.previous_ttl / WINDOW_SECONDS + self.current)

    def reset_seconds(self, limit: int) -> float:
        """Return the seconds until all of ``limit`` is available again (OpenAI: "resets to its initial state")."""
        return self.seconds_until_fits(limit, limit)

    def seconds_until_fits(self, limit: int, cost: int) -> float:
        """Return the seconds until ``cost`` more fits under ``limit``, if nothing else is added.

        The previous minute's weight falls linearly to 0 over its time to live; when the current
        minute ends (``current_ttl - 60`` s from now) it becomes the previous one, whose weight
        then falls the same way. ``limits`` admits while ``floor(used) + cost <= limit``.
        """
        room = limit - cost + 1 - 1e-9  # used must fall below this
        if self.used() < room:
            return 0.0
        roll_in = max(0.0, self.current_ttl - WINDOW_SECONDS)
        if self.current < room and self.previous > 0:
            wait = self.previous_ttl - (room - self.current) * WINDOW_SECONDS / self.previous
            if wait <= roll_in:
                return max(0.0, wait)
        if self.current <= 0:
            return roll_in
        return roll_in + max(0.0, WINDOW_SECONDS * (1 - room / self.current))


@dataclass(frozen=True, slots=True)
class _Counter:
    """One sliding-window counter of one subject: ``dimension`` "requests" or "tokens"."""

    subject: MeteringSubject
    dimension: str
    limit: int
    cost: int

    @property
    def key(self) -> str:
        # The limit is not in the key: a changed limit applies to what was already counted.
        return f"{self.dimension}:{self.subject.kind}:{self.subject.id}"


def _who(subject: MeteringSubject) -> str:
    return f"{_SUBJECT_NAMES.get(subject.kind, subject.kind)} {subject.id}"


def _streams_key(subject: MeteringSubject) -> str:
    return f"{KEY_PREFIX}:streams:{subject.kind}:{subject.id}"


# KEYS: one sorted set per subject. ARGV: member (request id), lease milliseconds, then each key's limit.
# Returns 0 when every set had room and the lease was added to all, else the 1-based index of a full one.
_STREAMS_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, ARGV[1]) and redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[1])
  redis.call('PEXPIRE', key, lease)
end
return 0
"""
# KEYS: sorted sets; ARGV: lease milliseconds, then the member to renew in each key (same order).
_STREAMS_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + lease, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', key, lease)
  end
end
return 0
"""


class _Backend:
    """The counters' store for one event loop: ``limits``' storage plus the concurrent-stream leases."""

    storage: Any  # limits' RedisStorage or MemoryStorage (both SlidingWindowCounterSupport)

    def __init__(self) -> None:
        self.lease_seconds = float(settings.RATE_LIMIT_STREAM_LEASE_SECONDS)
        # request id -> the stream keys its lease holds, renewed while the stream runs.
        self.held: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None
        # After the store was found unreachable, admissions fail at once (no connection attempt)
        # until this time.monotonic(): a Redis that hangs must not cost every request a timeout.
        self.unreachable_until = 0.0
        self.unreachable_error: BaseException | None = None

    async def hit(self, key: str, limit: int, amount: int) -> bool:
        """Add ``amount`` to counter ``key`` unless that would go over ``limit``; return whether it did."""
        return bool(await self.storage.acquire_sliding_window_entry(key, limit, WINDOW_SECONDS, amount))

    async def window(self, key: str) -> _Window:
        """Return counter ``key``'s window."""
        return _Window(*await self.storage.get_sliding_window(key, WINDOW_SECONDS))

    async def streams_acquire(self, keys: list[str], limits: list[int], member: str) -> int:
        """Take a lease in every one of ``keys`` if all have room: 0, else the 1-based index of a full one."""
        raise NotImplementedError

    async def streams_release(self, keys: Sequence[str], member: str) -> None:
        """Remove lease ``member`` from ``keys``."""
        raise NotImplementedError

    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        """Extend the leases ``held`` (request id -> keys) by ``lease_seconds`` from now."""
        raise NotImplementedError

    def hold(self, member: str, keys: tuple[str, ...]) -> None:
        """Renew ``member``'s leases while held (every third of a lease) until ``unhold``."""
        self.held[member] = keys
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever(), name="rate-limit-leases")

    def unhold(self, member: str) -> None:
        self.held.pop(member, None)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self.held:
                continue
            try:
                await self.streams_renew(dict(self.held))
            except Exception:  # Redis away: the next round tries again; leases may lapse meanwhile
                logger.warning("concurrent-stream leases could not be renewed", exc_info=True)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None


class _RedisBackend(_Backend):
    def __init__(self, url: str) -> None:
        super().__init__()
        timeout = float(settings.REDIS_SOCKET_TIMEOUT_SECONDS)
        # A bounded pool that waits for a free connection: a burst of admissions (each up to one
        # connection per counter, for well under a millisecond) must not open thousands of connections.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_REDIS_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client = redis.asyncio.Redis.from_pool(pool)
        scheme = "async+redis+" if url.startswith("unix://") else "async+"
        self.storage = RedisStorage(
            scheme + url,
            implementation="redispy",
            key_prefix=KEY_PREFIX,
            # One pool for limits' scripts and ours (limits passes it to redis-py; its annotation is too narrow).
            connection_pool=self.client.connection_pool,  # type: ignore[arg-type]
        )
        self._acquire = self.client.register_script(_STREAMS_ACQUIRE)
        self._renew = self.client.register_script(_STREAMS_RENEW)

    async def streams_acquire(self, keys: list[str], limits: list[int], member: str) -> int:
        lease_ms = int(self.lease_seconds * 1000)
        return int(await self._acquire(keys=keys, args=[member, lease_ms, *limits]))

    async def streams_release(self, keys: Sequence[str], member: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrem(key, member)
            await pipe.execute()

    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        keys = [key for stream_keys in held.values() for key in stream_keys]
        members = [member for member, stream_keys in held.items() for _ in stream_keys]
        await self._renew(keys=keys, args=[int(self.lease_seconds * 1000), *members])

    async def close(self) -> None:
        await super().close()
        await self.client.aclose()


class _MemoryBackend(_Backend):
    """This process only (the embedded defaults): the leases are a dict, the clock ``time.monotonic``."""

    def __init__(self) -> None:
        super().__init__()
        self.storage = MemoryStorage()
        self.streams: dict[str, dict[str, float]] = {}

    async def streams_acquire(self, keys: list[str], limits: list[int], member: str) -> int:
        now = time.monotonic()
        for index, (key, limit) in enumerate(zip(keys, limits, strict=True), start=1):
            leases = self.streams.setdefault(key, {})
            for expired in [m for m, until in leases.items() if until <= now]:
                del leases[expired]
            if member not in leases and len(leases) >= limit:
                return index
        for key in keys:
            self.streams[key][member] = now + self.lease_seconds
        return 0

    async def streams_release(self, keys: Sequence[str], member: str) -> None:
        for key in keys:
            leases = self.streams.get(key, {})
            leases.pop(member, None)
            if not leases:
                self.streams.pop(key, None)

    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        until = time.monotonic() + self.lease_seconds
        for member, keys in held.items():
            for key in keys:
                leases = self.streams.get(key, {})
                if member in leases:
                    leases[member] = until


# One backend per event loop (a redis-py asyncio connection belongs to the loop it was made in)
# and per REDIS_URL (tests switch it).
_backends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Backend]] = weakref.WeakKeyDictionary()


def _backend() -> _Backend:
    url = settings.REDIS_URL
    per_loop = _backends.setdefault(asyncio.get_running_loop(), {})
    backend = per_loop.get(url)
    if backend is None:
        backend = per_loop[url] = _RedisBackend(url) if url else _MemoryBackend()
    return backend


async def rate_limit_close() -> None:
    """Close this event loop's rate-limit store (its Redis connections, its lease renewer)."""
    for backend in _backends.pop(asyncio.get_running_loop(), {}).values():
        await backend.close()


@dataclass(eq=False)
class RateLease:
    """What an admitted request holds until its reply ends.

    ``headers``: OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the
    subject with the least remaining of each (``reset``: time until that subject's window holds
    nothing, Go's duration format); empty when no subject limits requests or tokens.
    """

    headers: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    _backend: _Backend | None = None
    _token_counters: tuple[_Counter, ...] = ()
    _stream_keys: tuple[str, ...] = ()
    _released: bool = False

    async def release(self, *, completion_tokens: int) -> None:
        """Add ``completion_tokens`` to every tokens-per-minute counter and free the stream slots; once.

        Idempotent: a second call does nothing. Runs to its end even if the caller is cancelled.
        Never raises for an unreachable store (logged; the counters and leases expire on their own).
        """
        if self._released or self._backend is None:
            self._released = True
            return
        self._released = True
        await asyncio.shield(self._release(max(0, completion_tokens)))

    async def _release(self, completion_tokens: int) -> None:
        backend = self._backend
        assert backend is not None  # noqa: S101 - checked by release
        steps: list[Awaitable[Any]] = []
        if completion_tokens:
            steps += [backend.hit(c.key, _NO_LIMIT, completion_tokens) for c in self._token_counters]
        if self._stream_keys:
            backend.unhold(self.request_id)
            steps.append(backend.streams_release(self._stream_keys, self.request_id))
        for result in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("rate-limit release of %s failed: %s", self.request_id, result, exc_info=result)


async def _all(steps: Sequence[Awaitable[T]]) -> list[T | BaseException]:
    if len(steps) == 1:
        try:
            return [await steps[0]]
        except Exception as exc:
            return [exc]
    return list(await asyncio.gather(*steps, return_exceptions=True))


def _unavailable(backend: _Backend, exc: BaseException, *, known: bool = False) -> RateLease:
    """Fail closed (503) or, with ``RATE_LIMIT_FAIL_OPEN``, admit unlimited.

    ``known``: the store was already found unreachable less than ``UNREACHABLE_RETRY_SECONDS``
    ago (not logged again); otherwise admissions fail at once for that long, and it is logged.
    """
    if not known:
        backend.unreachable_until = time.monotonic() + UNREACHABLE_RETRY_SECONDS
        backend.unreachable_error = exc
        logger.warning(
            "the rate limits' store is unreachable; requests with a rate limit are %s for %s s at least: %s: %s",
            "admitted unlimited (RATE_LIMIT_FAIL_OPEN)" if settings.RATE_LIMIT_FAIL_OPEN else "refused",
            UNREACHABLE_RETRY_SECONDS,
            type(exc).__name__,
            exc,
        )
    if settings.RATE_LIMIT_FAIL_OPEN:
        return RateLease()
    raise ApplicationError(
        "Rate limits cannot be checked right now; try again in a few seconds.",
        code="metering_unavailable",
        status=503,
    ) from exc


def _headers(counters: Sequence[_Counter], windows: Sequence[_Window]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for dimension in ("requests", "tokens"):
        candidates = [
            (counter.limit - math.floor(window.used()), counter.limit, counter, window)
            for counter, window in zip(counters, windows, strict=True)
            if counter.dimension == dimension
        ]
        if not candidates:
            continue
        remaining, limit, _, window = min(candidates, key=lambda c: (c[0], c[1]))
        headers[f"x-ratelimit-limit-{dimension}"] = str(limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(max(0, remaining))
        headers[f"x-ratelimit-reset-{dimension}"] = format_reset(window.reset_seconds(limit))
    return headers


def _refusal(counter: _Counter, window: _Window, headers: dict[str, str]) -> tuple[float, ApplicationError]:
    used = math.floor(window.used())
    seconds = window.seconds_until_fits(counter.limit, counter.cost)
    wait = max(1, math.ceil(seconds))  # Retry-After: whole seconds (RFC 9110, section 10.2.3)
    unit = "requests per min (RPM)" if counter.dimension == "requests" else "tokens per min (TPM)"
    message = (
        f"Rate limit reached for {_who(counter.subject)} on {unit}: Limit {counter.limit}, Used {used}, "
        f"Requested {counter.cost}. Please try again in {format_reset(seconds)}."
    )
    error = ApplicationError(
        message,
        code="rate_limit_exceeded",
        status=429,
        type=counter.dimension,
        headers={**headers, "Retry-After": str(wait)},
    )
    return wait, error


def _streams_refusal(subject: MeteringSubject, headers: dict[str, str]) -> tuple[float, ApplicationError]:
    wait = CONCURRENCY_RETRY_AFTER_SECONDS
    message = (
        f"Concurrent stream limit reached for {_who(subject)}: Limit {subject.limits.concurrent_streams} streams "
        "at once. Please try again when one of them has ended."
    )
    error = ApplicationError(
        message, code="rate_limit_exceeded", status=429, type="requests", headers={**headers, "Retry-After": str(wait)}
    )
    return wait, error


async def rate_limit_acquire(*, request_id: str, subjects: Sequence[MeteringSubject], prompt_tokens: int) -> RateLease:
    """Admit a request against the rate limits of every subject in ``subjects``; return its lease.

    ``request_id``: the reply's id (names its concurrent-stream lease). ``prompt_tokens``: counted
    against each tokens-per-minute limit now (the completion's are added by ``RateLease.release``).
    Every subject with limits must allow the request; when one refuses, nothing stays taken on the
    others. Subjects without limits cost no I/O.

    Raises ``ApplicationError`` 429 ``rate_limit_exceeded`` (``type`` "requests" or "tokens", as
    OpenAI's; a message naming the subject and the limit; ``headers``: ``Retry-After`` in whole
    seconds, none when the prompt alone exceeds a tokens limit, and ``x-ratelimit-*``), or 503
    ``metering_unavailable`` when the store is unreachable and ``RATE_LIMIT_FAIL_OPEN`` is off.
    """
    counters: list[_Counter] = []
    streams: list[MeteringSubject] = []
    for subject in subjects:
        limits = subject.limits
        if limits.requests_per_minute is not None:
            counters.append(_Counter(subject, "requests", limits.requests_per_minute, 1))
        if limits.tokens_per_minute is not None:
            counters.append(_Counter(subject, "tokens", limits.tokens_per_minute, max(0, prompt_tokens)))
        if limits.concurrent_streams is not None:
            streams.append(subject)
    if not counters and not streams:
        return RateLease(request_id=request_id)

    for counter in counters:
        if counter.dimension == "tokens" and counter.cost > counter.limit:  # never fits, however long one waits
            raise ApplicationError(
                f"Request too large for {_who(counter.subject)} on tokens per min (TPM): Limit {counter.limit}, "
                f"Requested {counter.cost}. The input or output tokens must be reduced in order to run successfully.",
                code="rate_limit_exceeded",
                status=429,
                type="tokens",
            )

    backend = _backend()
    if backend.unreachable_error is not None and time.monotonic() < backend.unreachable_until:
        return _unavailable(backend, backend.unreachable_error, known=True)
    stream_keys = [_streams_key(subject) for subject in streams]
    steps: list[Awaitable[Any]] = [backend.hit(c.key, c.limit, c.cost) for c in counters]
    if streams:
        stream_limits = [subject.limits.concurrent_streams or 0 for subject in streams]
        steps.append(backend.streams_acquire(stream_keys, stream_limits, request_id))
    try:
        results = await _all(steps)
    except asyncio.CancelledError:
        # The client went away mid-admission: its stream leases must not lock the subject out until
        # they expire (releasing a lease never taken is a no-op). Counters hit stay counted.
        await asyncio.shield(_give_back(backend, counters, [False] * len(counters), stream_keys, request_id))
        raise

    hits = results[: len(counters)]
    stream_result = results[len(counters)] if streams else 0
    # The streams script refused (a positive index) and took nothing; otherwise, when it failed
    # mid-way, it may have run: give its leases back too.
    taken_streams = [] if isinstance(stream_result, int) and stream_result > 0 else stream_keys
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None and not isinstance(failure, UNREACHABLE_ERRORS):
        await asyncio.shield(_give_back(backend, counters, hits, taken_streams, request_id))
        raise failure
    refused = failure is not None or stream_result != 0 or not all(hits)
    if refused:
        await asyncio.shield(_give_back(backend, counters, hits, taken_streams, request_id))
        if failure is not None:
            return _unavailable(backend, failure)

    try:
        windows = await _all([backend.window(c.key) for c in counters])
    except asyncio.CancelledError:
        if not refused:
            await asyncio.shield(_give_back(backend, counters, hits, stream_keys, request_id))
        raise
    window_failure = next((w for w in windows if isinstance(w, BaseException)), None)
    if window_failure is not None:
        if not refused:
            await asyncio.shield(_give_back(backend, counters, hits, stream_keys, request_id))
        if not isinstance(window_failure, UNREACHABLE_ERRORS):
            raise window_failure
        return _unavailable(backend, window_failure)
    good_windows = [w for w in windows if isinstance(w, _Window)]
    headers = _headers(counters, good_windows)

    if refused:
        errors = [
            _refusal(counter, window, headers)
            for counter, window, hit in zip(counters, good_windows, hits, strict=True)
            if hit is not True
        ]
        if isinstance(stream_result, int) and stream_result > 0:
            errors.append(_streams_refusal(streams[stream_result - 1], headers))
        # The longest wait is when every refusing limit allows the request again.
        raise max(errors, key=lambda e: e[0])[1]

    if stream_keys:
        backend.hold(request_id, tuple(stream_keys))
    return RateLease(
        headers=headers,
        request_id=request_id,
        _backend=backend,
        _token_counters=tuple(c for c in counters if c.dimension == "tokens"),
        _stream_keys=tuple(stream_keys),
    )


async def _give_back(
    backend: _Backend, counters: Sequence[_Counter], hits: Sequence[Any], stream_keys: Sequence[str], request_id: str
) -> None:
    """Undo what a refused admission took: the counters it hit and the stream leases it got."""
    steps: list[Awaitable[Any]] = [
        backend.hit(counter.key, _NO_LIMIT, -counter.cost)
        for counter, hit in zip(counters, hits, strict=True)
        if hit is True and counter.cost
    ]
    if stream_keys:
        steps.append(backend.streams_release(stream_keys, request_id))
    for result in await _all(steps) if steps else []:
        if isinstance(result, BaseException):
            logger.warning("rate-limit give-back of %s failed: %s", request_id, result)
