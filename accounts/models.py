"""Users, roles, API keys, usage records and budgets."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from .metering.types import RateLimits


class RateLimited(models.Model):
    """Rate-limit fields of a metering subject (a user, an API key, a model); empty means no limit.

    Enforced across all server processes by ``accounts.metering`` (https://platform.openai.com/docs/guides/rate-limits
    for the meaning of each).
    """

    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="requests per minute; empty for no limit"
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt plus completion tokens per minute; empty for no limit"
    )
    concurrent_streams = models.PositiveIntegerField(
        null=True, blank=True, help_text="replies streaming at once; empty for no limit"
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

    def __str__(self) -> str:
        return self.get_username()

    @property
    def is_admin(self) -> bool:
        """Return True for the ``admin`` role and for superusers."""
        return self.role == self.Role.ADMIN or self.is_superuser


class APIKey(RateLimited):
    """A long-lived credential (``sk-...``) for clients that cannot refresh a JWT (NextChat, SDKs).

    Only the SHA-256 digest of the secret is stored; the secret is shown once, at creation.
    ``prefix`` (the first characters of the secret) lets a user tell keys apart.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @property
    def is_active(self) -> bool:
        """Return True until the key is revoked."""
        return self.revoked_at is None


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
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records")
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records")
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
    belong to a user or an API key today, and teams or organizations become new kinds (a new
    ``SubjectKind`` choice, the metering subject the planner adds for it, and the usage rows it
    sums, in ``accounts.metering.budgets.SUBJECT_USAGE_FIELDS``) with no new mechanism. Several
    budgets may apply to one request (its key's and its user's); every one must allow it.

    ``period``: calendar days, ISO weeks (from Monday) or months in ``settings.TIME_ZONE``, or the
    subject's whole lifetime. Spend in a period is the sum of ``UsageRecord.cost`` of the subject's
    records created in it (the ledger); ``accounts.metering.budgets`` keeps it in counters that
    requests reserve against, and reconciles them from those records.
    """

    class SubjectKind(models.TextChoices):
        USER = "user", "User"
        API_KEY = "api_key", "API key"

    class Period(models.TextChoices):
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"
        LIFETIME = "lifetime", "Lifetime"

    name = models.CharField(max_length=100)
    subject_kind = models.CharField(max_length=16, choices=SubjectKind.choices)
    subject_id = models.PositiveBigIntegerField(help_text="id of the user or API key the budget limits")
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
        """Refuse a subject that does not exist (the admin's form and the services call this)."""
        subjects: dict[str, type[models.Model]] = {self.SubjectKind.USER: User, self.SubjectKind.API_KEY: APIKey}
        subject_model = subjects.get(self.subject_kind)
        if subject_model is not None and self.subject_id is not None:
            if not subject_model._default_manager.filter(pk=self.subject_id).exists():
                raise ValidationError({"subject_id": f"No {self.get_subject_kind_display()} has id {self.subject_id}."})

    @property
    def subject_label(self) -> str:
        """Return who the budget limits, for people: a username, or an API key's name and owner."""
        if self.subject_kind == self.SubjectKind.USER:
            user = User.objects.filter(pk=self.subject_id).only("username").first()
            return user.username if user else f"user {self.subject_id} (deleted)"
        key = APIKey.objects.filter(pk=self.subject_id).select_related("user").first()
        return f"{key.name} ({key.prefix}...) of {key.user.username}" if key else f"API key {self.subject_id} (deleted)"
