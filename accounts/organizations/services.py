"""Writes of an organization's administration: members' roles, teams, invitations.

Every write is checked against the caller's role in the organization the request acts in
(``ActingOrganization``): owners and admins manage members, teams and invitations; only an owner
grants or takes away the ``owner`` role; the last owner stays. Another organization's member,
team or invitation does not exist here (404; the attempt is audited, ``access.denied``, outside
the write's transaction so its rollback keeps the row). Each write records one audit row
(``accounts.audit``); a membership changed or removed ends the member's open sockets through the
``Membership`` signals of ``accounts.revocation`` (so a ``save()`` / ``delete()``, never a
queryset ``update()``).

Invitations: the emailed link carries a token signed with ``django.core.signing`` (salted, with
a timestamp) that names the invitation; the token is made when the email is sent and never
stored or logged. Accepting checks the signature, then the row: revoked, already accepted or past
``expires_at`` are refused, and the row is locked so a token is used once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from django.conf import settings
from django.core import signing
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.http import urlencode
from django.utils.text import slugify

from chatbackend.errors import ApplicationError, NotFoundError

from ..audit import (
    Action,
    AuditState,
    audit_denied_lookup,
    audit_model_changed,
    audit_model_deleted,
    audit_record,
    audit_snapshot,
)
from ..models import Invitation, Membership, Organization, Team, TeamMembership, User
from ..selectors import ActingOrganization, administers
from ..services import user_register

Role = Membership.Role

# Namespaces the signature of invitation tokens: a value signed for anything else fails.
INVITATION_SALT = "accounts.organizations.invitation"
INVITATION_EMAIL_TEMPLATE = "accounts/email/invitation.txt"


def _forbidden(message: str) -> ApplicationError:
    return ApplicationError(message, code="permission_denied", status=403)


def organization_admin_check(*, actor: User, acting: ActingOrganization, what: str) -> None:
    """Raise 403 ``permission_denied`` unless ``actor`` administers the organization it acts in.

    Owners and admins of it, the platform superuser and the platform ``admin`` role do
    (``accounts.selectors.administers``). ``what``: the action, for the message.
    """
    if not administers(actor, acting):
        raise _forbidden(f"Only the organization's owners and admins may {what}.")


def _is_owner(actor: User, acting: ActingOrganization) -> bool:
    return actor.is_superuser or acting.role == Role.OWNER


def _owner_check(*, actor: User, acting: ActingOrganization, what: str) -> None:
    if not _is_owner(actor, acting):
        raise _forbidden(f"Only an owner of the organization may {what}.")


# --- Members -------------------------------------------------------------------------------------


def member_audit_denied(*, actor: User, acting: ActingOrganization, user_id: int) -> AbstractContextManager[None]:
    """Around a lookup of member ``user_id`` of the acting organization: when it is a 404
    ``member_not_found`` and ``user_id`` is a member of another organization (one ``actor`` is not a
    member of), audit ``access.denied`` (object ``accounts.user`` ``user_id``)."""
    return audit_denied_lookup(
        actor=actor,
        organization=acting.organization,
        model=Membership,
        lookup=Q(user_id=user_id),
        code="member_not_found",
        object_type="accounts.user",
        object_id=user_id,
    )


def _membership_for_update(*, acting: ActingOrganization, user_id: int) -> Membership:
    """Return the membership of ``user_id`` in the acting organization, locked; 404 ``member_not_found``."""
    membership = (
        Membership.objects.select_for_update()
        .select_related("user", "organization")
        .filter(organization=acting.organization, user_id=user_id)
        .first()
    )
    if membership is None:
        raise NotFoundError("No member with this id in this organization.", code="member_not_found")
    return membership


def _last_owner_check(membership: Membership) -> None:
    """Refuse (400 ``last_owner``) to take the ``owner`` role from the organization's only owner.

    The owners' rows are locked, so two requests demoting the last two owners at once cannot both pass.
    """
    if membership.role != Role.OWNER:
        return
    owners = list(
        Membership.objects.select_for_update()
        .filter(organization_id=membership.organization_id, role=Role.OWNER)
        .values_list("pk", flat=True)
    )
    if len(owners) <= 1:
        raise ApplicationError(
            "This member is the organization's last owner: make another member an owner first.",
            code="last_owner",
            param="role",
        )


def membership_role_change(*, actor: User, acting: ActingOrganization, user_id: int, role: str) -> Membership:
    """Give member ``user_id`` of the acting organization the role ``role``; return the membership.

    Owners and admins only (403 ``permission_denied``); granting or taking away ``owner`` only by
    an owner (403); the last owner keeps the role (400 ``last_owner``); 404 ``member_not_found``.
    A change is audited (``membership.updated``) and closes the member's open sockets (they
    reconnect with the new role); the same role is no change.
    """
    organization_admin_check(actor=actor, acting=acting, what="change members' roles")
    with member_audit_denied(actor=actor, acting=acting, user_id=user_id), transaction.atomic():
        membership = _membership_for_update(acting=acting, user_id=user_id)
        if membership.role == role:
            return membership
        if membership.user.service_team_id is not None:
            # A team's service user holds the team's keys: a role above member would make them
            # admin credentials that outlive whoever granted it.
            raise ApplicationError(
                "A team's service account keeps the member role.", code="service_account", param="role"
            )
        if Role.OWNER in (membership.role, role):
            _owner_check(actor=actor, acting=acting, what="grant or take away the owner role")
        _last_owner_check(membership)
        before = AuditState(membership)
        membership.role = role
        membership.save(update_fields=["role"])  # save(): the revocation and cache signals
        old, new = before.changes(membership)
        audit_model_changed(obj=membership, before=old, after=new, actor=actor)
    return membership


def membership_remove(*, actor: User, acting: ActingOrganization, user_id: int) -> None:
    """Remove member ``user_id`` from the acting organization, and from its teams.

    Permissions and errors as ``membership_role_change``'s (an owner is removed only by an owner;
    never the last one). The member's open sockets close and their keys of the organization stop
    working; their data stays. Audited once (``membership.deleted``, ``before`` with the team ids
    they left).
    """
    organization_admin_check(actor=actor, acting=acting, what="remove members")
    with member_audit_denied(actor=actor, acting=acting, user_id=user_id), transaction.atomic():
        membership = _membership_for_update(acting=acting, user_id=user_id)
        if membership.role == Role.OWNER:
            _owner_check(actor=actor, acting=acting, what="remove an owner")
        _last_owner_check(membership)
        before = AuditState(membership)
        team_memberships = TeamMembership.objects.filter(user_id=user_id, team__organization=acting.organization)
        team_ids = sorted(team_memberships.values_list("team_id", flat=True))
        team_memberships.delete()
        membership.delete()
        audit_record(
            action=Action.MEMBERSHIP_DELETED,
            obj=membership,
            before={**before.snapshot, "teams": team_ids},
            actor=actor,
            object_id=before.pk,
        )


# --- Teams ---------------------------------------------------------------------------------------


def _team_save(team: Team) -> None:
    """Validate and save ``team``; 400 naming the field (``slug`` taken in the organization, ...)."""
    try:
        team.full_clean()
    except DjangoValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        if field == "__all__":  # the (organization, slug) unique constraint
            field, messages = "slug", ["A team with this slug already exists in this organization."]
        raise ApplicationError(
            f"{field}: {messages[0]}", code="invalid", param=field, fields={field: messages}
        ) from None
    try:
        with transaction.atomic():  # a savepoint: the caller's transaction survives the refusal
            team.save()
    except IntegrityError:  # the same slug saved by another request since full_clean()
        message = "A team with this slug already exists in this organization."
        raise ApplicationError(f"slug: {message}", code="invalid", param="slug", fields={"slug": [message]}) from None


def team_create(*, actor: User, acting: ActingOrganization, name: str, slug: str = "") -> Team:
    """Create a team in the acting organization; ``slug`` defaults to the slugified ``name``.

    Owners and admins only (403); 400 naming ``slug`` when the organization has a team of that
    slug (or ``name`` slugifies to nothing). Audited (``team.created``).
    """
    organization_admin_check(actor=actor, acting=acting, what="create teams")
    team = Team(organization=acting.organization, name=name, slug=slug or slugify(name)[:64])
    if not team.slug:
        raise ApplicationError("slug: give a slug (the name has no letters or digits).", code="invalid", param="slug")
    with transaction.atomic():
        _team_save(team)
        audit_record(action=Action.TEAM_CREATED, obj=team, after=audit_snapshot(team), actor=actor)
    return team


def team_update(*, actor: User, acting: ActingOrganization, team: Team, data: dict[str, Any]) -> Team:
    """Change ``team``'s ``name`` and/or ``slug``; owners and admins only. Audited when something changed."""
    organization_admin_check(actor=actor, acting=acting, what="change teams")
    before = AuditState(team)
    for name in ("name", "slug"):
        if name in data:
            setattr(team, name, data[name])
    with transaction.atomic():
        _team_save(team)
        old, new = before.changes(team)
        if new:
            audit_model_changed(obj=team, before=old, after=new, actor=actor)
    return team


