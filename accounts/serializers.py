"""Request and response shapes of the accounts API.

Input serializers parse and validate; output serializers shape. None of them saves: the
views hand validated data to ``accounts.services``. The token serializers are simplejwt's,
subclassed only to give them unique OpenAPI names (and, for refresh, to fix one failure mode).
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

from django.contrib.auth.password_validation import MinimumLengthValidator, get_default_password_validators
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.http import QueryDict
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.validators import UniqueValidator
from rest_framework_simplejwt.serializers import (
    TokenBlacklistSerializer,
    TokenObtainPairSerializer,
    TokenRefreshSerializer,
)
from rest_framework_simplejwt.settings import api_settings as jwt_api_settings
from rest_framework_simplejwt.token_blacklist.models import OutstandingToken

from chatbackend.fields import BIGINT_MAX, ID_MAX, BlankableEmailField, StrictBooleanField, StrictCharField

from .metering.budgets import budget_usage
from .models import API_KEY_OWNERS, APIKey, AuditEvent, Budget, UsageRecord, User
from .revocation import SESSION_CLAIM
from .selectors import USAGE_SUMMARY_GROUPS, usage_current_month, user_authentication_check

# --- Errors (documentation only: chatbackend.exception_handlers writes these bodies) ---------


class ErrorObjectOutputSerializer(serializers.Serializer):
    """OpenAI's error object, as every endpoint returns it on failure."""

    message = serializers.CharField()
    type = serializers.CharField(help_text="e.g. invalid_request_error, authentication_error, not_found_error")
    param = serializers.CharField(allow_null=True, help_text="the request field at fault, if any")
    code = serializers.CharField(allow_null=True)
    # The metaclass moves declared fields out of the class body, so this does not shadow
    # ``Serializer.fields``.
    fields = serializers.DictField(  # type: ignore[assignment]
        required=False, help_text="validation errors only: DRF's per-field detail"
    )


class ErrorOutputSerializer(serializers.Serializer):
    """The body of every error response: ``{"error": {...}}``."""

    error = ErrorObjectOutputSerializer()


# --- Registration, tokens, the caller --------------------------------------------------------


def _password_min_length() -> int:
    """Return the shortest password ``AUTH_PASSWORD_VALIDATORS`` accept (1 without a length rule)."""
    lengths = [v.min_length for v in get_default_password_validators() if isinstance(v, MinimumLengthValidator)]
    return max(lengths, default=1)


class UserRegisterInputSerializer(serializers.Serializer):
    username = StrictCharField(
        max_length=150,
        validators=[
            UnicodeUsernameValidator(),
            UniqueValidator(
                queryset=User.objects.all(), message="A user with that username already exists.", lookup="iexact"
            ),
        ],
    )
    # min_length: the length rule of the password validators, stated in the schema too; the other
    # rules (common, numeric, like the username) no schema can hold, and answer 400 as well.
    password = StrictCharField(
        write_only=True, trim_whitespace=False, min_length=_password_min_length(), style={"input_type": "password"}
    )
    email = BlankableEmailField(default="")


class UserRegisterOutputSerializer(serializers.ModelSerializer):
    email = BlankableEmailField(read_only=True)

    class Meta:
        model = User
        fields = ["id", "username", "email", "role", "email_verified"]
        extra_kwargs = {"email_verified": {"help_text": "false: follow the link emailed to you before logging in"}}
        read_only_fields = fields


class UserMeOutputSerializer(serializers.ModelSerializer):
    email = BlankableEmailField(read_only=True)

    class Meta:
        model = User
        fields = ["id", "username", "email", "role", "date_joined"]
        read_only_fields = fields


class UserListOutputSerializer(serializers.ModelSerializer):
    email = BlankableEmailField(read_only=True)
    is_service_account = serializers.BooleanField(
        read_only=True, help_text="a team's service user (owns the team's keys; cannot log in)"
    )

    class Meta:
        model = User
        fields = ["id", "username", "email", "role", "is_active", "is_service_account", "date_joined", "last_login"]
        read_only_fields = fields


