"""Where rate-limit counters live: Redis (every server process shares them) or this process's memory.

Requests and tokens per minute are the ``limits`` library's sliding window counters
(https://limits.readthedocs.io/en/stable/strategies.html#sliding-window-counter): its algorithm,
its Lua scripts and its key layout in Redis, its ``MemoryStorage`` in memory. Concurrent streams
are not a ``limits`` feature: a sorted set of leases per subject (member: the request id; score:
when the lease expires, in Redis' own clock), taken for all subjects or none by one script of ours.

One round trip per admission; releases ride along
    ``limits`` has one call per counter and no batch API: a caller limited per key, user and model
    on requests and tokens would pay six hits, six window reads for its headers, one lease script
    and the budget reservation, 14 commands. The Redis store instead runs one Lua script per
    admission that calls ``limits``' own two scripts, unchanged (their text, taken from ``limits``'
    package, becomes two local functions of ours), on ``limits``' own keys, each counter's window
    read right after its hit, so the figures are what ``limits`` itself would compute; then the
    stream leases, then the budget reservation (``budget_store.RESERVE_SCRIPT``, also a function
    of it). Being one script, it is all or nothing without a second round trip: when any part
    refuses, it gives back what the others took before it returns, and no other client sees the
    difference. It reaches
    into ``limits`` (its Redis bridge's script texts and its window key names; pinned in
    requirements.txt); ``test_limits_internals_used_by_the_store`` fails if an upgrade moves them.
    The scripts go by SHA1 (``EVALSHA``) on a few connections of the store's own
    (``chatbackend.redis_clients.ScriptLanes``: no pool checkout or command layer per call, never
    retried) and are loaded again when a restarted Redis answers ``NOSCRIPT`` (nothing ran then).
    Measured with ``python -m bench.admission``: see the README of ``bench/``.

    A reply's release (completion tokens, stream slots) is off its critical path, and costs no round
    trip of its own: ``release`` queues it in this process and returns. The queue goes to Redis in
    one script call (``_RELEASE``, many releases) ``RATE_LIMIT_RELEASE_BATCH_SECONDS`` (50 ms) after
    its first entry, or earlier at the front of the next admission's script, which applies them
    before it admits (so a slot this process freed is free for its next admission). Replies ending
    together share one call; a steady stream of requests sends each release with the next
    admission. Client CPU per call is what counts here: on the 2-core VM a redis-py asyncio call
    costs ~100-150 µs of this process's CPU (Python, the write and read system calls) however small.
    A failed flush is logged, naming its requests, and dropped, as a failed release always was
    (whether the script ran is unknown, and adding completion tokens twice is worse than not at
    all): the counters age out, the leases expire. ``close`` (``rate_limit_store_close``, from the
    ASGI lifespan's shutdown) sends what waits. Other processes see a freed slot at most the batch
    delay later; nothing else is held in one process only.

    Local admissions (``headroom``) are recorded by the same script, every limit lifted: ``record``
    queues them for up to ``RECORD_DELAY_SECONDS`` (50 ms) and sends those queued by then, with the
    waiting releases, in one call (``_ADMIT_CALL`` runs any number of admissions in order); sooner
    when the releases' own delay ends first (they go together) or a reply that ended waits for its
    record (``send_records_now``). Every answer
    also says where its caller stands (stream leases, budget counters) and how many processes
    admit (``PROCESSES_KEY``), for the views local admission decides on.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.exceptions
from django.conf import settings
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.bridge import RedisBridge

from chatbackend.liveness import PROCESS_ID
from chatbackend.redis_clients import ScriptLanes, async_redis_client

from .budget_store import RESERVE_SCRIPT, ReserveRequest, ReserveVerdict, budget_store, reserve_verdict

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_PREFIX",
    "NO_LIMIT",
    "PROCESSES_KEY",
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
# The processes that admitted requests in the last PROCESS_WINDOW_SECONDS (local admission divides
# what it may take unseen among them: ``headroom``).
PROCESSES_KEY = f"{KEY_PREFIX}:processes"
PROCESS_WINDOW_SECONDS = 60
# Local admissions (``headroom``) wait up to this long in their process to be recorded, so that those made
# meanwhile and the releases waiting then share one script call, after their upstream requests' work:
# under load one call per this interval rather than one per request (50 streams of ~0.7 s replies, as
# ``python -m bench``'s paired rounds: 0.25-0.33 calls per request where 5 ms made 0.64-0.74; see the
# README of ``bench/``). A reply that ends first sends them at once (``send_records_now``), as its
# settlement waits for its record.
RECORD_DELAY_SECONDS = 0.05
# What a forced add (completion tokens, a give-back) passes as the limit, so that it is never refused.
NO_LIMIT = 2**50
# Redis connections per process (and event loop) for everything but the scripts; more calls at once wait for one.
MAX_REDIS_CONNECTIONS = 64
# Connections of the admission and release scripts (ScriptLanes): Redis runs one script at a time,
# so a few keep it busy; more admissions at once wait for a free one (REDIS_SOCKET_TIMEOUT_SECONDS).
SCRIPT_LANES = 4
# Counter names whose Redis keys the store remembers (then it forgets them all and starts again).
_KEY_NAMES_MAX = 10_000
# Errors that mean the store cannot answer (redis-py's; the memory store raises none): unreachable,
# and also a Redis that refuses the command (read-only replica during a failover, out of memory).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


class Window(NamedTuple):
    """One counter's sliding window: counts and seconds to live of the previous and current minute.

    A named tuple: one per counter is made from each admission's answer, and a tuple is built in a
    third of a frozen dataclass's time."""

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


