"""Reads for accounts: the organization a request acts in, API key lookup and listing, usage records,
users, the audit log."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, DecimalField, F, Min, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from chatbackend.errors import ApplicationError, NotFoundError, error_type_for_status

from .audit import audit_denied_lookup
from .keys import hash_secret
from .models import APIKey, AuditEvent, Budget, Membership, Organization, Team, UsageRecord, User
from .services import api_key_last_used_update
from .usage import REFUSED


class AuthenticationFailed(ApplicationError):
    """Credentials are missing, wrong, expired or revoked (HTTP 401).

    ``type``: the OpenAI error type, by default the status's (``authentication_error``).
    """

    def __init__(
        self,
        message: str = "Invalid API key or token.",
        *,
        code: str = "invalid_api_key",
        type: str | None = None,  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message, code=code, status=401, type=type)


def api_key_check_unexpired(api_key: APIKey, *, now: dt.datetime | None = None) -> None:
    """Refuse ``api_key`` once its ``expires_at`` has come (``now``: default the current time).

    Raises ``AuthenticationFailed`` 401 in OpenAI's shape for a bad key (type
    ``invalid_request_error``, code ``invalid_api_key``) with a message saying when it expired.
    CPU only: called on every use, also of a key cached in the process, so expiry needs no
    cache invalidation.
    """
    if api_key.is_expired(now or timezone.now()):
        assert api_key.expires_at is not None  # noqa: S101 - is_expired says so
        raise AuthenticationFailed(
            f"This API key expired at {api_key.expires_at.isoformat()}.",
            code="invalid_api_key",
            type="invalid_request_error",
        )


# The HTTP header that names the organization a request acts in (OpenAI's own:
# https://platform.openai.com/docs/api-reference/authentication), as Django's request.headers key.
ORGANIZATION_HEADER = "OpenAI-Organization"


# What Organization.slug admits (Django's SlugField: validate_slug), at its length.
_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,64}")


@dataclass(frozen=True, slots=True)
class ActingOrganization:
    """The organization a request acts in and the caller's role in it (``Membership.Role``)."""

    organization: Organization
    role: str

    @property
    def is_admin(self) -> bool:
        """Return True for the organization's owners and admins (and the platform superuser)."""
        return self.role in (Membership.Role.OWNER, Membership.Role.ADMIN)


def acting_organization(*, user: User, api_key: APIKey | None, requested: str | None) -> ActingOrganization:
    """Return the organization a request of ``user`` (with ``api_key``, if any) acts in, and their role.

    ``requested``: the organization the request named (``OpenAI-Organization`` header), or None: its
    slug, or its id (OpenAI's header carries an id; a slug wins when both would match). An API key
    acts in its own organization (naming another is refused); a JWT in the one named, else in the
    user's default membership (else their oldest). The platform superuser acts in any organization,
    as its owner. One query (one more for an id, and for a superuser outside the organization named).

    Raises ``AuthenticationFailed`` (401) with code ``invalid_organization`` when the caller is not
    a member of the organization named (or of the key's, or of any).
    """
    if requested is not None and not _SLUG.fullmatch(requested):
        raise AuthenticationFailed(
            f"{ORGANIZATION_HEADER}: {requested[:64]!r} is not an organization slug (letters, digits, - and _) or id.",
            code="invalid_organization",
        )
    memberships = Membership.objects.filter(user=user).select_related("organization")
    if api_key is not None:
        if requested and not organization_named(api_key.organization, requested):
            raise AuthenticationFailed(
                f"This API key belongs to another organization than {requested!r}: send no "
                f"{ORGANIZATION_HEADER} header, or the key's own organization.",
                code="invalid_organization",
            )
        memberships = memberships.filter(organization=api_key.organization)
    memberships = memberships.order_by("-is_default", "created_at", "id")
    if api_key is None and requested:
        membership = _named(memberships, requested, "organization__")
    else:
        membership = memberships.first()
    if membership is not None:
        return ActingOrganization(membership.organization, membership.role)
    if user.is_superuser:
        if api_key is not None:
            organization: Organization | None = api_key.organization
        elif requested:
            organization = _named(Organization.objects.all(), requested, "")
        else:
            organization = Organization.objects.default()
        if organization is not None:
            return ActingOrganization(organization, Membership.Role.OWNER)
    if api_key is not None:
        raise AuthenticationFailed(
            "This API key's owner is no longer a member of its organization.", code="invalid_organization"
        )
    if requested:
        raise AuthenticationFailed(
            f"You are not a member of organization {requested!r} ({ORGANIZATION_HEADER}: the slug or id of an "
            "organization of yours, or none for your default one).",
            code="invalid_organization",
        )
    raise AuthenticationFailed("You are not a member of any organization.", code="invalid_organization")


