"""Users, roles, API keys and usage records."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractUser
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
    """A person who chats. ``role`` decides what they may see: admins everything, members their own."""

    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    email = models.EmailField("email address", blank=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)

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
    ``cost`` is in US dollars: ``tokens * price_per_million / 1_000_000`` for input and output.
    ``token_source`` says where the token counts came from: the provider's usage report
    (``provider``), the model's tokenizer when the provider reported none, e.g. for a stopped or
    cut stream (``counted``), or a characters / 4 estimate for a model without a known tokenizer
    (``estimated``): ``llm.tokens``.
    """

    class TokenSource(models.TextChoices):
        PROVIDER = "provider", "Provider"
        COUNTED = "counted", "Counted (tokenizer)"
        ESTIMATED = "estimated", "Estimated"

    class Source(models.TextChoices):
        CONVERSATION = "conversation", "Conversation"
        OPENAI_API = "openai_api", "OpenAI-compatible API"

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
    cost = models.DecimalField(max_digits=16, decimal_places=8, default=Decimal("0"))
    token_source = models.CharField(max_length=16, choices=TokenSource.choices, default=TokenSource.PROVIDER)
    finish_status = models.CharField(max_length=16)
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