class AuditEventOutputSerializer(serializers.ModelSerializer):
    """One audit event; ``before`` / ``after``: the changed fields' values (secrets as ``"[set]"``, ``"[changed]"``)."""

    before = serializers.JSONField(read_only=True, allow_null=True)
    after = serializers.JSONField(read_only=True, allow_null=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "action",
            "actor",
            "actor_username",
            "organization",
            "object_type",
            "object_id",
            "object_repr",
            "ip",
            "before",
            "after",
        ]
        read_only_fields = fields


class AuthTokenObtainInputSerializer(TokenObtainPairSerializer):
    """``{username, password}`` of an active account.

    Every token pair of one login carries a session id claim (``sid``), kept through refreshes, so
    that logging out can end that session's open WebSockets (``accounts.revocation``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # simplejwt's fields trim whitespace: a password registered as " secret " could not log in,
        # and "  " was a 400 (blank) where the schema's minLength 1 allows it (now: 401, wrong).
        # Strict: a number is not a username.
        self.fields[self.username_field] = StrictCharField(write_only=True, trim_whitespace=False)
        self.fields["password"] = StrictCharField(
            write_only=True, trim_whitespace=False, style={"input_type": "password"}
        )

    @classmethod
    def get_token(cls, user: Any) -> Any:
        # After the password check (so nothing is said about an account without it), before any
        # token is made: an unverified email is a 403 (accounts.selectors.user_authentication_check).
        user_authentication_check(user=user)
        token = super().get_token(user)
        token[SESSION_CLAIM] = uuid.uuid4().hex
        # simplejwt stored the token (``OutstandingToken``, token_blacklist) before the session was
        # in it: store it whole, so ending the user's logins finds their sessions
        # (``accounts.lifecycle.services.user_sessions_end``).
        OutstandingToken.objects.filter(jti=token[jwt_api_settings.JTI_CLAIM]).update(token=str(token))
        return token


class AuthTokenPairOutputSerializer(serializers.Serializer):
    access = serializers.CharField(help_text="JWT access token; send as 'Authorization: Bearer <access>'")
    refresh = serializers.CharField(help_text="JWT refresh token; single use (rotated on refresh)")


class AuthTokenRefreshInputSerializer(TokenRefreshSerializer):
    """``{refresh}``: a refresh token, usable once; it is rotated and the old one blacklisted."""

    # Untrimmed and strict, so "  " or 0 is a 401 (not a token), as the schema's minLength 1 allows.
    refresh = StrictCharField(trim_whitespace=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, str]:
        """Rotate the refresh token (simplejwt); answer 401 when its user no longer exists."""
        # simplejwt looks the user up with .get(): a deleted user's token would be a 500.
        try:
            return super().validate(attrs)
        except User.DoesNotExist:
            raise AuthenticationFailed(self.error_messages["no_active_account"], "no_active_account") from None


class AuthLogoutInputSerializer(TokenBlacklistSerializer):
    """``{refresh}``: the refresh token to blacklist.

    simplejwt's ``validate()`` does the blacklisting (token_blacklist app); the validated data is
    the token's ``user_id`` and session id (``sid``, None for tokens issued before sessions), for
    the view to end that session's open connections.
    """

    refresh = StrictCharField(write_only=True, trim_whitespace=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        refresh = self.token_class(attrs["refresh"])  # invalid or blacklisted: TokenError -> 401
        super().validate(attrs)
        return {"user_id": refresh.get(jwt_api_settings.USER_ID_CLAIM), "session_id": refresh.get(SESSION_CLAIM)}


# --- API keys -------------------------------------------------------------------------------


class APIKeyCreateInputSerializer(serializers.Serializer):
    """A new key's name and restrictions (``accounts.services.api_key_create`` checks the rest)."""

    name = StrictCharField(max_length=100)
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="when the key stops working; in the future; omitted or null: never"
    )
    allowed_models = serializers.ListField(
        child=StrictCharField(max_length=200),
        required=False,
        max_length=200,
        help_text="model and alias names the key may use (a model's name also allows its aliases); empty: all",
    )
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=APIKey.Scope.choices),
        required=False,
        allow_empty=False,
        help_text="chat: inference; read: GET usage, history, models, billing; admin: keys and budgets. "
        "Default: all three",
    )
    team = serializers.SlugField(
        max_length=64,
        allow_null=True,
        default=None,
        help_text="slug of a team of the acting organization: the key's requests also count against its "
        "budgets and rate limits",
    )
    owner = serializers.ChoiceField(
        choices=API_KEY_OWNERS,  # the output's choices too: one enum in the OpenAPI document
        default="user",
        help_text="user: the caller owns the key; team: the team's service user owns it, so it outlives its "
        "creator (needs team; organization owners and admins only)",
    )