def organization_named(organization: Organization, requested: str) -> bool:
    """Return True when ``requested`` (an ``OpenAI-Organization`` value) names ``organization``: its
    slug, or its id as ``/api/organizations/`` lists it (OpenAI's header carries an id)."""
    return requested in (organization.slug, str(organization.pk))


def _organization_id(requested: str) -> int | None:
    """Return the organization id ``requested`` may be (digits, within a bigint), else None."""
    if requested.isascii() and requested.isdigit() and len(requested) < 19:  # < 2**63
        return int(requested)
    return None


def _named(rows: QuerySet[Any], requested: str, prefix: str) -> Any:
    """Return the first of ``rows`` (memberships, or organizations: ``prefix`` is the path to the
    organization's fields) in the organization ``requested`` names, or None.

    A slug wins over an id: an organization whose slug is "42" is "42", whatever organization 42 is.
    One query; two for an id that is no slug.
    """
    found = rows.filter(**{f"{prefix}slug": requested}).first()
    organization_id = _organization_id(requested)
    if found is None and organization_id is not None:
        found = rows.filter(**{f"{prefix}pk": organization_id}).first()
    return found


class EmailNotVerified(AuthenticationFailed):
    """The account must verify its email before it may authenticate (HTTP 403 ``email_not_verified``).

    An ``AuthenticationFailed`` so every authentication path refuses it as a failed credential (a
    WebSocket closes with 4401), with a 403 where an HTTP status is answered: the credential is
    right, the account may not use it yet.
    """

    def __init__(self) -> None:
        super().__init__(
            "Verify your email address first: follow the link sent to it "
            "(POST /api/auth/email/verify/resend/ sends a new one).",
            code="email_not_verified",
        )
        self.status = 403
        self.type = error_type_for_status(403)


def user_authentication_check(*, user: User) -> None:
    """Raise unless ``user`` may authenticate, by any credential (password, JWT, API key).

    ``AuthenticationFailed`` (401 ``user_inactive``) for a deactivated account;
    ``EmailNotVerified`` (403 ``email_not_verified``) for an account that has not verified its
    email while ``settings.EMAIL_VERIFICATION_REQUIRED`` is on. Nothing else: a local password is
    not required (API keys, single sign-on).
    """
    if not user.is_active:
        raise AuthenticationFailed("This account is disabled.", code="user_inactive")
    if settings.EMAIL_VERIFICATION_REQUIRED and not user.email_verified:
        raise EmailNotVerified()


def api_key_authenticate(*, secret: str) -> APIKey:
    """Return the active ``APIKey`` (with its user loaded) whose secret is ``secret``.

    Updates ``last_used_at`` at most once per ``API_KEY_LAST_USED_RESOLUTION_SECONDS`` so
    authentication is not a write per request. Raises ``AuthenticationFailed`` for an unknown,
    revoked or expired key (``api_key_check_unexpired``), or an inactive user; ``EmailNotVerified``
    (403) for an unverified one (``user_authentication_check``). Sync: call through
    ``sync_to_async`` from async code.
    """
    try:
        api_key = APIKey.objects.select_related("user", "organization", "team").get(key_hash=hash_secret(secret))
    except APIKey.DoesNotExist:
        raise AuthenticationFailed("Incorrect API key provided.") from None
    if not api_key.is_active:
        raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
    user_authentication_check(user=api_key.user)
    now = timezone.now()
    api_key_check_unexpired(api_key, now=now)
    resolution = timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_SECONDS)
    if api_key.last_used_at is None or now - api_key.last_used_at >= resolution:
        api_key_last_used_update(api_key_id=api_key.pk, at=now)
        api_key.last_used_at = now
    return api_key


