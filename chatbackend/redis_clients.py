"""Asyncio Redis clients of the request path: a bounded pool whose connections pack commands in C.

redis-py's synchronous connections pack commands with hiredis (``hiredis.pack_command``, through
``redis.connection.HiredisRespSerializer``) when hiredis is installed; its asyncio connections
still pack them in Python (https://github.com/redis/redis-py/issues/4176, fix proposed in
https://github.com/redis/redis-py/pull/4191): an ``isinstance`` chain, an encode and a bytes join
per argument. An admission is one script call of ~70 arguments (``accounts.metering``): packing
it took 69 µs in Python and 20 µs with hiredis (timeit, one run on the 2-core VM), about 1/15 of
the CPU an admission and its release cost the process. ``async_redis_client`` gives its
connections redis-py's own hiredis serializer, as the synchronous client does (without hiredis,
redis-py's Python packer stays). Drop this once redis-py packs asyncio commands with hiredis.

``ScriptLanes`` runs registered Lua scripts (``EVALSHA``) on a few connections of its own, without
redis-py's pool checkout and command layer: the admission script runs once per metered request, and
those cost a quarter of the call's client CPU (see the class). It also never retries: whether a
script whose call failed ran is unknown, and running an admission twice would count it twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.asyncio.connection
import redis.exceptions
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

__all__ = ["ScriptLanes", "async_redis_client"]

_HIREDIS_SERIALIZER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None
if HIREDIS_AVAILABLE:
    from hiredis import pack_command as _hiredis_pack


class _HiredisPacking:
    """Mixin of a redis-py asyncio connection class: ``pack_command`` by hiredis (in C)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _HIREDIS_SERIALIZER is None:
            return super().pack_command(*args)  # type: ignore[misc]
        command = args[0]
        if type(command) is str and " " not in command:
            # What the serializer ends with, without its pass over every argument (an admission's
            # record batch has thousands): hiredis packs str, bytes, int and float.
            try:
                return [_hiredis_pack(args)]
            except TypeError:
                pass  # a bytearray or memoryview argument: the serializer copies it to bytes first
        # Splits a command name with a space ("CLIENT SETNAME"), converts bytearray and memoryview
        # arguments to bytes (one copy), then hiredis packs.
        return _HIREDIS_SERIALIZER.pack(*args)


_PACKING_CLASSES: dict[type[Any], type[Any]] = {}


def _hiredis_packing(connection_class: type[Any]) -> type[Any]:
    """Return ``connection_class`` (TCP, TLS or Unix socket, as the URL chose) packing with hiredis."""
    packing = _PACKING_CLASSES.get(connection_class)
    if packing is None:
        name = f"HiredisPacking{connection_class.__name__}"
        packing = _PACKING_CLASSES[connection_class] = type(name, (_HiredisPacking, connection_class), {})
    return packing


def async_redis_client(url: str, *, max_connections: int, timeout: float) -> redis.asyncio.Redis:
    """Return a redis-py asyncio client of ``url`` on a pool of at most ``max_connections`` connections.

    A command that finds every connection busy waits for one, up to ``timeout`` seconds, rather
    than opening more (``BlockingConnectionPool``: a burst of requests must not open thousands);
    ``timeout`` also bounds connecting and each socket operation. Raises redis-py's
    ``ConnectionError`` (on the first command, not here) when Redis cannot be reached.
    """
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    if HIREDIS_AVAILABLE:
        pool.connection_class = _hiredis_packing(pool.connection_class)
    return redis.asyncio.Redis.from_pool(pool)


