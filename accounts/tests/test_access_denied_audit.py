"""Another organization's API key, budget, member, team or invitation: the same 404 as a missing one,
and exactly one ``access.denied`` audit row (actor, acting organization, object type and id, IP,
method and path; nothing of the object's content).

The caller is an owner of Globex acting in it (and, as every user, a member of the default
organization); the objects are Acme's. Another Globex member's object that answers 404 and a
missing id write nothing: they are no tenant breach. (Conversations, the SSE send view and the
WebSocket: ``conversations/tests/test_access_denied_audit.py``.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import AuditEvent, Budget, Invitation, Membership, Organization, Team, User
from accounts.services import api_key_create
from tests.factories import UserFactory
from tests.kit import assert_error

pytestmark = pytest.mark.django_db

GLOBEX = {"OpenAI-Organization": "globex"}
DENIED = AuditEvent.Action.ACCESS_DENIED
MISSING_ID = 987654
Role = Membership.Role


@pytest.fixture
def world(db) -> dict[str, Any]:
    acme = Organization.objects.create(name="Acme", slug="acme")
    globex = Organization.objects.create(name="Globex", slug="globex")
    caller = UserFactory(username="caller")
    Membership.objects.create(user=caller, organization=globex, role=Role.OWNER)
    acme_member = UserFactory(username="acme-member")
    Membership.objects.create(user=acme_member, organization=acme)
    neighbour = UserFactory(username="globex-member")
    Membership.objects.create(user=neighbour, organization=globex)
    return {
        "acme": acme,
        "globex": globex,
        "caller": caller,
        "acme_member": acme_member,
        "neighbour": neighbour,
    }


def _denied_rows() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=DENIED).order_by("id"))


def _assert_denied_once(
    world: dict[str, Any],
    call: Callable[[Any], Any],
    *,
    other_orgs: Any,
    object_type: str,
    object_id: Any,
    via: str,
    same_org: Any = None,
) -> None:
    """``call(id)`` answers the same 404 for ``MISSING_ID``, for ``same_org`` (a Globex object the
    caller may not see; None: skip) and for ``other_orgs`` (Acme's); only the last writes one row."""
    missing = call(MISSING_ID)
    assert_error(missing, 404)
    if same_org is not None:
        refused = call(same_org)
        assert refused.status_code == 404 and refused.json() == missing.json()
    assert _denied_rows() == []

    response = call(other_orgs)

    assert response.status_code == 404 and response.json() == missing.json()
    [row] = _denied_rows()
    caller: User = world["caller"]
    assert (row.actor_id, row.actor_username, row.organization_id) == (caller.pk, "caller", world["globex"].pk)
    assert (row.object_type, row.object_id) == (object_type, str(object_id))
    assert row.after == {"via": via, "object_organization": world["acme"].pk}
    assert str(row.ip) == "127.0.0.1"
    assert row.object_repr == "" and row.before is None


# --- API keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix"), [("delete", ""), ("post", "rotate/")])
def test_revoking_or_rotating_another_organizations_key(client_for, world, method, suffix) -> None:
    theirs = api_key_create(user=world["acme_member"], name="acme ci", organization=world["acme"]).api_key
    neighbours = api_key_create(user=world["neighbour"], name="globex ci", organization=world["globex"]).api_key
    client = client_for(world["caller"])

    def call(key_id: int) -> Any:
        return getattr(client, method)(f"/api/api-keys/{key_id}/{suffix}", headers=GLOBEX)

    _assert_denied_once(
        world,
        call,
        other_orgs=theirs.pk,
        # A plain member's own key: not the owner's to manage (only team keys are), so a 404.
        same_org=neighbours.pk,
        object_type="accounts.apikey",
        object_id=theirs.pk,
        via=f"{method.upper()} /api/api-keys/{theirs.pk}/{suffix}",
    )
    theirs.refresh_from_db()
    assert theirs.revoked_at is None  # untouched: the rotation's transaction did not change it either


# --- Budgets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "body"), [("get", None), ("patch", {"limit_usd": "1"}), ("delete", None)])
def test_another_organizations_budget(client_for, world, method, body) -> None:
    theirs = Budget.objects.create(
        name="acme cap",
        organization=world["acme"],
        subject_kind=Budget.SubjectKind.ORGANIZATION,
        subject_id=world["acme"].pk,
        limit_usd=Decimal(100),
    )
    client = client_for(world["caller"])

    def call(budget_id: int) -> Any:
        return getattr(client, method)(f"/api/budgets/{budget_id}/", body, format="json", headers=GLOBEX)

    _assert_denied_once(
        world,
        call,
        other_orgs=theirs.pk,
        object_type="accounts.budget",
        object_id=theirs.pk,
        via=f"{method.upper()} /api/budgets/{theirs.pk}/",
    )
    theirs.refresh_from_db()
    assert theirs.limit_usd == Decimal(100)


def test_another_members_budget_in_the_same_organization_is_not_audited(client_for, world) -> None:
    """A member reads the budgets that limit them; a fellow member's is a 404, no tenant breach."""
    mine = Budget.objects.create(
        name="neighbour cap",
        organization=world["globex"],
        subject_kind=Budget.SubjectKind.USER,
        subject_id=world["neighbour"].pk,
        limit_usd=Decimal(5),
    )
    member = UserFactory()
    Membership.objects.create(user=member, organization=world["globex"])
    response = client_for(member).get(f"/api/budgets/{mine.pk}/", headers=GLOBEX)
    assert_error(response, 404, code="budget_not_found")
    assert _denied_rows() == []


# --- Members ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "body"), [("get", None), ("patch", {"role": "admin"}), ("delete", None)])
def test_another_organizations_member(client_for, world, method, body) -> None:
    acme_member: User = world["acme_member"]
    client = client_for(world["caller"])

    def call(user_id: int) -> Any:
        return getattr(client, method)(f"/api/organization/members/{user_id}/", body, format="json", headers=GLOBEX)

    # A user of the default organization only: the caller is a member there too, so no other tenant's.
    _assert_denied_once(
        world,
        call,
        other_orgs=acme_member.pk,
        same_org=UserFactory().pk,
        object_type="accounts.user",
        object_id=acme_member.pk,
        via=f"{method.upper()} /api/organization/members/{acme_member.pk}/",
    )
    assert Membership.objects.get(user=acme_member, organization=world["acme"]).role == Role.MEMBER


# --- Teams -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("get", "", None),
        ("patch", "", {"name": "Taken over"}),
        ("delete", "", None),
        ("post", "members/", {"user_id": 1}),
        ("delete", "members/1/", None),
    ],
)
@pytest.mark.parametrize("by", ["id", "slug"])
def test_another_organizations_team(client_for, world, method, suffix, body, by) -> None:
    theirs = Team.objects.create(organization=world["acme"], name="Acme research", slug="research")
    client = client_for(world["caller"])

    def call(team: Any) -> Any:
        return getattr(client, method)(f"/api/teams/{team}/{suffix}", body, format="json", headers=GLOBEX)

    named = theirs.pk if by == "id" else theirs.slug
    _assert_denied_once(
        world,
        call,
        other_orgs=named,
        object_type="accounts.team",
        object_id=theirs.pk,
        via=f"{method.upper()} /api/teams/{named}/{suffix}",
    )
    assert Team.objects.get(pk=theirs.pk).name == "Acme research"


