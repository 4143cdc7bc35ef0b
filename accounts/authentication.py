"""Authentication for every interface: DRF classes, and one function for async views and consumers.

Credentials travel as ``Authorization: Bearer <token>`` where the token is either an API key
(``sk-...``) or a simplejwt access token. ``x-api-key`` / ``api-key`` headers are also read,
since some OpenAI-compatible clients use them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication
from rest_framework.exceptions import AuthenticationFailed as DRFAuthenticationFailed
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTAuthentication as _SimpleJWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import Token
from rest_framework_simplejwt.utils import get_md5_hash_password

from chatbackend.asyncdb import run_sync
from chatbackend.lookup_cache import LookupCache

from .keys import hash_secret, looks_like_api_key
from .models import APIKey, Organization, User
from .revocation import SESSION_CLAIM, jwt_session_check
from .selectors import (
    ORGANIZATION_HEADER,
    ActingOrganization,
    AuthenticationFailed,
    acting_organization,
    administers,
    api_key_authenticate,
    api_key_check_unexpired,
    organization_named,
    user_authentication_check,
)
from .services import api_key_last_used_update

logger = logging.getLogger(__name__)

# NextChat sends ``Bearer nk-<access code>`` when its user typed an access code and no API key
# (../shared/nextchat.md): the code is for NextChat's own server, not ours; say so.
NEXTCHAT_ACCESS_CODE_PREFIX = "nk-"
_NEXTCHAT_ACCESS_CODE_MESSAGE = (
    "This is a NextChat access code (nk-...), which only NextChat's own server reads: "
    "enter an API key of this server (sk-...) in NextChat's API key field instead."
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the ``user``, the ``api_key`` used (``None`` for a JWT), and the organization
    the request acts in with their role in it (``accounts.selectors.acting_organization``).

    From ``authenticate_token_async`` it may be cached and shared between requests: read-only.
    """

    user: User
    api_key: APIKey | None
    acting: ActingOrganization

    @property
    def organization(self) -> Organization:
        return self.acting.organization

    @property
    def is_admin(self) -> bool:
        """Return True when the caller administers the organization it acts in (owner, admin, the
        platform superuser), or has the platform-wide ``admin`` role."""
        return administers(self.user, self.acting)


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

# Principals by ("api_key", SHA-256 digest of the secret, never the secret) or ("user", user id
# of a JWT, organization named (slug or id, as sent) or ""). Cleared in every process when a User,
# an APIKey or a Membership changes (``AccountsConfig.ready``).
principal_cache: LookupCache[tuple[str | int, ...], Principal] = LookupCache("accounts.principals", maxsize=10_000)


def _missing_token() -> AuthenticationFailed:
    return AuthenticationFailed(
        "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'.", code="missing_api_key"
    )


def _api_key_principal(secret: str) -> Principal:
    api_key = api_key_authenticate(secret=secret)
    acting = acting_organization(user=api_key.user, api_key=api_key, requested=None)
    return Principal(user=api_key.user, api_key=api_key, acting=acting)


def _validated_jwt(token: str) -> Token:
    """Check the signature, expiry and type of JWT access ``token`` (CPU only, no query)."""
    try:
        return _jwt.get_validated_token(token.encode("utf-8"))
    except (InvalidToken, TokenError):
        if token.startswith(NEXTCHAT_ACCESS_CODE_PREFIX):
            raise AuthenticationFailed(_NEXTCHAT_ACCESS_CODE_MESSAGE, code="token_not_valid") from None
        raise AuthenticationFailed("The access token is invalid or expired.", code="token_not_valid") from None


def _login_ended() -> AuthenticationFailed:
    return AuthenticationFailed("This login has ended (logged out); log in again.", code="token_not_valid")


def _check_login(validated: Token) -> None:
    """Raise ``AuthenticationFailed`` (401) when the login of ``validated`` ended (``jwt_session_check``:
    one cache read). Sync."""
    if not jwt_session_check(validated):
        raise _login_ended()


def _jwt_principal(validated: Token, organization: str | None) -> Principal:
    """Read the user of a validated JWT (one query) and check it may authenticate, then the
    organization it acts in (``organization``: the slug the request named, or None; one query)."""
    try:
        user = cast(User, _jwt.get_user(validated))  # AUTH_USER_MODEL is accounts.User
    except (InvalidToken, TokenError, DRFAuthenticationFailed):
        raise AuthenticationFailed("The access token is invalid or expired.", code="token_not_valid") from None
    user_authentication_check(user=user)
    return Principal(
        user=user, api_key=None, acting=acting_organization(user=user, api_key=None, requested=organization)
    )


