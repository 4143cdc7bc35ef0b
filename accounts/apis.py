"""Accounts REST API: registration, JWT tokens, the caller, API keys, usage, users, budgets.

Each view parses input, calls one service or selector, and shapes the output. Errors leave as
``{"error": {...}}`` through ``chatbackend.exception_handlers``.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.core.cache import caches
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.http import Http404
from django.utils.connection import ConnectionProxy
from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView, TokenViewBase

from chatbackend.client_ip import request_client_ip
from chatbackend.fields import ID_LOOKUP_REGEX, ID_SCHEMA
from chatbackend.filters import AnyChoiceFilter, IdFilter, UTCIsoDateTimeFilter
from chatbackend.pagination import PageNumberPagination
from chatbackend.renderers import CSVRenderer

from .audit import audit_login_succeeded
from .authentication import request_principal, request_user
from .login_throttle import login_locked_out, login_lockout_exception
from .models import APIKey, AuditEvent, Budget, UsageRecord, User
from .selectors import (
    AUDIT_EVENT_CSV_COLUMNS,
    USAGE_SUMMARY_GROUPS,
    administers,
    api_key_list,
    audit_event_csv_rows,
    audit_event_list,
    budget_get_for,
    budget_list,
    budget_list_own,
    usage_record_list,
    usage_summary,
    usage_summary_columns,
    user_list,
)
from .serializers import (
    APIKeyCreateInputSerializer,
    APIKeyCreateOutputSerializer,
    APIKeyOutputSerializer,
    AuditEventOutputSerializer,
    AuthLogoutInputSerializer,
    AuthTokenObtainInputSerializer,
    AuthTokenPairOutputSerializer,
    AuthTokenRefreshInputSerializer,
    BudgetCreateInputSerializer,
    BudgetOutputSerializer,
    BudgetUpdateInputSerializer,
    ErrorOutputSerializer,
    UsageRecordOutputSerializer,
    UsageSummaryPageOutputSerializer,
    UsageSummaryQuerySerializer,
    UsageSummaryRowOutputSerializer,
    UserListOutputSerializer,
    UserMeOutputSerializer,
    UserRegisterInputSerializer,
    UserRegisterOutputSerializer,
)
from .services import (
    api_key_create,
    api_key_revoke,
    api_key_rotate,
    budget_create,
    budget_delete,
    budget_update,
    session_end,
    user_register,
)

# The two OpenAPI security schemes for our authentication classes. They live here because this
# module is imported with the URLconf, before any schema is generated.


class APIKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Document ``APIKeyAuthentication``: a bearer ``sk-...`` API key."""

    target_class = "accounts.authentication.APIKeyAuthentication"
    name = "apiKeyAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return build_bearer_security_scheme_object(
            header_name="HTTP_AUTHORIZATION",
            token_prefix="Bearer",  # noqa: S106 - the HTTP auth scheme's name, not a secret
            bearer_format="sk-...",
        )


class JWTAuthenticationScheme(SimpleJWTScheme):
    """Document our ``JWTAuthentication`` subclass as simplejwt's bearer JWT scheme."""

    target_class = "accounts.authentication.JWTAuthentication"


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON or a field failed validation (see error.param, error.fields).",
    401: "Missing, invalid, expired or revoked credentials.",
    403: "Authenticated, but not allowed.",
    404: "Not found, or not yours.",
    429: "Too many attempts; retry after the Retry-After header's seconds.",
}


def _errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Return OpenAPI responses documenting the project's error body for each of ``statuses``."""
    return {code: OpenApiResponse(ErrorOutputSerializer, description=_ERROR_DESCRIPTIONS[code]) for code in statuses}