def team_list_restricting_models(*, user: User, api_key: APIKey | None, organization: Organization) -> QuerySet[Team]:
    """Return the teams whose ``allowed_models`` restrict what ``user`` (with ``api_key``, if any)
    may use in ``organization`` (``accounts.model_access``): a key assigned to a team (``APIKey.team``,
    a team-owned service key too) speaks for that team alone, so only its list applies; otherwise
    every team of the user there applies. Teams with an empty list impose nothing and are left out;
    none returned: no team restricts. One query.
    """
    teams = Team.objects.filter(organization=organization).exclude(allowed_models=[])
    if api_key is not None and api_key.team_id is not None:
        return teams.filter(pk=api_key.team_id)
    return teams.filter(memberships__user=user)


def _in_organization(objects: QuerySet[Any], *, actor: User, acting: ActingOrganization | None) -> QuerySet[Any]:
    """Return ``objects`` of the organization a request acts in (``acting``); all of them for the
    platform superuser, or when no organization applies (``acting`` None: the Django admin)."""
    if acting is None or actor.is_superuser:
        return objects
    return objects.filter(organization=acting.organization)


def administers(actor: User, acting: ActingOrganization | None) -> bool:
    """Return True when ``actor`` administers what it sees: the organization it acts in (owner,
    admin), or everything (the platform superuser, the ``admin`` role)."""
    return actor.is_admin or (acting is not None and acting.is_admin)


def api_key_list(*, user: User, acting: ActingOrganization | None = None) -> QuerySet[APIKey]:
    """Return the API keys ``user`` manages in the organization the request acts in (``acting``),
    newest first; revoked ones included, marked by ``revoked_at``: their own, and for the
    organization's owners and admins (``administers``) also its teams' keys (owned by a team's
    service user, ``APIKey.team``)."""
    keys = Q(user=user)
    if acting is not None and administers(user, acting):
        keys |= Q(user__service_team__organization=acting.organization)
    return _in_organization(
        APIKey.objects.filter(keys).select_related("team", "created_by", "user"), actor=user, acting=acting
    )


def usage_record_list(*, user: User, acting: ActingOrganization | None = None) -> QuerySet[UsageRecord]:
    """Return the usage records ``user`` may see, newest first, in the organization the request acts
    in (``acting``): its admins everyone's there, members their own."""
    records = UsageRecord.objects.select_related("api_key", "user").order_by("-created_at", "-id")
    records = _in_organization(records, actor=user, acting=acting)
    return records if administers(user, acting) else records.filter(user=user)


def usage_cost_total(*, user: User, organization: Organization, start_date: dt.date, end_date: dt.date) -> Decimal:
    """Return what ``user`` spent in ``organization`` from ``start_date`` (inclusive) to ``end_date``
    (exclusive), in US dollars.

    Days are midnights in ``settings.TIME_ZONE``; the sum is of ``UsageRecord.cost``. Only the
    organization the request acts in: usage is read per organization (README, "Organizations"), and
    its budgets count only its rows (``accounts.metering.budgets``).
    """
    tz = timezone.get_default_timezone()
    start = dt.datetime.combine(start_date, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(end_date, dt.time.min, tzinfo=tz)
    records = UsageRecord.objects.filter(
        user=user, organization=organization, created_at__gte=start, created_at__lt=end
    )
    return records.aggregate(total=Sum("cost"))["total"] or Decimal(0)


def usage_current_month(*, now: dt.datetime | None = None) -> tuple[dt.date, dt.date]:
    """Return ``(first day of this month, first day of next month)``: the current calendar month.

    The month is the one ``now`` (default: the current time) falls in, in ``settings.TIME_ZONE``;
    the end is exclusive, as ``usage_cost_total`` takes it.
    """
    today = timezone.localdate(now, timezone=timezone.get_default_timezone())
    start = today.replace(day=1)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def budget_monthly_limit_usd(
    *, user: User, api_key: APIKey | None, organization: Organization | None = None
) -> Decimal | None:
    """Return the tightest monthly US-dollar limit on what ``user`` may spend through ``api_key``, or None.

    The limit is the smallest ``limit_usd`` of the enabled monthly budgets (``Budget``) of every
    subject a request of the caller counts against, as ``llm.metering.reply_metering`` names them:
    its user, the key (when the caller used one) and the key's team (``APIKey.team``), and
    ``organization`` (the one the request acts in). Every budget applies to a request, so the
    tightest one is what the caller can spend this month. Daily, weekly and lifetime budgets are
    not a month's limit and are left out. None when no monthly budget applies; callers then
    report their documented fallback (``/dashboard/billing/subscription``:
    ``settings.OPENAI_BILLING_HARD_LIMIT_USD``). One query.
    """
    Kind = Budget.SubjectKind
    subjects = Q(subject_kind=Kind.USER, subject_id=user.pk)
    if api_key is not None:
        subjects |= Q(subject_kind=Kind.API_KEY, subject_id=api_key.pk)
        if api_key.team_id is not None:
            subjects |= Q(subject_kind=Kind.TEAM, subject_id=api_key.team_id)
    if organization is not None:
        subjects |= Q(subject_kind=Kind.ORGANIZATION, subject_id=organization.pk)
    budgets = Budget.objects.filter(subjects, enabled=True, period=Budget.Period.MONTHLY)
    limit: Decimal | None = budgets.aggregate(limit=Min("limit_usd"))["limit"]
    return limit


# --- Usage summary ----------------------------------------------------------------------------

# What ``usage_summary`` can group by, in the order rows are sorted: the value of ``group_by`` ->
# the fields each group's row carries.
USAGE_SUMMARY_GROUPS: dict[str, tuple[str, ...]] = {
    "day": ("day",),
    "model": ("model_name",),
    "user": ("user_id", "username"),
    "api_key": ("api_key_id", "api_key_name", "api_key_prefix"),
}
# The longest range one summary may cover, in days (a year, leap day included).
USAGE_SUMMARY_MAX_DAYS = 366
# The sums and counts of every summary row as the API names them, in the order the CSV export writes them.
USAGE_SUMMARY_METRICS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cost",
    "requests",
    "refused_requests",
)


