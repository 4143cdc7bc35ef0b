"""Organizations, teams and memberships; users, API keys, usage records and budgets."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from .metering.types import RateLimits

RATE_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")
# A limit of 0 admits nothing, yet its 429 said "try again in 1s": clients that honour Retry-After
# retried for ever. Empty is "no limit"; a subject to block is deactivated, revoked or disabled.
RATE_LIMIT_ZERO_MESSAGE = "0 would refuse every request; leave it empty for no limit."
_RATE_LIMIT_VALIDATORS = [MinValueValidator(1, message=RATE_LIMIT_ZERO_MESSAGE)]

# Every concrete ``RateLimited`` model lists these in its ``Meta.constraints`` (a child's own Meta
# replaces its abstract parent's): the same rule for rows written without a form.
RATE_LIMIT_CONSTRAINTS: list[models.BaseConstraint] = [
    models.CheckConstraint(
        condition=models.Q(**{f"{field}__gte": 1}) | models.Q(**{f"{field}__isnull": True}),
        name=f"%(app_label)s_%(class)s_{field}_not_zero",
        violation_error_message=RATE_LIMIT_ZERO_MESSAGE,
    )
    for field in RATE_LIMIT_FIELDS
]


class RateLimited(models.Model):
    """Rate-limit fields of a metering subject (a user, an API key, a model); empty means no limit.

    Enforced across all server processes by ``accounts.metering`` (https://platform.openai.com/docs/guides/rate-limits
    for the meaning of each). A limit is at least 1 (``RATE_LIMIT_CONSTRAINTS``).
    """

    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=_RATE_LIMIT_VALIDATORS, help_text="requests per minute; empty for no limit"
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=_RATE_LIMIT_VALIDATORS,
        help_text="prompt plus completion tokens per minute; empty for no limit",
    )
    concurrent_streams = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=_RATE_LIMIT_VALIDATORS,
        help_text="replies streaming at once; empty for no limit",
    )

    class Meta:
        abstract = True

    @property
    def rate_limits(self) -> RateLimits:
        """Return the limits as the metering subject's ``RateLimits``."""
        return RateLimits(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            concurrent_streams=self.concurrent_streams,
        )


DEFAULT_ORGANIZATION_SLUG = "default"

ALLOWED_MODELS_HELP = (
    "model and alias names members and keys may use (a model's name allows its aliases); empty for all"
)


def allowed_models_clean(names: object) -> list[str]:
    """Return ``names`` (an ``allowed_models`` value; None: empty) as a list without repeats, in order.

    Raises ``ValidationError`` (on ``allowed_models``) unless it is a list of names of existing
    models or aliases, naming the unknown ones. The ``llm`` models are looked up through the app
    registry: ``accounts`` sits below ``llm`` and does not import it (README, "Architecture").
    """
    if names is None:  # the admin's emptied JSON field
        return []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValidationError({"allowed_models": 'Give a JSON list of model or alias names, e.g. ["gpt-4o", "fast"].'})
    names = list(dict.fromkeys(names))
    known: set[str] = set()
    for model_name in ("LLMModel", "ModelAlias"):
        rows = apps.get_model("llm", model_name)._default_manager.filter(name__in=names)
        known.update(rows.values_list("name", flat=True))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValidationError({"allowed_models": f"No model or alias is called {', '.join(map(repr, unknown))}."})
    return names


class OrganizationQuerySet(models.QuerySet["Organization"]):
    def default(self) -> Organization:
        """Return the default organization (slug ``default``), creating it the first time.

        Every installation has it: single-tenant ones never need another. Users join it when they
        are created (``accounts.signals``) and objects created without an organization belong to it.
        """
        organization, _ = self.get_or_create(slug=DEFAULT_ORGANIZATION_SLUG, defaults={"name": "Default organization"})
        return organization