class AuthRateThrottle(ScopedRateThrottle):
    """Throttle registration and login attempts per client IP, in the ``auth_throttle`` cache.

    The IP is ``chatbackend.client_ip``'s (never a header the client wrote); the cache is Redis when
    configured, shared by every server process. Rates come from
    ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (``AUTH_LOGIN_RATE``, ``AUTH_REGISTER_RATE``; a rate
    of ``None`` turns the throttle off), read per request, so tests can override them.
    """

    # A proxy, as django.core.cache.cache is: each thread gets its own connection to the cache.
    cache = ConnectionProxy(caches, "auth_throttle")  # type: ignore[assignment]  # a BaseCache by proxy

    def get_rate(self) -> str | None:
        configured: dict[str, Any] = api_settings.DEFAULT_THROTTLE_RATES or {}
        return configured.get(self.scope or "")

    def get_ident(self, request: Request) -> str:
        return request_client_ip(request)


# --- Registration and tokens ----------------------------------------------------------------


class UserRegisterApi(APIView):
    """Create a member account from ``{username, password, email?}``; the password must pass Django's validators."""

    # No authentication: a stale token in the client must not block signing up.
    authentication_classes = ()
    permission_classes = (AllowAny,)
    throttle_classes = (AuthRateThrottle,)
    throttle_scope = "auth_register"

    @extend_schema(
        tags=["auth"],
        summary="Register a member account",
        description=(
            "400 when the username is taken or the password fails the server's password validators "
            "(too short, too common, too similar to the username, entirely numeric): see `error.fields`."
        ),
        request=UserRegisterInputSerializer,
        responses={201: UserRegisterOutputSerializer, **_errors(400, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = UserRegisterInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            user = user_register(**serializer.validated_data)
        except DjangoValidationError as exc:  # the password validators' verdict
            raise serializers.ValidationError({"password": exc.messages}) from None
        return Response(UserRegisterOutputSerializer(user).data, status=status.HTTP_201_CREATED)


class AuthTokenObtainApi(TokenObtainPairView):
    """Return a JWT access and refresh token pair for a username and password."""

    serializer_class = AuthTokenObtainInputSerializer
    throttle_classes = (AuthRateThrottle,)
    throttle_scope = "auth_login"

    @extend_schema(
        tags=["auth"],
        summary="Log in: exchange username and password for a JWT pair",
        description=(
            "401 for a wrong username or password or a deactivated account; 403 `email_not_verified` when "
            "`EMAIL_VERIFICATION_REQUIRED` is on and the account has not followed its verification link."
        ),
        request=AuthTokenObtainInputSerializer,
        responses={200: AuthTokenPairOutputSerializer, **_errors(400, 401, 403, 429)},
        auth=[],
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # A locked-out username or IP (accounts.login_throttle) is refused before its password is
        # checked; simplejwt reports that as a failed login, which is a 429 here.
        # A failed login is audited by the user_login_failed signal that authenticate() sends; a
        # successful one sends none here (simplejwt does not call login()), so it is audited below.
        serializer = self.get_serializer(data=request.data)
        try:
            serializer.is_valid(raise_exception=True)
        except AuthenticationFailed:
            if login_locked_out(request):
                raise login_lockout_exception() from None
            raise
        except TokenError as exc:
            raise InvalidToken(exc.args[0]) from exc
        audit_login_succeeded(user=serializer.user, request=request)  # type: ignore[attr-defined]
        return Response(serializer.validated_data, status=status.HTTP_200_OK)


class AuthTokenRefreshApi(TokenRefreshView):
    """Return a new access token and a rotated refresh token; the refresh token sent is blacklisted."""

    serializer_class = AuthTokenRefreshInputSerializer

    @extend_schema(
        tags=["auth"],
        summary="Exchange a refresh token for a new JWT pair (the old refresh token is blacklisted)",
        request=AuthTokenRefreshInputSerializer,
        responses={200: AuthTokenPairOutputSerializer, **_errors(400, 401)},
        auth=[],
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().post(request, *args, **kwargs)


class AuthLogoutApi(TokenViewBase):
    """Blacklist the refresh token sent, so it can no longer be refreshed, and end its login: that
    login's access tokens are refused from then on and its WebSockets close (``session_end``)."""

    serializer_class = AuthLogoutInputSerializer

    @extend_schema(
        tags=["auth"],
        summary="Log out: blacklist the refresh token",
        request=AuthLogoutInputSerializer,
        responses={
            204: OpenApiResponse(
                description="The refresh token is blacklisted; the access tokens of its login are refused from now on."
            ),
            **_errors(400, 401),
        },
        auth=[],
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # The serializer validates (which blacklists); a bad or blacklisted token is a 401.
        serializer = self.get_serializer(data=request.data)
        try:
            serializer.is_valid(raise_exception=True)
        except TokenError as exc:
            raise InvalidToken(exc.args[0]) from exc
        session_end(user_id=serializer.validated_data["user_id"], session_id=serializer.validated_data["session_id"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class UserMeApi(APIView):
    """Return the authenticated caller's account."""

    @extend_schema(
        tags=["auth"], summary="The caller's account", responses={200: UserMeOutputSerializer, **_errors(401)}
    )
    def get(self, request: Request) -> Response:
        return Response(UserMeOutputSerializer(request.user).data)


# --- API keys -------------------------------------------------------------------------------


class APIKeyListCreateApi(ListAPIView):
    """List the caller's API keys, or create one (its ``sk-...`` secret is shown only in that answer)."""

    serializer_class = APIKeyOutputSerializer
    filter_backends = ()
    api_key_scopes = {"GET": APIKey.Scope.ADMIN, "POST": APIKey.Scope.ADMIN}  # accounts.scopes: managing keys

    def get_queryset(self) -> QuerySet[APIKey]:
        actor = request_principal(self.request)
        return api_key_list(user=actor.user, acting=actor.acting)

    @extend_schema(
        tags=["api-keys"],
        summary="List the caller's API keys, and for organization admins its teams' keys (never secrets)",
        responses={200: APIKeyOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        tags=["api-keys"],
        summary="Create an API key; the answer holds its secret, once",
        request=APIKeyCreateInputSerializer,
        description=(
            "`expires_at` (future), `allowed_models` (model and alias names; empty: all) and `scopes` "
            "(`chat`, `read`, `admin`; default all) restrict the key. 400 naming the field for a past "
            "`expires_at` or an unknown scope. A caller using an API key may create keys only within its "
            "own scopes, allowed models and expiry (which are the defaults): 403 otherwise. `team` (a "
            "team's slug in the acting organization; members of the team and organization owners/admins) "
            "assigns the key to that team: its requests also count against the team's budgets and rate "
            "limits; 400 for a slug naming no team of the organization. `owner: team` (organization "
            "owners/admins only, with `team`) makes the team's service user own the key, so it outlives "
            "its creator (`created_by`)."
        ),
        responses={201: APIKeyCreateOutputSerializer, **_errors(400, 401, 403)},
    )
    def post(self, request: Request) -> Response:
        serializer = APIKeyCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        created = api_key_create(
            user=actor.user,
            organization=actor.organization,
            creator_key=actor.api_key,
            administers=administers(actor.user, actor.acting),
            **serializer.validated_data,
        )
        return Response(APIKeyCreateOutputSerializer(created).data, status=status.HTTP_201_CREATED)


class APIKeyRevokeApi(APIView):
    """Revoke one of the caller's API keys (or, for an organization's admins, one of its teams' keys);
    another user's key is a 404."""

    api_key_scopes = {"DELETE": APIKey.Scope.ADMIN}  # accounts.scopes

    @extend_schema(
        tags=["api-keys"],
        summary="Revoke one of the caller's API keys",
        request=None,
        responses={
            204: OpenApiResponse(description="Revoked; the key no longer authenticates."),
            **_errors(401, 403, 404),
        },
    )
    def delete(self, request: Request, api_key_id: int) -> Response:
        actor = request_principal(request)
        api_key_revoke(
            user=actor.user,
            api_key_id=api_key_id,
            creator_key=actor.api_key,
            managed=api_key_list(user=actor.user, acting=actor.acting),
            organization=actor.organization,
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class APIKeyRotateApi(APIView):
    """Give one of the caller's API keys a new secret, shown once; the old secret stops working at once."""

    api_key_scopes = {"POST": APIKey.Scope.ADMIN}  # accounts.scopes

    @extend_schema(
        tags=["api-keys"],
        summary="Rotate one of the caller's API keys: a new secret, the old one refused at once",
        description=(
            "The key keeps its id, name, restrictions, rate limits and budgets; its `prefix` and secret "
            "change. The answer holds the new secret, once, in the shape of a creation. Open connections "
            "and streaming replies of the key end, as on a revocation. 400 `api_key_revoked` for a revoked "
            "key; another user's key is a 404."
        ),
        request=None,
        responses={200: APIKeyCreateOutputSerializer, **_errors(400, 401, 403, 404)},
    )
    def post(self, request: Request, api_key_id: int) -> Response:
        actor = request_principal(request)
        rotated = api_key_rotate(
            user=actor.user,
            api_key_id=api_key_id,
            creator_key=actor.api_key,
            managed=api_key_list(user=actor.user, acting=actor.acting),
            organization=actor.organization,
        )
        return Response(APIKeyCreateOutputSerializer(rotated).data)


# --- Usage and users ------------------------------------------------------------------------


class UsageRecordListApi(ListAPIView):
    """List usage records (tokens and cost per reply), newest first; admins see everyone's."""

    serializer_class = UsageRecordOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[UsageRecord]:
        actor = request_principal(self.request)
        return usage_record_list(user=actor.user, acting=actor.acting)

    @extend_schema(
        tags=["usage"],
        summary="List usage records, newest first: the caller's own (admins: everyone's)",
        responses={200: UsageRecordOutputSerializer, **_errors(401)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class CSVExportMixin:
    """Answer JSON, or CSV for ``?format=csv`` / ``Accept: text/csv`` (``chatbackend.renderers.CSVRenderer``).

    The view sets ``csv_header`` (the columns) before answering CSV. An unknown ``format`` is a 400
    naming it; errors are JSON whatever the format asked for.
    """

    renderer_classes: Any = (JSONRenderer, BrowsableAPIRenderer, CSVRenderer)
    csv_header: tuple[str, ...] = ()

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # DRF answers an unknown ?format= with a 404, as if the URL named nothing: it is a bad parameter.
        try:
            return super().perform_content_negotiation(request, force)  # type: ignore[misc]
        except Http404:
            raise serializers.ValidationError({"format": ["Use json or csv."]}) from None

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        # An error is the project's JSON error body, also when CSV was asked for.
        if getattr(response, "exception", False) and isinstance(
            getattr(request, "accepted_renderer", None), CSVRenderer
        ):
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]

    def get_renderer_context(self) -> dict[str, Any]:
        return {**super().get_renderer_context(), "header": self.csv_header}  # type: ignore[misc]


class UsageSummaryApi(CSVExportMixin, APIView):
    """Sum usage per day, model, user and API key: tokens, cost, requests, refused requests; JSON or CSV.

    Members see their own usage; admins everyone's, or one user's with ``?user=<id>``. JSON is
    paginated (``?page=N``); CSV (``?format=csv`` or ``Accept: text/csv``) is every row of the range
    in one download, with a header row. Errors are JSON whatever the format asked for.
    """

    pagination_class = PageNumberPagination

    @extend_schema(
        tags=["usage"],
        summary="Usage summed per day, model, user and API key (JSON, or CSV with ?format=csv)",
        description=(
            "Sums the usage records from `start_date` (inclusive) to `end_date` (exclusive), days in the "
            "server's `TIME_ZONE` (default: the current month; at most 366 days), per group of `group_by` "
            "(default `day`; empty: one row of totals). Each row has its groups' fields and `prompt_tokens`, "
            "`completion_tokens`, `total_tokens`, their breakdown `cached_tokens` and `cache_creation_tokens` (of the "
            "prompt: read from / written to the provider's prompt cache) and `reasoning_tokens` (of the completion), "
            "`cost` (US dollars, a decimal string), `requests` (replies) and "
            "`refused_requests` (turned away by a budget or a rate limit). Members see only their own usage: "
            "`user` naming anyone else is a 403; admins see everyone's and may filter by `user`. "
            "`format=csv` (or `Accept: text/csv`) answers every row as CSV with a header row, unpaginated. "
            "400 (`param` naming it) for a malformed parameter, an unknown group, `end_date` before "
            "`start_date` or a longer range."
        ),
        parameters=[
            OpenApiParameter("start_date", OpenApiTypes.DATE, description="inclusive; default: this month's first day"),
            OpenApiParameter("end_date", OpenApiTypes.DATE, description="exclusive; default: next month's first day"),
            OpenApiParameter(
                "group_by",
                {"type": "array", "items": {"type": "string", "enum": list(USAGE_SUMMARY_GROUPS)}},
                style="form",
                explode=False,
                description="comma-separated groups; default `day`; empty: totals",
            ),
            OpenApiParameter("user", ID_SCHEMA, description="a user's id (admins; members: only their own)"),
            OpenApiParameter("api_key", ID_SCHEMA, description="an API key's id"),
            OpenApiParameter(
                "model", {"type": "string", "minLength": 1, "maxLength": 200}, description="a model's name"
            ),
            OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv"], description="default json"),
            OpenApiParameter("page", {"type": "integer", "minimum": 1}, description="JSON only: a page number from 1"),
        ],
        responses={
            (200, "application/json"): UsageSummaryPageOutputSerializer,
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="a header row, then one row per group"),
            # Errors are JSON whatever the format asked for.
            **{(code, "application/json"): response for code, response in _errors(400, 401, 403).items()},
        },
    )
    def get(self, request: Request) -> Response:
        query = UsageSummaryQuerySerializer(data=UsageSummaryQuerySerializer.query_data(request.query_params))
        query.is_valid(raise_exception=True)
        params = query.validated_data
        principal = request_principal(request)
        rows = usage_summary(
            actor=principal.user,
            acting=principal.acting,
            start_date=params["start_date"],
            end_date=params["end_date"],
            group_by=params["group_by"],
            user_id=params.get("user"),
            api_key_id=params.get("api_key"),
            model_name=params.get("model"),
        )
        if isinstance(request.accepted_renderer, CSVRenderer):
            self.csv_header = usage_summary_columns(group_by=params["group_by"])
            filename = f"usage-{params['start_date']}-{params['end_date']}.csv"
            return Response(
                UsageSummaryRowOutputSerializer(rows, many=True).data,
                headers={"Content-Disposition": f'attachment; filename="{filename}"'},
            )
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(rows, request, view=self)
        envelope = paginator.get_paginated_response(page).data  # count, next, previous, results (the rows)
        body = {"start_date": params["start_date"], "end_date": params["end_date"], "group_by": params["group_by"]}
        body |= envelope
        return Response(UsageSummaryPageOutputSerializer(body).data)


class UserListApi(ListAPIView):
    """List every user, oldest first; admins only (members get 403)."""

    serializer_class = UserListOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[User]:
        actor = request_principal(self.request)
        return user_list(actor=actor.user, acting=actor.acting)

    @extend_schema(
        tags=["users"],
        summary="List users (admins only)",
        responses={200: UserListOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


# --- Budgets --------------------------------------------------------------------------------


class BudgetFilter(django_filters.FilterSet):
    """``?subject_kind=``, ``?subject_id=``, ``?period=``."""

    subject_kind = AnyChoiceFilter(
        choices=Budget.SubjectKind.choices, help_text="Only budgets of this kind of subject (empty: any)."
    )
    subject_id = IdFilter()
    period = AnyChoiceFilter(choices=Budget.Period.choices, help_text="Only this period (empty: any).")

    class Meta:
        model = Budget
        fields = ["subject_kind", "subject_id", "period"]


_BUDGET_EXAMPLE = OpenApiExample(
    "monthly user budget",
    request_only=True,
    value={"name": "Alice monthly", "subject_kind": "user", "subject_id": 2, "period": "monthly", "limit_usd": "25.00"},
)


@extend_schema_view(
    list=extend_schema(
        summary="List budgets with their current period's usage: admins every budget, members their own",
        parameters=[
            OpenApiParameter("subject_id", ID_SCHEMA, description="Only budgets of this subject id."),
        ],
        responses={200: BudgetOutputSerializer, **_errors(400, 401)},
    ),
    retrieve=extend_schema(
        summary="Get a budget and its current period's usage (another user's budget is a 404)",
        responses={200: BudgetOutputSerializer, **_errors(401, 404)},
    ),
    create=extend_schema(
        summary="Create a budget (organization owners and admins)",
        request=BudgetCreateInputSerializer,
        examples=[_BUDGET_EXAMPLE],
        responses={201: BudgetOutputSerializer, **_errors(400, 401, 403)},
    ),
    partial_update=extend_schema(
        summary="Change a budget (organization owners and admins)",
        request=BudgetUpdateInputSerializer,
        responses={200: BudgetOutputSerializer, **_errors(400, 401, 403, 404)},
    ),
    destroy=extend_schema(
        summary="Delete a budget (organization owners and admins)",
        responses={204: OpenApiResponse(description="Deleted."), **_errors(401, 403, 404)},
    ),
    mine=extend_schema(
        summary="The budgets that limit the caller (user, keys, the keys' teams, organizations), with what remains",
        responses={200: BudgetOutputSerializer(many=True), **_errors(401)},
    ),
)
@extend_schema(tags=["budgets"])
class BudgetViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Spending limits per user, API key, team or organization (``accounts.metering.budgets`` enforces
    them on every reply).

    The organization's owners and admins (and platform admins) create, change and delete budgets of
    the organization the request acts in, for its members, keys, teams and itself (a subject of
    another organization is a 400, as a missing one; another organization's budget a 404); members
    read the budgets that limit them (another user's budget is a 404, a write a 403). ``usage`` is
    the current period's spent, reserved and remaining amount.
    """

    serializer_class = BudgetOutputSerializer
    filter_backends = (django_filters.rest_framework.DjangoFilterBackend,)
    filterset_class = BudgetFilter
    lookup_value_regex = ID_LOOKUP_REGEX
    http_method_names = ("get", "post", "patch", "delete", "head", "options")

    def get_queryset(self) -> QuerySet[Budget]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular inspecting the view
            return Budget.objects.none()
        actor = request_principal(self.request)
        return budget_list(user=actor.user, acting=actor.acting).order_by("id")

    def get_object(self) -> Budget:
        actor = request_principal(self.request)
        return budget_get_for(user=actor.user, budget_id=self.kwargs["pk"], acting=actor.acting)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = BudgetCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        budget = budget_create(
            actor=actor.user,
            organization=actor.organization,
            administers=administers(actor.user, actor.acting),
            **serializer.validated_data,
        )
        return Response(BudgetOutputSerializer(budget).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # PUT is not offered (http_method_names): every update is partial.
        serializer = BudgetUpdateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        budget = budget_update(
            actor=actor.user,
            budget=self.get_object(),
            data=serializer.validated_data,
            administers=administers(actor.user, actor.acting),
        )
        return Response(BudgetOutputSerializer(budget).data)

    def perform_destroy(self, instance: Budget) -> None:
        actor = request_principal(self.request)
        budget_delete(actor=actor.user, budget=instance, administers=administers(actor.user, actor.acting))

    @action(detail=False, methods=["get"], pagination_class=None, filter_backends=())
    def mine(self, request: Request) -> Response:
        budgets = budget_list_own(user=request_user(request)).order_by("id")
        return Response(BudgetOutputSerializer(budgets, many=True).data)


# --- Audit log ------------------------------------------------------------------------------


class AuditEventFilter(django_filters.FilterSet):
    """``?action=``, ``?actor=<user id>``, ``?actor_username=``, ``?object_type=``, ``?since=``, ``?until=``.

    ``actor_username`` finds failed logins (no actor) by the username tried; ``since`` is inclusive,
    ``until`` exclusive.
    """

    action = AnyChoiceFilter(choices=AuditEvent.Action.choices, help_text="Only this action (empty: any).")
    actor = IdFilter(field_name="actor_id")
    actor_username = django_filters.CharFilter()
    object_type = django_filters.CharFilter()
    since = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ["action", "actor", "actor_username", "object_type", "since", "until"]


@extend_schema(
    tags=["audit-log"],
    summary="The audit log, newest first (admins only); JSON, or CSV with ?format=csv",
    description=(
        "Security-relevant events: logins and failed logins, API keys created and revoked, changes of "
        "users' roles, budgets, providers, models, aliases and deployments, each with who (`actor`, "
        "`actor_username`: for a failed login the username tried), what (`action`, `object_type`, "
        "`object_id`, `object_repr`), when, from which IP, and the changed fields' values `before` and "
        "`after` (secrets only as `[set]` / `[changed]`). Filters: `action`, `actor` (a user id), "
        "`actor_username` (exact; finds failed logins by the username tried), "
        "`object_type` (e.g. `accounts.budget`), `since` (inclusive) and `until` (exclusive), ISO 8601 "
        "date-times. `format=csv` (or `Accept: text/csv`) answers every matching event as CSV with a header "
        "row, unpaginated (`before`/`after` as JSON text). Members get 403."
    ),
    # django-filter reads an empty value as no filter, so the date-times admit "" (as the server does;
    # the ``action`` enum says so through ``AnyChoiceFilter``).
    parameters=[
        OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv"], description="default json"),
        OpenApiParameter("actor", ID_SCHEMA, description="Only events of this user id."),
        *(
            OpenApiParameter(
                name,
                {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "string", "enum": [""]}]},
                description=f"ISO 8601 date-time, {bound} (empty: no bound).",
            )
            for name, bound in (("since", "inclusive"), ("until", "exclusive"))
        ),
    ],
    responses={
        (200, "application/json"): AuditEventOutputSerializer(many=True),
        (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="a header row, then one row per event"),
        **{(code, "application/json"): response for code, response in _errors(400, 401, 403).items()},
    },
)
class AuditEventListApi(CSVExportMixin, ListAPIView):
    """List audit events for admins, filtered; JSON pages or one CSV download. The log is append-only."""

    serializer_class = AuditEventOutputSerializer
    filter_backends = (django_filters.rest_framework.DjangoFilterBackend,)
    filterset_class = AuditEventFilter
    csv_header = AUDIT_EVENT_CSV_COLUMNS

    def get_queryset(self) -> QuerySet[AuditEvent]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular inspecting the view
            return AuditEvent.objects.none()
        actor = request_principal(self.request)
        return audit_event_list(actor=actor.user, acting=actor.acting)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not isinstance(request.accepted_renderer, CSVRenderer):
            return super().list(request, *args, **kwargs)
        events = self.filter_queryset(self.get_queryset())
        return Response(
            audit_event_csv_rows(events.iterator()),
            headers={"Content-Disposition": 'attachment; filename="audit-log.csv"'},
        )
