"""The client's IP address, decided once per connection, at the ASGI edge.

The socket peer is the client, unless the peer is one of ``settings.TRUSTED_PROXY_IPS`` (IPs or
CIDR networks, e.g. the nginx or load balancer in front): then the client is the right-most
address in ``X-Forwarded-For`` that is not itself a trusted proxy (each proxy appends the peer it
saw, so entries to the left of the first untrusted one could have been written by anybody; see
https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/X-Forwarded-For#selecting_an_ip_address).

``TrustedProxyMiddleware`` writes that address into the connection's ASGI ``scope["client"]``
before anything else sees the connection, so every reader gets the same value: Django's
``REMOTE_ADDR`` (DRF throttles, django-axes through ``request_client_ip``), Channels consumers'
``scope["client"]``, and uvicorn's access log, which reads the same scope. Nothing else may parse
``X-Forwarded-For``.

The parsing and the trust walk are uvicorn's ``ProxyHeadersMiddleware`` (its ``trusted_hosts``
take IPs and CIDR networks, and it handles IPv6 and ``host:port`` entries). The ASGI server must
not apply its own proxy-header handling first (uvicorn trusts ``127.0.0.1`` by default): run
uvicorn with ``--no-proxy-headers`` (daphne leaves the headers alone unless told otherwise).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

ASGIApp = Any


class TrustedProxyMiddleware:
    """Wrap an ASGI app so that ``scope["client"]`` is the client as ``TRUSTED_PROXY_IPS`` decides it.

    HTTP and WebSocket connections from a trusted proxy get the client address (and scheme, from
    ``X-Forwarded-Proto``) that proxy forwarded; others are left as the server set them (the
    socket peer). Lifespan passes through. ``TRUSTED_PROXY_IPS`` is read at each connection, so a
    test's override applies at once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._trusted_source: object = None
        self._proxy_app: ProxyHeadersMiddleware | None = None

    def _proxy_headers_app(self) -> ProxyHeadersMiddleware | None:
        """Return uvicorn's middleware for the current ``TRUSTED_PROXY_IPS``, or None when it is empty."""
        trusted = settings.TRUSTED_PROXY_IPS
        if trusted is not self._trusted_source:
            self._trusted_source = trusted
            self._proxy_app = ProxyHeadersMiddleware(self.app, trusted_hosts=list(trusted)) if trusted else None
        return self._proxy_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        proxy_app = self._proxy_headers_app() if scope["type"] in ("http", "websocket") else None
        if proxy_app is None:
            await self.app(scope, receive, send)
        else:
            await proxy_app(scope, receive, send)  # type: ignore[arg-type]


def request_client_ip(request: Any) -> str:
    """Return the client IP of ``request``: ``REMOTE_ADDR`` as ``TrustedProxyMiddleware`` set it.

    ``request``: Django's ``HttpRequest`` or DRF's ``Request``. The one accessor for code that
    needs the address (throttles, django-axes' ``AXES_CLIENT_IP_CALLABLE``).
    Empty string when the server gave none (e.g. a Unix socket).
    """
    return str(request.META.get("REMOTE_ADDR") or "")
