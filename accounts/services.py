"""Writes for accounts: registration, memberships, API keys, budgets (usage records: ``accounts.usage``)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from chatbackend.errors import ApplicationError, NotFoundError

from .audit import (
    Action,
    AuditState,
    audit_denied_lookup,
    audit_model_changed,
    audit_model_deleted,
    audit_record,
    audit_snapshot,
)
from .keys import display_prefix, generate_secret, hash_secret
from .lifecycle.services import email_verification_request
from .models import API_KEY_OWNERS, APIKey, Budget, Membership, Organization, Team, TeamMembership, User
from .revocation import revocation_announce

USERNAME_TAKEN_MESSAGE = "A user with that username already exists."


def membership_join_default_organization(*, user: User) -> Membership:
    """Make ``user`` a member of the default organization, as their default one; return the membership.

    Role: ``owner`` for a superuser, ``admin`` for the ``admin`` role, else ``member``. Idempotent:
    an existing membership is returned unchanged (and becomes the default only when the user has
    none). Called for every new user (``AccountsConfig.ready``), so that a single-tenant
    installation never has to manage organizations.
    """
    organization = Organization.objects.default()
    if user.is_superuser:
        role = Membership.Role.OWNER
    elif user.role == User.Role.ADMIN:
        role = Membership.Role.ADMIN
    else:
        role = Membership.Role.MEMBER
    has_default = Membership.objects.filter(user=user, is_default=True).exists()
    membership, _ = Membership.objects.get_or_create(
        user=user, organization=organization, defaults={"role": role, "is_default": not has_default}
    )
    return membership


def user_register(
    *,
    username: str,
    password: str,
    email: str = "",
    email_proven: bool = False,
    join_default_organization: bool = True,
) -> User:
    """Create a ``member`` user, a member of the default organization (``AccountsConfig``'s hook).

    With ``settings.EMAIL_VERIFICATION_REQUIRED`` the ``email`` is required (``ApplicationError``
    400 naming it) and unverified: a verification link is emailed
    (``accounts.lifecycle.services.email_verification_request``), and the account may not log in
    or use keys until it is followed. ``email_proven``: the caller has already proven it owns
    ``email`` (it followed an invitation link sent there): the account counts as verified.
    ``join_default_organization`` False: the account joins no organization here (an invitation's
    caller makes it a member of the inviting one, in the same transaction).

    Raises Django's ``ValidationError`` for a weak password, and ``ApplicationError`` (400,
    ``param`` and ``fields`` naming ``username``, as the serializer's uniqueness check reports it)
    when the username is taken, in any case (``Alice`` when ``alice`` exists). Concurrent
    registrations of one name race past that check; the database's unique constraint (exact
    match only: two names differing in case may both win such a race) lets one insert win and the
    others fail here, inside a savepoint, instead of with an IntegrityError.
    """
    verify = settings.EMAIL_VERIFICATION_REQUIRED and not email_proven
    if verify and not email:
        message = "An email address is required: this server verifies it before the account may log in."
        raise ApplicationError(f"email: {message}", code="required", param="email", fields={"email": [message]})
    # Taken in any case, as Django's own user creation form (the admin's) judges it: "Admin" beside
    # "admin" would read as the administrator in member lists, the audit log and usage reports.
    if User.objects.filter(username__iexact=username).exists():
        raise _username_taken()
    user = User(username=username, email=email, role=User.Role.MEMBER, email_verified=not verify)
    user.joins_default_organization = join_default_organization
    validate_password(password, user=user)
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        if not User.objects.filter(username=username).exists():
            raise  # another constraint: a bug, not the client's fault
        raise _username_taken() from None
    if not user.email_verified:
        email_verification_request(user=user)
    return user


def _username_taken() -> ApplicationError:
    return ApplicationError(
        f"username: {USERNAME_TAKEN_MESSAGE}",
        code="invalid",
        param="username",
        fields={"username": [USERNAME_TAKEN_MESSAGE]},
    )


@dataclass(frozen=True, slots=True)
class CreatedAPIKey:
    """A new key and its secret; the secret exists only here, once, and is never stored."""

    api_key: APIKey
    secret: str


def _forbidden(message: str) -> ApplicationError:
    return ApplicationError(message, code="insufficient_permissions", status=403, type="invalid_request_error")


def _api_key_restrictions(
    *,
    expires_at: dt.datetime | None,
    allowed_models: Sequence[str],
    scopes: Sequence[str] | None,
    creator_key: APIKey | None,
) -> tuple[dt.datetime | None, list[str], list[str]]:
    """Return a new key's ``(expires_at, allowed_models, scopes)``, checked; see ``api_key_create``."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError(
            f"expires_at: {expires_at.isoformat()} is not in the future.", code="invalid", param="expires_at"
        )
    unknown = [scope for scope in scopes or () if scope not in APIKey.Scope.values]
    if unknown:
        raise ApplicationError(
            f"scopes: unknown scope {', '.join(map(repr, unknown))}; use any of {', '.join(APIKey.Scope.values)}.",
            code="invalid",
            param="scopes",
        )
    if scopes is not None and not scopes:
        raise ApplicationError("scopes: give at least one scope.", code="invalid", param="scopes")
    models = list(dict.fromkeys(allowed_models))  # without repeats, in order
    granted = list(dict.fromkeys(scopes)) if scopes is not None else None
    if creator_key is not None:
        # A key creates keys only within its own restrictions: never a way out of them.
        granted = granted if granted is not None else list(creator_key.scopes)
        wider = [scope for scope in granted if scope not in creator_key.scopes]
        if wider:
            raise _forbidden(f"An API key may create keys only within its own scopes; it lacks {', '.join(wider)}.")
        if creator_key.allowed_models:
            models = models or list(creator_key.allowed_models)
            outside = [name for name in models if name not in creator_key.allowed_models]
            if outside:
                raise _forbidden(
                    f"An API key may create keys only for its own allowed models; it may not use {', '.join(outside)}."
                )
        if creator_key.expires_at is not None:
            expires_at = expires_at or creator_key.expires_at
            if expires_at > creator_key.expires_at:
                raise _forbidden("An API key may not create a key that outlives it (expires_at after its own).")
    return expires_at, models, granted if granted is not None else list(APIKey.Scope.values)


