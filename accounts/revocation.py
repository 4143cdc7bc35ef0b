"""Revoked credentials reach open connections, in every process, within a second.

Revoking an API key, deactivating (or deleting) a user, or logging out ends what that credential
has open: WebSockets close with 4401 and replies streaming for it stop (persisted ``cancelled``,
their usage up to then billed). A revocation is announced (``revocation_announce``) once its
transaction commits, as a broadcast (``chatbackend.broadcast``) that every server process
receives; each process ends the connections and replies that registered a matching watch
(``watch_credential``). Authentication itself refuses the credential from then on (the lookup
caches are cleared by the same change).

A JWT access token is not stored anywhere, so ending a login session (``sessions``: a logout, or
every login of a user whose password changed, ``accounts.lifecycle.services.user_sessions_end``)
also marks the session as ended in the default cache (Redis, shared by every process, when
``REDIS_URL`` is set) for as long as an access token lives (``ACCESS_TOKEN_LIFETIME``).
Authentication refuses an access token of a marked session (``jwt_session_check``), so a client
cannot reconnect, or go on calling the API, with the access token of a login that ended. An
unreachable cache is logged and lets tokens through (their signature and expiry still hold; the
refresh tokens are blacklisted in the database either way).

What matches what:

- ``api_key_ids``: everything opened with one of those keys;
- ``user_ids``: everything of those users, whatever the credential (deactivated or deleted);
- ``sessions``: WebSockets opened with a JWT access token of that login session (the ``sid``
  claim every token pair of one login carries, refreshes included; see
  ``accounts.serializers.AuthTokenObtainInputSerializer``): what logging out ends.
- ``session_user_ids``: WebSockets opened with a JWT access token of any login session of those
  users (API keys' untouched): what a new password ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import transaction
from rest_framework_simplejwt.settings import api_settings as jwt_settings

from chatbackend import broadcast

logger = logging.getLogger(__name__)

REVOKED_MESSAGE_TYPE = "credentials.revoked"
# The JWT claim naming the login session a token pair belongs to.
SESSION_CLAIM = "sid"


@dataclass(eq=False)
class _Watch:
    user_id: int
    api_key_id: int | None
    session_id: str | None
    on_revoked: Callable[[], None]


def revocation_announce(
    *,
    api_key_ids: Iterable[int] = (),
    user_ids: Iterable[int] = (),
    sessions: Iterable[str] = (),
    session_user_ids: Iterable[int] = (),
) -> None:
    """End, in every process, what the given credentials have open, once the transaction commits.

    Sync (services, signal handlers). A broadcast that cannot be sent is logged: authentication
    still refuses the credential, only connections opened before stay until they end.
    """
    ended_sessions = sorted(set(sessions))
    message = {
        "type": REVOKED_MESSAGE_TYPE,
        "api_key_ids": sorted(set(api_key_ids)),
        "user_ids": sorted(set(user_ids)),
        "sessions": ended_sessions,
        "session_user_ids": sorted(set(session_user_ids)),
    }
    if not any(message[name] for name in ("api_key_ids", "user_ids", "sessions", "session_user_ids")):
        return

    def send() -> None:
        _sessions_ended_mark(ended_sessions)
        try:
            broadcast.broadcast_sync(message)
        except Exception:
            logger.warning("could not announce a revocation to the other processes", exc_info=True)

    transaction.on_commit(send)


_ENDED_SESSION_PREFIX = "accounts:login-ended:"


def _mark_seconds() -> int:
    """How long a mark is kept: as long as an access token lives, and a minute for clock skew."""
    return int(jwt_settings.ACCESS_TOKEN_LIFETIME.total_seconds()) + 60


def _sessions_ended_mark(sessions: list[str]) -> None:
    """Mark login ``sessions`` as ended (see the module docstring); an unreachable cache is logged."""
    if not sessions:
        return
    try:
        cache.set_many({_ENDED_SESSION_PREFIX + session: True for session in sessions}, timeout=_mark_seconds())
    except Exception:
        logger.error(
            "could not mark %d login sessions as ended in the cache: their access tokens keep authenticating "
            "until they expire (%d s at most)",
            len(sessions),
            _mark_seconds(),
            exc_info=True,
        )


def jwt_session_check(claims: Any) -> bool:
    """Return False when the JWT access token of ``claims`` (a validated simplejwt token: its ``get``)
    belongs to a login session that ended (its ``sid`` claim marked: see the module docstring).

    One cache read (Redis when configured), none for a token without a session; sync. True when
    the cache cannot be read (logged).
    """
    session = claims.get(SESSION_CLAIM)
    if not isinstance(session, str):
        return True
    try:
        return not cache.get(_ENDED_SESSION_PREFIX + session)
    except Exception:
        logger.warning("could not read the ended login sessions from the cache: a JWT is let through", exc_info=True)
        return True


# The watches of each event loop (connections belong to the loop that serves them).
_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[_Watch]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def watch_credential(
    *, user_id: int, api_key_id: int | None, session_id: str | None = None, on_revoked: Callable[[], None]
) -> Iterator[None]:
    """Call ``on_revoked()`` (on this event loop) if the credential is revoked inside the block.

    ``api_key_id``: the key used, None for a JWT; ``session_id``: the JWT's login session, if
    logging out should end it too. ``on_revoked`` must be quick and must not raise; it may be
    called more than once.
    """
    loop = asyncio.get_running_loop()
    watch = _Watch(user_id=user_id, api_key_id=api_key_id, session_id=session_id, on_revoked=on_revoked)
    watches = _watches.setdefault(loop, set())
    watches.add(watch)
    try:
        yield
    finally:
        watches.discard(watch)


def _on_revoked(message: dict[str, Any]) -> None:
    try:
        watches = _watches.get(asyncio.get_running_loop())
    except RuntimeError:  # dispatched outside an event loop: nothing of this process to end
        return
    if not watches:
        return
    api_key_ids = set(message.get("api_key_ids") or ())
    user_ids = set(message.get("user_ids") or ())
    sessions = set(message.get("sessions") or ())
    session_user_ids = set(message.get("session_user_ids") or ())
    for watch in list(watches):
        if (
            watch.user_id in user_ids
            or (watch.api_key_id is not None and watch.api_key_id in api_key_ids)
            or (watch.session_id is not None and (watch.session_id in sessions or watch.user_id in session_user_ids))
        ):
            watch.on_revoked()


broadcast.on_broadcast(REVOKED_MESSAGE_TYPE, _on_revoked)


def _api_key_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
    if instance.revoked_at is not None:
        revocation_announce(api_key_ids=[instance.pk])


def _api_key_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    revocation_announce(api_key_ids=[instance.pk])


def _user_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
    if not instance.is_active:
        revocation_announce(user_ids=[instance.pk])


def _user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    revocation_announce(user_ids=[instance.pk])


def _membership_changed(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    # A membership removed or its role changed: the user's open sockets acted with the old one
    # (their principal is resolved at connect); they end, and reconnect with what holds now.
    if not created:
        revocation_announce(user_ids=[instance.user_id])


def connect_revocation_signals() -> None:
    """Announce revocations on model changes: a revoked or deleted key, a deactivated or deleted
    user, a membership removed or changed.

    Called once, from ``AccountsConfig.ready``. (A logout announces its session itself.)
    """
    from django.db.models.signals import post_delete, post_save

    from .models import APIKey, Membership, User

    post_save.connect(_api_key_saved, sender=APIKey, dispatch_uid="accounts.revocation.api_key_saved")
    post_delete.connect(_api_key_deleted, sender=APIKey, dispatch_uid="accounts.revocation.api_key_deleted")
    post_save.connect(_user_saved, sender=User, dispatch_uid="accounts.revocation.user_saved")
    post_delete.connect(_user_deleted, sender=User, dispatch_uid="accounts.revocation.user_deleted")
    post_save.connect(_membership_changed, sender=Membership, dispatch_uid="accounts.revocation.membership_saved")
    post_delete.connect(_membership_changed, sender=Membership, dispatch_uid="accounts.revocation.membership_deleted")


__all__ = [
    "REVOKED_MESSAGE_TYPE",
    "SESSION_CLAIM",
    "connect_revocation_signals",
    "jwt_session_check",
    "revocation_announce",
    "watch_credential",
]