def _api_key_owner(api_key: APIKey) -> str:
    return "team" if api_key.team_id is not None and api_key.user.service_team_id == api_key.team_id else "user"


class APIKeyOutputSerializer(serializers.ModelSerializer):
    """An API key as lists show it: never the secret, never its hash."""

    allowed_models = serializers.ListField(child=serializers.CharField(), read_only=True)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=APIKey.Scope.choices), read_only=True)
    team: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True, help_text="slug of the team the key is assigned to"
    )
    owner = serializers.SerializerMethodField(help_text="user: a person's key; team: owned by the team's service user")
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True, help_text="username of who created the key"
    )

    @extend_schema_field(serializers.ChoiceField(choices=API_KEY_OWNERS))
    def get_owner(self, api_key: APIKey) -> str:
        return _api_key_owner(api_key)

    class Meta:
        model = APIKey
        fields = [
            "id",
            "name",
            "prefix",
            "created_at",
            "last_used_at",
            "revoked_at",
            "expires_at",
            "allowed_models",
            "scopes",
            "team",
            "owner",
            "created_by",
        ]
        read_only_fields = fields


class APIKeyCreateOutputSerializer(serializers.Serializer):
    """A new (or rotated) API key with its ``sk-...`` secret in ``key``: the only time the secret is shown."""

    # The instance is a services.CreatedAPIKey: the saved key and its one-time secret.

    id = serializers.IntegerField(source="api_key.id")
    name = serializers.CharField(source="api_key.name")
    prefix = serializers.CharField(source="api_key.prefix")
    created_at = serializers.DateTimeField(source="api_key.created_at")
    last_used_at = serializers.DateTimeField(source="api_key.last_used_at", allow_null=True)
    revoked_at = serializers.DateTimeField(source="api_key.revoked_at", allow_null=True)
    expires_at = serializers.DateTimeField(source="api_key.expires_at", allow_null=True)
    allowed_models = serializers.ListField(source="api_key.allowed_models", child=serializers.CharField())
    scopes = serializers.ListField(source="api_key.scopes", child=serializers.ChoiceField(choices=APIKey.Scope.choices))
    team = serializers.CharField(source="api_key.team.slug", allow_null=True, default=None)
    owner = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="api_key.created_by.username", allow_null=True, default=None)
    key = serializers.CharField(source="secret", help_text="the secret, shown once; store it now")

    @extend_schema_field(serializers.ChoiceField(choices=API_KEY_OWNERS))
    def get_owner(self, created: Any) -> str:
        return _api_key_owner(created.api_key)


# --- Usage ----------------------------------------------------------------------------------


class UsageRecordOutputSerializer(serializers.ModelSerializer):
    """One reply's tokens and cost; ``cost`` is US dollars as a decimal string."""

    username = serializers.CharField(source="user.username", read_only=True)
    total_tokens = serializers.IntegerField(read_only=True)
    api_key_prefix = serializers.CharField(
        source="api_key.prefix", read_only=True, allow_null=True, help_text="prefix of the API key used, if any"
    )

    class Meta:
        model = UsageRecord
        fields = [
            "id",
            "request_id",
            "username",
            "model_name",
            "source",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cached_tokens",
            "cache_creation_tokens",
            "reasoning_tokens",
            "cost",
            "token_source",
            "finish_status",
            "created_at",
            "api_key_prefix",
        ]
        read_only_fields = fields


# --- Budgets --------------------------------------------------------------------------------