def _api_key_within(api_key: APIKey, creator_key: APIKey | None) -> None:
    """Refuse (403) when ``creator_key`` (the key a request authenticated with) may not manage
    ``api_key``: a key manages only itself and keys no wider than itself (its organization, within
    its scopes and allowed models, expiring no later), as it may create only such keys."""
    if creator_key is None or api_key.pk == creator_key.pk:
        return
    if api_key.organization_id != creator_key.organization_id:
        raise _forbidden("An API key may manage only keys of its own organization.")
    if creator_key.team_id is not None and api_key.team_id != creator_key.team_id:
        raise _forbidden("An API key of a team may manage only keys of that team.")
    if set(api_key.scopes) - set(creator_key.scopes):
        raise _forbidden("An API key may manage only keys within its own scopes.")
    if creator_key.allowed_models and (
        not api_key.allowed_models or set(api_key.allowed_models) - set(creator_key.allowed_models)
    ):
        raise _forbidden("An API key may manage only keys within its own allowed models.")
    if creator_key.expires_at is not None and (
        api_key.expires_at is None or api_key.expires_at > creator_key.expires_at
    ):
        raise _forbidden("An API key may manage only keys that expire no later than itself.")


# Who owns a new key: the caller, or the team it is assigned to (through the team's service user).