def usage_summary_columns(*, group_by: Sequence[str]) -> tuple[str, ...]:
    """Return the keys of a ``usage_summary`` row for ``group_by``: the groups' fields, then the metrics."""
    keys = [key for name, group_keys in USAGE_SUMMARY_GROUPS.items() if name in group_by for key in group_keys]
    return (*keys, *USAGE_SUMMARY_METRICS)


def _usage_metrics() -> dict[str, Any]:
    # Sums of a field are named apart from it: an annotation may not take a model field's name.
    refused = Q(finish_status=REFUSED)
    return {
        "prompt_tokens_sum": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens_sum": Coalesce(Sum("completion_tokens"), 0),
        "total_tokens_sum": Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0),
        "cached_tokens_sum": Coalesce(Sum("cached_tokens"), 0),
        "cache_creation_tokens_sum": Coalesce(Sum("cache_creation_tokens"), 0),
        "reasoning_tokens_sum": Coalesce(Sum("reasoning_tokens"), 0),
        "cost_sum": Coalesce(
            Sum("cost"), Value(Decimal(0)), output_field=DecimalField(max_digits=20, decimal_places=8)
        ),
        "requests": Count("id", filter=~refused),
        "refused_requests": Count("id", filter=refused),
    }


def usage_summary(
    *,
    actor: User | None,
    start_date: dt.date,
    end_date: dt.date,
    group_by: Sequence[str] = ("day",),
    user_id: int | None = None,
    api_key_id: int | None = None,
    model_name: str | None = None,
    acting: ActingOrganization | None = None,
) -> QuerySet[Any, dict[str, Any]] | list[dict[str, Any]]:
    """Return usage summed per group: one dict per (day, model, user, API key) that ``group_by`` names.

    ``actor`` sees their own records; an admin sees everyone's and may pick one user with
    ``user_id``; both within the organization the request acts in (``acting``; the platform
    superuser: every organization's). ``actor`` None: everyone's, for an interface that checked
    its own permission (the Django admin's ``view_usagerecord``). The range is ``start_date`` (inclusive) to
    ``end_date`` (exclusive), days in ``settings.TIME_ZONE``; ``group_by`` is a subset of
    ``USAGE_SUMMARY_GROUPS`` (empty: one row of totals, present even when nothing was used).
    ``api_key_id`` and ``model_name`` narrow the records further.

    Each row: the group's fields (``day`` a ``date``; ``model_name``; ``user_id``, ``username``;
    ``api_key_id``, ``api_key_name``, ``api_key_prefix``, all None for usage without a key) and the
    metrics: ``prompt_tokens_sum``, ``completion_tokens_sum``, ``total_tokens_sum``, the breakdown
    ``cached_tokens_sum``, ``cache_creation_tokens_sum`` (of the prompt tokens: read from / written to
    the provider's prompt cache) and ``reasoning_tokens_sum`` (of the completion tokens), ``cost_sum`` (US
    dollars, ``Decimal``), ``requests`` (records not refused: completed, stopped or failed replies)
    and ``refused_requests`` (records with ``finish_status`` ``refused``: turned away by a budget or a
    rate limit, 0 tokens); ``UsageSummaryRowOutputSerializer`` names the sums without ``_sum``.
    Sorted by the group fields, in ``USAGE_SUMMARY_GROUPS`` order. Summed in the database (one
    ``GROUP BY`` query; a paginated caller adds its ``COUNT``), using the ``(user, created_at)``
    index for one user and the ``created_at`` index for everyone.

    Raises ``ApplicationError`` 403 ``permission_denied`` (``param`` ``user``) when a member asks
    for another user's usage, and 400 (``param`` ``group_by`` / ``end_date``) for an unknown group
    or a range that is reversed or longer than ``USAGE_SUMMARY_MAX_DAYS``.
    """
    unknown = [name for name in group_by if name not in USAGE_SUMMARY_GROUPS]
    if unknown:
        raise ApplicationError(
            f"Unknown group_by {', '.join(unknown)}: use any of {', '.join(USAGE_SUMMARY_GROUPS)}.",
            code="invalid",
            param="group_by",
        )
    if end_date < start_date:
        raise ApplicationError("end_date must not be before start_date.", code="invalid", param="end_date")
    if (end_date - start_date).days > USAGE_SUMMARY_MAX_DAYS:
        raise ApplicationError(
            f"The range may cover at most {USAGE_SUMMARY_MAX_DAYS} days; ask for several ranges.",
            code="invalid",
            param="end_date",
        )
    if actor is not None and not administers(actor, acting):
        if user_id is not None and user_id != actor.pk:
            raise ApplicationError(
                "Members may see only their own usage.", code="permission_denied", status=403, param="user"
            )
        user_id = actor.pk
    tz = timezone.get_default_timezone()
    records = UsageRecord.objects.filter(
        created_at__gte=dt.datetime.combine(start_date, dt.time.min, tzinfo=tz),
        created_at__lt=dt.datetime.combine(end_date, dt.time.min, tzinfo=tz),
    )
    if actor is not None:
        records = _in_organization(records, actor=actor, acting=acting)
    if user_id is not None:
        records = records.filter(user_id=user_id)
    if api_key_id is not None:
        records = records.filter(api_key_id=api_key_id)
    if model_name is not None:
        records = records.filter(model_name=model_name)
    tz_day = TruncDate("created_at", tzinfo=tz)
    # Row keys that are not UsageRecord fields (values() refuses an alias that shadows a field).
    joined = {"day": tz_day, "username": F("user__username")}
    joined |= {"api_key_name": F("api_key__name"), "api_key_prefix": F("api_key__prefix")}
    keys = usage_summary_columns(group_by=group_by)[: -len(USAGE_SUMMARY_METRICS)]
    if not keys:
        # values() without fields would group per record: aggregate() sums them all, into one row.
        return [records.aggregate(**_usage_metrics())]
    fields = [key for key in keys if key not in joined]
    expressions = {key: joined[key] for key in keys if key in joined}
    rows = records.order_by().values(*fields, **expressions).annotate(**_usage_metrics())
    return rows.order_by(*keys)


