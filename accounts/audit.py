"""The audit log: one append-only ``AuditEvent`` row per security-relevant event.

Every audited write goes through ``audit_record``, which decides the actor, the client IP and
(later) the organization in one place:

- logins: Django's ``user_logged_in`` (the admin's login form) and ``user_login_failed`` (every
  ``authenticate()``: the admin's form and the JWT login, locked-out attempts included) signals,
  and ``audit_login_succeeded`` called by the JWT login, which sends no signal on success;
- API keys: ``accounts.services`` (created, revoked; rotated is one ``audit_record`` call), and
  deleted (the ``post_delete`` signal: the admin's delete, or a cascade from its user or team);
- budgets: ``accounts.services`` (REST) and ``AuditedModelAdmin`` (admin);
- users, providers, models, aliases and deployments: ``AuditedModelAdmin`` (their only writers
  besides management commands);
- access denied to another organization's object: ``audit_denied_lookup`` around each lookup by
  id or slug that is scoped to the organization a request acts in (conversations, API keys,
  budgets, members, teams, invitations).

The actor and the IP come from the request being served: ``AuditRequestMiddleware`` keeps it in a
context variable, so services need no ``request`` parameter. DRF sets the user it authenticated
(JWT, API key) on the Django request too, so the actor is right for REST calls. Outside a request
(a management command, a Celery task) the actor is whoever the caller names, or none.

Secrets never reach a row: ``audit_snapshot`` replaces the value of every field in
``SECRET_FIELDS`` with ``"[set]"`` / ``""`` (before) or ``"[changed]"`` (after).

django-auditlog was considered and not used; the README's "Audit log" section says why.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from decimal import Decimal
from typing import Any

from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q
from django.db.models.signals import post_delete
from django.http import HttpRequest, HttpResponse

from chatbackend.client_ip import request_client_ip
from chatbackend.errors import NotFoundError

from .login_throttle import login_locked_out
from .models import APIKey, AuditEvent, Membership, Organization, TeamMembership, User

Action = AuditEvent.Action

# Fields whose values never enter an audit row, by model label: only whether they are set / changed.
SECRET_FIELDS: dict[str, frozenset[str]] = {
    "accounts.user": frozenset({"password"}),
    "accounts.apikey": frozenset({"key_hash"}),
    "llm.provider": frozenset({"api_key"}),
}
# URL fields whose user info may carry a password (http://user:password@host/v1): the password
# enters a row only as ``"[set]"``, or ``"[changed]"`` when it alone changed.
URL_FIELDS: dict[str, frozenset[str]] = {
    "llm.provider": frozenset({"base_url"}),
}
# Fields left out of snapshots: bookkeeping that changes on its own, not by a decision.
IGNORED_FIELDS: dict[str, frozenset[str]] = {
    "accounts.user": frozenset({"last_login", "date_joined"}),
    "accounts.apikey": frozenset({"last_used_at"}),
}
# A user change touching one of these is a role change (``user.role_changed``).
USER_ROLE_FIELDS = frozenset({"role", "is_active", "is_staff", "is_superuser", "groups", "user_permissions"})

SECRET_SET = "[set]"  # noqa: S105 - the placeholder that replaces a secret, not one
SECRET_CHANGED = "[changed]"  # noqa: S105

_current_request: ContextVar[HttpRequest | None] = ContextVar("audit_request", default=None)


# --- Context: the request being served ----------------------------------------------------------


class AuditRequestMiddleware:
    """Keep the request being served where ``audit_record`` finds its user and client IP.

    Sync only: it sits in ``MIDDLEWARE`` (the admin and the REST API), not in the streaming chain,
    whose endpoints write no audited change.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with audit_request(request):
            return self.get_response(request)


@contextmanager
def audit_request(request: Any) -> Iterator[None]:
    """Make ``request`` (Django's or DRF's) the one whose user and IP audit rows record, inside the block."""
    token = _current_request.set(request)
    try:
        yield
    finally:
        _current_request.reset(token)


def _request_user(request: Any) -> User | None:
    if isinstance(request, dict):  # a WebSocket's ASGI scope
        user = request.get("user")
    else:
        user = getattr(request, "user", None) if request is not None else None
    return user if isinstance(user, User) and user.is_authenticated else None


def _request_ip(request: Any) -> str | None:
    """Return the client IP of ``request`` (Django's, DRF's, or a WebSocket's ASGI scope), or None."""
    if isinstance(request, dict):  # TrustedProxyMiddleware has set the scope's client already
        client = request.get("client")
        return _valid_ip(str(client[0])) if client else None
    return _valid_ip(request_client_ip(request))