def team_service_user(*, team: Team) -> User:
    """Return ``team``'s service user, creating it the first time: the owner of the team's keys.

    Not a person: an unusable password (it cannot log in; only its keys authenticate it), active,
    a ``member`` of the team's organization (its default) and of the team, and marked by
    ``User.service_team`` so listings and the admin can tell it apart. Its username is
    ``<team slug>.team-<team id>.service`` (with a random suffix should a person have taken it).
    Because the team's keys belong to it, they keep working whatever becomes of the person who
    created them (``APIKey.created_by``); usage rows and conversations of those keys are its own.
    """
    existing = User.objects.filter(service_team=team).first()
    if existing is not None:
        _service_user_memberships(existing, team)  # an admin may have removed it since
        return existing
    username = f"{team.slug}.team-{team.pk}.service"[:150]
    try:
        with transaction.atomic():
            if User.objects.filter(username=username).exists():
                username = f"{username[:140]}-{secrets.token_hex(4)}"
            user = User(username=username, service_team=team, role=User.Role.MEMBER)
            user.set_unusable_password()
            user.save()  # the default organization's post_save hook skips service users (AccountsConfig)
            _service_user_memberships(user, team)
            audit_record(action=Action.USER_CREATED, obj=user, after=audit_snapshot(user))
    except IntegrityError:  # another request made it at the same moment
        return User.objects.get(service_team=team)
    return user


def _service_user_memberships(user: User, team: Team) -> None:
    """Make ``user`` (``team``'s service user) a ``member`` of the team's organization and of the team."""
    Membership.objects.get_or_create(
        user=user,
        organization_id=team.organization_id,
        defaults={"role": Membership.Role.MEMBER, "is_default": not user.memberships.filter(is_default=True).exists()},
    )
    TeamMembership.objects.get_or_create(user=user, team=team)


def team_service_user_deactivate(*, team: Team) -> User | None:
    """Deactivate ``team``'s service user, if it has an active one; return it (else None).

    Called before a team is deleted (the ``pre_delete`` signal of ``Team``, ``AccountsConfig``: the
    REST and admin deletes and an organization's cascade alike), while ``User.service_team`` still
    names the team; the delete then sets it to NULL and removes the team's keys (CASCADE). The
    service user is nobody's to use any more: ``save()`` clears the cached principals and ends its
    open sockets and replies in every process (``accounts.revocation``). Its data stays (usage
    rows, conversations), as a deactivated person's does. Not audited on its own: the team's
    deletion (``team.deleted``) is the decision, and its one row.
    """
    user = User.objects.filter(service_team=team, is_active=True).first()
    if user is None:
        return None
    user.is_active = False
    user.save(update_fields=["is_active"])
    return user


def _api_key_team(
    *, actor: User, organization: Organization, team: str | None, owner: str, administers: bool
) -> tuple[Team | None, User]:
    """Return the team a new key is assigned to (``team``: a slug in ``organization``) and its owner.

    A member of the team, or an owner or admin of the organization (``administers``), may assign a
    key to it; only the latter may make the team its owner (``owner="team"``). Raises
    ``ApplicationError`` 400 ``param`` ``team`` for a slug that names no team of ``organization``
    (another organization's team reads as none), or ``owner="team"`` without a team; 403
    ``insufficient_permissions`` otherwise.
    """
    if owner not in API_KEY_OWNERS:
        raise ApplicationError(f"owner: use one of {', '.join(API_KEY_OWNERS)}.", code="invalid", param="owner")
    if not team:
        if owner == "team":
            raise ApplicationError(
                "owner: a team-owned key needs the team: give its slug in team.", code="invalid", param="owner"
            )
        return None, actor
    found = Team.objects.filter(organization=organization, slug=team).first()
    if found is None:
        raise ApplicationError(f"team: this organization has no team {team!r}.", code="invalid", param="team")
    if owner == "team":
        if not administers:
            raise _forbidden("Only the organization's owners and admins may create keys owned by a team.")
        return found, team_service_user(team=found)
    if not administers and not TeamMembership.objects.filter(team=found, user=actor).exists():
        raise _forbidden(
            f"Only members of team {team!r} (or the organization's owners and admins) may assign keys to it."
        )
    return found, actor


