"""Channels middleware that authenticates WebSocket connections by API key or JWT.

Browsers cannot set headers on a WebSocket, so the token is read from (in order) the
``Authorization`` header, the ``token`` query parameter, or a ``bearer.<token>`` subprotocol.
The organization the connection acts in is named by the ``OpenAI-Organization`` header or the
``organization`` query parameter (else the key's, or the user's default).
``scope["user"]``, ``scope["api_key"]``, ``scope["principal"]`` and ``scope["session_id"]`` (a
JWT's login session, for ``accounts.revocation``) are set; a failed authentication leaves
``scope["user"]`` anonymous and ``scope["auth_error"]`` set, and the consumer closes with 4401.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.middleware import BaseMiddleware
from django.contrib.auth.models import AnonymousUser

from .authentication import authenticate_token_async, jwt_session_id, token_from_headers
from .selectors import ORGANIZATION_HEADER, AuthenticationFailed

BEARER_SUBPROTOCOL_PREFIX = "bearer."


def _credentials_from_scope(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return the connection's ``(token, organization slug named)``, each None when absent."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    organization = headers.get(ORGANIZATION_HEADER.lower()) or (query.get("organization") or [""])[0] or None
    token = token_from_headers(headers)
    if not token and query.get("token"):
        token = query["token"][0]
    if not token:
        for protocol in scope.get("subprotocols", []):
            if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
                token = protocol[len(BEARER_SUBPROTOCOL_PREFIX) :]
                break
    return token or None, organization


class TokenAuthMiddleware(BaseMiddleware):
    """Set ``scope["user"]`` / ``scope["api_key"]`` from an API key or JWT access token."""

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204 - ASGI signature
        scope = dict(scope)
        token, organization = _credentials_from_scope(scope)
        try:
            principal = await authenticate_token_async(token, organization)
        except AuthenticationFailed as exc:
            scope.update(user=AnonymousUser(), api_key=None, principal=None, session_id=None, auth_error=exc)
        else:
            scope.update(
                user=principal.user,
                api_key=principal.api_key,
                principal=principal,
                session_id=jwt_session_id(token),
                auth_error=None,
            )
        return await super().__call__(scope, receive, send)
