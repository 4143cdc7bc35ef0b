"""Reads of an organization's administration: the caller's organizations, members, teams, invitations.

Each is scoped to the organization the request acts in (``ActingOrganization``): another
organization's team or invitation is a 404, as another user's key is, and the attempt is audited
(``access.denied``, ``accounts.audit.audit_access_denied``).
"""

from __future__ import annotations

from django.db.models import BooleanField, CharField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from chatbackend.errors import NotFoundError

from ..audit import audit_denied_lookup
from ..models import Invitation, Membership, Organization, Team, User
from ..selectors import ActingOrganization
from .services import member_audit_denied, organization_admin_check


def organization_list(*, user: User) -> QuerySet[Organization]:
    """Return the organizations ``user`` belongs to, each annotated with ``role`` and ``is_default``.

    The platform superuser gets every organization; where they are no member, ``role`` is
    ``owner`` (what they may do there) and ``is_default`` False. Ordered by name.
    """
    mine = Membership.objects.filter(user=user, organization=OuterRef("pk"))
    organizations = Organization.objects.annotate(
        role=Coalesce(Subquery(mine.values("role")[:1]), Value(Membership.Role.OWNER), output_field=CharField()),
        is_default=Coalesce(Subquery(mine.values("is_default")[:1]), Value(False), output_field=BooleanField()),
    ).order_by("name", "id")
    if user.is_superuser:
        return organizations
    return organizations.filter(memberships__user=user)


def member_list(*, acting: ActingOrganization) -> QuerySet[Membership]:
    """Return the memberships of the acting organization with their users, oldest first (any member reads them)."""
    return (
        Membership.objects.filter(organization=acting.organization).select_related("user").order_by("created_at", "id")
    )


def member_get_for(*, actor: User, acting: ActingOrganization, user_id: int) -> Membership:
    """Return the membership of ``user_id`` in the acting organization; 404 ``member_not_found``.

    Another organization's member is audited (``member_audit_denied``).
    """
    with member_audit_denied(actor=actor, acting=acting, user_id=user_id):
        membership = member_list(acting=acting).filter(user_id=user_id).first()
        if membership is None:
            raise NotFoundError("No member with this id in this organization.", code="member_not_found")
    return membership


def team_list(*, acting: ActingOrganization) -> QuerySet[Team]:
    """Return the acting organization's teams with their members, by name (any member reads them)."""
    return (
        Team.objects.filter(organization=acting.organization)
        .prefetch_related("memberships__user")
        .order_by("name", "id")
    )


def _team_named(team: str) -> Q:
    """Return the condition of a team named by ``team``: its id (digits that fit a bigint) or its slug."""
    named = Q(slug=team)
    return named | Q(pk=int(team)) if team.isdigit() and len(team) < 19 else named


def team_get_for(*, actor: User, acting: ActingOrganization, team: str) -> Team:
    """Return the acting organization's team named by ``team``: its id (digits) or else its slug.

    An id that is no team of the organization is then tried as a slug (slugs may be all digits).
    Raises ``NotFoundError`` 404 ``team_not_found`` (another organization's team too, which is
    audited: ``access.denied`` with the team's id, ``accounts.audit.audit_access_denied``).
    """
    with audit_denied_lookup(
        actor=actor, organization=acting.organization, model=Team, lookup=_team_named(team), code="team_not_found"
    ):
        teams = team_list(acting=acting)
        found = teams.filter(pk=int(team)).first() if team.isdigit() and len(team) < 19 else None
        found = found or teams.filter(slug=team).first()
        if found is None:
            raise NotFoundError("No team with this id or slug in this organization.", code="team_not_found")
    return found


def invitation_list(*, actor: User, acting: ActingOrganization) -> QuerySet[Invitation]:
    """Return the acting organization's pending invitations, newest first; owners and admins only (403)."""
    organization_admin_check(actor=actor, acting=acting, what="list invitations")
    return (
        Invitation.objects.filter(
            organization=acting.organization, accepted_at=None, revoked_at=None, expires_at__gt=timezone.now()
        )
        .select_related("invited_by")
        .prefetch_related("teams")
        .order_by("-created_at", "-id")
    )
