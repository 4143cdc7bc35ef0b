"""Accounts API routes, mounted at ``/api/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import apis
from .lifecycle import apis as lifecycle_apis

app_name = "accounts"

router = SimpleRouter()
router.register("budgets", apis.BudgetViewSet, basename="budget")

urlpatterns = [
    path("auth/register/", apis.UserRegisterApi.as_view(), name="register"),
    path("auth/token/", apis.AuthTokenObtainApi.as_view(), name="token-obtain"),
    path("auth/token/refresh/", apis.AuthTokenRefreshApi.as_view(), name="token-refresh"),
    path("auth/logout/", apis.AuthLogoutApi.as_view(), name="logout"),
    path("auth/me/", apis.UserMeApi.as_view(), name="me"),
    path("auth/password/change/", lifecycle_apis.PasswordChangeApi.as_view(), name="password-change"),
    path("auth/password/reset/", lifecycle_apis.PasswordResetApi.as_view(), name="password-reset"),
    path(
        "auth/password/reset/confirm/",
        lifecycle_apis.PasswordResetConfirmApi.as_view(),
        name="password-reset-confirm",
    ),
    path("auth/email/verify/", lifecycle_apis.EmailVerifyApi.as_view(), name="email-verify"),
    path(
        "auth/email/verify/resend/",
        lifecycle_apis.EmailVerificationResendApi.as_view(),
        name="email-verify-resend",
    ),
    path("api-keys/", apis.APIKeyListCreateApi.as_view(), name="api-key-list"),
    path("api-keys/<int:api_key_id>/", apis.APIKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("api-keys/<int:api_key_id>/rotate/", apis.APIKeyRotateApi.as_view(), name="api-key-rotate"),
    path("usage/", apis.UsageRecordListApi.as_view(), name="usage-list"),
    path("usage/summary/", apis.UsageSummaryApi.as_view(), name="usage-summary"),
    path("users/", apis.UserListApi.as_view(), name="user-list"),
    path("audit-log/", apis.AuditEventListApi.as_view(), name="audit-log"),
    path("users/<int:user_id>/deactivate/", lifecycle_apis.UserDeactivateApi.as_view(), name="user-deactivate"),
    path("users/<int:user_id>/reactivate/", lifecycle_apis.UserReactivateApi.as_view(), name="user-reactivate"),
    *router.urls,
]