def api_key_create(
    *,
    user: User,
    name: str,
    secret: str | None = None,
    expires_at: dt.datetime | None = None,
    allowed_models: Sequence[str] = (),
    scopes: Sequence[str] | None = None,
    creator_key: APIKey | None = None,
    organization: Organization | None = None,
    team: str | None = None,
    owner: str = "user",
    administers: bool = False,
) -> CreatedAPIKey:
    """Create an API key for ``user`` in ``organization`` (None: the default organization, or the
    creator key's); return it with its one-time ``sk-...`` secret.

    ``secret``: the secret to store (hashed, like any), for an operator who chose it
    (``manage.py demo``'s ``DEMO_API_KEY``); by default a new random one (``generate_secret``).
    ``expires_at``: when the key stops working (None: never); ``allowed_models``: model and alias
    names it may use (empty: all); ``scopes``: ``APIKey.Scope`` values (None: all of them).
    ``creator_key``: the key the caller authenticated with, if any: the new key may not exceed it
    (its scopes, allowlist and expiry are the defaults and the bounds).
    ``team``: the slug of a team of ``organization`` the key is assigned to (its requests count
    against the team's budgets and rate limits too; a ``creator_key`` of a team makes it that team,
    and refuses another with 403); ``owner``: ``"user"`` (``user`` owns it) or
    ``"team"`` (the team's service user owns it: ``team_service_user``); ``administers``: whether
    ``user`` administers ``organization`` (``accounts.selectors.administers``), as
    ``_api_key_team`` requires. ``created_by`` is ``user`` either way.

    Raises ``ApplicationError`` 400 (``param`` naming the field) for an ``expires_at`` not in the
    future, an unknown scope or no scope, an unknown team; 403 ``insufficient_permissions`` for a
    key wider than ``creator_key`` or a team the caller may not assign keys to.
    """
    expires_at, models, granted = _api_key_restrictions(
        expires_at=expires_at, allowed_models=allowed_models, scopes=scopes, creator_key=creator_key
    )
    secret = secret or generate_secret()
    if organization is None:
        organization = creator_key.organization if creator_key is not None else Organization.objects.default()
    if creator_key is not None and creator_key.team_id is not None:
        # A team's key creates keys of that team only: never one that escapes its budgets, rate
        # limits and model list, or outlives the team (its keys go with it).
        creator_team = creator_key.team.slug if creator_key.team is not None else None
        if team and team != creator_team:
            raise _forbidden(f"An API key of team {creator_team!r} may create keys of that team only.")
        team = creator_team
    with transaction.atomic():
        assigned, key_owner = _api_key_team(
            actor=user, organization=organization, team=team, owner=owner, administers=administers
        )
        api_key = APIKey.objects.create(
            user=key_owner,
            organization=organization,
            team=assigned,
            created_by=user,
            name=name,
            prefix=display_prefix(secret),
            key_hash=hash_secret(secret),
            expires_at=expires_at,
            allowed_models=models,
            scopes=granted,
        )
        audit_record(action=Action.API_KEY_CREATED, obj=api_key, after=audit_snapshot(api_key))
    return CreatedAPIKey(api_key=api_key, secret=secret)


def team_keys_revoke_departed(*, team_id: int, user_id: int) -> int:
    """Revoke the keys ``user_id`` holds in team ``team_id`` (keys they own and assigned to it), now
    that they left the team; return how many. A departed member's key must not keep spending the
    team's shared budget or using its model list. When a person leaves, the team's own keys (its
    service user's) stay; removing the service user itself from the team revokes them.
    Each revocation is audited and ends the key's open connections in every process
    (``accounts.revocation``, on the key's save). Called when a team membership is deleted (REST,
    the admin, leaving the organization).
    """
    revoked = 0
    for api_key in APIKey.objects.filter(team_id=team_id, user_id=user_id, revoked_at__isnull=True):
        before = AuditState(api_key)
        api_key.revoked_at = timezone.now()
        with transaction.atomic():
            api_key.save(update_fields=["revoked_at"])
            old, new = before.changes(api_key)
            audit_record(action=Action.API_KEY_REVOKED, obj=api_key, before=old, after=new)
        revoked += 1
    return revoked