def _request_via(request: Any) -> str:
    """Return how ``request`` reached us: ``"GET /api/teams/x/"``, ``"websocket /ws/conversations/1/"``.

    The path only: query strings may carry credentials (a WebSocket's ``?token=``).
    """
    if request is None:
        return ""
    if isinstance(request, dict):
        return f"{request.get('type', 'websocket')} {request.get('path', '')}"
    return f"{request.method} {request.path}"


def _valid_ip(address: str) -> str | None:
    """Return ``address`` when it is an IP address, else None (a Unix socket's peer, a test's placeholder)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def audit_organization(*, actor: User | None, obj: models.Model | None) -> int | None:
    """Return the id of the organization an event belongs to: the one place that decides it.

    The object's organization (a key's, a budget's, a membership's, a team's; an organization
    itself); for a user (a login, a change to the account) the user's default organization; None
    for platform objects (providers, models, aliases, deployments: every organization's) and
    events of nobody (a failed login of an unknown name); with no object, the actor's default.
    """
    if isinstance(obj, Organization):
        return obj.pk
    organization_id = getattr(obj, "organization_id", None)
    if isinstance(organization_id, int):
        return organization_id
    if isinstance(obj, TeamMembership):
        return obj.team.organization_id
    if isinstance(obj, User):
        actor = obj
    elif obj is not None:
        return None
    if actor is not None and actor.pk is not None:
        return (
            Membership.objects.filter(user=actor)
            .order_by("-is_default", "created_at", "id")
            .values_list("organization_id", flat=True)
            .first()
        )
    return None


# --- Snapshots and diffs ------------------------------------------------------------------------


def _label(obj: models.Model) -> str:
    return obj._meta.label_lower


def _fields(obj: models.Model) -> Iterable[models.Field[Any, Any]]:
    ignored = IGNORED_FIELDS.get(_label(obj), frozenset())
    for field in obj._meta.concrete_fields:
        if field.primary_key or field.name in ignored:
            continue
        if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
            continue  # timestamps of the row itself: the event has its own
        yield field


def audit_snapshot(obj: models.Model) -> dict[str, Any]:
    """Return ``obj``'s audited fields as JSON values: ``{field name: value}``, secrets as ``"[set]"``/``""``.

    Foreign keys are their ids, many-to-many fields sorted lists of ids (once ``obj`` is saved),
    decimals strings with the field's decimal places, datetimes ISO 8601 to the millisecond
    (``DjangoJSONEncoder``).
    """
    secrets = SECRET_FIELDS.get(_label(obj), frozenset())
    urls = URL_FIELDS.get(_label(obj), frozenset())
    values: dict[str, Any] = {}
    for field in _fields(obj):
        value = field.value_from_object(obj)
        if field.name in secrets:
            value = SECRET_SET if value else ""
        elif field.name in urls and isinstance(value, str):
            value = url_password_masked(value, SECRET_SET)
        elif isinstance(field, models.DecimalField) and isinstance(value, Decimal) and value.is_finite():
            # As stored: "7" typed in a form and "7.00000000" read back are one value, not a change.
            value = value.quantize(Decimal(1).scaleb(-field.decimal_places))
        values[field.name] = value
    if obj.pk is not None:
        for m2m in obj._meta.many_to_many:  # e.g. a user's groups and permissions: ids, sorted
            values[m2m.name] = sorted(getattr(obj, m2m.name).values_list("pk", flat=True))
    return json.loads(json.dumps(values, cls=DjangoJSONEncoder))


def url_password_masked(url: str, placeholder: str) -> str:
    """Return ``url`` with the password of its user info replaced by ``placeholder``: ``user:[set]@``,
    or ``[set]@`` for user info without one (a token as the user name); as is without user info."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not separator or not at or "/" in userinfo:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:{placeholder}@{host}" if colon else f"{scheme}://{placeholder}@{host}"


def _raw_values(obj: models.Model, fields: dict[str, frozenset[str]]) -> dict[str, Any]:
    """Return the raw values of ``obj``'s fields named in ``fields`` (``SECRET_FIELDS``, ``URL_FIELDS``),
    only to compare them in memory (never stored)."""
    return {name: getattr(obj, name, None) for name in fields.get(_label(obj), ())}


class AuditState:
    """An object's audited state before a change: its snapshot and, in memory only, its secrets."""

    def __init__(self, obj: models.Model) -> None:
        self.pk = obj.pk
        self.snapshot = audit_snapshot(obj)
        self._secrets = _raw_values(obj, SECRET_FIELDS)
        self._urls = _raw_values(obj, URL_FIELDS)

    @classmethod
    def of_stored(cls, obj: models.Model) -> AuditState | None:
        """Return the state of ``obj``'s row as stored (before unsaved edits), or None when it has none."""
        if obj.pk is None:
            return None
        stored = type(obj)._default_manager.filter(pk=obj.pk).first()
        return None if stored is None else cls(stored)

    def changes(self, obj: models.Model) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(before, after)``: the fields whose value differs in ``obj`` now (a secret: ``"[changed]"``)."""
        now = audit_snapshot(obj)
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        for name, value in now.items():
            if self.snapshot.get(name) != value:
                before[name], after[name] = self.snapshot.get(name), value
        for name, secret in _raw_values(obj, SECRET_FIELDS).items():
            if secret != self._secrets.get(name):
                before[name] = self.snapshot.get(name, "")
                after[name] = SECRET_CHANGED if secret else ""
        for name, url in _raw_values(obj, URL_FIELDS).items():
            if name not in after and isinstance(url, str) and url != self._urls.get(name):  # the password alone
                before[name] = self.snapshot.get(name)
                after[name] = url_password_masked(url, SECRET_CHANGED)
        return before, after


# --- Recording ----------------------------------------------------------------------------------


def audit_record(
    *,
    action: str,
    obj: models.Model | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_username: str | None = None,
    request: Any = None,
    anonymous: bool = False,
    object_id: Any = None,
    object_type: str | None = None,
    organization_id: int | None = None,
) -> AuditEvent:
    """Write one audit row and return it.

    ``action``: an ``AuditEvent.Action``. ``obj``: the object acted on (its type, id and ``str``).
    ``before`` / ``after``: JSON-ready dicts (``audit_snapshot``, ``AuditState.changes``); the
    caller masks secrets through them. ``actor``: who acted, by default the user of ``request``,
    else of the request being served (``AuditRequestMiddleware``); ``actor_username`` defaults to
    the actor's username. ``request``: Django's or DRF's, by default the request being served;
    its client IP is recorded (``chatbackend.client_ip``). ``anonymous``: record no actor (a failed
    login). ``object_id``: ``obj``'s id when it has none any more (deleted), or the id of an object
    not loaded (with ``object_type``, its ``app_label.model_name``). ``organization_id``: the
    event's organization when ``audit_organization`` would not decide it (an access denied).
    """
    request = request if request is not None else _current_request.get()
    if not anonymous:
        actor = actor or _request_user(request)
    if actor_username is None:
        actor_username = actor.get_username() if actor is not None else ""
    ip = _request_ip(request) if request is not None else None
    if organization_id is None:
        organization_id = audit_organization(actor=actor, obj=obj)
    if object_type is None:
        object_type = _label(obj) if obj is not None else ""
    return AuditEvent.objects.create(
        action=action,
        actor=actor,
        actor_username=actor_username[:150],
        organization_id=organization_id,
        object_type=object_type,
        object_id=str(object_id if object_id is not None else getattr(obj, "pk", None) or ""),
        object_repr=str(obj)[:200] if obj is not None else "",
        ip=ip,
        before=before,
        after=after,
    )


# Audited models, by label: their actions when created, changed, deleted.
_MODEL_ACTIONS: dict[str, tuple[str, str, str]] = {
    "accounts.user": (Action.USER_CREATED, Action.USER_UPDATED, Action.USER_DELETED),
    "accounts.budget": (Action.BUDGET_CREATED, Action.BUDGET_UPDATED, Action.BUDGET_DELETED),
    "llm.provider": (Action.PROVIDER_CREATED, Action.PROVIDER_UPDATED, Action.PROVIDER_DELETED),
    "llm.llmmodel": (Action.LLM_MODEL_CREATED, Action.LLM_MODEL_UPDATED, Action.LLM_MODEL_DELETED),
    "llm.modelalias": (Action.MODEL_ALIAS_CREATED, Action.MODEL_ALIAS_UPDATED, Action.MODEL_ALIAS_DELETED),
    "llm.deployment": (Action.DEPLOYMENT_CREATED, Action.DEPLOYMENT_UPDATED, Action.DEPLOYMENT_DELETED),
    "accounts.organization": (Action.ORGANIZATION_CREATED, Action.ORGANIZATION_UPDATED, Action.ORGANIZATION_DELETED),
    "accounts.membership": (Action.MEMBERSHIP_CREATED, Action.MEMBERSHIP_UPDATED, Action.MEMBERSHIP_DELETED),
    "accounts.team": (Action.TEAM_CREATED, Action.TEAM_UPDATED, Action.TEAM_DELETED),
    "accounts.teammembership": (
        Action.TEAM_MEMBERSHIP_CREATED,
        Action.TEAM_MEMBERSHIP_UPDATED,
        Action.TEAM_MEMBERSHIP_DELETED,
    ),
}


def audit_model_saved(*, obj: models.Model, before: AuditState | None) -> AuditEvent | None:
    """Record that ``obj`` was created (``before`` None) or changed from ``before``; None when nothing changed.

    Raises ``KeyError`` for a model that is not audited (``_MODEL_ACTIONS``).
    """
    created, updated, _ = _MODEL_ACTIONS[_label(obj)]
    if before is None:
        return audit_record(action=created, obj=obj, after=audit_snapshot(obj))
    old, new = before.changes(obj)
    return audit_model_changed(obj=obj, before=old, after=new) if new else None


def audit_model_changed(
    *, obj: models.Model, before: dict[str, Any], after: dict[str, Any], actor: User | None = None
) -> AuditEvent:
    """Record the change of ``obj`` from ``before`` to ``after`` (the changed fields only).

    A user change that touches a role or permission field is ``user.role_changed``.
    """
    _, updated, _ = _MODEL_ACTIONS[_label(obj)]
    if isinstance(obj, User) and USER_ROLE_FIELDS & after.keys():
        updated = Action.USER_ROLE_CHANGED
    return audit_record(action=updated, obj=obj, before=before, after=after, actor=actor)


def audit_model_deleted(*, obj: models.Model, before: AuditState, actor: User | None = None) -> AuditEvent:
    """Record that ``obj`` (whose state was ``before``) was deleted; call it after the delete.

    An operator who deleted their own account is recorded by username only (``actor`` null), as
    their earlier rows now are: a row naming the deleted user would break the foreign key at commit.
    """
    _, _, deleted = _MODEL_ACTIONS[_label(obj)]
    actor = actor or _request_user(_current_request.get())
    if actor is not None and not User.objects.filter(pk=actor.pk).exists():
        return audit_record(
            action=deleted,
            obj=obj,
            before=before.snapshot,
            anonymous=True,
            actor_username=actor.get_username(),
            object_id=before.pk,
        )
    return audit_record(action=deleted, obj=obj, before=before.snapshot, actor=actor, object_id=before.pk)


# --- Access denied to another organization's object ----------------------------------------------


def audit_access_denied(
    *,
    actor: User,
    organization: Organization,
    model: type[models.Model],
    lookup: Q,
    object_type: str | None = None,
    object_id: Any = None,
) -> AuditEvent | None:
    """Record ``access.denied`` when the object a failed lookup named belongs to another tenant.

    Call it after a lookup scoped to ``organization`` (the one the request acts in) found nothing:
    ``model`` rows matching ``lookup`` (e.g. ``Q(pk=conversation_id)``), unscoped, are what it
    named. One indexed query tells a missing object (no row: nothing recorded) from another
    organization's: a row whose ``organization`` is neither ``organization`` nor one ``actor`` is a
    member of. Neither the platform superuser (who may act in any organization) nor a member of
    the object's organization (acting in another of theirs) breaches a tenant; another user's
    object in the same organization is no tenant breach either (the lookup's own rule refused it):
    none of them is recorded.

    The row: ``actor``, ``organization`` (the acting one), ``object_type`` (default ``model``'s
    label) and ``object_id`` (default the found row's id), never the object's content (no
    ``object_repr``); ``after`` holds ``via`` (``"DELETE /api/api-keys/7/"`` or ``"websocket
    /ws/conversations/3/"``) and ``object_organization``; the IP is the client's. The caller
    answers the same 404 as for a missing object. Sync (a query and a write): from async code,
    call the lookup through ``run_sync``.
    """
    if actor.is_superuser:
        return None
    try:
        found = (
            model._default_manager.filter(lookup)
            .exclude(organization_id=organization.pk)
            .exclude(organization__memberships__user=actor)
            .values_list("pk", "organization_id")
            .order_by("pk")
            .first()
        )
    except (ValueError, TypeError):  # an id that is no id: nothing of that name exists
        return None
    if found is None:
        return None
    found_id, object_organization = found
    request = _current_request.get()
    return audit_record(
        action=Action.ACCESS_DENIED,
        actor=actor,
        request=request,
        organization_id=organization.pk,
        object_type=object_type if object_type is not None else model._meta.label_lower,
        object_id=object_id if object_id is not None else found_id,
        after={"via": _request_via(request), "object_organization": object_organization},
    )


@contextmanager
def audit_denied_lookup(
    *,
    actor: User,
    organization: Organization,
    model: type[models.Model],
    lookup: Q,
    code: str,
    object_type: str | None = None,
    object_id: Any = None,
) -> Iterator[None]:
    """Around a lookup scoped to ``organization``: when it raises ``NotFoundError`` ``code``, record
    ``audit_access_denied`` (same arguments) and re-raise it unchanged.

    Nothing runs on success. Put it outside any ``transaction.atomic()`` the lookup runs in
    (``with audit_denied_lookup(...), transaction.atomic():``), so the row is written after the
    rollback, not undone by it.
    """
    try:
        yield
    except NotFoundError as exc:
        if exc.code == code:
            audit_access_denied(
                actor=actor,
                organization=organization,
                model=model,
                lookup=lookup,
                object_type=object_type,
                object_id=object_id,
            )
        raise


# --- Logins -------------------------------------------------------------------------------------


def audit_login_succeeded(*, user: User, request: Any) -> AuditEvent:
    """Record a successful login of ``user`` (the JWT login, the admin's login form)."""
    return audit_record(action=Action.LOGIN_SUCCEEDED, obj=user, actor=user, request=request)


def audit_login_failed(*, username: str, request: Any) -> AuditEvent:
    """Record a failed login with ``username`` (no actor); ``after.locked_out`` says django-axes refused it."""
    user = User.objects.filter(username=username).first() if username else None
    return audit_record(
        action=Action.LOGIN_FAILED,
        obj=user,
        actor_username=username,
        request=request,
        anonymous=True,
        after={"locked_out": login_locked_out(request)},
    )


def _on_user_logged_in(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    if isinstance(user, User):
        audit_login_succeeded(user=user, request=request)


def _on_user_login_failed(
    sender: Any, credentials: dict[str, Any] | None = None, request: Any = None, **_: Any
) -> None:
    # Django has already masked the password in ``credentials``; only the username is kept.
    username = str((credentials or {}).get(User.USERNAME_FIELD) or "")
    audit_login_failed(username=username, request=request)


def _on_api_key_deleted(sender: Any, instance: APIKey, origin: Any = None, **_: Any) -> None:
    # A signal, not the admin's delete_model: a key also goes with its user or its team (cascades),
    # and each of those deletions is a key that stopped working, as a revocation is.
    actor = _request_user(_current_request.get())
    if actor is not None and _deletes_user(origin, actor):
        # An operator deleting their own account: their row is gone at commit, so the row names
        # them by username only, as audit_model_deleted records the account's own deletion.
        audit_record(
            action=Action.API_KEY_DELETED,
            obj=instance,
            before=audit_snapshot(instance),
            object_id=instance.pk,
            anonymous=True,
            actor_username=actor.get_username(),
        )
        return
    audit_record(action=Action.API_KEY_DELETED, obj=instance, before=audit_snapshot(instance), object_id=instance.pk)


def _deletes_user(origin: Any, user: User) -> bool:
    """Return True when the deletion ``origin`` (a ``post_delete`` signal's: an instance or a queryset)
    deletes ``user``. Queried while the deletion runs, before the user's own row goes."""
    if isinstance(origin, User):
        return origin.pk == user.pk
    if isinstance(origin, models.QuerySet) and origin.model is User:
        return origin.filter(pk=user.pk).exists()
    return False


def connect_audit_signals() -> None:
    """Record logins and failed logins from Django's auth signals, and API keys deleted (``post_delete``)
    by any path (``AccountsConfig.ready``)."""
    user_logged_in.connect(_on_user_logged_in, dispatch_uid="accounts.audit.user_logged_in")
    user_login_failed.connect(_on_user_login_failed, dispatch_uid="accounts.audit.user_login_failed")
    post_delete.connect(_on_api_key_deleted, sender=APIKey, dispatch_uid="accounts.audit.api_key_deleted")