class ScriptLanes:
    """A few connections of their own ("lanes") for the request path's Lua scripts, outside the pool.

    ``call`` runs a registered script (``EVALSHA``) on the first idle lane, or waits for one (at most
    ``timeout`` seconds, then ``ConnectionError``, as the pool's wait does). Redis runs scripts one at a
    time whatever the connection count, so a few lanes keep it busy while the next requests wait
    here rather than in its socket buffers. Why not the client's pool: redis-py 8's asyncio pool
    checks a connection out and in with a condition lock, a timeout, observability counters and an
    event dispatch, and its command layer adds a retry wrapper and more hooks; one admission per
    metered request paid that (111 against 151 µs of client CPU per call, same run, pool against
    lane; the pool's command layer was another 26 µs). What the pool's checkout does that matters is
    kept: a lane that holds unread data or a connection Redis closed is reconnected before use.

    Each lane is the pool's own connection class (``make_connection``: the URL's host, database,
    credentials, TLS, timeouts, hiredis packing). Not thread-safe; one per event loop.
    """

    def __init__(self, client: redis.asyncio.Redis, *, lanes: int, timeout: float) -> None:
        pool = client.connection_pool
        # No socket timeout of their own: ``call`` bounds the whole call with one ``asyncio.timeout``.
        # redis-py bounds each write with ``asyncio.wait_for``, which on Python 3.11 wraps the write in
        # a task of its own: a task and a loop iteration more per call.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None, "socket_connect_timeout": timeout}
        self._lanes = [(pool.connection_class(**kwargs), asyncio.Lock()) for _ in range(lanes)]
        self._timeout = timeout
        self._turn = 0
        self._health_checks = bool(kwargs.get("health_check_interval"))

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run ``script`` (registered with ``register_script``) with ``keys`` and ``args``; return its
        reply as redis-py's parser gives it (bytes, ints, lists of them).

        When Redis answers ``NOSCRIPT`` (restarted or flushed: nothing ran), ``SCRIPT LOAD`` and the
        call once more, as redis-py's ``Script`` does. Never retried otherwise: whether a failed call ran
        is unknown. Raises redis-py's ``ResponseError`` for an error reply (the script's own errors
        included), ``ConnectionError`` when Redis cannot be reached or no lane frees within ``timeout``,
        ``TimeoutError`` when the call (connecting, writing, reading) takes longer than ``timeout``. A
        failure or a cancellation mid-call closes the lane's connection (a reply left unread must not
        reach the next call); the next call on it connects again.
        """
        connection, lock = self._lane()
        if lock.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await lock.acquire()
            except TimeoutError:
                raise redis.exceptions.ConnectionError("No Redis connection available.") from None
        else:
            await lock.acquire()
        try:
            async with asyncio.timeout(self._timeout):
                await self._ready(connection)
                try:
                    # send_command's own two steps; its health check (a coroutine call) only when the
                    # URL sets health_check_interval, as it would return at once otherwise.
                    command = connection.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    await connection.send_packed_command(command, check_health=self._health_checks)
                    return await connection.read_response()
                except redis.exceptions.NoScriptError:
                    await connection.send_command("SCRIPT", "LOAD", script.script)
                    await connection.read_response()
                    await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    return await connection.read_response()
        except TimeoutError:
            # redis-py closed the connection on the way out (a cancelled read or write does).
            raise redis.exceptions.TimeoutError(f"Redis did not answer within {self._timeout} s") from None
        finally:
            lock.release()

    def _lane(self) -> tuple[Any, asyncio.Lock]:
        """Return the first idle lane, else the next one in turn."""
        for lane in self._lanes:
            if not lane[1].locked():
                return lane
        self._turn = (self._turn + 1) % len(self._lanes)
        return self._lanes[self._turn]

    @staticmethod
    async def _ready(connection: Any) -> None:
        """Connect ``connection`` if it is not; reconnect it if it holds data or Redis closed it (what
        redis-py's pool checks at checkout, ``ConnectionPool.ensure_connection``, which skips the
        check while its maintenance notifications are enabled, as they are by default: a lane Redis
        closed would then fail its next call). ``connect`` is called only when not connected: it
        returns at once otherwise, after a retry wrapper and two coroutine calls."""
        if not connection.is_connected:
            await connection.connect()
            return  # a new connection holds nothing
        try:
            if await connection.can_read():
                raise redis.exceptions.ConnectionError("Connection has data")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            await connection.disconnect()
            await connection.connect()

    async def aclose(self) -> None:
        """Close every lane's connection."""
        for connection, _ in self._lanes:
            await connection.disconnect()
