"""Where rate-limit counters live: Redis (every server process shares them) or this process's memory.

Requests and tokens per minute are the ``limits`` library's sliding window counters
(https://limits.readthedocs.io/en/stable/strategies.html#sliding-window-counter): its algorithm,
its Lua scripts and its key layout in Redis, its ``MemoryStorage`` in memory. Concurrent streams
are not a ``limits`` feature: a sorted set of leases per subject (member: the request id; score:
when the lease expires, in Redis' own clock), taken for all subjects or none by one script of ours.

One round trip per admission
    ``limits`` has one call per counter and no batch API: a caller limited per key, user and model
    on requests and tokens would pay six hits, six window reads for its headers and one lease
    script, ~14 commands (measured: ~2 ms of CPU and 1.1–2.5 ms at p50 on a 2-core machine). The
    Redis store instead sends all of them in one redis-py pipeline, running ``limits``' own scripts
    by their SHA1 (``EVALSHA``) on ``limits``' own keys, each counter's window read right after its
    hit, so the figures are what ``limits`` itself would compute. It reaches into ``limits``
    (its Redis bridge's registered scripts and its window key names; pinned to 5.8.0 in
    requirements.txt); ``test_limits_internals_used_by_the_store`` fails if an upgrade moves them.
    Scripts are loaded once per store; a Redis that lost them (restarted) is answered ``NOSCRIPT``,
    after which the store gives back what the batch took, loads them again and retries once.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions
from django.conf import settings
from limits.aio.storage import MemoryStorage, RedisStorage

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_PREFIX",
    "UNREACHABLE_ERRORS",
    "WINDOW_SECONDS",
    "Admitted",
    "CounterHit",
    "RateLimitStore",
    "Window",
    "rate_limit_store",
    "rate_limit_store_close",
]

KEY_PREFIX = "chatbackend-ratelimit"
WINDOW_SECONDS = 60
# What a forced add (completion tokens, a give-back) passes as the limit, so that it is never refused.
NO_LIMIT = 2**50
# Redis connections per process (and event loop); more admissions at once wait for one.
MAX_REDIS_CONNECTIONS = 64
# Errors that mean the store cannot answer (redis-py's; the memory store raises none): unreachable,
# and also a Redis that refuses the command (read-only replica during a failover, out of memory).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


@dataclass(frozen=True, slots=True)
class Window:
    """One counter's sliding window: counts and seconds to live of the previous and current minute."""

    previous: int
    previous_ttl: float
    current: int
    current_ttl: float

    def used(self) -> float:
        """Return the weighted count, as ``limits`` computes it."""
        return max(0.0, self.previous * self.previous_ttl / WINDOW_SECONDS + self.current)

    def without(self, amount: int) -> Window:
        """Return this window with ``amount`` taken back from the current minute."""
        return Window(self.previous, self.previous_ttl, self.current - amount, self.current_ttl)

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
class CounterHit:
    """Add ``amount`` to counter ``key`` unless its window would then hold more than ``limit``."""

    key: str
    limit: int
    amount: int


@dataclass(frozen=True, slots=True)
class Admitted:
    """What one admission batch did: for each counter whether it was hit and its window just after
    (``None`` when that command failed), and the lease script's answer (0: every stream lease
    taken; a positive 1-based index: that subject's set was full and nothing was taken; ``None``:
    no lease asked or its command failed). ``error``: the first failure, if any."""

    hits: list[bool]
    windows: list[Window | None]
    streams: int | None
    error: BaseException | None = None


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