def user_list(*, actor: User, acting: ActingOrganization | None = None) -> QuerySet[User]:
    """Return the users an admin ``actor`` may list, oldest first: the members of the organization
    the request acts in (``acting``); every user for the platform superuser.

    Raises ``ApplicationError`` 403 ``permission_denied`` when ``actor`` is not an admin.
    """
    if actor is not None and not administers(actor, acting):
        raise ApplicationError("Only admins may list users.", code="permission_denied", status=403)
    users = User.objects.order_by("date_joined", "id")
    if acting is None or actor.is_superuser:
        return users
    return users.filter(memberships__organization=acting.organization)


def budget_list_own(*, user: User) -> QuerySet[Budget]:
    """Return the budgets that limit ``user``: on the user, on each of the user's API keys, on the
    teams those keys are assigned to, and on the organizations the user is a member of."""
    keys = APIKey.objects.filter(user=user)
    return Budget.objects.filter(
        Q(subject_kind=Budget.SubjectKind.USER, subject_id=user.pk)
        | Q(subject_kind=Budget.SubjectKind.API_KEY, subject_id__in=keys.values("pk"))
        | Q(subject_kind=Budget.SubjectKind.TEAM, subject_id__in=keys.filter(team__isnull=False).values("team_id"))
        | Q(
            subject_kind=Budget.SubjectKind.ORGANIZATION,
            subject_id__in=Membership.objects.filter(user=user).values("organization_id"),
        )
    )