def _managed_key(*, user: User, api_key_id: int, managed: QuerySet[APIKey] | None, lock: bool = False) -> APIKey:
    """Return key ``api_key_id`` if ``user`` manages it: their own, or one of ``managed`` (the
    queryset ``accounts.selectors.api_key_list`` gives, with team-owned keys for admins); 404 otherwise."""
    keys = managed if managed is not None else APIKey.objects.filter(user=user)
    if lock:
        keys = APIKey.objects.select_for_update().filter(pk__in=keys.values_list("pk", flat=True))
    try:
        return keys.get(pk=api_key_id)
    except APIKey.DoesNotExist:
        raise NotFoundError("API key not found.", code="api_key_not_found") from None


def _audit_denied_key(
    *, user: User, api_key_id: int, organization: Organization | None
) -> AbstractContextManager[None]:
    """Around a lookup of key ``api_key_id`` in ``organization`` (the one the request acts in):
    another organization's key is audited (``accounts.audit.audit_denied_lookup``); None: no check."""
    if organization is None:
        return nullcontext()
    return audit_denied_lookup(
        actor=user, organization=organization, model=APIKey, lookup=Q(pk=api_key_id), code="api_key_not_found"
    )


def api_key_rotate(
    *,
    user: User,
    api_key_id: int,
    creator_key: APIKey | None = None,
    managed: QuerySet[APIKey] | None = None,
    organization: Organization | None = None,
) -> CreatedAPIKey:
    """Give ``user``'s key ``api_key_id`` a new secret; return it with that secret, shown this once.

    The same row keeps its id, name, restrictions, rate limits and budgets; only ``key_hash`` and
    ``prefix`` change. The old secret is refused at once in every process: the save clears the
    principal caches everywhere (``chatbackend.lookup_cache``), and the connections and replies
    opened with the key end as on a revocation (``revocation_announce``). Audited
    (``api_key.rotated``: the prefix before and after, never a secret or its hash). ``managed``:
    the keys ``user`` manages (``accounts.selectors.api_key_list``; None: their own). Raises
    ``NotFoundError`` (404) for another user's key, ``ApplicationError`` 400 ``api_key_revoked``
    for a revoked one. ``organization``: the one the request acts in; another organization's key
    is then also audited (``access.denied``).
    """
    secret = generate_secret()
    with _audit_denied_key(user=user, api_key_id=api_key_id, organization=organization), transaction.atomic():
        api_key = _managed_key(user=user, api_key_id=api_key_id, managed=managed, lock=True)
        if api_key.revoked_at is not None:
            raise ApplicationError("A revoked API key cannot be rotated; create a new key.", code="api_key_revoked")
        _api_key_within(api_key, creator_key)
        before = audit_snapshot(api_key)
        api_key.key_hash = hash_secret(secret)
        api_key.prefix = display_prefix(secret)
        api_key.save(update_fields=["key_hash", "prefix"])  # save(): the caches' signal
        audit_record(action=Action.API_KEY_ROTATED, obj=api_key, before=before, after=audit_snapshot(api_key))
        revocation_announce(api_key_ids=[api_key.pk])
    return CreatedAPIKey(api_key=api_key, secret=secret)


def api_key_last_used_update(*, api_key_id: int, at: dt.datetime) -> None:
    """Record that key ``api_key_id`` was used at ``at``; never moves ``last_used_at`` backwards.

    One UPDATE, no ``save()``: it fires no signal, so it does not clear the lookup caches
    (``chatbackend.lookup_cache``) of every process the way a change of the key does.
    """
    APIKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=at), pk=api_key_id).update(last_used_at=at)


