"""Authentication for every interface: DRF classes, and one function for async views and consumers.

Credentials travel as ``Authorization: Bearer <token>`` where the token is either an API key
(``sk-...``) or a simplejwt access token. ``x-api-key`` / ``api-key`` headers are also read,
since some OpenAI-compatible clients use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from rest_framework import authentication
from rest_framework.exceptions import AuthenticationFailed as DRFAuthenticationFailed
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTAuthentication as _SimpleJWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError

from chatbackend.asyncdb import run_sync

from .keys import looks_like_api_key
from .models import APIKey, User
from .selectors import AuthenticationFailed, api_key_authenticate


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the ``user``, and the ``api_key`` used (``None`` for a JWT)."""

    user: User
    api_key: APIKey | None


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """Return the bearer token or API key in HTTP ``headers`` (lower-cased names, or Django's
    case-insensitive ``request.headers``), or None."""
    value = headers.get("authorization", "")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("x-api-key") or headers.get("api-key") or None


_jwt = _SimpleJWTAuthentication()


def authenticate_token(token: str | None) -> Principal:
    """Return the ``Principal`` for an API key or JWT access ``token``.

    Raises ``AuthenticationFailed`` (401) when the token is missing, unknown, revoked or expired.
    Sync (may touch the database): call through ``sync_to_async`` from async code.
    """
    if not token:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.", code="missing_api_key"
        )
    if looks_like_api_key(token):
        api_key = api_key_authenticate(secret=token)
        return Principal(user=api_key.user, api_key=api_key)
    try:
        validated = _jwt.get_validated_token(token.encode("utf-8"))
        user = cast(User, _jwt.get_user(validated))  # AUTH_USER_MODEL is accounts.User
    except (InvalidToken, TokenError, DRFAuthenticationFailed):
        raise AuthenticationFailed("The access token is invalid or expired.", code="token_not_valid") from None
    if not user.is_active:
        raise AuthenticationFailed("This account is disabled.", code="user_inactive")
    return Principal(user=user, api_key=None)


async def authenticate_token_async(token: str | None) -> Principal:
    """``authenticate_token`` from async code, in one worker-thread hop (the ORM is sync)."""
    return await run_sync(authenticate_token, token)


def request_user(request: Request) -> User:
    """Return the authenticated ``User`` of a DRF ``request`` behind ``IsAuthenticated``.

    DRF types ``request.user`` as ``User | AnonymousUser``; under ``IsAuthenticated`` it is a ``User``.
    """
    return cast(User, request.user)


class APIKeyAuthentication(authentication.BaseAuthentication):
    """DRF authentication by API key (``Authorization: Bearer sk-...``); ``request.auth`` is the key."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, APIKey] | None:
        token = token_from_headers(request.headers)
        if not token or not looks_like_api_key(token):
            return None
        try:
            api_key = api_key_authenticate(secret=token)
        except AuthenticationFailed as exc:
            raise DRFAuthenticationFailed(exc.message, code=exc.code) from None
        return api_key.user, api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class JWTAuthentication(_SimpleJWTAuthentication):
    """simplejwt's authentication, stepping aside for API keys so the two can share ``Bearer``."""

    def authenticate(self, request: Request):  # type: ignore[override]
        header = self.get_header(request)
        if header is not None:
            raw = self.get_raw_token(header)
            if raw is not None and looks_like_api_key(raw.decode("utf-8", "replace")):
                return None
        return super().authenticate(request)