# One counter of an admission, as the stores' ``admit`` and ``record`` take it: ``(key, limit, amount)``,
# add ``amount`` to counter ``key`` unless its window would then hold more than ``limit``. A plain tuple:
# ``rate_limit_acquire`` zips them from its caller's shape.
CounterHit = tuple[str, int, int]


class Admitted(NamedTuple):
    """What one admission did: for each counter whether it was hit and its window just after the hit
    (``None`` when the store failed), the stream leases' answer (0: every lease taken; a positive
    1-based index: that subject's set was full; ``None``: no lease asked, or the store failed) and
    the budget reservation's verdict (``None``: none asked, or not tried because a rate limit
    refused). All or nothing: when anything refused, nothing stays taken. ``error``: the store's
    failure, if any (then whether anything ran is unknown). A named tuple: one is made per admission
    and per record answered."""

    hits: list[bool]
    windows: list[Window | None]
    streams: int | None
    budget: ReserveVerdict | None = None
    error: BaseException | None = None
    # Read at the end of the call (the Redis store; empty from the memory store), for local
    # admission (``headroom``): the leases in each stream set, what each budget counter holds
    # (spent plus reserved: units, tokens), and the processes that admitted in PROCESS_WINDOW_SECONDS.
    stream_counts: tuple[int, ...] = ()
    budget_used: tuple[tuple[int, int], ...] = ()
    processes: int = 1
    # Which call of this store answered (they are numbered as they are sent): a later call's answer
    # holds what an earlier one's does.
    call: int = 0

    @property
    def admitted(self) -> bool:
        """Return True when every counter was hit, every lease taken and the budgets (if asked) reserved."""
        return (
            self.error is None and all(self.hits) and not self.streams and (self.budget is None or self.budget.reserved)
        )


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


def _lua_function(name: str, script: bytes | str) -> str:
    """Return ``script`` (which reads ``KEYS`` and ``ARGV``) as the Lua function ``name(KEYS, ARGV)``."""
    body = script.decode() if isinstance(script, bytes) else script
    return f"local function {name}(KEYS, ARGV)\n{body}\nend\n"


