"""Accounts API routes, mounted at ``/api/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import apis
from .lifecycle import apis as lifecycle_apis
from .organizations import apis as organization_apis

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
    path("organizations/", organization_apis.OrganizationListApi.as_view(), name="organization-list"),
    path("organization/members/", organization_apis.MemberListApi.as_view(), name="member-list"),
    path("organization/members/<int:user_id>/", organization_apis.MemberDetailApi.as_view(), name="member-detail"),
    path("teams/", organization_apis.TeamListCreateApi.as_view(), name="team-list"),
    path("teams/<slug:team>/", organization_apis.TeamDetailApi.as_view(), name="team-detail"),
    path("teams/<slug:team>/members/", organization_apis.TeamMemberAddApi.as_view(), name="team-member-add"),
    path(
        "teams/<slug:team>/members/<int:user_id>/",
        organization_apis.TeamMemberRemoveApi.as_view(),
        name="team-member-remove",
    ),
    path("invitations/", organization_apis.InvitationListCreateApi.as_view(), name="invitation-list"),
    path("invitations/accept/", organization_apis.InvitationAcceptApi.as_view(), name="invitation-accept"),
    path("invitations/<int:invitation_id>/", organization_apis.InvitationRevokeApi.as_view(), name="invitation-revoke"),
    *router.urls,
]