class Organization(RateLimited):
    """A tenant: its members, teams, API keys, conversations, usage and budgets are its own.

    Every lookup of those objects is scoped to the organization a request acts in; another
    organization's object does not exist for it (404). The platform superuser sees across them.
    Every request acting in it counts against its rate limits and budgets (metering subject ``organization``).
    """

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=64, unique=True, help_text="short name, sent as the OpenAI-Organization header")
    created_at = models.DateTimeField(auto_now_add=True)
    # Model access (``accounts.model_access``): what its members and keys may use.
    allowed_models = models.JSONField(default=list, blank=True, help_text=ALLOWED_MODELS_HELP)

    objects = OrganizationQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            *RATE_LIMIT_CONSTRAINTS,
            # "Acme" and "acme" would be two tenants a person cannot tell apart in a header or a list.
            models.UniqueConstraint(
                Lower("slug"),
                name="organization_slug_unique_ignoring_case",
                violation_error_message="An organization with this slug, ignoring case, already exists.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Refuse an ``allowed_models`` naming no model or alias (the admin's form calls this)."""
        self.allowed_models = allowed_models_clean(self.allowed_models)


def default_organization_id() -> int:
    """Return the default organization's id: the ``organization`` of objects created without one.

    Reads only the id (migrations that make the foreign keys required call it too, on the model of
    whatever code runs them: it must not select columns a later migration adds).
    """
    organization_id = Organization.objects.filter(slug=DEFAULT_ORGANIZATION_SLUG).values_list("pk", flat=True).first()
    return organization_id if organization_id is not None else Organization.objects.default().pk


class Team(RateLimited):
    """A group of an organization's members (e.g. to share model access and a budget).

    Requests made with a key assigned to the team (``APIKey.team``) count against its rate limits
    and budgets (metering subject ``team``). A team may own keys through its service user
    (``User.service_team``), which outlive the person who created them.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="teams")
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    # Model access (``accounts.model_access``): narrows the organization's for the team's members.
    allowed_models = models.JSONField(default=list, blank=True, help_text=ALLOWED_MODELS_HELP)

    class Meta:
        ordering = ["organization", "name", "id"]
        constraints = [
            *RATE_LIMIT_CONSTRAINTS,
            models.UniqueConstraint(fields=["organization", "slug"], name="team_slug_unique_in_organization"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.organization})"

    def clean(self) -> None:
        """Refuse an ``allowed_models`` naming no model or alias (the admin's form calls this)."""
        self.allowed_models = allowed_models_clean(self.allowed_models)


class User(AbstractUser, RateLimited):
    """A person who chats. ``role`` decides what they may see: admins everything, members their own.

    A local password is optional (``set_unusable_password``): API keys work whatever the password,
    and a single sign-on backend would authenticate such users (README "Single sign-on").
    """

    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    email = models.EmailField("email address", blank=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    # False only for an account registered while EMAIL_VERIFICATION_REQUIRED was on, until it follows
    # the link sent to its email (accounts.lifecycle); accounts an operator makes count as verified.
    email_verified = models.BooleanField(
        default=True, help_text="False while a self-registered account has not followed its verification link"
    )
    # Set only on a team's service (bot) user: the owner of the team's keys (accounts.services.team_service_user).
    service_team = models.OneToOneField(
        Team,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="service_user",
        help_text="set on a team's service user, which owns the team's keys; it cannot log in",
    )

    class Meta(AbstractUser.Meta):
        constraints = RATE_LIMIT_CONSTRAINTS

    # Not a field: False on an unsaved user keeps the post_save hook (``AccountsConfig``) from making
    # it a member of the default organization: an invited account joins the inviting one instead.
    joins_default_organization = True

    def __str__(self) -> str:
        return self.get_username()

    @property
    def is_admin(self) -> bool:
        """Return True for the ``admin`` role and for superusers."""
        return self.role == self.Role.ADMIN or self.is_superuser

    @property
    def is_service_account(self) -> bool:
        """Return True for a team's service user (``service_team``): not a person."""
        return self.service_team_id is not None


class Membership(models.Model):
    """A user's membership of an organization, with their role in it.

    Roles: ``owner`` (everything, including the organization's owners), ``admin`` (members, teams,
    keys, budgets and usage of the organization), ``member`` (chats; their own keys, conversations
    and usage), ``viewer`` (reads their own conversations and usage; cannot chat or create).
    A user may belong to several organizations; ``is_default`` marks the one a request acts in when
    it names none (at most one per user).
    """

    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"
        VIEWER = "viewer", "Viewer"

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization", "user"]
        constraints = [
            models.UniqueConstraint(fields=["user", "organization"], name="membership_unique"),
            models.UniqueConstraint(
                fields=["user"], condition=models.Q(is_default=True), name="membership_one_default_per_user"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"

    @property
    def is_admin(self) -> bool:
        """Return True for the organization's owners and admins."""
        return self.role in (self.Role.OWNER, self.Role.ADMIN)


class TeamMembership(models.Model):
    """A user's membership of a team (they must be a member of the team's organization)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="team_memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["team", "user"]
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="team_membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team}"


class Invitation(models.Model):
    """An invitation of an email address to join an organization, with a role and teams.

    The link emailed to the address carries a signed token (``django.core.signing``) that names
    this row; the token itself is never stored. It may be accepted once, until ``expires_at``,
    unless revoked (``accounts.organizations.services``).
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Membership.Role.choices, default=Membership.Role.MEMBER)
    teams = models.ManyToManyField(Team, blank=True, related_name="+", help_text="teams the new member joins")
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["organization", "email"])]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization} ({self.role})"

    def is_pending(self, now: datetime) -> bool:
        """Return True while the invitation may still be accepted at ``now``."""
        return self.accepted_at is None and self.revoked_at is None and self.expires_at > now


def api_key_default_scopes() -> list[str]:
    """Return every scope: what a key gets unless its creator narrows it (and what existing keys got)."""
    return list(APIKey.Scope.values)


# Who owns an API key: "user" (the person who has it) or "team" (the team's service user).
API_KEY_OWNERS = ("user", "team")


class APIKey(RateLimited):
    """A long-lived credential (``sk-...``) for clients that cannot refresh a JWT (NextChat, SDKs).

    Only the SHA-256 digest of the secret is stored; the secret is shown once, at creation and at
    each rotation (which replaces ``key_hash`` and ``prefix`` on the same row).
    ``prefix`` (the first characters of the secret) lets a user tell keys apart.

    Restrictions, checked wherever the key authenticates (``accounts.selectors``, ``accounts.scopes``,
    ``llm.selectors.enabled_model_get_for``): ``expires_at`` (None: never), after which the key is
    refused with a 401; ``allowed_models``, the model and alias names it may use (empty: all; a
    model's name also allows its aliases); ``scopes``, a subset of ``Scope`` (``chat``: inference,
    ``read``: GET usage, history, models, billing, ``admin``: managing keys and budgets).

    ``team``: the team the key is assigned to; its requests count against the team's rate limits
    and budgets too. A team-owned key (a service key) belongs to the team's service user
    (``user.service_team == team``) and keeps working whatever becomes of ``created_by``, the person
    who created it (None once they are deleted).
    """

    class Scope(models.TextChoices):
        CHAT = "chat", "Chat (inference)"
        READ = "read", "Read (usage, history, models, billing)"
        ADMIN = "admin", "Admin (keys, budgets)"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="api_keys", default=default_organization_id
    )
    team = models.ForeignKey(
        Team,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="api_keys",
        help_text="the team the key's requests also count against (rate limits, budgets); deleting it deletes the key",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="created_api_keys",
        help_text="who created the key (for a team-owned key, the person; its owner is the team's service user)",
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="the key is refused from this moment on; empty for never"
    )
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="model and alias names the key may use; empty for all"
    )
    scopes = models.JSONField(default=api_key_default_scopes, help_text="what the key may do: any of chat, read, admin")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"
        constraints = RATE_LIMIT_CONSTRAINTS

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @property
    def is_active(self) -> bool:
        """Return True until the key is revoked."""
        return self.revoked_at is None

    def is_expired(self, now: datetime) -> bool:
        """Return True when ``expires_at`` is set and not after ``now`` (an aware datetime)."""
        return self.expires_at is not None and self.expires_at <= now

    def has_scope(self, scope: str) -> bool:
        """Return True when ``scope`` (an ``APIKey.Scope`` value) is among the key's ``scopes``; ``admin``
        includes ``read`` (managing keys and budgets means seeing them, as OpenAI's write permissions
        include read)."""
        return scope in self.scopes or (scope == self.Scope.READ and self.Scope.ADMIN in self.scopes)