def api_key_revoke(
    *,
    user: User,
    api_key_id: int,
    creator_key: APIKey | None = None,
    managed: QuerySet[APIKey] | None = None,
    organization: Organization | None = None,
) -> APIKey:
    """Revoke ``user``'s key ``api_key_id`` (idempotent); ``managed``: the keys ``user`` manages
    (``accounts.selectors.api_key_list``: team-owned keys too for an organization's admins; None:
    their own). Raises ``NotFoundError`` for another's key, 403 ``insufficient_permissions`` when
    ``creator_key`` (the key the request used) is narrower. ``organization``: the one the request
    acts in; another organization's key is then also audited (``access.denied``)."""
    with _audit_denied_key(user=user, api_key_id=api_key_id, organization=organization):
        api_key = _managed_key(user=user, api_key_id=api_key_id, managed=managed)
    _api_key_within(api_key, creator_key)
    if api_key.revoked_at is None:
        before = AuditState(api_key)
        api_key.revoked_at = timezone.now()
        with transaction.atomic():
            api_key.save(update_fields=["revoked_at"])
            old, new = before.changes(api_key)
            audit_record(action=Action.API_KEY_REVOKED, obj=api_key, before=old, after=new)
    return api_key


def session_end(*, user_id: int | None, session_id: str | None) -> None:
    """End a logged-out JWT session in every process (``accounts.revocation``): its access tokens are
    refused from then on and its open WebSockets close.

    The refresh token is already blacklisted. Tokens issued before sessions existed carry no
    session id: nothing to end then (their access tokens expire on their own).
    """
    if user_id is not None and session_id:
        revocation_announce(sessions=[session_id])


# --- Budgets (enforced by accounts.metering.budgets) ---------------------------------------------

BUDGET_FIELDS = ("name", "subject_kind", "subject_id", "period", "limit_usd", "token_limit", "enabled")


def _budget_admin_only(actor: User, administers: bool) -> None:
    if not (actor.is_admin or administers):
        raise ApplicationError(
            "Only the organization's owners and admins may manage budgets.", code="permission_denied", status=403
        )


def _budget_save(budget: Budget, before: AuditState | None, actor: User) -> Budget:
    try:
        budget.full_clean()
    except DjangoValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise ApplicationError(
            f"{field}: {messages[0]}", code="invalid", param=field, fields=exc.message_dict
        ) from None
    with transaction.atomic():
        budget.save()  # save(), not update(): every process's budget cache is cleared (lookup_cache)
        if before is None:
            audit_record(action=Action.BUDGET_CREATED, obj=budget, after=audit_snapshot(budget), actor=actor)
        else:
            old, new = before.changes(budget)
            if new:  # a PATCH that changes nothing is no event
                audit_model_changed(obj=budget, before=old, after=new, actor=actor)
    return budget


def budget_create(
    *, actor: User, organization: Organization | None = None, administers: bool = False, **fields: Any
) -> Budget:
    """Create a budget from ``BUDGET_FIELDS`` in ``organization`` (None: the default organization);
    platform admins, and the organization's owners and admins (``administers``) only (403
    ``permission_denied`` otherwise).

    Raises ``ApplicationError`` 400 naming the field when the subject does not exist in the
    organization (``Budget.clean``; another organization's reads as missing). It applies to the next
    request of its subject in every process.
    """
    _budget_admin_only(actor, administers)
    budget = Budget(**{name: value for name, value in fields.items() if name in BUDGET_FIELDS})
    if organization is not None:
        budget.organization = organization
    return _budget_save(budget, None, actor)


def budget_update(*, actor: User, budget: Budget, data: dict[str, Any], administers: bool = False) -> Budget:
    """Change ``budget``'s fields in ``data`` (a subset of ``BUDGET_FIELDS``); admins only (as ``budget_create``).

    A changed limit applies to the current period's spend at once; a changed period or subject starts
    counting that period's usage rows (the counters are per budget, subject and period).
    """
    _budget_admin_only(actor, administers)
    before = AuditState(budget)
    for name, value in data.items():
        if name in BUDGET_FIELDS:
            setattr(budget, name, value)
    return _budget_save(budget, before, actor)


def budget_delete(*, actor: User, budget: Budget, administers: bool = False) -> None:
    """Delete ``budget``; admins only (as ``budget_create``). Requests in flight settle their
    reservations on its counter harmlessly."""
    _budget_admin_only(actor, administers)
    before = AuditState(budget)
    with transaction.atomic():
        budget.delete()
        audit_model_deleted(obj=budget, before=before, actor=actor)