def jwt_session_id(token: str | None) -> str | None:
    """Return the login session id (``sid`` claim) of a valid JWT access ``token``, else None.

    CPU only. API keys and tokens issued before sessions existed have none.
    """
    if not token or looks_like_api_key(token):
        return None
    try:
        session_id = _validated_jwt(token).get(SESSION_CLAIM)
    except AuthenticationFailed:
        return None
    return session_id if isinstance(session_id, str) else None


def _check_key_organization(principal: Principal, organization: str | None) -> Principal:
    if organization and principal.api_key is not None and not organization_named(principal.organization, organization):
        acting_organization(user=principal.user, api_key=principal.api_key, requested=organization)  # raises
    return principal


def authenticate_token(token: str | None, organization: str | None = None) -> Principal:
    """Return the ``Principal`` for an API key or JWT access ``token``, from the database.

    ``organization``: the slug of the organization the request names (``OpenAI-Organization``), or
    None for the key's own, or the user's default. Raises ``AuthenticationFailed`` (401) when the
    token is missing, unknown, revoked or expired, or the caller is not a member of the organization.
    Sync (touches the database); async code calls ``authenticate_token_async``, which caches.
    """
    if not token:
        raise _missing_token()
    if looks_like_api_key(token):
        return _check_key_organization(_api_key_principal(token), organization)
    validated = _validated_jwt(token)
    _check_login(validated)
    return _jwt_principal(validated, organization)


async def authenticate_token_async(token: str | None, organization: str | None = None) -> Principal:
    """Return the ``Principal`` for ``token`` like ``authenticate_token``: cached, else in one hop.

    A token this process authenticated before is answered from ``principal_cache`` on the event
    loop, with no query and no worker-thread hop; a JWT's signature and expiry are still checked
    on every request (simplejwt, CPU only), only its user is cached. Otherwise the lookup runs in
    one worker-thread hop and its result is cached (``chatbackend.lookup_cache``: cleared in
    every process when a user or a key changes; failures are never cached). An API key answered
    from the cache still gets its ``last_used_at`` written every
    ``API_KEY_LAST_USED_RESOLUTION_SECONDS`` (``_note_api_key_use``). The returned principal may
    be shared with other requests: read it, never change it.
    """
    if not token:
        raise _missing_token()
    if looks_like_api_key(token):
        key: tuple[str | int, ...] = ("api_key", hash_secret(token))
        principal = principal_cache.get(key)
        if principal is not None:
            # Expiry is a moment, not a change: compared at each use, the cached key's too.
            if principal.api_key is not None:
                api_key_check_unexpired(principal.api_key)
            _note_api_key_use(principal)
            return _check_key_organization(principal, organization)
        ticket = await principal_cache.fill_ticket_async()  # before the read: see lookup_cache
        principal = await run_sync(_api_key_principal, token)
        principal_cache.put(key, principal, ticket)
        return _check_key_organization(principal, organization)
    validated = _validated_jwt(token)
    await run_sync(_check_login, validated)  # a cache read (Redis): off the event loop
    user_id = validated.get(jwt_settings.USER_ID_CLAIM)
    if not isinstance(user_id, int | str):  # no claim (get_user says so) or not a usable key
        return await run_sync(_jwt_principal, validated, organization)
    key = ("user", user_id, organization or "")
    principal = principal_cache.get(key)
    if principal is not None:
        _check_revoke_claim(validated, principal.user)
        return principal
    ticket = await principal_cache.fill_ticket_async()
    principal = await run_sync(_jwt_principal, validated, organization)
    principal_cache.put(key, principal, ticket)
    return principal


def _check_revoke_claim(validated: Token, user: User) -> None:
    """What simplejwt's ``get_user`` checks after reading the user, for a cached user.

    Only ``CHECK_REVOKE_TOKEN`` (off here): the user's password hash in the token. Cached users
    are active (inactive ones are refused, not cached, and a deactivation clears the cache).
    """
    if jwt_settings.CHECK_REVOKE_TOKEN and validated.get(jwt_settings.REVOKE_TOKEN_CLAIM) != get_md5_hash_password(
        user.password
    ):
        raise AuthenticationFailed("The access token is invalid or expired.", code="token_not_valid")


# The UPDATEs of last_used_at in flight, kept so that they are not garbage-collected mid-way.
_last_used_updates: set[asyncio.Task[None]] = set()


