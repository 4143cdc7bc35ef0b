"""Where budget counters live: Redis (every process shares them) or this process's memory.

Amounts are integers of ``UNIT`` (10⁻⁸ US dollar, the precision of ``UsageRecord.cost``), so that
counters add exactly in Redis (``HINCRBY``) and in Python alike.

Data model, the same in both stores:

- A *counter* per budget and period (key ``{budget}:c:<budget id>:<subject kind>:<subject id>:<period>``),
  a hash: ``s`` spent units and ``st`` spent tokens (settled usage), ``r`` / ``rt`` reserved units and
  tokens (requests in flight), ``v`` a version bumped by every settlement or release (reconciliation
  repairs a counter only if no settlement ran meanwhile), and ``x:<request id>`` = ``"<units>:<tokens>"``
  for every reservation it holds (so reserved amounts can be recomputed).
- A *reservation* per request (key ``{budget}:r:<request id>``), a hash: ``pid`` (the process that
  holds it, ``chatbackend.liveness.PROCESS_ID``), ``exp`` (when it may be released regardless, Unix
  seconds), ``c`` the counters it holds, one line each: ``key|units|tokens|period start|period end``.
- An index of reservations (sorted set ``{budget}:reservations``, score ``exp``), so reconciliation
  finds those of dead processes without scanning keys.

Every key shares the hash tag ``{budget}``: in a Redis Cluster they sit in one slot, which the
scripts (that name counters read from a reservation) need.

The scripts are atomic (Redis runs one script at a time), so a reservation checks and takes every
budget of a request at once: none is taken when one refuses. https://redis.io/docs/latest/develop/interact/programmability/eval-intro/
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple, Protocol

import redis
from django.conf import settings

from chatbackend.redis_clients import async_redis_client

UNIT = Decimal("0.00000001")  # US dollars per counter unit: UsageRecord.cost's 8 decimal places
PREFIX = "{budget}:"
INDEX_KEY = PREFIX + "reservations"
# Redis connections per event loop for reservations (admissions beyond wait for one).
MAX_ASYNC_CONNECTIONS = 64


def to_units(amount: Decimal, *, round_up: bool = False) -> int:
    """Return ``amount`` (US dollars) in counter units; ``round_up`` for a reservation (never under)."""
    scaled = amount / UNIT
    return int(scaled.to_integral_value(rounding=ROUND_CEILING) if round_up else scaled.to_integral_value())


def from_units(units: int) -> Decimal:
    """Return counter ``units`` in US dollars."""
    return (Decimal(units) * UNIT).quantize(UNIT)


def counter_key(*, budget_id: int, subject_kind: str, subject_id: int, period_label: str) -> str:
    """Return the counter key of a budget in one period (the subject is part of it: moving a budget resets it)."""
    return f"{PREFIX}c:{budget_id}:{subject_kind}:{subject_id}:{period_label}"


def reservation_key(request_id: str) -> str:
    return f"{PREFIX}r:{request_id}"


class ReserveLine(NamedTuple):
    """One budget a reservation takes: its counter, limits and the amount asked, in units and tokens.

    ``token_limit`` None: no token limit. ``seed_units`` / ``seed_tokens``: the period's spend from the
    usage rows, used when the counter does not exist yet (None: not computed; the store then asks for it).
    ``ttl_seconds``: lifetime of a new counter (0: none). ``start`` / ``end``: the period, Unix seconds.
    A named tuple (``_replace`` copies it): one is built per budget per request.
    """

    key: str
    limit_units: int
    token_limit: int | None
    units: int
    tokens: int
    ttl_seconds: int
    start: float
    end: float
    seed_units: int | None = None
    seed_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReserveVerdict:
    """What a reserve call did: ``reserved``; else ``missing`` (indexes of lines whose counter needs a
    seed) or ``refused`` (index of the line that refused, and its counter's spent and reserved
    amounts: units, or tokens when ``by_tokens``)."""

    reserved: bool = False
    missing: tuple[int, ...] = ()
    refused: int | None = None
    by_tokens: bool = False
    spent: int = 0
    held: int = 0


# The verdict of every reservation made (immutable: one instance serves them all).
RESERVED = ReserveVerdict(reserved=True)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One ended request to settle: its actual cost (units) and tokens, and when its usage row was created.

    A row created outside a reserved counter's period adds nothing to it (that period's counter is
    seeded from the rows, which already hold it). ``created`` -1: release only (nothing was used).
    """

    request_id: str
    created: float
    units: int
    tokens: int


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter as read: ``version``, spent/reserved units and tokens, and the reservations it holds."""

    version: int
    spent: int
    spent_tokens: int
    reserved: int
    reserved_tokens: int
    holders: tuple[str, ...]


class BudgetStore(Protocol):
    """The operations budgets need; ``RedisBudgetStore`` and ``MemoryBudgetStore`` implement them."""

    async def reserve(
        self, *, request_id: str, pid: str, expires_at: float, lines: list[ReserveLine]
    ) -> ReserveVerdict: ...

    def settle(self, settlements: list[Settlement]) -> int: ...

    def reservations(self) -> list[tuple[str, str, float]]: ...

    def counter(self, key: str) -> CounterState | None: ...

    def counter_repair(
        self, key: str, *, version: int, units: int, tokens: int, pending: dict[str, tuple[int, int]]
    ) -> tuple[CounterState, CounterState] | None: ...


# --- Redis -------------------------------------------------------------------------------------

# KEYS: reservation, index, counters...  ARGV: request id, pid, expires at, then 9 per counter:
# limit units, token limit (-1: none), units, tokens, seed units (-1: unknown), seed tokens, ttl,
# period start, period end.
# Returns {1} reserved (or already was), {2, i...} counters i need a seed, {0, i, spent, reserved}
# refused by units, {3, i, spent tokens, reserved tokens} refused by tokens.
RESERVE_SCRIPT = """
local n = #KEYS - 2
if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
local missing = {}
for i = 1, n do
  local key, base = KEYS[i + 2], 3 + (i - 1) * 9
  if redis.call('EXISTS', key) == 0 then
    if tonumber(ARGV[base + 5]) < 0 then
      missing[#missing + 1] = i
    else
      redis.call('HSET', key, 's', ARGV[base + 5], 'st', ARGV[base + 6], 'r', 0, 'rt', 0, 'v', 0)
      if tonumber(ARGV[base + 7]) > 0 then redis.call('EXPIRE', key, ARGV[base + 7]) end
    end
  end
end
if #missing > 0 then return {2, unpack(missing)} end
for i = 1, n do
  local key, base = KEYS[i + 2], 3 + (i - 1) * 9
  local c = redis.call('HMGET', key, 's', 'r', 'st', 'rt')
  local s, r, st, rt = tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0
  if s + r + tonumber(ARGV[base + 3]) > tonumber(ARGV[base + 1]) then return {0, i, c[1] or '0', c[2] or '0'} end
  local tlimit = tonumber(ARGV[base + 2])
  if tlimit >= 0 and st + rt + tonumber(ARGV[base + 4]) > tlimit then return {3, i, c[3] or '0', c[4] or '0'} end
end
local lines = {}
for i = 1, n do
  local key, base = KEYS[i + 2], 3 + (i - 1) * 9
  redis.call('HINCRBY', key, 'r', ARGV[base + 3])
  redis.call('HINCRBY', key, 'rt', ARGV[base + 4])
  redis.call('HSET', key, 'x:' .. ARGV[1], ARGV[base + 3] .. ':' .. ARGV[base + 4])
  lines[i] = key .. '|' .. ARGV[base + 3] .. '|' .. ARGV[base + 4] .. '|' .. ARGV[base + 8] .. '|' .. ARGV[base + 9]
end
redis.call('HSET', KEYS[1], 'pid', ARGV[2], 'exp', ARGV[3], 'c', table.concat(lines, '\\n'))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {1}
"""

# KEYS: index.  ARGV: key prefix, then 4 per request: request id, row created (Unix s; -1: release
# only), cost units, tokens. Releases each reservation's reserved amounts, adds the actual ones to
# the counters whose period holds the row, deletes the reservation. Returns how many it settled.
_SETTLE = """
local prefix, settled = ARGV[1], 0
for j = 2, #ARGV, 4 do
  local rid, created = ARGV[j], tonumber(ARGV[j + 1])
  local rkey = prefix .. 'r:' .. rid
  local lines = redis.call('HGET', rkey, 'c')
  if lines then
    for line in string.gmatch(lines, '[^\\n]+') do
      local key, units, tokens, first, stop = string.match(line, '^(.*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
      if redis.call('HDEL', key, 'x:' .. rid) == 1 then
        -- '-' .. amount: exact for any int64 (a Lua number would print 1e+15); Redis rejects '-0'
        if units ~= '0' then redis.call('HINCRBY', key, 'r', '-' .. units) end
        if tokens ~= '0' then redis.call('HINCRBY', key, 'rt', '-' .. tokens) end
        if created >= tonumber(first) and created < tonumber(stop) then
          redis.call('HINCRBY', key, 's', ARGV[j + 2])
          redis.call('HINCRBY', key, 'st', ARGV[j + 3])
        end
        redis.call('HINCRBY', key, 'v', 1)
      end
    end
    redis.call('DEL', rkey)
    settled = settled + 1
  end
  redis.call('ZREM', KEYS[1], rid)
end
return settled
"""

# KEYS: counter.  ARGV: expected version, spent units and tokens from the rows, then 3 per row of a
# reservation the counter held when read: request id, units, tokens (rows written, not settled yet).
# Returns {} when the counter is gone or changed (version), else {old s, st, r, rt, new s, st, r, rt}.
_REPAIR = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then return {} end
local s, st = tonumber(ARGV[2]), tonumber(ARGV[3])
for j = 4, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[1], 'x:' .. ARGV[j]) == 1 then
    s = s - tonumber(ARGV[j + 1])
    st = st - tonumber(ARGV[j + 2])
  end
end
local r, rt = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for k = 1, #all, 2 do
  if string.sub(all[k], 1, 2) == 'x:' then
    local units, tokens = string.match(all[k + 1], '^(-?%d+):(-?%d+)$')
    r, rt = r + tonumber(units), rt + tonumber(tokens)
  end
end
local old = redis.call('HMGET', KEYS[1], 's', 'st', 'r', 'rt')
local new = {string.format('%d', s), string.format('%d', st), string.format('%d', r), string.format('%d', rt)}
redis.call('HSET', KEYS[1], 's', new[1], 'st', new[2], 'r', new[3], 'rt', new[4])
return {old[1] or '0', old[2] or '0', old[3] or '0', old[4] or '0', new[1], new[2], new[3], new[4]}
"""


def reserve_verdict(result: list[Any]) -> ReserveVerdict:
    """Return ``RESERVE_SCRIPT``'s answer as a ``ReserveVerdict``."""
    status = int(result[0])
    if status == 1:
        return RESERVED
    if status == 2:
        return ReserveVerdict(missing=tuple(int(i) - 1 for i in result[1:]))
    return ReserveVerdict(refused=int(result[1]) - 1, by_tokens=status == 3, spent=int(result[2]), held=int(result[3]))


class ReserveRequest(NamedTuple):
    """One request's reservation on budgets: ``lines`` for ``request_id``, held by process ``pid`` until
    ``expires_at`` (Unix seconds) at the latest. What ``BudgetStore.reserve`` takes, and what the rate
    limits' store runs in its admission script (``ratelimit_store``) so that both cost one round trip.
    A named tuple (``_replace`` copies it): one or two are built per budgeted request."""

    request_id: str
    pid: str
    expires_at: float
    lines: tuple[ReserveLine, ...]

    def redis_keys(self) -> list[str]:
        """Return ``RESERVE_SCRIPT``'s KEYS: the reservation, the index, then each line's counter."""
        return [reservation_key(self.request_id), INDEX_KEY, *[line.key for line in self.lines]]

    def redis_args(self) -> list[Any]:
        """Return ``RESERVE_SCRIPT``'s ARGV (see the script)."""
        return _reserve_args(self.request_id, self.pid, self.expires_at, self.lines)


def _reserve_args(request_id: str, pid: str, expires_at: float, lines: Sequence[ReserveLine]) -> list[Any]:
    # Floats as they are: redis-py's packers (hiredis' and its own) write them as repr() does.
    args: list[Any] = [request_id, pid, expires_at]
    for line in lines:
        args += [
            line.limit_units,
            -1 if line.token_limit is None else line.token_limit,
            line.units,
            line.tokens,
            -1 if line.seed_units is None else line.seed_units,
            0 if line.seed_tokens is None else line.seed_tokens,
            line.ttl_seconds,
            line.start,
            line.end,
        ]
    return args


def _state(raw: dict[Any, Any]) -> CounterState:
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    return CounterState(
        version=int(fields.get("v", 0)),
        spent=int(fields.get("s", 0)),
        spent_tokens=int(fields.get("st", 0)),
        reserved=int(fields.get("r", 0)),
        reserved_tokens=int(fields.get("rt", 0)),
        holders=tuple(name[2:] for name in fields if name.startswith("x:")),
    )


class RedisBudgetStore:
    """Counters in Redis (``settings.REDIS_URL``): one truth for every server process and worker.

    Async calls (``reserve``) use a client per event loop; sync calls (settlement, reconciliation:
    the Celery worker, the admin) a shared thread-safe client. Raises redis-py's errors when Redis
    cannot be reached (``socket_timeout``: ``REDIS_SOCKET_TIMEOUT_SECONDS``).
    """

    def __init__(self, url: str, *, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._sync: Any = None  # redis.Redis: responses are bytes
        self._lock = threading.Lock()
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _client(self) -> Any:
        with self._lock:
            if self._sync is None:
                self._sync = redis.Redis.from_url(
                    self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
                )
            return self._sync

    def _async_script(self) -> Any:
        loop = asyncio.get_running_loop()
        script = self._async.get(loop)
        if script is None:
            # Bounded, like the rate limits' pool: a burst of admissions waits for a connection
            # (up to the timeout) rather than opening one per request.
            client = async_redis_client(self._url, max_connections=MAX_ASYNC_CONNECTIONS, timeout=self._timeout)
            script = self._async[loop] = client.register_script(RESERVE_SCRIPT)
        return script

    async def reserve(
        self, *, request_id: str, pid: str, expires_at: float, lines: list[ReserveLine]
    ) -> ReserveVerdict:
        request = ReserveRequest(request_id, pid, expires_at, tuple(lines))
        result = await self._async_script()(keys=request.redis_keys(), args=request.redis_args())
        return reserve_verdict(result)

    def settle(self, settlements: list[Settlement]) -> int:
        if not settlements:
            return 0
        args: list[Any] = [PREFIX]
        for item in settlements:
            args += [item.request_id, repr(item.created), item.units, item.tokens]
        return int(self._client().register_script(_SETTLE)(keys=[INDEX_KEY], args=args))

    def reservations(self) -> list[tuple[str, str, float]]:
        client = self._client()
        listed = client.zrange(INDEX_KEY, 0, -1, withscores=True)
        pipe = client.pipeline(transaction=False)
        for request_id, _ in listed:
            pipe.hget(reservation_key(request_id.decode()), "pid")
        pids = pipe.execute()
        return [(rid.decode(), (pid or b"").decode(), exp) for (rid, exp), pid in zip(listed, pids, strict=True)]

    def counter(self, key: str) -> CounterState | None:
        raw = self._client().hgetall(key)
        return _state(raw) if raw else None

    def counter_repair(
        self, key: str, *, version: int, units: int, tokens: int, pending: dict[str, tuple[int, int]]
    ) -> tuple[CounterState, CounterState] | None:
        args: list[Any] = [str(version), units, tokens]
        for request_id, (row_units, row_tokens) in pending.items():
            args += [request_id, row_units, row_tokens]
        result = self._client().register_script(_REPAIR)(keys=[key], args=args)
        if not result:
            return None
        old, new = [int(x) for x in result[:4]], [int(x) for x in result[4:]]
        return (
            CounterState(version, old[0], old[1], old[2], old[3], ()),
            CounterState(version, new[0], new[1], new[2], new[3], ()),
        )


# --- In process ----------------------------------------------------------------------------------


@dataclass
class _Counter:
    expires_at: float | None
    s: int = 0
    st: int = 0
    r: int = 0
    rt: int = 0
    v: int = 0
    holders: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Reservation:
    pid: str
    expires_at: float
    lines: list[ReserveLine]


class MemoryBudgetStore:
    """The same counters in this process's memory, behind a lock: the embedded defaults' store.

    Single-process by nature (each process would count on its own): with several server processes
    set ``REDIS_URL``. The embedded defaults run one process and Celery tasks in it (eagerly), so
    reservation and settlement meet here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._reservations: dict[str, _Reservation] = {}

    def _get(self, key: str) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at is not None and counter.expires_at <= time.time():
            del self._counters[key]
            return None
        return counter

    async def reserve(
        self, *, request_id: str, pid: str, expires_at: float, lines: list[ReserveLine]
    ) -> ReserveVerdict:
        with self._lock:
            if request_id in self._reservations:
                return RESERVED
            missing = []
            for index, line in enumerate(lines):
                if self._get(line.key) is None:
                    if line.seed_units is None:
                        missing.append(index)
                        continue
                    expires = time.time() + line.ttl_seconds if line.ttl_seconds > 0 else None
                    self._counters[line.key] = _Counter(expires, s=line.seed_units, st=line.seed_tokens or 0)
            if missing:
                return ReserveVerdict(missing=tuple(missing))
            counters = [self._counters[line.key] for line in lines]
            for index, (line, counter) in enumerate(zip(lines, counters, strict=True)):
                if counter.s + counter.r + line.units > line.limit_units:
                    return ReserveVerdict(refused=index, spent=counter.s, held=counter.r)
                if line.token_limit is not None and counter.st + counter.rt + line.tokens > line.token_limit:
                    return ReserveVerdict(refused=index, by_tokens=True, spent=counter.st, held=counter.rt)
            for line, counter in zip(lines, counters, strict=True):
                counter.r += line.units
                counter.rt += line.tokens
                counter.holders[request_id] = (line.units, line.tokens)
            self._reservations[request_id] = _Reservation(pid, expires_at, list(lines))
            return RESERVED

    def settle(self, settlements: list[Settlement]) -> int:
        settled = 0
        with self._lock:
            for item in settlements:
                reservation = self._reservations.pop(item.request_id, None)
                if reservation is None:
                    continue
                settled += 1
                for line in reservation.lines:
                    counter = self._get(line.key)
                    if counter is None or counter.holders.pop(item.request_id, None) is None:
                        continue
                    counter.r -= line.units
                    counter.rt -= line.tokens
                    if line.start <= item.created < line.end:
                        counter.s += item.units
                        counter.st += item.tokens
                    counter.v += 1
        return settled

    def reservations(self) -> list[tuple[str, str, float]]:
        with self._lock:
            return [(rid, res.pid, res.expires_at) for rid, res in self._reservations.items()]

    def counter(self, key: str) -> CounterState | None:
        with self._lock:
            counter = self._get(key)
            if counter is None:
                return None
            return CounterState(counter.v, counter.s, counter.st, counter.r, counter.rt, tuple(counter.holders))

    def counter_repair(
        self, key: str, *, version: int, units: int, tokens: int, pending: dict[str, tuple[int, int]]
    ) -> tuple[CounterState, CounterState] | None:
        with self._lock:
            counter = self._get(key)
            if counter is None or counter.v != version:
                return None
            old = CounterState(version, counter.s, counter.st, counter.r, counter.rt, ())
            for request_id, (row_units, row_tokens) in pending.items():
                if request_id in counter.holders:
                    units -= row_units
                    tokens -= row_tokens
            counter.s, counter.st = units, tokens
            counter.r = sum(held for held, _ in counter.holders.values())
            counter.rt = sum(held for _, held in counter.holders.values())
            return old, CounterState(version, counter.s, counter.st, counter.r, counter.rt, ())

    def clear(self) -> None:
        """Forget every counter and reservation (tests)."""
        with self._lock:
            self._counters.clear()
            self._reservations.clear()


_store: BudgetStore | None = None
_store_lock = threading.Lock()


def budget_store() -> BudgetStore:
    """Return the process's store: Redis when ``settings.REDIS_URL`` is set, else in memory."""
    global _store
    with _store_lock:
        if _store is None:
            if settings.REDIS_URL:
                _store = RedisBudgetStore(settings.REDIS_URL, timeout=settings.REDIS_SOCKET_TIMEOUT_SECONDS)
            else:
                _store = MemoryBudgetStore()
        return _store


def budget_store_reset() -> None:
    """Drop the process's store so the next call builds it from the current settings (tests)."""
    global _store
    with _store_lock:
        _store = None


__all__ = [
    "INDEX_KEY",
    "PREFIX",
    "RESERVE_SCRIPT",
    "UNIT",
    "BudgetStore",
    "CounterState",
    "MemoryBudgetStore",
    "RedisBudgetStore",
    "ReserveLine",
    "ReserveRequest",
    "ReserveVerdict",
    "Settlement",
    "budget_store",
    "budget_store_reset",
    "counter_key",
    "from_units",
    "reservation_key",
    "reserve_verdict",
    "to_units",
]
