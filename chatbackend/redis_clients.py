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

``script_call`` runs a registered Lua script (``EVALSHA``) on a connection of the client's pool
without redis-py's command layer (its retry wrapper, observability hooks and event dispatch): the
admission script runs once per metered request, and that layer was a sixth of the call's client
CPU (140 against 166 µs per call, same run). It also never retries: whether a script whose call
failed ran is unknown, and running an admission twice would count it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.asyncio.connection
import redis.exceptions
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

__all__ = ["async_redis_client", "script_call"]

_HIREDIS_SERIALIZER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None


class _HiredisPacking:
    """Mixin of a redis-py asyncio connection class: ``pack_command`` by hiredis (in C)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _HIREDIS_SERIALIZER is None:
            return super().pack_command(*args)  # type: ignore[misc]
        # Converts bytearray and memoryview arguments to bytes first (one copy), then hiredis packs.
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


async def script_call(
    client: redis.asyncio.Redis, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
) -> Any:
    """Run ``script`` (registered on ``client``: ``client.register_script``) with ``keys`` and ``args``;
    return its reply as redis-py's parser gives it (bytes, ints, lists of them).

    One ``EVALSHA`` on a connection of ``client``'s pool (waiting for one as the pool does); when Redis
    answers ``NOSCRIPT`` (restarted or flushed: nothing ran), ``SCRIPT LOAD`` and the call once more, as
    redis-py's ``Script`` does. Never retried otherwise. Raises what redis-py raises: ``ResponseError``
    for an error reply (the script's own errors included), ``ConnectionError`` / ``TimeoutError`` when
    Redis cannot be reached or does not answer within the pool's socket timeout (the connection is then
    closed, as on cancellation: a reply left unread must not reach the next command).
    """
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        try:
            await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return await connection.read_response()
        except redis.exceptions.NoScriptError:
            await connection.send_command("SCRIPT", "LOAD", script.script)
            await connection.read_response()
            await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return await connection.read_response()
    finally:
        await pool.release(connection)