# --- Invitations -----------------------------------------------------------------------------------


def test_revoking_another_organizations_invitation(client_for, world) -> None:
    theirs = Invitation.objects.create(
        organization=world["acme"], email="new@example.com", expires_at=timezone.now() + dt.timedelta(days=1)
    )
    client = client_for(world["caller"])

    def call(invitation_id: int) -> Any:
        return client.delete(f"/api/invitations/{invitation_id}/", headers=GLOBEX)

    _assert_denied_once(
        world,
        call,
        other_orgs=theirs.pk,
        object_type="accounts.invitation",
        object_id=theirs.pk,
        via=f"DELETE /api/invitations/{theirs.pk}/",
    )
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# --- Who is not audited, who reads the rows ----------------------------------------------------------


def test_a_member_of_the_objects_organization_is_not_audited(client_for, world) -> None:
    """Acting in Globex, the caller's key of Acme (where they are a member too) is a 404: no breach."""
    Membership.objects.create(user=world["caller"], organization=world["acme"])
    mine = api_key_create(user=world["caller"], name="acme", organization=world["acme"]).api_key
    assert client_for(world["caller"]).delete(f"/api/api-keys/{mine.pk}/", headers=GLOBEX).status_code == 404
    assert _denied_rows() == []


def test_the_platform_superuser_is_not_audited(client_for, world, superuser) -> None:
    Membership.objects.create(user=superuser, organization=world["globex"])
    theirs = Team.objects.create(organization=world["acme"], name="Acme research", slug="research")
    assert client_for(superuser).get(f"/api/teams/{theirs.pk}/", headers=GLOBEX).status_code == 404
    assert _denied_rows() == []


def test_access_denied_rows_are_the_platform_admins_to_read(client_for, world, admin_user) -> None:
    """An organization's admin would learn from them which ids exist elsewhere: only platform admins see them."""
    theirs = Team.objects.create(organization=world["acme"], name="Acme research", slug="research")
    client = client_for(world["caller"])
    assert client.get(f"/api/teams/{theirs.slug}/", headers=GLOBEX).status_code == 404
    other = audit_record(action=AuditEvent.Action.TEAM_CREATED, actor=world["caller"], obj=world["globex"])

    rows = client.get("/api/audit-log/", headers=GLOBEX).json()["results"]
    assert [row["id"] for row in rows] == [other.pk]
    platform = client_for(admin_user).get("/api/audit-log/", {"action": DENIED}).json()["results"]
    assert [(row["action"], row["object_type"]) for row in platform] == [(DENIED, "accounts.team")]