class BudgetUsageOutputSerializer(serializers.Serializer):
    """A budget in its current period. Amounts: US dollars as decimal strings."""

    period_start = serializers.DateTimeField(allow_null=True, help_text="start of the current period; null: lifetime")
    resets_at = serializers.DateTimeField(allow_null=True, help_text="when the period ends; null: never")
    spent_usd = serializers.DecimalField(max_digits=24, decimal_places=8, help_text="settled usage this period")
    reserved_usd = serializers.DecimalField(
        max_digits=24, decimal_places=8, help_text="held by requests in flight (their maximum cost)"
    )
    remaining_usd = serializers.DecimalField(
        max_digits=24, decimal_places=8, help_text="limit minus spent and reserved, never below 0"
    )
    spent_tokens = serializers.IntegerField()
    reserved_tokens = serializers.IntegerField()
    remaining_tokens = serializers.IntegerField(allow_null=True, help_text="null: no token limit")


class BudgetOutputSerializer(serializers.ModelSerializer):
    """A budget and its current period's usage."""

    usage = serializers.SerializerMethodField()

    class Meta:
        model = Budget
        fields = [
            "id",
            "name",
            "subject_kind",
            "subject_id",
            "period",
            "limit_usd",
            "token_limit",
            "enabled",
            "created_at",
            "updated_at",
            "usage",
        ]
        read_only_fields = fields

    @extend_schema_field(BudgetUsageOutputSerializer)
    def get_usage(self, budget: Budget) -> dict[str, Any]:
        return dict(BudgetUsageOutputSerializer(budget_usage(budget)).data)


class _StrictIntegerField(serializers.IntegerField):
    """A JSON integer: strings, booleans and fractions are 400, as the schema's ``type: integer`` says."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


# Up to 8 digits before the point and 8 after (max_digits 16, decimal_places 8), not negative.
_USD_PATTERN = r"^[0-9]{1,8}(\.[0-9]{1,8})?$"


@extend_schema_field({"type": "string", "format": "decimal", "pattern": _USD_PATTERN, "example": "25.00"})
class _StrictDecimalField(serializers.DecimalField):
    """US dollars as a JSON string (``"12.50"``), exactly as the schema's pattern says: no sign, exponent or spaces."""

    def to_internal_value(self, data: Any) -> Decimal:
        if not isinstance(data, str) or not re.fullmatch(_USD_PATTERN, data):
            self.fail("invalid")
        return super().to_internal_value(data)


class BudgetCreateInputSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100)
    subject_kind = serializers.ChoiceField(choices=Budget.SubjectKind.choices, help_text="who the budget limits")
    subject_id = _StrictIntegerField(
        min_value=1, max_value=ID_MAX, help_text="the user's, API key's, team's or organization's id"
    )
    period = serializers.ChoiceField(
        choices=Budget.Period.choices,
        default=Budget.Period.MONTHLY,
        help_text="calendar day, week (from Monday) or month in the server's time zone, or lifetime",
    )
    limit_usd = _StrictDecimalField(
        max_digits=16, decimal_places=8, min_value=Decimal(0), help_text='US dollars per period, e.g. "25.00"'
    )
    token_limit = _StrictIntegerField(
        min_value=0,
        max_value=BIGINT_MAX,  # a PositiveBigIntegerField
        required=False,
        allow_null=True,
        default=None,
        help_text="prompt plus completion tokens per period; null: none",
    )
    enabled = StrictBooleanField(default=True)