class RateLimitStore(abc.ABC):
    """The counters and leases of one event loop. ``admit`` is the hot path; the rest runs once per reply."""

    def __init__(self) -> None:
        self.lease_seconds = float(settings.RATE_LIMIT_STREAM_LEASE_SECONDS)
        # request id -> the stream keys its lease holds, renewed while the stream runs.
        self.held: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None
        # After the store was found unreachable, admissions fail at once (no connection attempt)
        # until this time.monotonic(): a Redis that hangs must not cost every request a timeout.
        self.unreachable_until = 0.0
        self.unreachable_error: BaseException | None = None

    @abc.abstractmethod
    async def admit(
        self, hits: Sequence[CounterHit], stream_keys: Sequence[str], stream_limits: Sequence[int], member: str
    ) -> Admitted:
        """Hit every counter of ``hits`` (each only if it fits), read each one's window right after its
        hit, and take lease ``member`` in every set of ``stream_keys`` if each has room under its limit.

        Never raises for the store's failures: they come back in ``Admitted.error``.
        """

    @abc.abstractmethod
    async def add(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str] = (), member: str = "") -> None:
        """Add each ``(key, amount)`` whatever the limit (negative: give back) and remove lease ``member``
        from ``stream_keys``. Raises the store's errors."""

    @abc.abstractmethod
    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        """Extend the leases ``held`` (request id -> keys) by ``lease_seconds`` from now."""

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


def _window(raw: Any) -> Window:
    """Return ``limits``' sliding-window script answer as a ``Window`` (its bridge's own conversion)."""
    if not raw:
        return Window(0, 0.0, 0, 0.0)
    return Window(
        int(raw[0] or 0),
        max(0.0, float(raw[1] or 0)) / 1000,
        int(raw[2] or 0),
        max(0.0, float(raw[3] or 0)) / 1000,
    )


class RedisRateLimitStore(RateLimitStore):
    """Counters in Redis, shared by every server process: one pipeline (one round trip) per call."""

    def __init__(self, url: str) -> None:
        super().__init__()
        timeout = float(settings.REDIS_SOCKET_TIMEOUT_SECONDS)
        # A bounded pool that waits for a free connection: a burst of admissions must not open
        # thousands of connections.
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
        bridge = self.storage.bridge
        # limits' own scripts (see the module docstring): KEYS previous, current window; ARGV limit,
        # expiry seconds, amount -> 1 or nil; and KEYS the same, ARGV expiry -> the window's 4 figures.
        self._acquire = bridge.lua_acquire_sliding_window  # type: ignore[attr-defined]
        self._read = bridge.lua_sliding_window  # type: ignore[attr-defined]
        self._streams = self.client.register_script(_STREAMS_ACQUIRE)
        self._renew = self.client.register_script(_STREAMS_RENEW)
        self._loaded = False

    def _keys(self, key: str) -> tuple[str, str]:
        """Return counter ``key``'s Redis keys as ``limits`` names them: previous and current window."""
        prefixed = self.storage.bridge.prefixed_key
        return prefixed(self.storage._previous_window_key(key)), prefixed(self.storage._current_window_key(key))

    async def _load_scripts(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for script in (self._acquire, self._read, self._streams):
                pipe.script_load(script.script)
            await pipe.execute()
        self._loaded = True

    async def admit(
        self, hits: Sequence[CounterHit], stream_keys: Sequence[str], stream_limits: Sequence[int], member: str
    ) -> Admitted:
        try:
            if not self._loaded:
                await self._load_scripts()
            admitted = await self._admit_once(hits, stream_keys, stream_limits, member)
            if not isinstance(admitted.error, redis.exceptions.NoScriptError):
                return admitted
            # Redis lost the scripts (restarted, SCRIPT FLUSH): undo what ran, load them, try once more.
            await self._undo(hits, admitted, stream_keys, member)
            await self._load_scripts()
            return await self._admit_once(hits, stream_keys, stream_limits, member)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable: whether any command ran is unknown; leases are given back
            return Admitted([False] * len(hits), [None] * len(hits), None, exc)

    async def _admit_once(
        self, hits: Sequence[CounterHit], stream_keys: Sequence[str], stream_limits: Sequence[int], member: str
    ) -> Admitted:
        expiry = WINDOW_SECONDS
        async with self.client.pipeline(transaction=False) as pipe:
            for hit in hits:
                keys = self._keys(hit.key)
                pipe.evalsha(self._acquire.sha, 2, *keys, hit.limit, expiry, hit.amount)
                pipe.evalsha(self._read.sha, 2, *keys, expiry)
            if stream_keys:
                lease_ms = int(self.lease_seconds * 1000)
                pipe.evalsha(self._streams.sha, len(stream_keys), *stream_keys, member, lease_ms, *stream_limits)
            results = await pipe.execute(raise_on_error=False)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        hit_results = results[0 : 2 * len(hits) : 2]
        windows = [None if isinstance(r, BaseException) else _window(r) for r in results[1 : 2 * len(hits) : 2]]
        streams = None
        if stream_keys and not isinstance(results[-1], BaseException):
            streams = int(results[-1])
        hit_flags = [not isinstance(r, BaseException) and bool(r) for r in hit_results]
        return Admitted(hit_flags, windows, streams, error)

    async def _undo(
        self, hits: Sequence[CounterHit], admitted: Admitted, stream_keys: Sequence[str], member: str
    ) -> None:
        amounts = [(hit.key, -hit.amount) for hit, taken in zip(hits, admitted.hits, strict=True) if taken]
        taken_streams = stream_keys if admitted.streams == 0 else ()
        if amounts or taken_streams:
            await self.add(amounts, taken_streams, member)

    async def add(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str] = (), member: str = "") -> None:
        results = await self._add_once(amounts, stream_keys, member)
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in results[: len(amounts)]):
            # Redis lost the scripts: every add failed (they share one), the removals ran. Once more.
            await self._load_scripts()
            results = await self._add_once(amounts, (), member)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error

    async def _add_once(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str], member: str) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, amount in amounts:
                pipe.evalsha(self._acquire.sha, 2, *self._keys(key), NO_LIMIT, WINDOW_SECONDS, amount)
            for stream_key in stream_keys:
                pipe.zrem(stream_key, member)
            return list(await pipe.execute(raise_on_error=False))

    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        keys = [key for stream_keys in held.values() for key in stream_keys]
        members = [member for member, stream_keys in held.items() for _ in stream_keys]
        await self._renew(keys=keys, args=[int(self.lease_seconds * 1000), *members])

    async def close(self) -> None:
        await super().close()
        await self.client.aclose()


