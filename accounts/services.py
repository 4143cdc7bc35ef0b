"""Writes for accounts: registration, API keys, budgets (usage records: ``accounts.usage``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from chatbackend.errors import ApplicationError, NotFoundError

from .keys import display_prefix, generate_secret, hash_secret
from .lifecycle.services import email_verification_request
from .models import APIKey, Budget, User
from .revocation import revocation_announce

USERNAME_TAKEN_MESSAGE = "A user with that username already exists."


def user_register(*, username: str, password: str, email: str = "") -> User:
    """Create a ``member`` user.

    With ``settings.EMAIL_VERIFICATION_REQUIRED`` the ``email`` is required (``ApplicationError``
    400 naming it) and unverified: a verification link is emailed
    (``accounts.lifecycle.services.email_verification_request``), and the account may not log in
    or use keys until it is followed.

    Raises Django's ``ValidationError`` for a weak password, and ``ApplicationError`` (400,
    ``param`` and ``fields`` naming ``username``, as the serializer's uniqueness check reports it)
    when the username is taken. Concurrent registrations of one name race past that check; the
    database's unique constraint (the same exact-match rule) lets one insert win and the others
    fail here, inside a savepoint, instead of with an IntegrityError.
    """
    verify = settings.EMAIL_VERIFICATION_REQUIRED
    if verify and not email:
        message = "An email address is required: this server verifies it before the account may log in."
        raise ApplicationError(f"email: {message}", code="required", param="email", fields={"email": [message]})
    user = User(username=username, email=email, role=User.Role.MEMBER, email_verified=not verify)
    validate_password(password, user=user)
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        if not User.objects.filter(username=username).exists():
            raise  # another constraint: a bug, not the client's fault
        raise ApplicationError(
            f"username: {USERNAME_TAKEN_MESSAGE}",
            code="invalid",
            param="username",
            fields={"username": [USERNAME_TAKEN_MESSAGE]},
        ) from None
    if not user.email_verified:
        email_verification_request(user=user)
    return user


@dataclass(frozen=True, slots=True)
class CreatedAPIKey:
    """A new key and its secret; the secret exists only here, once, and is never stored."""

    api_key: APIKey
    secret: str


def api_key_create(*, user: User, name: str, secret: str | None = None) -> CreatedAPIKey:
    """Create an API key for ``user``; return it with its one-time ``sk-...`` secret.

    ``secret``: the secret to store (hashed, like any), for an operator who chose it
    (``manage.py demo``'s ``DEMO_API_KEY``); by default a new random one (``generate_secret``).
    """
    secret = secret or generate_secret()
    api_key = APIKey.objects.create(user=user, name=name, prefix=display_prefix(secret), key_hash=hash_secret(secret))
    return CreatedAPIKey(api_key=api_key, secret=secret)


def api_key_last_used_update(*, api_key_id: int, at: dt.datetime) -> None:
    """Record that key ``api_key_id`` was used at ``at``; never moves ``last_used_at`` backwards.

    One UPDATE, no ``save()``: it fires no signal, so it does not clear the lookup caches
    (``chatbackend.lookup_cache``) of every process the way a change of the key does.
    """
    APIKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=at), pk=api_key_id).update(last_used_at=at)


def api_key_revoke(*, user: User, api_key_id: int) -> APIKey:
    """Revoke ``user``'s key ``api_key_id`` (idempotent). Raises ``NotFoundError`` for another's key."""
    try:
        api_key = APIKey.objects.get(pk=api_key_id, user=user)
    except APIKey.DoesNotExist:
        raise NotFoundError("API key not found.", code="api_key_not_found") from None
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def session_end(*, user_id: int | None, session_id: str | None) -> None:
    """End a logged-out JWT session's open WebSockets, in every process (``accounts.revocation``).

    The refresh token is already blacklisted. Tokens issued before sessions existed carry no
    session id: nothing to end then (their access tokens expire on their own).
    """
    if user_id is not None and session_id:
        revocation_announce(sessions=[session_id])


# --- Budgets (enforced by accounts.metering.budgets) ---------------------------------------------

BUDGET_FIELDS = ("name", "subject_kind", "subject_id", "period", "limit_usd", "token_limit", "enabled")


def _budget_admin_only(actor: User) -> None:
    if not actor.is_admin:
        raise ApplicationError("Only admins may manage budgets.", code="permission_denied", status=403)


def _budget_save(budget: Budget) -> Budget:
    try:
        budget.full_clean()
    except DjangoValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise ApplicationError(
            f"{field}: {messages[0]}", code="invalid", param=field, fields=exc.message_dict
        ) from None
    budget.save()  # save(), not update(): every process's budget cache is cleared (lookup_cache)
    return budget


def budget_create(*, actor: User, **fields: Any) -> Budget:
    """Create a budget from ``BUDGET_FIELDS``; admins only (403 ``permission_denied`` otherwise).

    Raises ``ApplicationError`` 400 naming the field when the subject does not exist. It applies to
    the next request of its subject in every process.
    """
    _budget_admin_only(actor)
    return _budget_save(Budget(**{name: value for name, value in fields.items() if name in BUDGET_FIELDS}))


def budget_update(*, actor: User, budget: Budget, data: dict[str, Any]) -> Budget:
    """Change ``budget``'s fields in ``data`` (a subset of ``BUDGET_FIELDS``); admins only.

    A changed limit applies to the current period's spend at once; a changed period or subject starts
    counting that period's usage rows (the counters are per budget, subject and period).
    """
    _budget_admin_only(actor)
    for name, value in data.items():
        if name in BUDGET_FIELDS:
            setattr(budget, name, value)
    return _budget_save(budget)


def budget_delete(*, actor: User, budget: Budget) -> None:
    """Delete ``budget``; admins only. Requests in flight settle their reservations on its counter harmlessly."""
    _budget_admin_only(actor)
    budget.delete()