def team_delete(*, actor: User, acting: ActingOrganization, team: Team) -> None:
    """Delete ``team`` and its memberships (the members stay in the organization); owners and admins only.

    Its keys go with it, and its service user is deactivated (``accounts.services.team_service_user_deactivate``).
    """
    organization_admin_check(actor=actor, acting=acting, what="delete teams")
    before = AuditState(team)
    with transaction.atomic():
        team.delete()
        audit_model_deleted(obj=team, before=before, actor=actor)


def team_member_add(
    *, actor: User, acting: ActingOrganization, team: Team, user_id: int
) -> tuple[TeamMembership, bool]:
    """Add member ``user_id`` of the acting organization to ``team``; return it and whether it is new.

    Owners and admins only (403). Someone who is not a member of the organization (another
    organization's user, or no user) is a 400 ``not_a_member`` naming ``user_id``, never added.
    Adding a team's member again changes nothing. Audited when added (``team_membership.created``).
    """
    organization_admin_check(actor=actor, acting=acting, what="change teams")
    if not Membership.objects.filter(organization=acting.organization, user_id=user_id).exists():
        raise ApplicationError(
            "user_id: no member of this organization has this id; invite them first.",
            code="not_a_member",
            param="user_id",
        )
    with transaction.atomic():
        team_membership, created = TeamMembership.objects.get_or_create(team=team, user_id=user_id)
        if created:
            audit_record(
                action=Action.TEAM_MEMBERSHIP_CREATED,
                obj=team_membership,
                after=audit_snapshot(team_membership),
                actor=actor,
            )
    return team_membership, created


