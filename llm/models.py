"""Providers (upstream LLM APIs) and the models users may pick."""

from __future__ import annotations

import re
from collections.abc import Collection
from decimal import Decimal
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from encrypted_fields.fields import EncryptedCharField

from accounts.models import RATE_LIMIT_CONSTRAINTS, RateLimited


def validate_base_url(value: str) -> None:
    """Require an ``http(s)://host[:port][/path]`` URL.

    Django's ``URLValidator`` rejects host names without a dot, yet ``http://ollama:11434/v1`` and
    ``http://vllm:8000/v1`` are how upstreams are reached inside docker compose or Kubernetes.
    """
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed IPv6 bracket (http://[::1/v1): no URL at all
        raise ValidationError(f"{value!r} is not an http(s) URL like https://api.openai.com/v1.") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query or parts.fragment:
        raise ValidationError(f"{value!r} is not an http(s) URL like https://api.openai.com/v1.")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValidationError(f"{value!r} has an invalid port.") from None


# Headers the adapter itself sets or that HTTP owns: extra headers may not replace them.
RESERVED_HEADERS = frozenset(
    (
        "authorization",
        "content-type",
        "content-length",
        "accept",
        "host",
        "transfer-encoding",
        "connection",
        "api-key",  # Azure OpenAI's key header
        "x-goog-api-key",  # Gemini's key header
        "x-api-key",  # Anthropic's key header (llm.providers.anthropic)
        "anthropic-version",  # and its API version
    )
)
# RFC 9110 field-name: a token (section 5.1); values: visible ASCII, spaces and tabs (section 5.5),
# so a value cannot smuggle a CR/LF into the request.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def validate_extra_headers(value: object) -> None:
    """Require a JSON object of header names to string values, none of them ``RESERVED_HEADERS``.

    Names are RFC 9110 tokens and values printable ASCII (no CR/LF), at most 50 headers.
    """
    if not isinstance(value, dict):
        raise ValidationError('Must be a JSON object of header names and values, e.g. {"X-Title": "Chat"}.')
    if len(value) > 50:
        raise ValidationError("At most 50 headers.")
    for name, header_value in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValidationError(f"{name!r} is not a valid HTTP header name.")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(f"{name!r} is set by the server and cannot be overridden.")
        if not isinstance(header_value, str) or not _HEADER_VALUE.fullmatch(header_value):
            raise ValidationError(f"The value of {name!r} must be a string of printable ASCII characters.")


# An API key travels in a request header (Authorization, api-key, x-api-key, x-goog-api-key).
_API_KEY = re.compile(r"[\x21-\x7e]*")


def validate_provider_api_key(value: str | None) -> None:
    """Require visible ASCII without spaces: a key must fit in a header value (RFC 9110 section 5.5).

    A CR or LF made every request to the provider a 500 (the HTTP client refuses header
    injection), and any other stray character (a zero-width space copied with the key) fails
    at the upstream. The message never repeats the key.

    Used by the admin's form field, not the model field: django-encrypted-model-fields' ``clean``
    sets a flag on the (shared) field and clears it only when no validator raises, so a model-level
    ValidationError on ``api_key`` would leave every later read of a key in the process undecrypted.
    """
    if value and not _API_KEY.fullmatch(value):
        raise ValidationError(
            "An API key is visible ASCII characters without spaces or line breaks; "
            "check for a stray character copied with it."
        )


def _validate_provider_kind(value: str) -> None:
    if value not in settings.LLM_PROVIDER_BACKENDS:
        raise ValidationError(f"Unknown provider kind {value!r}; known: {', '.join(settings.LLM_PROVIDER_BACKENDS)}.")


class Provider(models.Model):
    """An upstream LLM API: its kind (which adapter speaks to it), base URL, key, extra headers and timeouts.

    ``api_key`` is encrypted at rest (Fernet, key derived from SECRET_KEY and SALT_KEY) and is
    write-only: no API returns it and the admin never shows it after saving.
    """

    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible (OpenAI, DeepSeek, vLLM, Ollama /v1, ...); base URL with /v1"
        # Base URL https://api.anthropic.com (the adapter appends /v1/messages); key in x-api-key.
        ANTHROPIC = "anthropic", "Anthropic Messages API; base URL https://api.anthropic.com"
        # Base URL https://generativelanguage.googleapis.com (the adapter appends
        # /v1beta/models/{upstream model}:streamGenerateContent?alt=sse); key in x-goog-api-key.
        GEMINI = "gemini", "Google Gemini API (base URL https://generativelanguage.googleapis.com)"
        # Base URL https://{resource}.openai.azure.com (the adapter appends
        # /openai/deployments/{upstream model}/chat/completions?api-version=LLM_AZURE_OPENAI_API_VERSION);
        # the upstream model is the deployment name; key in api-key.
        AZURE_OPENAI = "azure_openai", "Azure OpenAI (base URL https://{resource}.openai.azure.com; model = deployment)"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(
        max_length=32, choices=Kind.choices, default=Kind.OPENAI, validators=[_validate_provider_kind]
    )
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text=(
            "API root. OpenAI-compatible: including /v1, e.g. https://api.openai.com/v1 or "
            "http://ollama:11434/v1. Anthropic: https://api.anthropic.com (/v1/messages is appended). "
            "Gemini: https://generativelanguage.googleapis.com. "
            "Azure OpenAI: https://{resource}.openai.azure.com (the model's upstream id is the deployment)."
        ),
    )
    # null=True because the encrypted field stores an empty key as NULL (it encrypts only
    # non-empty values); read back, an empty key is None. Use ``provider.api_key or ""``.
    api_key = EncryptedCharField(max_length=500, blank=True, null=True, default="")
    connect_timeout = models.FloatField(default=10.0, validators=[MinValueValidator(0.1)], help_text="seconds")
    read_timeout = models.FloatField(
        default=300.0,
        validators=[MinValueValidator(0.1)],
        help_text="seconds of silence allowed between chunks (and before the response headers)",
    )
    first_token_timeout = models.FloatField(
        default=60.0,
        validators=[MinValueValidator(0.1)],
        help_text=(
            "seconds to wait for the first chunk of a reply; past it the request fails with 504 upstream_timeout "
            "and routing tries the model's next deployment"
        ),
    )
    extra_headers = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_extra_headers],
        help_text=(
            "HTTP headers sent with every request to this provider, as a JSON object, e.g. "
            '{"HTTP-Referer": "https://chat.example.com", "X-Title": "Chat"} for OpenRouter. '
            "Stored and shown in plain text: put the secret key in API key, not here."
        ),
    )
    enabled = models.BooleanField(default=True)
    stream_usage = models.BooleanField(
        default=True,
        help_text=(
            'Ask for the token usage at the end of every stream (stream_options: {"include_usage": true}). '
            "Turn off for servers that reject stream_options; stopped or cut streams are counted with the "
            "model's tokenizer either way."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """Refuse an OpenAI-compatible provider with both an API key and a base URL's user info: the
        key travels as ``Authorization: Bearer``, the user info as HTTP Basic in that same header, and
        the HTTP client refuses to send both (every request was a 500)."""
        try:
            has_user_info = "@" in urlsplit(self.base_url).netloc
        except ValueError:  # validate_base_url reports it
            return
        if self.kind == self.Kind.OPENAI and self.api_key and has_user_info:
            raise ValidationError(
                {
                    "base_url": "An OpenAI-compatible provider sends its API key as 'Authorization: Bearer'; "
                    "a user name and password in the base URL would need that same header (HTTP Basic). "
                    "Use one of the two."
                }
            )


# The most fallback models one model may name: each costs a failed attempt before the reply starts.
MAX_FALLBACKS = 5


class LLMModel(RateLimited):
    """A model users can chat with: a public ``name`` mapped to a provider's ``upstream_model``.

    Prices are US dollars per million tokens (the unit providers publish): prompt tokens read
    fresh (input), from the provider's prompt cache (cached input; empty: the input price) and
    written to it (cache write; empty: the input price), and completion tokens, reasoning
    included (output). ``accounts.pricing.token_cost`` has the formula.
    ``default_parameters`` are OpenAI request fields (e.g. ``{"temperature": 0.7}``) applied
    when the client does not send them. ``tokenizer``: how its tokens are counted when the provider
    does not report them (before the call, and for a stopped stream): ``llm.tokens``.
    """

    class RoutingStrategy(models.TextChoices):
        WEIGHTED = "weighted", "Weighted random within the best priority"
        LEAST_IN_FLIGHT = "least_in_flight", "Least requests in flight (counted per server process)"
        LOWEST_LATENCY = "lowest_latency", "Lowest recent time to first token (per server process)"

    class Tokenizer(models.TextChoices):
        AUTO = "auto", "Automatic (by the upstream model's name)"
        O200K_BASE = "o200k_base", "o200k_base (gpt-4o, gpt-4.1, gpt-5, o1, o3, o4-mini)"
        CL100K_BASE = "cl100k_base", "cl100k_base (gpt-4, gpt-3.5-turbo)"
        ESTIMATE = "estimate", "Estimate (characters / 4)"

    name = models.CharField(max_length=200, unique=True, help_text="the model id clients send")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="models")
    upstream_model = models.CharField(max_length=200, help_text="the model id sent to the provider")
    context_window = models.PositiveIntegerField(default=8192, validators=[MinValueValidator(1)], help_text="tokens")
    max_output_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="the most tokens one reply may generate, less than the context window; empty for the rest of it",
    )
    default_parameters = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    # A negative price would make every reply's cost negative: budgets would grow with use.
    input_price_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal(0))]
    )
    output_price_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal(0))]
    )
    cached_input_price_per_million = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text=(
            'US dollars per million prompt tokens read from the provider\'s prompt cache (OpenAI "cached input", '
            'Anthropic "cache hits", Gemini "context caching"); empty: the input price'
        ),
    )
    cache_write_price_per_million = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text=(
            "US dollars per million prompt tokens written to the provider's prompt cache (Anthropic \"cache "
            'writes"); empty: the input price'
        ),
    )
    tokenizer = models.CharField(
        max_length=32,
        choices=Tokenizer.choices,
        default=Tokenizer.AUTO,
        help_text=(
            "Counts prompt tokens before the call and the tokens of stopped streams. Automatic: o200k_base or "
            "cl100k_base for OpenAI models (by the upstream model id), else an estimate of characters / 4."
        ),
    )
    routing_strategy = models.CharField(
        max_length=32,
        choices=RoutingStrategy.choices,
        default=RoutingStrategy.WEIGHTED,
        help_text="How a reply picks among the model's deployments of the best priority (llm.routing)",
    )
    fallbacks = models.JSONField(
        default=list,
        blank=True,
        help_text=(
            "Other models to try, in order, when every deployment of this one failed before the first token, e.g. "
            '["gpt-4o", "claude-sonnet"] (a JSON list of model names). A prompt longer than this model\'s context '
            "window goes straight to the first of them whose window fits it."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "LLM model"
        constraints = RATE_LIMIT_CONSTRAINTS

    def __str__(self) -> str:
        return self.name

    def clean_fields(self, exclude: Collection[str] | None = None) -> None:
        """Validate the fields, then what depends on other rows: the name (no alias has it) and the
        fallbacks (models that exist). Only for fields being validated: a form without them (the
        admin's list of models edits ``enabled`` alone) must not be refused, nor fail, for them."""
        super().clean_fields(exclude=exclude)
        excluded = set(exclude or ())
        if "default_parameters" not in excluded and not isinstance(self.default_parameters, dict):
            raise ValidationError({"default_parameters": "Must be a JSON object of OpenAI request fields."})
        if "name" not in excluded and self.name:
            validate_model_name_not_alias(name=self.name)
        if "fallbacks" not in excluded:
            self._validate_fallbacks()

    def clean(self) -> None:
        """Refuse a ``max_output_tokens`` not below the ``context_window``: the reply's tokens are part of
        the window, and the prompt needs room beside them (``llm.metering.prompt_budget_for``)."""
        window, most = self.context_window, self.max_output_tokens
        if isinstance(window, int) and isinstance(most, int) and window >= 1 and most >= window:
            raise ValidationError(
                {
                    "max_output_tokens": f"Less than the context window ({window} tokens), which must also hold "
                    "the prompt; or empty for the rest of it."
                }
            )

    def _validate_fallbacks(self) -> None:
        fallbacks = self.fallbacks
        if not (isinstance(fallbacks, list) and all(isinstance(name, str) for name in fallbacks)):
            raise ValidationError({"fallbacks": 'Must be a JSON list of model names, e.g. ["gpt-4o"].'})
        if len(fallbacks) > MAX_FALLBACKS or len(set(fallbacks)) != len(fallbacks) or self.name in fallbacks:
            raise ValidationError(
                {"fallbacks": f"At most {MAX_FALLBACKS} other models, each once, not the model itself."}
            )
        missing = set(fallbacks) - set(LLMModel.objects.filter(name__in=fallbacks).values_list("name", flat=True))
        if missing:
            raise ValidationError({"fallbacks": f"No model is called {', '.join(sorted(map(repr, missing)))}."})


class Deployment(RateLimited):
    """One place that serves a model: a provider and the model id it knows it by (``llm.routing``).

    A model with enabled deployments on enabled providers is served by them instead of its own
    ``provider`` / ``upstream_model`` (a model without any keeps being its own one deployment).
    ``priority``: lower is tried first; deployments of one priority share the load by the model's
    ``routing_strategy`` (``weight``: relative share for the weighted strategy). The rate-limit
    fields are the deployment's own, per minute like the model's (``RateLimited``).
    """

    model = models.ForeignKey(LLMModel, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="deployments")
    upstream_model = models.CharField(max_length=200, help_text="the model id sent to this provider")
    weight = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text="relative share among deployments of its priority"
    )
    priority = models.IntegerField(default=0, help_text="lower is tried first; higher ones take over on failures")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "priority", "id"]
        constraints = [
            *RATE_LIMIT_CONSTRAINTS,
            models.UniqueConstraint(
                fields=["model", "provider", "upstream_model"], name="llm_deployment_unique_per_model"
            ),
            models.CheckConstraint(condition=models.Q(weight__gte=1), name="llm_deployment_weight_positive"),
        ]

    def __str__(self) -> str:
        return deployment_name(provider_name=self.provider.name, upstream_model=self.upstream_model)


