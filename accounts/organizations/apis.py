"""REST endpoints an organization's owners and admins run it with, and the invitation's acceptance.

All act in the organization the request names (``OpenAI-Organization``, else the caller's
default). Any member (viewers too) reads the organization's members and teams; owners and admins
change them and invite; only an owner grants ``owner``. Each view parses input, calls one service
or selector of ``accounts.organizations`` and shapes the output.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ..apis import AuthRateThrottle, _errors
from ..authentication import request_principal
from ..models import Invitation, Membership, Organization, Team, User
from ..scopes import APIKeyScopePermission
from .selectors import invitation_list, member_get_for, member_list, organization_list, team_get_for, team_list
from .serializers import (
    InvitationAcceptInputSerializer,
    InvitationAcceptOutputSerializer,
    InvitationCreateInputSerializer,
    InvitationOutputSerializer,
    MemberOutputSerializer,
    MemberUpdateInputSerializer,
    OrganizationOutputSerializer,
    TeamCreateInputSerializer,
    TeamMemberAddInputSerializer,
    TeamMemberOutputSerializer,
    TeamOutputSerializer,
    TeamUpdateInputSerializer,
)
from .services import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_remove,
    membership_role_change,
    team_create,
    team_delete,
    team_member_add,
    team_member_remove,
    team_update,
)

_ADMINS_ONLY = "Owners and admins of the organization only (403 `permission_denied` for members and viewers)."


class OrganizationListApi(ListAPIView):
    """List the organizations the caller belongs to, with their role in each (the superuser: all)."""

    serializer_class = OrganizationOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[Organization]:
        return organization_list(user=request_principal(self.request).user)

    @extend_schema(
        tags=["organizations"],
        summary="The organizations the caller belongs to, with their role (the platform superuser: every one)",
        description=(
            "Name one in the `OpenAI-Organization: <slug>` header to act in it; `is_default` marks the one "
            "requests act in when they name none."
        ),
        responses={200: OrganizationOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


# --- Members -------------------------------------------------------------------------------------


class MemberListApi(ListAPIView):
    """List the members of the acting organization with their roles; any member may read it."""

    serializer_class = MemberOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[Membership]:
        return member_list(acting=request_principal(self.request).acting)

    @extend_schema(
        tags=["organizations"],
        summary="The members of the organization the request acts in, with their roles",
        description=(
            "Any member reads it, viewers included (usernames and roles; emails are in `GET /api/users/`, for admins)."
        ),
        responses={200: MemberOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class MemberDetailApi(APIView):
    """Read, change the role of, or remove a member of the acting organization."""

    @extend_schema(
        tags=["organizations"],
        summary="A member of the organization (another organization's user is a 404)",
        responses={200: MemberOutputSerializer, **_errors(401, 403, 404)},
    )
    def get(self, request: Request, user_id: int) -> Response:
        principal = request_principal(request)
        membership = member_get_for(actor=principal.user, acting=principal.acting, user_id=user_id)
        return Response(MemberOutputSerializer(membership).data)

    @extend_schema(
        tags=["organizations"],
        summary="Change a member's role",
        description=(
            f"{_ADMINS_ONLY} Only an owner grants or takes away `owner` (403); the last owner keeps it (400 "
            "`last_owner`). The member's open WebSockets close (they reconnect with the new role). Another "
            "organization's user is a 404."
        ),
        request=MemberUpdateInputSerializer,
        responses={200: MemberOutputSerializer, **_errors(400, 401, 403, 404)},
    )
    def patch(self, request: Request, user_id: int) -> Response:
        serializer = MemberUpdateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request_principal(request)
        membership = membership_role_change(
            actor=principal.user, acting=principal.acting, user_id=user_id, role=serializer.validated_data["role"]
        )
        return Response(MemberOutputSerializer(membership).data)

    @extend_schema(
        tags=["organizations"],
        summary="Remove a member from the organization (and its teams); their data stays",
        description=(
            f"{_ADMINS_ONLY} Only an owner removes an owner (403); never the last owner (400 `last_owner`). "
            "The member's open WebSockets close and their API keys of the organization stop working."
        ),
        request=None,
        responses={204: OpenApiResponse(description="Removed."), **_errors(400, 401, 403, 404)},
    )
    def delete(self, request: Request, user_id: int) -> Response:
        principal = request_principal(request)
        membership_remove(actor=principal.user, acting=principal.acting, user_id=user_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Teams ---------------------------------------------------------------------------------------


class TeamListCreateApi(ListAPIView):
    """List the acting organization's teams with their members, or create one."""

    serializer_class = TeamOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[Team]:
        return team_list(acting=request_principal(self.request).acting)

    @extend_schema(
        tags=["teams"],
        summary="The teams of the organization, with their members (any member reads them)",
        responses={200: TeamOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        tags=["teams"],
        summary="Create a team",
        description=(
            f"{_ADMINS_ONLY} `slug` defaults to the name, slugified; 400 naming `slug` when the organization "
            "has a team of that slug, or the name has no letter or digit to make one of."
        ),
        request=TeamCreateInputSerializer,
        examples=[OpenApiExample("team", request_only=True, value={"name": "Research", "slug": "research"})],
        responses={201: TeamOutputSerializer, **_errors(400, 401, 403)},
    )
    def post(self, request: Request) -> Response:
        serializer = TeamCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request_principal(request)
        team = team_create(actor=principal.user, acting=principal.acting, **serializer.validated_data)
        return Response(TeamOutputSerializer(team).data, status=status.HTTP_201_CREATED)


class TeamDetailApi(APIView):
    """Read, rename or delete a team of the acting organization, named by its id or its slug."""

    @extend_schema(
        tags=["teams"],
        summary="A team and its members, by id or slug (another organization's team is a 404)",
        responses={200: TeamOutputSerializer, **_errors(401, 403, 404)},
    )
    def get(self, request: Request, team: str) -> Response:
        principal = request_principal(request)
        found = team_get_for(actor=principal.user, acting=principal.acting, team=team)
        return Response(TeamOutputSerializer(found).data)

    @extend_schema(
        tags=["teams"],
        summary="Rename a team or change its slug",
        description=f"{_ADMINS_ONLY} 400 naming `slug` when the organization has another team of that slug.",
        request=TeamUpdateInputSerializer,
        responses={200: TeamOutputSerializer, **_errors(400, 401, 403, 404)},
    )
    def patch(self, request: Request, team: str) -> Response:
        serializer = TeamUpdateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request_principal(request)
        found = team_get_for(actor=principal.user, acting=principal.acting, team=team)
        updated = team_update(actor=principal.user, acting=principal.acting, team=found, data=serializer.validated_data)
        reread = team_get_for(actor=principal.user, acting=principal.acting, team=str(updated.pk))
        return Response(TeamOutputSerializer(reread).data)

    @extend_schema(
        tags=["teams"],
        summary="Delete a team (its members stay in the organization)",
        description=_ADMINS_ONLY,
        request=None,
        responses={204: OpenApiResponse(description="Deleted."), **_errors(401, 403, 404)},
    )
    def delete(self, request: Request, team: str) -> Response:
        principal = request_principal(request)
        found = team_get_for(actor=principal.user, acting=principal.acting, team=team)
        team_delete(actor=principal.user, acting=principal.acting, team=found)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TeamMemberAddApi(APIView):
    """Add a member of the acting organization to one of its teams."""

    @extend_schema(
        tags=["teams"],
        summary="Add a member of the organization to a team",
        description=(
            f"{_ADMINS_ONLY} 400 `not_a_member` (param `user_id`) for anyone who is not a member of the "
            "organization, another organization's users included: they are never added. 201 when added; 200 "
            "when they were in the team already."
        ),
        request=TeamMemberAddInputSerializer,
        responses={
            201: TeamMemberOutputSerializer,
            200: TeamMemberOutputSerializer,
            **_errors(400, 401, 403, 404),
        },
    )
    def post(self, request: Request, team: str) -> Response:
        serializer = TeamMemberAddInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request_principal(request)
        found = team_get_for(actor=principal.user, acting=principal.acting, team=team)
        team_membership, created = team_member_add(
            actor=principal.user, acting=principal.acting, team=found, user_id=serializer.validated_data["user_id"]
        )
        return Response(
            TeamMemberOutputSerializer(team_membership).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class TeamMemberRemoveApi(APIView):
    """Remove a member from a team of the acting organization."""

    @extend_schema(
        tags=["teams"],
        summary="Remove a member from a team (they stay in the organization)",
        description=f"{_ADMINS_ONLY} 404 when the team has no such member.",
        request=None,
        responses={204: OpenApiResponse(description="Removed."), **_errors(401, 403, 404)},
    )
    def delete(self, request: Request, team: str, user_id: int) -> Response:
        principal = request_principal(request)
        found = team_get_for(actor=principal.user, acting=principal.acting, team=team)
        team_member_remove(actor=principal.user, acting=principal.acting, team=found, user_id=user_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Invitations ---------------------------------------------------------------------------------


class InvitationListCreateApi(ListAPIView):
    """List the acting organization's pending invitations, or invite an email address."""

    serializer_class = InvitationOutputSerializer
    filter_backends = ()

    def get_queryset(self) -> QuerySet[Invitation]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular inspecting the view
            return Invitation.objects.none()
        principal = request_principal(self.request)
        return invitation_list(actor=principal.user, acting=principal.acting)

    @extend_schema(
        tags=["invitations"],
        summary="The organization's pending invitations (not accepted, revoked or expired), newest first",
        description=_ADMINS_ONLY,
        responses={200: InvitationOutputSerializer, **_errors(401, 403)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        tags=["invitations"],
        summary="Invite an email address to the organization; a signed link is emailed to it",
        description=(
            f"{_ADMINS_ONLY} Only an owner invites an owner (403). The link (`INVITATION_URL?token=...`) is valid "
            "for `INVITATION_MAX_AGE_SECONDS` (default 7 days), once; its token appears nowhere else. 400 naming "
            "the field: a team id that is not the organization's (`teams`), the address of a member already "
            "(`already_member`), or one with a pending invitation (`invitation_pending`: revoke it first)."
        ),
        request=InvitationCreateInputSerializer,
        examples=[
            OpenApiExample(
                "invitation", request_only=True, value={"email": "ada@example.com", "role": "member", "teams": []}
            )
        ],
        responses={201: InvitationOutputSerializer, **_errors(400, 401, 403)},
    )
    def post(self, request: Request) -> Response:
        serializer = InvitationCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = request_principal(request)
        data = serializer.validated_data
        invitation = invitation_create(
            actor=principal.user,
            acting=principal.acting,
            email=data["email"],
            role=data["role"],
            team_ids=data["teams"],
        )
        return Response(InvitationOutputSerializer(invitation).data, status=status.HTTP_201_CREATED)


class InvitationRevokeApi(APIView):
    """Revoke a pending invitation of the acting organization: its link stops working."""

    @extend_schema(
        tags=["invitations"],
        summary="Revoke an invitation (its link stops working)",
        description=(
            f"{_ADMINS_ONLY} Another organization's invitation is a 404; an accepted one a 400 `invitation_used`. "
            "Revoking a revoked invitation is a 204 again."
        ),
        request=None,
        responses={204: OpenApiResponse(description="Revoked."), **_errors(400, 401, 403, 404)},
    )
    def delete(self, request: Request, invitation_id: int) -> Response:
        principal = request_principal(request)
        invitation_revoke(actor=principal.user, acting=principal.acting, invitation_id=invitation_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationAcceptApi(APIView):
    """Accept an invitation: a logged-in user joins; without a login, a new account is made and joins."""

    # Callers without credentials create an account (as at registration); a logged-in caller joins.
    permission_classes = (AllowAny, APIKeyScopePermission)
    throttle_classes = (AuthRateThrottle,)
    throttle_scope = "auth_register"

    @extend_schema(
        tags=["invitations"],
        summary="Accept an invitation with its link's token: join as the caller, or as a new account",
        description=(
            "With a login (JWT): send `{token}`; the caller joins the organization with the invitation's role "
            "and teams. Without one: send `{token, username, password}`; an account is made with the invited "
            "email, verified (the link reached it), and joins (its default organization is this one). "
            "Single use. 400 (param `token`): `invitation_invalid` (tampered or unknown), `invitation_expired`, "
            "`invitation_revoked`, `invitation_used`, `already_member`; 400 naming `username` or `password` "
            "when one is missing, taken or refused by the password validators."
        ),
        request=InvitationAcceptInputSerializer,
        responses={201: InvitationAcceptOutputSerializer, **_errors(400, 401, 403, 429)},
    )
    def post(self, request: Request) -> Response:
        serializer = InvitationAcceptInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        user = request.user if isinstance(request.user, User) and request.user.is_authenticated else None
        membership = invitation_accept(
            token=data["token"], user=user, username=data.get("username"), password=data.get("password")
        )
        return Response(InvitationAcceptOutputSerializer(membership).data, status=status.HTTP_201_CREATED)
