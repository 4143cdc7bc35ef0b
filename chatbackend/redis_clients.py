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
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
import redis.asyncio.connection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

__all__ = ["async_redis_client"]

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