class BudgetUpdateInputSerializer(BudgetCreateInputSerializer):
    """Any of the create fields; those left out keep their value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, partial=True, **kwargs)


# --- Usage summary ---------------------------------------------------------------------------


class UsageSummaryQuerySerializer(serializers.Serializer):
    """The query of ``GET /api/usage/summary/``: a date range, how to group, and filters.

    Dates are days in ``settings.TIME_ZONE``; missing ones are the current month's bounds
    (``accounts.selectors.usage_current_month``). ``group_by`` is a comma-separated list of
    ``day``, ``model``, ``user``, ``api_key`` (repeats ignored; empty: one row of totals); build
    its data with ``query_data``.
    """

    start_date = serializers.DateField(input_formats=["%Y-%m-%d"], required=False)
    end_date = serializers.DateField(input_formats=["%Y-%m-%d"], required=False)
    group_by = serializers.CharField(required=False, allow_blank=True, default="day", trim_whitespace=False)
    user = serializers.IntegerField(min_value=1, max_value=ID_MAX, required=False)
    api_key = serializers.IntegerField(min_value=1, max_value=ID_MAX, required=False)
    model = serializers.CharField(max_length=200, required=False)

    @classmethod
    def query_data(cls, query: QueryDict) -> dict[str, str]:
        """Return ``query`` as the plain dict this serializer validates: ``group_by`` given more than once
        is the union of its values (``group_by=day&group_by=model`` is ``day,model``); another of its
        fields given more than once raises ``ValidationError`` naming it, not one value chosen silently.

        A plain dict, not the QueryDict: DRF reads an empty value in a QueryDict as "not sent", and
        ``start_date=`` is a malformed date (400), not the default.
        """
        data: dict[str, str] = {}
        for name, values in query.lists():
            if name == "group_by":
                data[name] = ",".join(values)
            elif len(values) > 1 and name in cls._declared_fields:
                raise serializers.ValidationError({name: [f"Given {len(values)} times: give it once."]})
            else:
                data[name] = values[-1]
        return data

    def validate_group_by(self, value: str) -> list[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in USAGE_SUMMARY_GROUPS]
        if unknown:
            allowed = ", ".join(USAGE_SUMMARY_GROUPS)
            raise serializers.ValidationError(f"Unknown group {', '.join(unknown)}: use any of {allowed}.")
        return list(dict.fromkeys(names))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        month_start, month_end = usage_current_month()
        return {"start_date": month_start, "end_date": month_end, **attrs}


class UsageSummaryRowOutputSerializer(serializers.Serializer):
    """One group's usage: the fields of its groups (present only when grouped so), then the sums."""

    day = serializers.DateField(required=False, help_text="group_by=day: the day, in the server's TIME_ZONE")
    model_name = serializers.CharField(required=False, help_text="group_by=model: the model's name")
    user_id = serializers.IntegerField(required=False, help_text="group_by=user")
    username = serializers.CharField(required=False, help_text="group_by=user")
    api_key_id = serializers.IntegerField(
        required=False, allow_null=True, help_text="group_by=api_key; null: usage without a key (JWT, conversations)"
    )
    api_key_name = serializers.CharField(required=False, allow_null=True, help_text="group_by=api_key")
    api_key_prefix = serializers.CharField(required=False, allow_null=True, help_text="group_by=api_key")
    prompt_tokens = serializers.IntegerField(source="prompt_tokens_sum")
    completion_tokens = serializers.IntegerField(source="completion_tokens_sum")
    total_tokens = serializers.IntegerField(source="total_tokens_sum")
    cached_tokens = serializers.IntegerField(
        source="cached_tokens_sum", help_text="of prompt_tokens: read from the provider's prompt cache"
    )
    cache_creation_tokens = serializers.IntegerField(
        source="cache_creation_tokens_sum", help_text="of prompt_tokens: written to the provider's prompt cache"
    )
    reasoning_tokens = serializers.IntegerField(
        source="reasoning_tokens_sum", help_text="of completion_tokens: spent reasoning"
    )
    cost = serializers.DecimalField(
        source="cost_sum", max_digits=20, decimal_places=8, help_text="US dollars, as a decimal string"
    )
    requests = serializers.IntegerField(help_text="replies: completed, stopped or failed (refused ones not counted)")
    refused_requests = serializers.IntegerField(
        help_text="requests refused by a budget or a rate limit before any reply (0 tokens, cost 0)"
    )

    def to_representation(self, instance: Any) -> dict[str, Any]:
        # A group's fields only when grouped so (a nullable field would otherwise render as null).
        data = super().to_representation(instance)
        return {name: value for name, value in data.items() if self.fields[name].source in instance}


class UsageSummaryPageOutputSerializer(serializers.Serializer):
    """A page of usage summary rows, with the range and grouping that produced them."""

    start_date = serializers.DateField(help_text="inclusive")
    end_date = serializers.DateField(help_text="exclusive")
    group_by = serializers.ListField(
        child=serializers.ChoiceField(choices=list(USAGE_SUMMARY_GROUPS)), help_text="as applied"
    )
    count = serializers.IntegerField(help_text="rows in all pages")
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = UsageSummaryRowOutputSerializer(many=True)