def _library() -> str:
    """Return the functions the admission and release scripts call: ``limits``' sliding-window scripts,
    unchanged (its acquire, then its window read), our stream leases and the budget reservation."""
    return (
        _lua_function("sliding_acquire", RedisBridge.SCRIPT_ACQUIRE_SLIDING_WINDOW)
        + _lua_function("sliding_window", RedisBridge.SCRIPT_SLIDING_WINDOW)
        + _lua_function("streams_acquire", _STREAMS_ACQUIRE)
        + _lua_function("budget_reserve", RESERVE_SCRIPT)
    )


# KEYS: the previous and current window keys of each counter (2n, as limits names them), each stream
# set (m), then the budget reservation's keys (b). ARGV: n, m, b, lease member, lease ms, window
# seconds, no-limit, then each counter's limit and amount, each stream set's limit, then the budget
# reservation's ARGV. Returns {hits, windows, streams, budget, counts, used}: hits[i] 1 when
# counter i was hit;
# windows[i] limits' four window figures read right after that hit (counts as numbers, 0 for none;
# times to live in ms, at least 0: read without converting); streams 0 (every lease taken),
# j (set j full) or -1 (none asked); budget the reservation script's answer, or {} when none was
# asked or a rate limit refused first; counts, each stream set's leases at the end; used, each
# budget counter's spent plus reserved units, then tokens, at the end. All or nothing: when anything
# refused, what the others took is given back before the script returns (no other command runs in
# between). Amounts are never negative (callers clamp them at 0): the give-back prefixes '-', and
# '--5' is not a number to Lua.
_ADMIT = """
local n, m, b = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, lease, expiry, nolimit = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local hits, windows, admitted = {}, {}, true
for i = 1, n do
  local keys = {KEYS[2 * i - 1], KEYS[2 * i]}
  if sliding_acquire(keys, {ARGV[6 + 2 * i], expiry, ARGV[7 + 2 * i]}) then
    hits[i] = 1
  else
    hits[i] = 0
    admitted = false
  end
  local w = sliding_window(keys, {expiry})
  windows[i] = {tonumber(w[1]) or 0, math.max(0, w[2]), tonumber(w[3]) or 0, math.max(0, w[4])}
end
local streams = -1
if m > 0 then
  local skeys, sargs = {}, {member, lease}
  for j = 1, m do
    skeys[j] = KEYS[2 * n + j]
    sargs[j + 2] = ARGV[7 + 2 * n + j]
  end
  streams = streams_acquire(skeys, sargs)
  if streams ~= 0 then admitted = false end
end
local budget = {}
if b > 0 and admitted then
  local bkeys, bargs = {}, {}
  for k = 1, b do bkeys[k] = KEYS[2 * n + m + k] end
  for k = 8 + 2 * n + m, #ARGV do bargs[#bargs + 1] = ARGV[k] end
  budget = budget_reserve(bkeys, bargs)
  if budget[1] ~= 1 then admitted = false end
end
if not admitted then
  for i = 1, n do
    if hits[i] == 1 and ARGV[7 + 2 * i] ~= '0' then
      sliding_acquire({KEYS[2 * i - 1], KEYS[2 * i]}, {nolimit, expiry, '-' .. ARGV[7 + 2 * i]})
    end
  end
  if streams == 0 then
    for j = 1, m do redis.call('ZREM', KEYS[2 * n + j], member) end
  end
end
local counts, used = {}, {}
for j = 1, m do counts[j] = redis.call('ZCARD', KEYS[2 * n + j]) end
for k = 3, b do
  local c = redis.call('HMGET', KEYS[2 * n + m + k], 's', 'r', 'st', 'rt')
  used[#used + 1] = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0)
  used[#used + 1] = (tonumber(c[3]) or 0) + (tonumber(c[4]) or 0)
end
return {hits, windows, streams, budget, counts, used}
"""
# KEYS: per release, the two window keys of each of its n counters (2n), then its m stream sets.
# ARGV: r (releases), window seconds, no-limit, then per release n, m, its lease member and each
# counter's amount. Adds each amount whatever the limit (negative: a give-back) and removes the lease
# from every stream set of its release. Returns r.
_RELEASE = """
local r, expiry, nolimit = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local a, k = 4, 0
for _ = 1, r do
  local n, m, member = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2]
  a = a + 3
  for _ = 1, n do
    if ARGV[a] ~= '0' then
      sliding_acquire({KEYS[k + 1], KEYS[k + 2]}, {nolimit, expiry, ARGV[a]})
    end
    a = a + 1
    k = k + 2
  end
  for _ = 1, m do
    redis.call('ZREM', KEYS[k + 1], member)
    k = k + 1
  end
end
return r
"""
# The admission script as called: KEYS[1] is the set of processes that admit (``PROCESSES_KEY``,
# member: the process id, score: when it last admitted, Redis' clock), then KEYS and ARGV hold the
# releases waiting in this process (``_RELEASE``'s, ``rk`` keys and ``ra`` arguments; none: 0 and
# 0), applied first, then ``n`` admissions (``_ADMIT``'s), each preceded in ARGV by its counts of
# keys and of arguments. ARGV: rk, ra, this process's id, the processes' window (seconds), n, the
# releases' ARGV, then per admission its key count, its argument count and its ARGV. Returns each
# admission's ``_ADMIT`` answer, in order, and last how many processes admitted within the window
# (this one included). Admissions run one after the other, each seeing what the ones before took.
_ADMIT_CALL = """
local rk, ra, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5])
if ra > 0 then
  local rkeys, rargs = {}, {}
  for i = 1, rk do rkeys[i] = KEYS[1 + i] end
  for i = 1, ra do rargs[i] = ARGV[5 + i] end
  release_many(rkeys, rargs)
end
local k, a, answers = rk + 2, ra + 6, {}
for r = 1, n do
  local kc, ac = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local akeys, aargs = {}, {}
  for i = 1, kc do akeys[i] = KEYS[k + i - 1] end
  for i = 1, ac do aargs[i] = ARGV[a + 1 + i] end
  answers[r] = admit_one(akeys, aargs)
  k, a = k + kc, a + 2 + ac
end
local now, window = tonumber(redis.call('TIME')[1]), tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('EXPIRE', KEYS[1], window)
answers[n + 1] = redis.call('ZCARD', KEYS[1])
return answers
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
        # Local admission (``headroom``): the share of a limit's room this store's processes may admit
        # without waiting for the store (0: never), each caller's view, and the records under way.
        self.local_share = 0.0
        self.views: dict[Any, Any] = {}
        self.records: set[asyncio.Future[Any]] = set()

    @abc.abstractmethod
    async def admit(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None = None,
    ) -> Admitted:
        """Hit every counter of ``hits`` (each only if it fits), read each one's window right after its
        hit, take lease ``member`` in every set of ``stream_keys`` if each has room under its limit,
        and then, if all of that succeeded, make the ``budget`` reservation. All or nothing: when any
        part refuses, the others are undone before this returns.

        Never raises for the store's failures: they come back in ``Admitted.error``.
        """

    def record(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None = None,
    ) -> asyncio.Future[Admitted]:
        """``admit`` a local admission (``headroom``) later: its future answer (the Redis store batches them)."""
        return asyncio.ensure_future(self.admit(hits, stream_keys, stream_limits, member, budget))

    @abc.abstractmethod
    async def add(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str] = (), member: str = "") -> None:
        """Add each ``(key, amount)`` whatever the limit (negative: give back) and remove lease ``member``
        from ``stream_keys``. Raises the store's errors."""

    async def release(
        self,
        amounts: Sequence[tuple[str, int]],
        stream_keys: Sequence[str] = (),
        member: str = "",
        carrier: list[int | None] | None = None,
    ) -> None:
        """A reply's release: ``add`` (its completion tokens, its stream leases), which may be sent later
        and together with others (the Redis store), but before ``close`` returns. Runs to its end even
        if the caller is cancelled. Never raises: a failure is logged (the counters age out, the leases
        expire). ``carrier``: where the Redis store writes the number of the call that sends it
        (``headroom``)."""
        await asyncio.shield(self._add_logged(amounts, stream_keys, member))

    def send_records_now(self) -> None:  # noqa: B027 - a store that records at once queues none
        """Send the queued records of local admissions now (``RedisRateLimitStore.record``); none here."""

    def release_soon(
        self,
        amounts: Sequence[tuple[str, int]],
        stream_keys: Sequence[str] = (),
        member: str = "",
        carrier: list[int | None] | None = None,
    ) -> None:
        """``release`` from a callback (no caller waits): queued, sent as ``release`` sends it."""
        task = asyncio.get_running_loop().create_task(
            self.release(amounts, stream_keys, member), name="rate-limit-release", context=contextvars.Context()
        )
        self.records.add(task)
        task.add_done_callback(self.records.discard)

    async def _add_logged(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str], member: str) -> None:
        try:
            await self.add(amounts, stream_keys, member)
        except Exception as exc:
            _release_failed([member], exc)

    async def flush(self) -> None:  # noqa: B027 - a store that sends releases at once holds none
        """Send the releases this store still holds (none here)."""

    @abc.abstractmethod
    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        """Extend the leases ``held`` (request id -> keys) by ``lease_seconds`` from now."""

    def hold(self, member: str, keys: tuple[str, ...]) -> None:
        """Renew ``member``'s leases while held (every third of a lease) until ``unhold``."""
        self.held[member] = keys
        if self._renewer is None or self._renewer.done():
            # The process's, not the request's that started it: an empty context (chatbackend.liveness).
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="rate-limit-leases", context=contextvars.Context()
            )

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
        while self.records:  # local admissions' records, and the releases waiting for them
            await asyncio.gather(*self.records, return_exceptions=True)