def team_member_remove(*, actor: User, acting: ActingOrganization, team: Team, user_id: int) -> None:
    """Remove ``user_id`` from ``team``; owners and admins only; 404 ``team_member_not_found``. Audited."""
    organization_admin_check(actor=actor, acting=acting, what="change teams")
    team_membership = TeamMembership.objects.select_related("team", "user").filter(team=team, user_id=user_id).first()
    if team_membership is None:
        raise NotFoundError("No member with this id in this team.", code="team_member_not_found")
    before = AuditState(team_membership)
    with transaction.atomic():
        team_membership.delete()
        audit_model_deleted(obj=team_membership, before=before, actor=actor)


# --- Invitations ---------------------------------------------------------------------------------


def invitation_create(
    *, actor: User, acting: ActingOrganization, email: str, role: str, team_ids: Sequence[int] = ()
) -> Invitation:
    """Invite ``email`` to the acting organization as ``role``, into the teams ``team_ids``; email the link.

    Owners and admins only (403); an ``owner`` invitation only by an owner (403). 400 naming the
    field: a team that is not the organization's (``teams``), an address of a member already
    (``already_member``), an address with an invitation still pending (``invitation_pending``:
    revoke it first). The invitation expires ``INVITATION_MAX_AGE_SECONDS`` from now; the email
    (``invitation_send``, by a Celery task once the transaction commits) carries the only copy of
    its signed token. Audited (``invitation.created``).
    """
    organization_admin_check(actor=actor, acting=acting, what="invite members")
    if role == Role.OWNER:
        _owner_check(actor=actor, acting=acting, what="invite an owner")
    organization = acting.organization
    email = User.objects.normalize_email(email)
    wanted = sorted(set(team_ids))
    teams = list(Team.objects.filter(organization=organization, pk__in=wanted))
    if len(teams) != len(wanted):
        missing = sorted(set(wanted) - {team.pk for team in teams})
        raise ApplicationError(
            f"teams: this organization has no team with id {', '.join(map(str, missing))}.",
            code="invalid",
            param="teams",
        )
    if Membership.objects.filter(organization=organization, user__email__iexact=email).exists():
        raise ApplicationError(
            "email: a member of this organization already has this address.", code="already_member", param="email"
        )
    now = timezone.now()
    with transaction.atomic():
        pending = Invitation.objects.select_for_update().filter(
            organization=organization, email__iexact=email, accepted_at=None, revoked_at=None, expires_at__gt=now
        )
        if pending.exists():
            raise ApplicationError(
                "email: this address has a pending invitation; revoke it (DELETE /api/invitations/{id}/) to send "
                "a new one.",
                code="invitation_pending",
                param="email",
            )
        invitation = Invitation.objects.create(
            organization=organization,
            email=email,
            role=role,
            invited_by=actor,
            expires_at=now + dt.timedelta(seconds=settings.INVITATION_MAX_AGE_SECONDS),
        )
        invitation.teams.set(teams)
        audit_record(action=Action.INVITATION_CREATED, obj=invitation, after=audit_snapshot(invitation), actor=actor)
        invitation_id = invitation.pk
        transaction.on_commit(lambda: _invitation_send_queue(invitation_id))
    return invitation