def deployment_name(*, provider_name: str, upstream_model: str) -> str:
    """Return how logs and usage rows name a deployment: ``<provider name>/<upstream model id>``."""
    return f"{provider_name}/{upstream_model}"


# --- Model aliases --------------------------------------------------------------------------------


def validate_model_name_not_alias(*, name: str) -> None:
    """Raise ``ValidationError`` on ``name`` when a ``ModelAlias`` already has that name.

    A request names a model by one string, so models and aliases share one namespace
    (``ModelAlias``); ``LLMModel.clean`` calls this, ``ModelAlias.clean`` checks the other way.
    """
    if ModelAlias.objects.filter(name=name).exists():
        raise ValidationError({"name": f"'{name}' is already the name of a model alias; rename or delete it first."})


class ModelAlias(models.Model):
    """Another name clients may send for a model: ``name`` resolves to ``model`` while ``enabled``.

    NextChat asks for ``gpt-4o-mini`` to title chats whatever model the user picked
    (``/work/shared/nextchat.md``); an alias points that name at any configured model. Models and
    aliases share one namespace: an alias may not take a model's name nor a model an alias's
    (``clean`` on both sides; should a row bypass validation, the model wins). An alias points at
    a model, never at another alias. Resolution: ``llm.selectors.llm_model_get_enabled``; a reply
    and its usage row name the model that served it, as OpenAI's own aliases do
    (``gpt-4o`` answers ``"model": "gpt-4o-2024-08-06"``).
    """

    name = models.CharField(max_length=200, unique=True, help_text="the model id clients send")
    model = models.ForeignKey(
        LLMModel,
        on_delete=models.CASCADE,
        related_name="aliases",
        verbose_name="target model",
        help_text="the model this name resolves to",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model alias"
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.name and LLMModel.objects.filter(name=self.name).exists():
            raise ValidationError({"name": f"'{self.name}' is already the name of a model; an alias needs its own."})