def _release_failed(members: Sequence[str], exc: BaseException | str) -> None:
    """Log releases that may not have reached the store: their counters age out, their leases expire."""
    logger.warning(
        "rate-limit release of %s failed: %s",
        ", ".join(members),
        exc,
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


# A record's arguments as ``record`` takes them: hits, stream keys, stream limits, member, budget.
_RecordArgs = tuple[Sequence[CounterHit], Sequence[str], Sequence[int], str, ReserveRequest | None]


class RedisRateLimitStore(RateLimitStore):
    """Counters in Redis, shared by every server process: one script call (one round trip) per admission."""

    def __init__(self, url: str) -> None:
        super().__init__()
        # A bounded pool that waits for a free connection: a burst of admissions must not open
        # thousands of connections.
        self.client = async_redis_client(
            url, max_connections=MAX_REDIS_CONNECTIONS, timeout=float(settings.REDIS_SOCKET_TIMEOUT_SECONDS)
        )
        scheme = "async+redis+" if url.startswith("unix://") else "async+"
        self.storage = RedisStorage(
            scheme + url,
            implementation="redispy",
            key_prefix=KEY_PREFIX,
            # One pool for limits' scripts and ours (limits passes it to redis-py; its annotation is too narrow).
            connection_pool=self.client.connection_pool,  # type: ignore[arg-type]
        )
        library = _library() + _lua_function("release_many", _RELEASE)
        self._admit = self.client.register_script(library + _lua_function("admit_one", _ADMIT) + _ADMIT_CALL)
        self._release = self.client.register_script(library + _RELEASE)
        self._renew = self.client.register_script(_STREAMS_RENEW)
        self._lanes = ScriptLanes(self.client, lanes=SCRIPT_LANES, timeout=float(settings.REDIS_SOCKET_TIMEOUT_SECONDS))
        # Counter key -> its two Redis keys: the same few subjects' keys are named on every request.
        self._key_names: dict[str, tuple[str, str]] = {}
        self.release_delay = float(settings.RATE_LIMIT_RELEASE_BATCH_SECONDS)
        # Releases waiting to be sent (``release``), each (keys, args) in ``_RELEASE``'s layout, and
        # the flushes under way; ``close`` sends what waits and waits for them.
        self._pending: list[tuple[list[str], list[Any], str, list[int | None] | None]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.local_share = float(settings.METERING_LOCAL_ADMISSION_SHARE)
        # Local admissions waiting to be recorded (``record``), each with its future answer.
        self._records: list[tuple[_RecordArgs, asyncio.Future[Admitted]]] = []
        self._record_timer: asyncio.TimerHandle | None = None
        self._calls = 0  # script calls sent that carry releases or admissions (``Admitted.call``)

    def _keys(self, key: str) -> tuple[str, str]:
        """Return counter ``key``'s Redis keys as ``limits`` names them: previous and current window."""
        names = self._key_names.get(key)
        if names is None:
            if len(self._key_names) >= _KEY_NAMES_MAX:
                self._key_names.clear()
            prefixed = self.storage.bridge.prefixed_key
            names = self._key_names[key] = (
                prefixed(self.storage._previous_window_key(key)),
                prefixed(self.storage._current_window_key(key)),
            )
        return names

    def _release_entry(
        self,
        amounts: Sequence[tuple[str, int]],
        stream_keys: Sequence[str],
        member: str,
        carrier: list[int | None] | None = None,
    ) -> tuple[list[str], list[Any], str, list[int | None] | None]:
        """Return one release as ``_RELEASE`` reads it: its keys, its ARGV part (n, m, member, amounts),
        its member, and the cell to write the carrying call's number into (``headroom``), if any."""
        keys: list[str] = []
        args: list[Any] = [len(amounts), len(stream_keys), member]
        for key, amount in amounts:
            keys += self._keys(key)
            args.append(amount)
        keys += stream_keys
        return keys, args, member, carrier

    def _take_pending(self, call: int) -> tuple[list[str], list[Any], list[str]]:
        """Take every waiting release for store call number ``call``: their keys, their ARGV
        (``_RELEASE``'s, r first), their members."""
        pending, self._pending = self._pending, []
        if self._flush_timer is not None:  # the next release waits its full delay for a carrier again
            self._flush_timer.cancel()
            self._flush_timer = None
        keys: list[str] = []
        args: list[Any] = [len(pending), WINDOW_SECONDS, NO_LIMIT]
        members: list[str] = []
        for entry_keys, entry_args, member, carrier in pending:
            keys += entry_keys
            args += entry_args
            members.append(member)
            if carrier is not None:
                carrier[0] = call
        return keys, args, members

    def _admission(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None,
    ) -> tuple[list[str], list[Any], int]:
        """Return one admission as ``_ADMIT_CALL`` reads it: its keys, its ARGV (counts first), its hits."""
        budget_keys = budget.redis_keys() if budget is not None else []
        keys: list[str] = []
        args: list[Any] = [
            len(hits),
            len(stream_keys),
            len(budget_keys),
            member,
            int(self.lease_seconds * 1000),
            WINDOW_SECONDS,
            NO_LIMIT,
        ]
        for counter, limit, amount in hits:
            keys += self._keys(counter)
            args += (limit, amount)
        keys += stream_keys
        args += stream_limits
        if budget is not None:
            keys += budget_keys
            args += budget.redis_args()
        return keys, [len(keys), len(args), *args], len(hits)

    async def _call(self, admissions: Sequence[tuple[list[str], list[Any], int]]) -> list[Admitted]:
        """Run ``admissions`` in one script call, after the releases waiting in this process; return
        each one's answer (with the store's error, if the call failed: whether it ran is unknown)."""
        self._calls += 1
        call = self._calls
        # Releases waiting in this process go first, in the same script call (no round trip of their own).
        release_keys, release_args, carried = self._take_pending(call) if self._pending else ([], [], [])
        keys = [PROCESSES_KEY, *release_keys]
        args = [len(release_keys), len(release_args), PROCESS_ID, PROCESS_WINDOW_SECONDS, len(admissions)]
        args += release_args
        for admission_keys, admission_args, _ in admissions:
            keys += admission_keys
            args += admission_args
        try:
            # EVALSHA, and on NOSCRIPT (a restarted Redis) SCRIPT LOAD and once more (a NOSCRIPT
            # answer means nothing ran); never retried otherwise (ScriptLanes).
            *answers, processes = await self._lanes.call(self._admit, keys, args)
        except asyncio.CancelledError:
            if carried:
                _release_failed(carried, "the admission carrying them was cancelled")
            raise
        except Exception as exc:  # unreachable: whether the script ran is unknown
            if carried:
                _release_failed(carried, exc)
            return [Admitted([False] * n, [None] * n, None, None, exc) for _, _, n in admissions]
        processes = max(1, int(processes))
        return [
            Admitted(
                [bool(flag) for flag in hit_flags],
                # _ADMIT's figures of each window: counts, and times to live in ms (at least 0).
                [
                    Window(previous, previous_ms / 1000, current, current_ms / 1000)
                    for previous, previous_ms, current, current_ms in windows
                ],
                None if streams < 0 else int(streams),
                reserve_verdict(reserved) if reserved else None,
                stream_counts=tuple(counts),
                budget_used=tuple(zip(used[::2], used[1::2], strict=True)),
                processes=processes,
                call=call,
            )
            for hit_flags, windows, streams, reserved, counts, used in answers
        ]

    async def admit(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None = None,
    ) -> Admitted:
        (admitted,) = await self._call([self._admission(hits, stream_keys, stream_limits, member, budget)])
        return admitted

    def record(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None = None,
    ) -> asyncio.Future[Admitted]:
        """Queue the admission; it is sent ``RECORD_DELAY_SECONDS`` after the first one queued, with every
        one queued by then (and the waiting releases), in one script call. Returns its future answer,
        which never raises but for cancellation (a failure is the answer's ``error``)."""
        future: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        # Its arguments are built when sent: off the request's path to its upstream call.
        self._records.append(((hits, stream_keys, stream_limits, member, budget), future))
        if self._record_timer is None:
            self._record_timer = asyncio.get_running_loop().call_later(RECORD_DELAY_SECONDS, self._record_soon)
        return future

    def send_records_now(self) -> None:
        """Send the queued records at the loop's next turn rather than at their delay (with every one
        queued by then and the waiting releases): a reply that ended waits for its own record."""
        timer = self._record_timer
        if timer is not None:
            timer.cancel()
            self._record_soon()

    def _record_soon(self) -> None:
        self._record_timer = None
        task = asyncio.get_running_loop().create_task(
            self._send_records(), name="metering-records", context=contextvars.Context()
        )
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send_records(self) -> None:
        records, self._records = self._records, []
        if not records:
            return
        try:
            answers = await self._call([self._admission(*admission) for admission, _ in records])
        except BaseException as exc:  # cancelled (the loop is closing): the answers will never come
            answers = [Admitted([], [], None, None, exc) for _ in records]
            raise
        finally:
            for (_, future), answer in zip(records, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

    async def add(self, amounts: Sequence[tuple[str, int]], stream_keys: Sequence[str] = (), member: str = "") -> None:
        keys, args, _, _ = self._release_entry(amounts, stream_keys, member)
        await self._release(keys=keys, args=[1, WINDOW_SECONDS, NO_LIMIT, *args])

    async def release(
        self,
        amounts: Sequence[tuple[str, int]],
        stream_keys: Sequence[str] = (),
        member: str = "",
        carrier: list[int | None] | None = None,
    ) -> None:
        """Queue the release; it is sent within ``release_delay`` with every other one queued by then, in
        one script call, or earlier with the next admission's. Returns at once; failures are logged."""
        self.release_soon(amounts, stream_keys, member, carrier)

    def release_soon(
        self,
        amounts: Sequence[tuple[str, int]],
        stream_keys: Sequence[str] = (),
        member: str = "",
        carrier: list[int | None] | None = None,
    ) -> None:
        """Queue the release (``release``), without suspending."""
        self._pending.append(self._release_entry(amounts, stream_keys, member, carrier))
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.release_delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_timer = None
        if not self._pending:  # an admission carried them
            return
        if self._records:  # records wait too: they carry the releases, in one call
            self.send_records_now()
            return
        # Many requests' releases: no one request's context (its id would be on the batch's logs).
        task = asyncio.get_running_loop().create_task(
            self._flush(), name="rate-limit-releases", context=contextvars.Context()
        )
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Send every waiting release in one script call; log (and drop) them if it fails, as one
        release's failure always was: the counters age out, the leases expire."""
        self._calls += 1
        keys, args, members = self._take_pending(self._calls)
        if not members:
            return
        try:
            await self._lanes.call(self._release, keys, args)
        except Exception as exc:
            _release_failed(members, exc)

    async def flush(self) -> None:
        """Send the waiting records and releases now and wait for every call under way (shutdown): the
        records first, then the releases that waited for them (``RateLease.release``)."""
        if self._record_timer is not None:
            self._record_timer.cancel()
            self._record_timer = None
        if self._records:
            await self._send_records()
        while self.records:  # the local admissions' tasks, whose end queues the releases waiting for them
            await asyncio.gather(*self.records, return_exceptions=True)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending:
            await self._flush()
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def streams_renew(self, held: dict[str, tuple[str, ...]]) -> None:
        keys = [key for stream_keys in held.values() for key in stream_keys]
        members = [member for member, stream_keys in held.items() for _ in stream_keys]
        await self._renew(keys=keys, args=[int(self.lease_seconds * 1000), *members])

    async def close(self) -> None:
        await super().close()
        await self.flush()
        await self._lanes.aclose()
        await self.client.aclose()


class MemoryRateLimitStore(RateLimitStore):
    """This process only (the embedded defaults): ``limits``' memory storage, leases in a dict, the
    clock ``time.monotonic``. Nothing here awaits I/O, so a batch cannot interleave with another."""

    def __init__(self) -> None:
        super().__init__()
        self.storage = MemoryStorage()
        self.streams: dict[str, dict[str, float]] = {}

    async def admit(
        self,
        hits: Sequence[CounterHit],
        stream_keys: Sequence[str],
        stream_limits: Sequence[int],
        member: str,
        budget: ReserveRequest | None = None,
    ) -> Admitted:
        flags: list[bool] = []
        windows: list[Window | None] = []
        for key, limit, amount in hits:
            flags.append(bool(await self.storage.acquire_sliding_window_entry(key, limit, WINDOW_SECONDS, amount)))
            windows.append(Window(*await self.storage.get_sliding_window(key, WINDOW_SECONDS)))
        streams = self._streams_acquire(stream_keys, stream_limits, member) if stream_keys else None
        verdict = None
        admitted = all(flags) and not streams
        try:
            if budget is not None and admitted:
                # The in-process budget store (the embedded defaults have no Redis for either).
                verdict = await budget_store().reserve(
                    request_id=budget.request_id, pid=budget.pid, expires_at=budget.expires_at, lines=list(budget.lines)
                )
                admitted = verdict.reserved
        finally:
            if not admitted:
                taken = [(key, -amount) for (key, _, amount), flag in zip(hits, flags, strict=True) if flag and amount]
                await self.add(taken, stream_keys if streams == 0 else (), member)
        return Admitted(flags, windows, streams, verdict)

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


# The store rate_limit_store last returned, with its loop (weakly) and URL: one call per metered request.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], str, RateLimitStore] | None = None


def rate_limit_store() -> RateLimitStore:
    """Return this event loop's store: Redis with ``REDIS_URL``, else this process's memory."""
    global _last
    url = settings.REDIS_URL
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0]() is loop and last[1] == url:
        return last[2]
    per_loop = _stores.setdefault(loop, {})
    store = per_loop.get(url)
    if store is None:
        store = per_loop[url] = RedisRateLimitStore(url) if url else MemoryRateLimitStore()
    _last = (weakref.ref(loop), url, store)
    return store


async def rate_limit_store_close() -> None:
    """Close this event loop's stores (their Redis connections, their lease renewers)."""
    global _last
    _last = None
    for store in _stores.pop(asyncio.get_running_loop(), {}).values():
        await store.close()
