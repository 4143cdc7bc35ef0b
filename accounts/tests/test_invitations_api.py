"""Invitations to an organization by a signed link: sent, listed, revoked, accepted once, refused otherwise.

The email is sent by a Celery task queued once the transaction commits, so the tests that invite
run the commit callbacks (``django_capture_on_commit_callbacks``) and read the link from the
outbox, as the invited person would.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import signing
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditEvent, Invitation, Membership, Organization, Team, TeamMembership, User
from accounts.organizations.services import INVITATION_SALT
from tests.factories import PASSWORD, UserFactory
from tests.kit import access_token, bearer

pytestmark = pytest.mark.django_db

ACME = {"OpenAI-Organization": "acme"}
Role = Membership.Role
Action = AuditEvent.Action
NEW_PASSWORD = "a-long-and-unusual-passphrase-42"


@pytest.fixture
def acme(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


@pytest.fixture
def owner(acme) -> User:
    user = UserFactory(username="acme-owner")
    Membership.objects.create(user=user, organization=acme, role=Role.OWNER)
    return user


@pytest.fixture
def admin(acme) -> User:
    user = UserFactory(username="acme-admin")
    Membership.objects.create(user=user, organization=acme, role=Role.ADMIN)
    return user


@pytest.fixture
def research(acme) -> Team:
    return Team.objects.create(organization=acme, name="Research", slug="research")


@pytest.fixture
def invite(client_for, mailoutbox, django_capture_on_commit_callbacks):
    """``invite(by, **body)``: POST an invitation as ``by`` in Acme; return ``(response, token or None)``."""

    def invite(by: User, **body: Any) -> tuple[Any, str | None]:
        sent = len(mailoutbox)
        with django_capture_on_commit_callbacks(execute=True):
            response = client_for(by).post("/api/invitations/", {"role": "member", **body}, headers=ACME)
        if len(mailoutbox) == sent:
            return response, None
        (link,) = re.findall(r"https?://\S+", mailoutbox[-1].body)
        assert link.startswith("http://localhost:8000/accept-invitation?")
        return response, parse_qs(urlsplit(link).query)["token"][0]

    return invite


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    return response.json()["error"]


def _accept(token: str, client: APIClient | None = None, **fields: Any) -> Any:
    return (client or APIClient()).post("/api/invitations/accept/", {"token": token, **fields}, format="json")


def test_an_admin_invites_by_email_and_the_token_is_only_in_the_link(
    invite, admin, acme, research, mailoutbox, client_for
) -> None:
    response, token = invite(admin, email="Ada@Example.com", role="viewer", teams=[research.pk])
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["email"], body["role"], body["teams"], body["invited_by"]) == (
        "Ada@example.com",
        "viewer",
        [research.pk],
        admin.pk,
    )
    assert token is not None
    (email,) = mailoutbox
    assert email.to == ["Ada@example.com"]
    assert "Acme" in email.subject
    assert "acme-admin" in email.body
    # The token is nowhere but the link: not in the answer, the row, the audit row or the listing.
    invitation = Invitation.objects.get()
    (event,) = AuditEvent.objects.filter(action=Action.INVITATION_CREATED)
    listing = client_for(admin).get("/api/invitations/", headers=ACME)
    assert [row["id"] for row in listing.json()["results"]] == [invitation.pk]
    for text in (response.content.decode(), listing.content.decode(), str(event.after), str(vars(invitation))):
        assert token not in text
    assert (event.actor, event.organization, event.after["email"]) == (admin, acme, "Ada@example.com")
    assert abs(invitation.expires_at - invitation.created_at - dt.timedelta(days=7)) < dt.timedelta(seconds=1)


def test_a_new_user_accepts_with_a_username_and_password(invite, admin, acme, research) -> None:
    _, token = invite(admin, email="ada@example.com", role="admin", teams=[research.pk])
    accepted = _accept(token, username="ada", password=NEW_PASSWORD)
    assert accepted.status_code == 201, accepted.content
    body = accepted.json()
    assert (body["organization"]["slug"], body["username"], body["role"], body["is_default"], body["teams"]) == (
        "acme",
        "ada",
        "admin",
        True,
        [research.pk],
    )
    ada = User.objects.get(username="ada")
    assert (ada.email, ada.email_verified, ada.check_password(NEW_PASSWORD)) == ("ada@example.com", True, True)
    assert TeamMembership.objects.filter(team=research, user=ada).exists()
    # The one organization they joined is their default: their requests act in it.
    login = APIClient(headers=bearer(access_token(ada)))
    assert {row["slug"]: row["is_default"] for row in login.get("/api/organizations/").json()["results"]} == {
        "acme": True,
    }
    assert login.get("/api/invitations/").status_code == 200  # an admin of acme, without naming it
    invitation = Invitation.objects.get()
    assert (invitation.accepted_by, invitation.accepted_at is not None) == (ada, True)
    (event,) = AuditEvent.objects.filter(action=Action.INVITATION_ACCEPTED)
    assert (event.actor, event.organization) == (ada, acme)
    assert (event.after["user"], event.after["role"], event.after["teams"], event.after["new_account"]) == (
        ada.pk,
        "admin",
        [research.pk],
        True,
    )
    assert NEW_PASSWORD not in str(event.after)


def test_an_invited_new_user_does_not_join_the_default_organization(invite, admin, client_for) -> None:
    """In a multi-tenant installation the default organization's members read its member list:
    an account made by an invitation belongs to the inviting organization only. Registering
    still joins the default organization."""
    _, token = invite(admin, email="ada@example.com")
    assert _accept(token, username="ada", password=NEW_PASSWORD).status_code == 201
    ada = User.objects.get(username="ada")
    assert list(ada.memberships.values_list("organization__slug", "is_default")) == [("acme", True)]
    login = APIClient(headers=bearer(access_token(ada)))
    refused = _error(login.get("/api/organization/members/", headers={"OpenAI-Organization": "default"}), 401)
    assert refused["code"] == "invalid_organization"
    default_members = client_for(UserFactory()).get("/api/organization/members/").json()["results"]
    assert "ada" not in {row["username"] for row in default_members}

    registered = APIClient().post("/api/auth/register/", {"username": "grace", "password": NEW_PASSWORD}, format="json")
    assert registered.status_code == 201, registered.content
    grace = User.objects.get(username="grace")
    assert list(grace.memberships.values_list("organization__slug", "is_default")) == [("default", True)]


def test_a_logged_in_user_accepts_with_the_token_alone(invite, owner, acme) -> None:
    someone = UserFactory(username="grace")
    _, token = invite(owner, email="grace@example.com", role="owner")
    accepted = _accept(token, APIClient(headers=bearer(access_token(someone))))
    assert accepted.status_code == 201, accepted.content
    membership = Membership.objects.get(user=someone, organization=acme)
    assert (membership.role, membership.is_default) == (Role.OWNER, False)  # their default stays theirs
    assert User.objects.filter(username="grace").count() == 1


def test_a_token_works_once(invite, admin) -> None:
    _, token = invite(admin, email="ada@example.com")
    assert _accept(token, username="ada", password=NEW_PASSWORD).status_code == 201
    again = _error(_accept(token, username="ada2", password=NEW_PASSWORD), 400)
    assert (again["code"], again["param"]) == ("invitation_used", "token")
    assert "already accepted" in again["message"]
    assert not User.objects.filter(username="ada2").exists()


def test_a_revoked_invitation_is_refused(invite, admin, client_for) -> None:
    _, token = invite(admin, email="ada@example.com")
    invitation = Invitation.objects.get()
    assert client_for(admin).delete(f"/api/invitations/{invitation.pk}/", headers=ACME).status_code == 204
    assert client_for(admin).delete(f"/api/invitations/{invitation.pk}/", headers=ACME).status_code == 204
    assert AuditEvent.objects.filter(action=Action.INVITATION_REVOKED).count() == 1
    assert client_for(admin).get("/api/invitations/", headers=ACME).json()["results"] == []
    error = _error(_accept(token, username="ada", password=NEW_PASSWORD), 400)
    assert (error["code"], error["message"]) == (
        "invitation_revoked",
        "This invitation was revoked; ask for a new one.",
    )
    assert not User.objects.filter(username="ada").exists()


def test_an_expired_invitation_is_refused(invite, admin, settings) -> None:
    _, token = invite(admin, email="ada@example.com")
    Invitation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert _error(_accept(token, username="ada", password=NEW_PASSWORD), 400)["code"] == "invitation_expired"
    # The signature's own age counts too (a token older than the setting allows).
    Invitation.objects.update(expires_at=timezone.now() + dt.timedelta(days=1))
    settings.INVITATION_MAX_AGE_SECONDS = 1
    old = signing.dumps({"invitation": Invitation.objects.get().pk, "email": "ada@example.com"}, salt=INVITATION_SALT)
    with pytest.MonkeyPatch.context() as patch:
        later = timezone.now().timestamp() + 5
        patch.setattr("django.core.signing.time.time", lambda: later)
        error = _error(_accept(old, username="ada", password=NEW_PASSWORD), 400)
    assert error["code"] == "invitation_expired"
    assert not User.objects.filter(username="ada").exists()


@pytest.mark.parametrize(
    "tamper",
    [
        lambda token, pk: token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        lambda token, pk: signing.dumps({"invitation": pk, "email": "ada@example.com"}, salt="another.salt"),
        lambda token, pk: signing.dumps({"invitation": pk + 1, "email": "ada@example.com"}, salt=INVITATION_SALT),
        lambda token, pk: signing.dumps({"invitation": pk, "email": "eve@example.com"}, salt=INVITATION_SALT),
        lambda token, pk: signing.dumps(["not", "an", "object"], salt=INVITATION_SALT),
        lambda token, pk: "not-a-token",
    ],
    ids=["signature", "salt", "unknown-id", "other-email", "other-shape", "garbage"],
)
def test_a_tampered_token_is_refused(invite, admin, tamper) -> None:
    _, token = invite(admin, email="ada@example.com")
    bad = tamper(token, Invitation.objects.get().pk)
    error = _error(_accept(bad, username="ada", password=NEW_PASSWORD), 400)
    assert (error["code"], error["param"]) == ("invitation_invalid", "token")
    assert not User.objects.filter(username="ada").exists()
    assert Invitation.objects.get().accepted_at is None


def test_a_new_account_needs_a_username_and_a_valid_password(invite, admin) -> None:
    _, token = invite(admin, email="ada@example.com")
    assert _error(_accept(token), 400)["param"] == "username"
    assert _error(_accept(token, username="ada"), 400)["param"] == "password"
    UserFactory(username="taken")
    assert _error(_accept(token, username="taken", password=NEW_PASSWORD), 400)["param"] == "username"
    assert _error(_accept(token, username="Taken", password=NEW_PASSWORD), 400)["param"] == "username"  # any case
    assert _error(_accept(token, username="ada", password="ada@example.com"), 400)["param"] == "password"
    assert Invitation.objects.get().accepted_at is None  # nothing was used up
    assert _accept(token, username="ada", password=NEW_PASSWORD).status_code == 201


def test_a_member_already_is_refused(invite, admin, acme, client_for) -> None:
    member = UserFactory(username="bob", email="bob@example.com")
    Membership.objects.create(user=member, organization=acme)
    response, token = invite(admin, email="BOB@example.com")
    assert _error(response, 400)["code"] == "already_member"
    assert token is None
    _, token = invite(admin, email="carol@example.com")
    assert _error(_accept(token, APIClient(headers=bearer(access_token(member)))), 400)["code"] == "already_member"


def test_who_may_invite(invite, owner, admin, acme, research) -> None:
    member, viewer = UserFactory(), UserFactory()
    Membership.objects.create(user=member, organization=acme, role=Role.MEMBER)
    Membership.objects.create(user=viewer, organization=acme, role=Role.VIEWER)
    for someone in (member, viewer):
        assert _error(invite(someone, email="x@example.com")[0], 403)["code"] == "permission_denied"
    assert _error(invite(admin, email="x@example.com", role="owner")[0], 403)["code"] == "permission_denied"
    assert invite(owner, email="x@example.com", role="owner")[0].status_code == 201
    pending = invite(owner, email="X@example.com")[0]
    assert _error(pending, 400)["code"] == "invitation_pending"
    other = Team.objects.create(organization=Organization.objects.default(), name="Other", slug="other")
    wrong_team = invite(admin, email="y@example.com", teams=[other.pk])[0]
    assert _error(wrong_team, 400)["param"] == "teams"
    assert Invitation.objects.count() == 1


def test_invitations_of_another_organization_are_not_found(invite, admin, acme, client_for) -> None:
    invite(admin, email="ada@example.com")
    invitation = Invitation.objects.get()
    stranger = UserFactory()  # a member of the default organization only
    Membership.objects.filter(user=stranger).update(role=Role.OWNER)
    client = client_for(stranger)
    assert _error(client.delete(f"/api/invitations/{invitation.pk}/"), 404)["code"] == "invitation_not_found"
    assert client.get("/api/invitations/").json()["results"] == []
    assert Invitation.objects.get().revoked_at is None
    member = UserFactory()
    Membership.objects.create(user=member, organization=acme)
    assert client_for(member).get("/api/invitations/", headers=ACME).status_code == 403
    assert client_for(member).delete(f"/api/invitations/{invitation.pk}/", headers=ACME).status_code == 403


def test_an_accepted_invitation_cannot_be_revoked(invite, admin, client_for) -> None:
    _, token = invite(admin, email="ada@example.com")
    assert _accept(token, username="ada", password=NEW_PASSWORD).status_code == 201
    invitation = Invitation.objects.get()
    response = client_for(admin).delete(f"/api/invitations/{invitation.pk}/", headers=ACME)
    assert _error(response, 400)["code"] == "invitation_used"


def test_a_wrong_login_on_accept_is_a_401_not_a_new_account(invite, admin) -> None:
    _, token = invite(admin, email="ada@example.com")
    response = _accept(token, APIClient(headers=bearer("not-a-jwt")), username="ada", password=PASSWORD)
    assert response.status_code == 401
    assert not User.objects.filter(username="ada").exists()


def test_the_admin_lists_invitations_and_revokes_them_once_audited(invite, admin, admin_site, superuser) -> None:
    _, token = invite(admin, email="ada@example.com")
    invitation = Invitation.objects.get()
    changelist = admin_site.get("/admin/accounts/invitation/")
    assert changelist.status_code == 200
    assert "ada@example.com" in changelist.content.decode()
    assert token not in admin_site.get(f"/admin/accounts/invitation/{invitation.pk}/change/").content.decode()
    response = admin_site.post(
        "/admin/accounts/invitation/", {"action": "revoke_selected", "_selected_action": [invitation.pk]}
    )
    assert response.status_code == 302
    assert Invitation.objects.get().revoked_at is not None
    (event,) = AuditEvent.objects.filter(action=Action.INVITATION_REVOKED)
    assert event.actor == superuser
    assert _error(_accept(token, username="ada", password=NEW_PASSWORD), 400)["code"] == "invitation_revoked"


def test_no_log_line_holds_the_token(invite, admin, caplog) -> None:
    caplog.set_level("DEBUG")
    _, token = invite(admin, email="ada@example.com")
    assert _accept(token, username="ada", password=NEW_PASSWORD).status_code == 201
    assert _accept(token, username="ada2", password=NEW_PASSWORD).status_code == 400
    assert caplog.records  # the task and the requests did log
    assert token not in caplog.text
    assert NEW_PASSWORD not in caplog.text


# --- Review findings --------------------------------------------------------------------------


def test_an_inviter_who_lost_the_right_to_grant_the_role_takes_the_invitation_along(invite, owner, admin) -> None:
    _, as_admin = invite(owner, email="new-admin@example.com", role="admin")
    _, as_member = invite(admin, email="new-member@example.com")
    assert as_admin and as_member
    Membership.objects.filter(user=owner).update(role=Role.ADMIN)  # no longer an owner: may still grant admin
    Membership.objects.filter(user=admin).update(role=Role.MEMBER)  # may grant nothing any more

    accepted = _accept(as_admin, username="new-admin", password=NEW_PASSWORD)
    refused = _accept(as_member, username="new-member", password=NEW_PASSWORD)

    assert accepted.status_code == 201, accepted.content
    assert _error(refused, 400)["code"] == "invitation_revoked"
    assert not User.objects.filter(username="new-member").exists()


def test_an_invitation_to_the_default_organization_makes_an_account(
    client_for, mailoutbox, django_capture_on_commit_callbacks
) -> None:
    boss = UserFactory(is_superuser=True, is_staff=True)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(boss).post("/api/invitations/", {"email": "hello@example.com", "role": "admin"})
    assert response.status_code == 201, response.content
    (link,) = re.findall(r"https?://\S+", mailoutbox[-1].body)

    accepted = _accept(parse_qs(urlsplit(link).query)["token"][0], username="hello", password=NEW_PASSWORD)

    assert accepted.status_code == 201, accepted.content
    membership = Membership.objects.get(user__username="hello", organization=Organization.objects.default())
    assert (membership.role, membership.is_default) == (Role.ADMIN, True)


def test_a_teams_service_account_keeps_the_member_role(client_for, owner, research) -> None:
    from accounts.services import team_service_user

    service = team_service_user(team=research)

    response = client_for(owner).patch(f"/api/organization/members/{service.pk}/", {"role": "admin"}, headers=ACME)

    assert _error(response, 400)["code"] == "service_account"
    assert Membership.objects.get(user=service, organization=research.organization).role == Role.MEMBER
