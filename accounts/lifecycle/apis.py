"""REST endpoints of the account lifecycle: passwords, email verification, deactivation.

Each view parses input, calls one service of ``accounts.lifecycle.services`` and shapes the
output. The endpoints a stranger may call are throttled per client IP (``auth_password`` scope,
``AUTH_PASSWORD_RATE``), as login and registration are.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ..apis import AuthRateThrottle, _errors
from ..authentication import request_user
from ..serializers import AuthTokenObtainInputSerializer, AuthTokenPairOutputSerializer, UserListOutputSerializer
from .serializers import (
    EmailVerificationResendInputSerializer,
    EmailVerifyInputSerializer,
    LifecycleAcceptedOutputSerializer,
    PasswordChangeInputSerializer,
    PasswordResetConfirmInputSerializer,
    PasswordResetInputSerializer,
)
from .services import (
    email_verification_resend,
    email_verify,
    password_change,
    password_reset_confirm,
    password_reset_request,
    user_deactivate,
    user_reactivate,
)

RESET_ACCEPTED = "If an account has this email address, a link to reset its password was sent to it."
VERIFICATION_ACCEPTED = "If an unverified account has this email address, a new verification link was sent to it."


class _PublicLifecycleApi(APIView):
    """No authentication (a stale token must not block these), throttled per client IP."""

    authentication_classes = ()
    permission_classes = (AllowAny,)
    throttle_classes = (AuthRateThrottle,)
    throttle_scope = "auth_password"


class PasswordChangeApi(APIView):
    """Change the caller's password; every login of theirs ends, and the answer is a new one."""

    throttle_classes = (AuthRateThrottle,)
    throttle_scope = "auth_password"

    @extend_schema(
        tags=["auth"],
        summary="Change the caller's password (ends every login; answers a new JWT pair)",
        description=(
            "Checks `old_password`, then `new_password` against the server's password validators (400 naming "
            "the field: `password_incorrect`, `password_not_set` for an account without a local password, "
            "`password_too_short`, ...). Every refresh token of the user is blacklisted and their logins' "
            "WebSockets close; access tokens already issued expire on their own. API keys keep working."
        ),
        request=PasswordChangeInputSerializer,
        responses={200: AuthTokenPairOutputSerializer, **_errors(400, 401, 429)},
    )
    def post(self, request: Request) -> Response:
        serializer = PasswordChangeInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = password_change(user=request_user(request), **serializer.validated_data)
        refresh = AuthTokenObtainInputSerializer.get_token(user)
        return Response(
            AuthTokenPairOutputSerializer({"access": str(refresh.access_token), "refresh": str(refresh)}).data
        )


class PasswordResetApi(_PublicLifecycleApi):
    """Email a password reset link to the account of an address; 202 whether or not one has it."""

    @extend_schema(
        tags=["auth"],
        summary="Ask for a password reset link by email (202 whether or not the address is known)",
        description=(
            "Sends `PASSWORD_RESET_URL?uid=...&token=...` to each active account with this email and a local "
            "password; the client's page posts `uid`, `token` and the new password to "
            "`/api/auth/password/reset/confirm/`. The link is valid for `PASSWORD_RESET_TIMEOUT` seconds, and "
            "only until the password changes or the user logs in."
        ),
        request=PasswordResetInputSerializer,
        responses={202: LifecycleAcceptedOutputSerializer, **_errors(400, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = PasswordResetInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        password_reset_request(email=serializer.validated_data["email"])
        return Response({"detail": RESET_ACCEPTED}, status=status.HTTP_202_ACCEPTED)


class PasswordResetConfirmApi(_PublicLifecycleApi):
    """Set a new password with the ``uid`` and ``token`` of a reset link."""

    @extend_schema(
        tags=["auth"],
        summary="Set a new password with a reset link's uid and token",
        description=(
            "400 `invalid_link` (param `token`) for a wrong, expired or already used link; 400 naming "
            "`new_password` when the password validators refuse it. Every login of the user ends; the email "
            "counts as verified."
        ),
        request=PasswordResetConfirmInputSerializer,
        responses={204: OpenApiResponse(description="The password is set; log in with it."), **_errors(400, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = PasswordResetConfirmInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        password_reset_confirm(**serializer.validated_data)
        return Response(status=status.HTTP_204_NO_CONTENT)


class EmailVerifyApi(_PublicLifecycleApi):
    """Verify an account's email with the token of its verification link."""

    @extend_schema(
        tags=["auth"],
        summary="Verify an email address with the token of the link sent to it",
        description=(
            "With `EMAIL_VERIFICATION_REQUIRED` on, a registered account may log in and use API keys only "
            "once verified. 400 `invalid_link` or `link_expired` (param `token`, valid "
            "`EMAIL_VERIFICATION_MAX_AGE_SECONDS`); verifying twice is harmless."
        ),
        request=EmailVerifyInputSerializer,
        responses={204: OpenApiResponse(description="The email is verified."), **_errors(400, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = EmailVerifyInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        email_verify(token=serializer.validated_data["token"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class EmailVerificationResendApi(_PublicLifecycleApi):
    """Send a new verification link to the unverified account of an address; 202 whether or not one has it."""

    @extend_schema(
        tags=["auth"],
        summary="Send a new email verification link (202 whether or not the address is known)",
        request=EmailVerificationResendInputSerializer,
        responses={202: LifecycleAcceptedOutputSerializer, **_errors(400, 429)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = EmailVerificationResendInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        email_verification_resend(email=serializer.validated_data["email"])
        return Response({"detail": VERIFICATION_ACCEPTED}, status=status.HTTP_202_ACCEPTED)


class UserDeactivateApi(APIView):
    """Deactivate a user (admins only): their keys and tokens stop working and their connections close."""

    @extend_schema(
        tags=["users"],
        summary="Deactivate a user (admins only); their data stays",
        description=(
            "At once, in every server process: the user's API keys and JWTs are refused (401 `user_inactive`), "
            "their WebSockets close (4401) and their streaming replies stop; their refresh tokens are "
            "blacklisted. Keys are not revoked: `reactivate` makes them work again. 403 for members (and for "
            "an admin deactivating a superuser), 400 `cannot_deactivate_self`, 404 for an unknown user."
        ),
        request=None,
        responses={200: UserListOutputSerializer, **_errors(400, 401, 403, 404)},
    )
    def post(self, request: Request, user_id: int) -> Response:
        user = user_deactivate(actor=request_user(request), user_id=user_id)
        return Response(UserListOutputSerializer(user).data)


class UserReactivateApi(APIView):
    """Reactivate a deactivated user (admins only)."""

    @extend_schema(
        tags=["users"],
        summary="Reactivate a user (admins only): their API keys work again, they may log in",
        request=None,
        responses={200: UserListOutputSerializer, **_errors(401, 403, 404)},
    )
    def post(self, request: Request, user_id: int) -> Response:
        user = user_reactivate(actor=request_user(request), user_id=user_id)
        return Response(UserListOutputSerializer(user).data)
