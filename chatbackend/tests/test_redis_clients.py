"""The request path's asyncio Redis client: bounded pool, commands packed by hiredis, same bytes on the wire."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio.connection
import redis.exceptions
from django.conf import settings

from chatbackend.redis_clients import ScriptLanes, async_redis_client

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


@pytest.mark.parametrize(
    "args",
    [("CLIENT SETNAME", "x"), ("SET", "k", memoryview(b"v")), ("SET", "k", bytearray(b"v")), ("PING",)],
)
def test_what_hiredis_cannot_pack_alone_packs_the_same_bytes(args: tuple[object, ...]) -> None:
    """A command name with a space, a memoryview or bytearray argument: the serializer's own path."""
    connection = async_redis_client(
        "redis://127.0.0.1:6379/3", max_connections=1, timeout=1.0
    ).connection_pool.make_connection()
    python_packed = b"".join(redis.asyncio.connection.Connection.pack_command(connection, *args))
    assert b"".join(connection.pack_command(*args)) == python_packed


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


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (CI sets it)")
async def test_script_lanes_answer_as_the_script_does_and_reload_it_after_a_flush() -> None:
    client = async_redis_client(settings.REDIS_URL, max_connections=2, timeout=5.0)
    lanes = ScriptLanes(client, lanes=2, timeout=5.0)
    try:
        echo = client.register_script("return {KEYS[1], ARGV[1], #ARGV, redis.call('INCR', KEYS[1])}")
        key = "chatbackend-test:script-lanes"
        await client.delete(key)
        by_script = await echo(keys=[key], args=[2**50, "x"])
        assert await lanes.call(echo, [key], [2**50, "x"]) == [key.encode(), b"1125899906842624", 2, 2]
        assert by_script == [key.encode(), b"1125899906842624", 2, 1]
        # A restarted Redis has no scripts: NOSCRIPT (nothing ran), then it is loaded and runs once.
        await client.script_flush()
        assert await lanes.call(echo, [key], ["y"]) == [key.encode(), b"y", 1, 3]
        assert await client.get(key) == b"3"
        # The script's own error is the caller's; the lane stays usable for the next call.
        failing = client.register_script("return redis.error_reply('ERR refused by the script')")
        with pytest.raises(redis.exceptions.ResponseError, match="refused by the script"):
            await lanes.call(failing, [], [])
        assert await lanes.call(echo, [key], ["z"]) == [key.encode(), b"z", 1, 4]
        # Many calls at once share the two lanes, each once.
        replies = await asyncio.gather(*(lanes.call(echo, [key], [str(i)]) for i in range(20)))
        assert sorted(reply[3] for reply in replies) == list(range(5, 25))
        # Redis closing a lane's connection (an idle timeout, a restart): the next call reconnects.
        await client.client_kill_filter(_type="normal", skipme=True)
        assert (await lanes.call(echo, [key], ["after"]))[3] == 25
        await client.delete(key)
    finally:
        await lanes.aclose()
        await client.aclose()


async def test_script_lanes_raise_connection_error_when_redis_is_unreachable() -> None:
    client = async_redis_client("redis://127.0.0.1:1/0", max_connections=1, timeout=1.0)
    lanes = ScriptLanes(client, lanes=1, timeout=1.0)
    try:
        script = client.register_script("return 1")
        with pytest.raises(redis.exceptions.ConnectionError):
            await lanes.call(script, [], [])
    finally:
        await lanes.aclose()
        await client.aclose()


def _busy_for(microseconds: int) -> str:
    """A Lua script that keeps Redis busy for ``microseconds`` (by its own clock), then returns 'slow'."""
    return (
        "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "
        f"repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > {microseconds} return 'slow'"
    )


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (CI sets it)")
async def test_a_call_cancelled_mid_reply_leaves_its_lane_clean() -> None:
    client = async_redis_client(settings.REDIS_URL, max_connections=2, timeout=5.0)
    lanes = ScriptLanes(client, lanes=1, timeout=5.0)
    try:
        slow = client.register_script(_busy_for(200000))
        quick = client.register_script("return ARGV[1]")
        await lanes.call(quick, [], ["warm"])
        call = asyncio.ensure_future(lanes.call(slow, [], []))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The slow reply arrives later on a closed connection: the next call never reads it.
        assert await lanes.call(quick, [], ["next"]) == b"next"
    finally:
        await lanes.aclose()
        await client.aclose()


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (CI sets it)")
async def test_a_call_past_the_timeout_raises_redis_timeout_error_and_leaves_its_lane_clean() -> None:
    # The lanes bound the whole call with their own timeout (their connections have no socket timeout).
    client = async_redis_client(settings.REDIS_URL, max_connections=2, timeout=0.1)
    lanes = ScriptLanes(client, lanes=1, timeout=0.1)
    try:
        slow = client.register_script(_busy_for(300000))
        quick = client.register_script("return ARGV[1]")
        await lanes.call(quick, [], ["warm"])
        started = asyncio.get_running_loop().time()
        with pytest.raises(redis.exceptions.TimeoutError, match="did not answer within 0.1 s"):
            await lanes.call(slow, [], [])
        assert asyncio.get_running_loop().time() - started < 0.25
        await asyncio.sleep(0.3)  # the slow script ends; its reply went to the closed connection
        assert await lanes.call(quick, [], ["next"]) == b"next"
    finally:
        await lanes.aclose()
        await client.aclose()