class MemoryRateLimitStore(RateLimitStore):
    """This process only (the embedded defaults): ``limits``' memory storage, leases in a dict, the
    clock ``time.monotonic``. Nothing here awaits I/O, so a batch cannot interleave with another."""

    def __init__(self) -> None:
        super().__init__()
        self.storage = MemoryStorage()
        self.streams: dict[str, dict[str, float]] = {}

    async def admit(
        self, hits: Sequence[CounterHit], stream_keys: Sequence[str], stream_limits: Sequence[int], member: str
    ) -> Admitted:
        flags: list[bool] = []
        windows: list[Window | None] = []
        for hit in hits:
            flags.append(
                bool(await self.storage.acquire_sliding_window_entry(hit.key, hit.limit, WINDOW_SECONDS, hit.amount))
            )
            windows.append(Window(*await self.storage.get_sliding_window(hit.key, WINDOW_SECONDS)))
        streams = self._streams_acquire(stream_keys, stream_limits, member) if stream_keys else None
        return Admitted(flags, windows, streams)

    def _streams_acquire(self, keys: Sequence[str], limits: Sequence[int], member: str) -> int:
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

    async def add(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str] = (), member: str = "") -> None:
        for key, amount in amounts:
            await self.storage.acquire_sliding_window_entry(key, NO_LIMIT, WINDOW_SECONDS, amount)
        for key in stream_keys:
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


# One store per event loop (a redis-py asyncio connection belongs to the loop it was made in) and
# per REDIS_URL (tests switch it).
_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RateLimitStore]] = weakref.WeakKeyDictionary()


def rate_limit_store() -> RateLimitStore:
    """Return this event loop's store: Redis with ``REDIS_URL``, else this process's memory."""
    url = settings.REDIS_URL
    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(url)
    if store is None:
        store = per_loop[url] = RedisRateLimitStore(url) if url else MemoryRateLimitStore()
    return store


async def rate_limit_store_close() -> None:
    """Close this event loop's stores (their Redis connections, their lease renewers)."""
    for store in _stores.pop(asyncio.get_running_loop(), {}).values():
        await store.close()