def _invitation_send_queue(invitation_id: int) -> None:
    from .tasks import invitation_send_task

    invitation_send_task.delay(invitation_id)


def invitation_revoke(*, actor: User, acting: ActingOrganization, invitation_id: int) -> Invitation:
    """Revoke invitation ``invitation_id`` of the acting organization: its link stops working.

    Owners and admins only (403); 404 ``invitation_not_found`` (another organization's too, also
    audited: ``access.denied``); 400 ``invitation_used`` for one already accepted. Revoking a
    revoked one changes nothing. Audited (``invitation.revoked``).
    """
    organization_admin_check(actor=actor, acting=acting, what="revoke invitations")
    denied = audit_denied_lookup(
        actor=actor,
        organization=acting.organization,
        model=Invitation,
        lookup=Q(pk=invitation_id),
        code="invitation_not_found",
    )
    with denied, transaction.atomic():  # the audit row is written after the rollback
        invitation = (
            Invitation.objects.select_for_update().filter(pk=invitation_id, organization=acting.organization).first()
        )
        if invitation is None:
            raise NotFoundError("No invitation with this id in this organization.", code="invitation_not_found")
        if invitation.accepted_at is not None:
            raise ApplicationError("This invitation was already accepted.", code="invitation_used")
        if invitation.revoked_at is None:
            before = AuditState(invitation)
            invitation.revoked_at = timezone.now()
            invitation.save(update_fields=["revoked_at"])
            old, new = before.changes(invitation)
            audit_record(action=Action.INVITATION_REVOKED, obj=invitation, before=old, after=new, actor=actor)
    return invitation


def invitation_token(*, invitation: Invitation) -> str:
    """Return the signed token of ``invitation``'s link: its id and email, HMAC-signed with a timestamp.

    ``django.core.signing`` (``SECRET_KEY``, salted for invitations). Not stored anywhere: the
    link in the email is its only copy.
    """
    return signing.dumps({"invitation": invitation.pk, "email": invitation.email}, salt=INVITATION_SALT)


def invitation_send(*, invitation_id: int) -> bool:
    """Email invitation ``invitation_id`` its link ``INVITATION_URL?token=...``; False when it is no longer pending."""
    invitation = Invitation.objects.select_related("organization", "invited_by").filter(pk=invitation_id).first()
    if invitation is None or not invitation.is_pending(timezone.now()):
        return False
    link = f"{settings.INVITATION_URL}?{urlencode({'token': invitation_token(invitation=invitation)})}"
    context = {
        "organization": invitation.organization,
        "role": invitation.get_role_display().lower(),
        "invited_by": invitation.invited_by.get_username() if invitation.invited_by else "An administrator",
        "expires_at": invitation.expires_at,
        "link": link,
    }
    body = render_to_string(INVITATION_EMAIL_TEMPLATE, context)
    send_mail(f"You are invited to join {invitation.organization.name}", body, None, [invitation.email])
    return True


_INVALID_INVITATION = "This invitation link is not valid; ask for a new invitation."


def _invitation_refused(message: str, code: str) -> ApplicationError:
    return ApplicationError(message, code=code, param="token")