def _note_api_key_use(principal: Principal) -> None:
    """Write ``last_used_at`` of a key answered from the cache, at most once per resolution.

    What ``api_key_authenticate`` does on a read, without making the request wait: when the
    cached ``last_used_at`` is ``API_KEY_LAST_USED_RESOLUTION_SECONDS`` old, the cached copy is
    set to now (so the next hits schedule nothing: one UPDATE in flight per key and process) and
    the UPDATE runs in a worker thread, fire-and-forget. A failed UPDATE is logged; an UPDATE
    still pending when the process exits is lost (the next use writes it).
    """
    api_key = principal.api_key
    if api_key is None:
        return
    now = timezone.now()
    last = api_key.last_used_at
    if last is not None and (now - last).total_seconds() < settings.API_KEY_LAST_USED_RESOLUTION_SECONDS:
        return
    api_key.last_used_at = now
    task = asyncio.get_running_loop().create_task(run_sync(api_key_last_used_update, api_key_id=api_key.pk, at=now))
    _last_used_updates.add(task)
    task.add_done_callback(_last_used_update_done)


def _last_used_update_done(task: asyncio.Task[None]) -> None:
    _last_used_updates.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("writing an API key's last_used_at failed", exc_info=task.exception())


def principal_for(*, user: User, api_key: APIKey | None = None, organization: str | None = None) -> Principal:
    """Return the ``Principal`` of an authenticated ``user`` (with ``api_key``, if any), acting in
    ``organization`` (a slug) or else the key's or the user's default. One query.

    Raises ``AuthenticationFailed`` (401) when the user is not a member of that organization.
    """
    return Principal(
        user=user, api_key=api_key, acting=acting_organization(user=user, api_key=api_key, requested=organization)
    )


def request_principal(request: Request) -> Principal:
    """Return the ``Principal`` of a DRF ``request`` behind ``IsAuthenticated``: its user, its API key
    (when it authenticated with one) and the organization it acts in (``OpenAI-Organization``).

    Resolved once per request (one query). Raises DRF's ``AuthenticationFailed`` (401, the
    project's error shape) when the caller is not a member of the organization named.
    """
    principal = getattr(request, "_chatbackend_principal", None)
    if principal is None:
        principal = _drf_principal(request, request_user(request), request_api_key(request))
    return principal


def _drf_principal(request: Request, user: User, api_key: APIKey | None) -> Principal:
    """Resolve and keep on ``request`` the principal of a DRF request: what every DRF authentication
    does once it knows the caller, so that a key whose owner left its organization, or a JWT naming
    one the user is not a member of, is a 401 on every endpoint, not only those that scope by it."""
    try:
        principal = principal_for(
            user=user, api_key=api_key, organization=request.headers.get(ORGANIZATION_HEADER) or None
        )
    except AuthenticationFailed as exc:
        raise DRFAuthenticationFailed(exc.message, code=exc.code) from None
    request._chatbackend_principal = principal  # type: ignore[attr-defined]
    return principal


def request_user(request: Request) -> User:
    """Return the authenticated ``User`` of a DRF ``request`` behind ``IsAuthenticated``.

    DRF types ``request.user`` as ``User | AnonymousUser``; under ``IsAuthenticated`` it is a ``User``.
    """
    return cast(User, request.user)


def request_api_key(request: Request) -> APIKey | None:
    """Return the API key a DRF ``request`` authenticated with, or None (a JWT, a session)."""
    return request.auth if isinstance(request.auth, APIKey) else None


class _APIKeyAuthenticationFailed(DRFAuthenticationFailed):
    """DRF's 401 for a refused API key, keeping our error's OpenAI ``type`` (``error_type``)."""

    def __init__(self, error: AuthenticationFailed) -> None:
        super().__init__(error.message, code=error.code)
        self.error_type = error.type


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
            if exc.status != DRFAuthenticationFailed.status_code:  # a 403 (EmailNotVerified) stays one
                raise
            raise _APIKeyAuthenticationFailed(exc) from None
        _drf_principal(request, api_key.user, api_key)
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
        authenticated = super().authenticate(request)
        if authenticated is not None:
            _drf_principal(request, cast(User, authenticated[0]), None)
        return authenticated

    def get_user(self, validated_token: Token) -> User:  # type: ignore[override]  # AUTH_USER_MODEL is User
        """A login that ended is a 401 (``jwt_session_check``), then simplejwt's user lookup (401 for an
        inactive user), then ``user_authentication_check`` (403 unverified)."""
        if not jwt_session_check(validated_token):
            raise DRFAuthenticationFailed(_login_ended().message, code="token_not_valid")
        user = cast(User, super().get_user(validated_token))
        user_authentication_check(user=user)
        return user
