"""The request path's asyncio Redis client: bounded pool, commands packed by hiredis, same bytes on the wire."""

from __future__ import annotations

import pytest
import redis.asyncio.connection
from django.conf import settings

from chatbackend.redis_clients import async_redis_client

# What an admission sends: strings (keys, a request id), small and large integers, a float's repr.
_ARGS = ("EVALSHA", "f" * 40, 3, "chatbackend-ratelimit/LIMITER/user:1:requests/29", "é", 0, -5, 2**50, "1.5", b"\x00")


@pytest.mark.parametrize(
    ("url", "connection_class"),
    [
        ("redis://127.0.0.1:6379/3", redis.asyncio.connection.Connection),
        ("rediss://127.0.0.1:6380/3", redis.asyncio.connection.SSLConnection),
        ("unix:///run/redis.sock?db=3", redis.asyncio.connection.UnixDomainSocketConnection),
    ],
)
def test_connections_pack_the_same_bytes_with_hiredis(url: str, connection_class: type) -> None:
    client = async_redis_client(url, max_connections=7, timeout=2.0)
    pool = client.connection_pool
    assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
    assert pool.max_connections == 7
    assert pool.timeout == 2.0
    # The URL's kind of connection (TCP, TLS, Unix socket), packing in C.
    assert issubclass(pool.connection_class, connection_class)
    assert pool.connection_class.pack_command is not connection_class.pack_command
    connection = pool.make_connection()
    python_packed = b"".join(connection_class.pack_command(connection, *_ARGS))
    assert b"".join(connection.pack_command(*_ARGS)) == python_packed
    assert python_packed.startswith(b"*10\r\n$7\r\nEVALSHA\r\n")


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (CI sets it)")
async def test_a_script_call_round_trips_its_arguments() -> None:
    client = async_redis_client(settings.REDIS_URL, max_connections=2, timeout=5.0)
    try:
        echo = client.register_script("return {KEYS[1], ARGV[1], ARGV[2], ARGV[3]}")
        assert await echo(keys=["chatbackend-test:é"], args=[2**50, -3, "1.5"]) == [
            "chatbackend-test:é".encode(),
            b"1125899906842624",
            b"-3",
            b"1.5",
        ]
    finally:
        await client.aclose()
