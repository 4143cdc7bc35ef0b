"""The client IP: the socket peer, unless that peer is a trusted proxy (``TRUSTED_PROXY_IPS``)."""

from __future__ import annotations

from typing import Any

import pytest

from chatbackend.client_ip import TrustedProxyMiddleware


async def _client_seen(
    peer: str, forwarded_for: list[str], *, scope_type: str = "http", proxy_headers: Any = None
) -> tuple[str, str]:
    """Return the ``(client host, scheme)`` the wrapped app sees for a connection from ``peer``."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded_for]
    headers += list(proxy_headers or [])
    scheme = "ws" if scope_type == "websocket" else "http"
    scope = {"type": scope_type, "scheme": scheme, "headers": headers, "client": (peer, 50000)}
    await TrustedProxyMiddleware(app)(scope, None, None)
    return seen["client"][0], seen["scheme"]


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded_for", "client"),
    [
        # Nothing trusted (the default): the header is the client's own words.
        ([], "127.0.0.1", ["203.0.113.9"], "127.0.0.1"),
        ([], "198.51.100.4", ["203.0.113.9, 10.0.0.1"], "198.51.100.4"),
        # A peer that is not a trusted proxy cannot choose its address either.
        (["10.0.0.0/8"], "198.51.100.4", ["203.0.113.9"], "198.51.100.4"),
        # A trusted proxy's header: the right-most address that is not a trusted proxy.
        (["127.0.0.1"], "127.0.0.1", ["203.0.113.9"], "203.0.113.9"),
        (["10.0.0.0/8"], "10.1.2.3", ["203.0.113.9"], "203.0.113.9"),
        (["10.0.0.0/8"], "10.1.2.3", ["203.0.113.9, 10.9.9.9"], "203.0.113.9"),
        # What the client wrote to the left of the address the proxy appended is ignored.
        (["127.0.0.1"], "127.0.0.1", ["6.6.6.6, 203.0.113.9"], "203.0.113.9"),
        # Several header lines are one list, in order.
        (["10.0.0.0/8"], "10.0.0.2", ["6.6.6.6", "203.0.113.9, 10.0.0.1"], "203.0.113.9"),
        (["::1", "fd00::/8"], "::1", ["2001:db8::7, fd00::5"], "2001:db8::7"),
        (["127.0.0.1"], "127.0.0.1", ["[2001:db8::7]:4711"], "2001:db8::7"),
        # A trusted proxy that forwarded nothing: it is the client.
        (["127.0.0.1"], "127.0.0.1", [], "127.0.0.1"),
    ],
)
async def test_client_is_the_peer_unless_a_trusted_proxy_forwarded_it(
    settings: Any, trusted: list[str], peer: str, forwarded_for: list[str], client: str
) -> None:
    settings.TRUSTED_PROXY_IPS = trusted

    seen, _ = await _client_seen(peer, forwarded_for)

    assert seen == client


async def test_websocket_connections_get_the_same_client(settings: Any) -> None:
    settings.TRUSTED_PROXY_IPS = ["10.0.0.0/8"]

    trusted = await _client_seen("10.0.0.2", ["203.0.113.9"], scope_type="websocket")
    untrusted = await _client_seen("198.51.100.4", ["203.0.113.9"], scope_type="websocket")

    assert trusted == ("203.0.113.9", "ws")
    assert untrusted == ("198.51.100.4", "ws")


async def test_a_trusted_proxy_also_sets_the_scheme(settings: Any) -> None:
    settings.TRUSTED_PROXY_IPS = ["127.0.0.1"]
    https = [(b"x-forwarded-proto", b"https")]

    assert await _client_seen("127.0.0.1", ["203.0.113.9"], proxy_headers=https) == ("203.0.113.9", "https")
    settings.TRUSTED_PROXY_IPS = []
    assert await _client_seen("127.0.0.1", ["203.0.113.9"], proxy_headers=https) == ("127.0.0.1", "http")