def _invitation_for_token(token: str) -> Invitation:
    """Return the invitation ``token`` names, locked, if it may be accepted now; else raise a 400.

    Codes (param ``token``): ``invitation_invalid`` (not our signature, tampered, or naming no
    invitation), ``invitation_expired``, ``invitation_revoked``, ``invitation_used``.
    """
    try:
        data: Any = signing.loads(token, salt=INVITATION_SALT, max_age=settings.INVITATION_MAX_AGE_SECONDS)
    except signing.SignatureExpired:
        raise _invitation_refused("This invitation has expired; ask for a new one.", "invitation_expired") from None
    except signing.BadSignature:
        raise _invitation_refused(_INVALID_INVITATION, "invitation_invalid") from None
    invitation_id = data.get("invitation") if isinstance(data, dict) else None
    invitation = (
        Invitation.objects.select_for_update().filter(pk=invitation_id).first()
        if isinstance(invitation_id, int)
        else None
    )
    if invitation is None or invitation.email != data.get("email"):
        raise _invitation_refused(_INVALID_INVITATION, "invitation_invalid")
    if invitation.revoked_at is not None:
        raise _invitation_refused("This invitation was revoked; ask for a new one.", "invitation_revoked")
    if invitation.accepted_at is not None:
        raise _invitation_refused("This invitation was already accepted; it works once.", "invitation_used")
    if invitation.expires_at <= timezone.now():
        raise _invitation_refused("This invitation has expired; ask for a new one.", "invitation_expired")
    if not _inviter_may_still_grant(invitation):
        raise _invitation_refused(
            "Whoever invited you can no longer grant this role here; ask for a new invitation.", "invitation_revoked"
        )
    return invitation


def _inviter_may_still_grant(invitation: Invitation) -> bool:
    """Return whether the invitation's author may still grant its role in its organization, as when
    inviting: an owner or admin there (an owner for ``owner``), or the platform superuser or
    ``admin`` role. An inviter demoted, removed or deleted since takes their pending invitations along."""
    inviter = invitation.invited_by
    if inviter is None or not inviter.is_active:
        return False
    if inviter.is_superuser or inviter.is_admin:
        return True
    role = (
        Membership.objects.filter(user=inviter, organization_id=invitation.organization_id)
        .values_list("role", flat=True)
        .first()
    )
    if invitation.role == Role.OWNER:
        return role == Role.OWNER
    return role in (Role.OWNER, Role.ADMIN)


def invitation_accept(
    *, token: str, user: User | None = None, username: str | None = None, password: str | None = None
) -> Membership:
    """Accept the invitation of ``token``: make ``user`` (or a new account) a member; return the membership.

    ``user``: the authenticated caller, who joins. Without one a new account is made from
    ``username`` and ``password`` (both required: 400 naming the missing one; the password
    validators' and a taken username's 400 as at registration) with the invitation's email,
    verified (the link reached that address); it joins only the inviting organization, its
    default (not the default organization every registered user joins).
    The membership has the invitation's role and its teams (those that still exist). Single use:
    400s of ``_invitation_for_token`` for a bad, expired, revoked or used token; 400
    ``already_member`` when ``user`` is a member already. Audited once (``invitation.accepted``,
    actor the member, ``after`` the user, role and teams).
    """
    with transaction.atomic():
        invitation = _invitation_for_token(token)
        organization: Organization = invitation.organization
        new_account = user is None
        if user is None:
            for name, value in (("username", username), ("password", password)):
                if not value:
                    message = "required to create your account (or log in and send only the token)."
                    raise ApplicationError(f"{name}: {message}", code="required", param=name, fields={name: [message]})
            assert username is not None and password is not None  # noqa: S101 - checked just above
            try:
                # Not the default organization: in a multi-tenant installation its members would
                # see the invited account (and it theirs); the inviting organization is its default.
                user = user_register(
                    username=username,
                    password=password,
                    email=invitation.email,
                    email_proven=True,
                    join_default_organization=False,
                )
            except DjangoValidationError as exc:  # the password validators' verdict
                raise ApplicationError(
                    f"password: {exc.messages[0]}", code="invalid", param="password", fields={"password": exc.messages}
                ) from None
        elif Membership.objects.filter(user=user, organization=organization).exists():
            raise ApplicationError(
                "You are already a member of this organization.", code="already_member", param="token"
            )
        has_default = Membership.objects.filter(user=user, is_default=True).exists()
        try:
            membership = Membership.objects.create(
                user=user, organization=organization, role=invitation.role, is_default=new_account or not has_default
            )
        except IntegrityError:  # joined by another request at the same time
            raise ApplicationError(
                "You are already a member of this organization.", code="already_member", param="token"
            ) from None
        team_ids = sorted(invitation.teams.values_list("pk", flat=True))
        TeamMembership.objects.bulk_create([TeamMembership(team_id=team_id, user=user) for team_id in team_ids])
        before = AuditState(invitation)
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        old, new = before.changes(invitation)
        audit_record(
            action=Action.INVITATION_ACCEPTED,
            obj=invitation,
            before=old,
            after={**new, "user": user.pk, "new_account": new_account, "role": membership.role, "teams": team_ids},
            actor=user,
        )
    return membership