class UsageRecord(models.Model):
    """Tokens and cost of one finished reply: completed, stopped, or failed (0 tokens before any output).

    ``request_id`` is unique: a redelivered accounting task hits the constraint and writes nothing.
    ``prompt_tokens`` counts every input token and ``completion_tokens`` every output token; of them,
    ``cached_tokens`` were read from the provider's prompt cache, ``cache_creation_tokens`` written
    to it, and ``reasoning_tokens`` spent thinking (0 when the provider did not report them).
    ``cost`` is in US dollars, at the model's prices when the reply started: ``accounts.pricing.token_cost``.
    ``token_source`` says where the token counts came from: the provider's usage report
    (``provider``), the model's tokenizer when the provider reported none, e.g. for a stopped or
    cut stream (``counted``), or a characters / 4 estimate for a model without a known tokenizer
    (``estimated``): ``llm.tokens``. ``deployment`` names the deployment that served it (``llm.routing``).
    """

    class TokenSource(models.TextChoices):
        PROVIDER = "provider", "Provider"
        COUNTED = "counted", "Counted (tokenizer)"
        ESTIMATED = "estimated", "Estimated"

    class Source(models.TextChoices):
        CONVERSATION = "conversation", "Conversation"
        OPENAI_API = "openai_api", "OpenAI-compatible API"
        ANTHROPIC_API = "anthropic_api", "Anthropic Messages API"
        OPENAI_RESPONSES = "openai_responses", "OpenAI Responses API"

    request_id = models.CharField(max_length=64, unique=True)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="usage_records", default=default_organization_id
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records")
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records")
    team = models.ForeignKey(
        Team,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_records",
        help_text="the team of the API key used, if any (a team budget's spend is the sum of its rows)",
    )
    model = models.ForeignKey("llm.LLMModel", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_name = models.CharField(max_length=200)
    message = models.ForeignKey(
        "conversations.Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    source = models.CharField(max_length=16, choices=Source.choices)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0, help_text="of the prompt tokens: read from the prompt cache")
    cache_creation_tokens = models.PositiveIntegerField(
        default=0, help_text="of the prompt tokens: written to the prompt cache"
    )
    reasoning_tokens = models.PositiveIntegerField(default=0, help_text="of the completion tokens: spent reasoning")
    cost = models.DecimalField(max_digits=16, decimal_places=8, default=Decimal("0"))
    token_source = models.CharField(max_length=16, choices=TokenSource.choices, default=TokenSource.PROVIDER)
    finish_status = models.CharField(max_length=16)
    deployment = models.CharField(
        max_length=320,
        blank=True,
        default="",
        help_text="the deployment that served the reply: <provider name>/<upstream model id>",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "created_at"])]

    def __str__(self) -> str:
        return f"{self.model_name}: {self.prompt_tokens}+{self.completion_tokens} tokens"

    @property
    def total_tokens(self) -> int:
        """Return prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class Budget(models.Model):
    """A spending limit in US dollars (optionally also in tokens) over a period, for one subject.

    The subject is a ``subject_kind`` and a row id (``subject_id``), not a foreign key: a budget may
    belong to a user, an API key, a team (the requests of keys assigned to it) or an organization
    (every request acting in it); a new kind is a new ``SubjectKind`` choice, the metering subject
    the planner adds for it, and the usage rows it sums, in
    ``accounts.metering.budgets.SUBJECT_USAGE_FIELDS``, with no new mechanism. Several budgets may
    apply to one request (its key's, its user's, its team's, its organization's); every one must allow it.

    ``period``: calendar days, ISO weeks (from Monday) or months in ``settings.TIME_ZONE``, or the
    subject's whole lifetime. Spend in a period is the sum of ``UsageRecord.cost`` of the subject's
    records created in it (the ledger); ``accounts.metering.budgets`` keeps it in counters that
    requests reserve against, and reconciles them from those records.
    """

    class SubjectKind(models.TextChoices):
        USER = "user", "User"
        API_KEY = "api_key", "API key"
        TEAM = "team", "Team"
        ORGANIZATION = "organization", "Organization"

    class Period(models.TextChoices):
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"
        LIFETIME = "lifetime", "Lifetime"

    name = models.CharField(max_length=100)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="budgets", default=default_organization_id
    )
    subject_kind = models.CharField(max_length=16, choices=SubjectKind.choices)
    subject_id = models.PositiveBigIntegerField(
        help_text="id of the user, API key, team or organization the budget limits"
    )
    period = models.CharField(max_length=16, choices=Period.choices, default=Period.MONTHLY)
    limit_usd = models.DecimalField(
        "limit (US dollars)",
        max_digits=16,
        decimal_places=8,
        validators=[MinValueValidator(Decimal(0))],
        help_text="most the subject may spend per period, in US dollars",
    )
    token_limit = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="most prompt plus completion tokens per period; empty for no limit"
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["subject_kind", "subject_id", "id"]
        indexes = [models.Index(fields=["subject_kind", "subject_id"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_period_display().lower()}, ${self.limit_usd.normalize():f})"

    def clean(self) -> None:
        """Refuse a subject that does not exist or is not the budget's organization's (the admin's form
        and the services call this): a user must be its member, a key or a team its own, an
        organization the budget's own. Another organization's subject reads as a missing one.

        Only a new or changed subject is checked: a budget whose subject has since gone (a key or
        team deleted, a member removed) can still be renamed, disabled or given another limit."""
        if self.subject_id is None or self.subject_kind not in self.SubjectKind.values:
            return
        organization_id: int = self.organization_id or default_organization_id()
        if (
            self.pk is not None
            and Budget.objects.filter(
                pk=self.pk,
                subject_kind=self.subject_kind,
                subject_id=self.subject_id,
                organization_id=organization_id,
            ).exists()
        ):
            return
        subjects: dict[str, models.QuerySet[Any]] = {
            self.SubjectKind.USER: User.objects.filter(memberships__organization_id=organization_id),
            self.SubjectKind.API_KEY: APIKey.objects.filter(organization_id=organization_id),
            self.SubjectKind.TEAM: Team.objects.filter(organization_id=organization_id),
            self.SubjectKind.ORGANIZATION: Organization.objects.filter(pk=organization_id),
        }
        if not subjects[self.subject_kind].filter(pk=self.subject_id).exists():
            kind = self.get_subject_kind_display().lower()
            raise ValidationError({"subject_id": f"No {kind} has id {self.subject_id} in this organization."})

    @property
    def subject_label(self) -> str:
        """Return who the budget limits, for people: a username, an API key's name and owner, a team or organization."""
        if self.subject_kind == self.SubjectKind.USER:
            user = User.objects.filter(pk=self.subject_id).only("username").first()
            return user.username if user else f"user {self.subject_id} (deleted)"
        if self.subject_kind == self.SubjectKind.TEAM:
            team = Team.objects.filter(pk=self.subject_id).first()
            return f"team {team.name}" if team else f"team {self.subject_id} (deleted)"
        if self.subject_kind == self.SubjectKind.ORGANIZATION:
            organization = Organization.objects.filter(pk=self.subject_id).first()
            return f"organization {organization.name}" if organization else f"organization {self.subject_id} (deleted)"
        key = APIKey.objects.filter(pk=self.subject_id).select_related("user").first()
        return f"{key.name} ({key.prefix}...) of {key.user.username}" if key else f"API key {self.subject_id} (deleted)"


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    """Audit rows are append-only: bulk updates and deletes are refused."""

    def update(self, **kwargs: object) -> int:
        raise TypeError("Audit events are append-only: they cannot be updated.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("Audit events are append-only: they cannot be deleted.")


class AuditEvent(models.Model):
    """One security-relevant event: who did what to which object, when, from where; append-only.

    Written only by ``accounts.audit`` (``audit_record``). ``actor`` is the user who acted (null for
    an anonymous failed login or a system task); ``actor_username`` is a snapshot of their username,
    or the username a failed login tried. ``object_type`` is the object's ``app_label.model_name``
    (``accounts.apikey``), ``object_id`` its primary key as text. ``before`` / ``after`` are JSON
    objects of the fields that changed (all audited fields on create and delete); secrets (provider
    keys, key hashes, passwords) appear only as ``"[set]"``, ``"[changed]"`` or ``""``.
    ``ip`` is the client as ``chatbackend.client_ip`` decides it.
    """

    class Action(models.TextChoices):
        LOGIN_SUCCEEDED = "login.succeeded", "Login succeeded"
        LOGIN_FAILED = "login.failed", "Login failed"
        API_KEY_CREATED = "api_key.created", "API key created"
        API_KEY_REVOKED = "api_key.revoked", "API key revoked"
        API_KEY_ROTATED = "api_key.rotated", "API key rotated"
        API_KEY_UPDATED = "api_key.updated", "API key's rate limits changed"
        API_KEY_DELETED = "api_key.deleted", "API key deleted"
        USER_CREATED = "user.created", "User created"
        USER_UPDATED = "user.updated", "User changed"
        USER_ROLE_CHANGED = "user.role_changed", "User role or permissions changed"
        USER_DELETED = "user.deleted", "User deleted"
        BUDGET_CREATED = "budget.created", "Budget created"
        BUDGET_UPDATED = "budget.updated", "Budget changed"
        BUDGET_DELETED = "budget.deleted", "Budget deleted"
        PROVIDER_CREATED = "provider.created", "Provider created"
        PROVIDER_UPDATED = "provider.updated", "Provider changed"
        PROVIDER_DELETED = "provider.deleted", "Provider deleted"
        LLM_MODEL_CREATED = "llm_model.created", "Model created"
        LLM_MODEL_UPDATED = "llm_model.updated", "Model changed"
        LLM_MODEL_DELETED = "llm_model.deleted", "Model deleted"
        MODEL_ALIAS_CREATED = "model_alias.created", "Model alias created"
        MODEL_ALIAS_UPDATED = "model_alias.updated", "Model alias changed"
        MODEL_ALIAS_DELETED = "model_alias.deleted", "Model alias deleted"
        DEPLOYMENT_CREATED = "deployment.created", "Deployment created"
        DEPLOYMENT_UPDATED = "deployment.updated", "Deployment changed"
        DEPLOYMENT_DELETED = "deployment.deleted", "Deployment deleted"
        ORGANIZATION_CREATED = "organization.created", "Organization created"
        ORGANIZATION_UPDATED = "organization.updated", "Organization changed"
        ORGANIZATION_DELETED = "organization.deleted", "Organization deleted"
        MEMBERSHIP_CREATED = "membership.created", "Member added to an organization"
        MEMBERSHIP_UPDATED = "membership.updated", "Member's role changed"
        MEMBERSHIP_DELETED = "membership.deleted", "Member removed from an organization"
        TEAM_CREATED = "team.created", "Team created"
        TEAM_UPDATED = "team.updated", "Team changed"
        TEAM_DELETED = "team.deleted", "Team deleted"
        TEAM_MEMBERSHIP_CREATED = "team_membership.created", "Member added to a team"
        TEAM_MEMBERSHIP_UPDATED = "team_membership.updated", "Team membership changed"
        TEAM_MEMBERSHIP_DELETED = "team_membership.deleted", "Member removed from a team"
        INVITATION_CREATED = "invitation.created", "Invitation sent"
        INVITATION_REVOKED = "invitation.revoked", "Invitation revoked"
        INVITATION_ACCEPTED = "invitation.accepted", "Invitation accepted"
        ACCESS_DENIED = "access.denied", "Access denied to another organization's object"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_username = models.CharField(max_length=150, blank=True)
    organization = models.ForeignKey(Organization, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["actor", "created_at"]),
            models.Index(fields=["object_type", "object_id"]),
            models.Index(fields=["organization", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action} by {self.actor_username or '-'}"

    def save(self, *args: object, **kwargs: object) -> None:
        """Insert the event; an event already saved cannot be changed (append-only)."""
        if not self._state.adding:
            raise TypeError("Audit events are append-only: they cannot be updated.")
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        """Refuse: audit events are append-only."""
        raise TypeError("Audit events are append-only: they cannot be deleted.")