def budget_list(*, user: User, acting: ActingOrganization | None = None) -> QuerySet[Budget]:
    """Return the budgets ``user`` may see in the organization the request acts in (``acting``):
    every budget there for its admins, their own (``budget_list_own``) for members."""
    budgets = Budget.objects.all() if administers(user, acting) else budget_list_own(user=user)
    return _in_organization(budgets, actor=user, acting=acting)


def budget_get_for(*, user: User, budget_id: int, acting: ActingOrganization | None = None) -> Budget:
    """Return budget ``budget_id`` if ``user`` may see it; raises ``NotFoundError`` (404) otherwise.

    With ``acting``, another organization's budget is also audited (``access.denied``,
    ``accounts.audit.audit_access_denied``); another member's budget in the same organization is not.
    """
    audited: AbstractContextManager[None] = (
        nullcontext()
        if acting is None
        else audit_denied_lookup(
            actor=user,
            organization=acting.organization,
            model=Budget,
            lookup=Q(pk=budget_id),
            code="budget_not_found",
        )
    )
    with audited:
        try:
            return budget_list(user=user, acting=acting).get(pk=budget_id)
        except (Budget.DoesNotExist, ValueError, TypeError):
            raise NotFoundError("Budget not found.", code="budget_not_found") from None


# --- Audit log --------------------------------------------------------------------------------


def audit_event_list(*, actor: User, acting: ActingOrganization) -> QuerySet[AuditEvent]:
    """Return the audit events ``actor`` may read, newest first: platform admins (superusers and the
    ``admin`` role) every event, those of no organization included (a failed login of an unknown
    name); an admin of the organization the request acts in (``acting``) that organization's, except
    ``access.denied``: those rows name objects of other organizations that answered 404, so an
    organization's admin who probed ids or slugs would learn from their own log which exist
    elsewhere. They are the platform admins' to read.

    Raises ``ApplicationError`` 403 ``permission_denied`` when ``actor`` administers neither.
    """
    events = AuditEvent.objects.order_by("-created_at", "-id")
    if actor.is_admin:
        return events
    if not acting.is_admin:
        raise ApplicationError("Only admins may read the audit log.", code="permission_denied", status=403)
    return events.filter(organization=acting.organization).exclude(action=AuditEvent.Action.ACCESS_DENIED)


# Columns of the audit log's CSV export, in order; ``before`` and ``after`` are JSON text.
AUDIT_EVENT_CSV_COLUMNS = (
    "id",
    "created_at",
    "action",
    "actor_id",
    "actor_username",
    "organization_id",
    "object_type",
    "object_id",
    "object_repr",
    "ip",
    "before",
    "after",
)


def audit_event_csv_rows(events: Iterable[AuditEvent]) -> list[dict[str, Any]]:
    """Return one flat dict per event, keyed by ``AUDIT_EVENT_CSV_COLUMNS`` (JSON fields as compact JSON text)."""
    return [
        {
            "id": event.pk,
            "created_at": event.created_at.isoformat(),
            "action": event.action,
            "actor_id": event.actor_id,
            "actor_username": event.actor_username,
            "organization_id": event.organization_id,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "object_repr": event.object_repr,
            "ip": event.ip,
            "before": None if event.before is None else json.dumps(event.before, sort_keys=True),
            "after": None if event.after is None else json.dumps(event.after, sort_keys=True),
        }
        for event in events
    ]
