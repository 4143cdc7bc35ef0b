"""Running an organization over REST: its organizations list, members' roles, teams; refusals and audit rows."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import AuditEvent, Membership, Organization, Team, TeamMembership
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

ACME = {"OpenAI-Organization": "acme"}
Role = Membership.Role
Action = AuditEvent.Action


@pytest.fixture
def acme(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


@pytest.fixture
def globex(db) -> Organization:
    return Organization.objects.create(name="Globex", slug="globex")


@pytest.fixture
def people(acme, globex) -> dict[str, Any]:
    """Acme's owner, admin, member and viewer, and a member of Globex only (besides the default organization)."""
    people = {}
    for role in (Role.OWNER, Role.ADMIN, Role.MEMBER, Role.VIEWER):
        people[role] = UserFactory(username=f"acme-{role}")
        Membership.objects.create(user=people[role], organization=acme, role=role)
    people["outsider"] = UserFactory(username="globex-member")
    Membership.objects.create(user=people["outsider"], organization=globex, role=Role.OWNER)
    return people


def _rows(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.content
    return response.json()["results"]


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    return response.json()["error"]


def _events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action))


# --- Organizations -------------------------------------------------------------------------------


def test_organizations_lists_the_callers_with_their_role(client_for, people, acme, superuser) -> None:
    rows = _rows(client_for(people[Role.ADMIN]).get("/api/organizations/"))
    assert {(row["slug"], row["role"], row["is_default"]) for row in rows} == {
        ("acme", "admin", False),
        ("default", "member", True),
    }
    everything = _rows(client_for(superuser).get("/api/organizations/"))
    assert {row["slug"]: row["role"] for row in everything} == {"acme": "owner", "default": "owner", "globex": "owner"}


# --- Members -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.MEMBER, Role.VIEWER])
def test_every_member_reads_the_member_list_of_the_acting_organization(client_for, people, role) -> None:
    rows = _rows(client_for(people[role]).get("/api/organization/members/", headers=ACME))
    assert {(row["username"], row["role"]) for row in rows} == {(f"acme-{r}", r) for r in Role.values}
    assert "email" not in rows[0]


def test_a_user_of_another_organization_is_refused_and_not_found(client_for, people) -> None:
    outsider = client_for(people["outsider"])
    assert _error(outsider.get("/api/organization/members/", headers=ACME), 401)["code"] == "invalid_organization"
    globex = {"OpenAI-Organization": "globex"}
    member = people[Role.MEMBER].pk
    assert outsider.get(f"/api/organization/members/{member}/", headers=globex).status_code == 404
    patch = outsider.patch(f"/api/organization/members/{member}/", {"role": "viewer"}, headers=globex)
    assert _error(patch, 404)["code"] == "member_not_found"
    assert outsider.delete(f"/api/organization/members/{member}/", headers=globex).status_code == 404
    assert Membership.objects.get(user=people[Role.MEMBER], organization__slug="acme").role == Role.MEMBER


def test_an_admin_changes_a_role_once_audited(client_for, people, acme) -> None:
    member = people[Role.MEMBER]
    response = client_for(people[Role.ADMIN]).patch(
        f"/api/organization/members/{member.pk}/", {"role": "viewer"}, headers=ACME
    )
    assert response.status_code == 200, response.content
    assert response.json()["role"] == "viewer"
    assert Membership.objects.get(user=member, organization=acme).role == Role.VIEWER
    (event,) = _events(Action.MEMBERSHIP_UPDATED)
    assert (event.actor, event.organization, event.before, event.after) == (
        people[Role.ADMIN],
        acme,
        {"role": "member"},
        {"role": "viewer"},
    )
    # The same role again is no change, and no event.
    again = client_for(people[Role.ADMIN]).patch(
        f"/api/organization/members/{member.pk}/", {"role": "viewer"}, headers=ACME
    )
    assert again.status_code == 200
    assert len(_events(Action.MEMBERSHIP_UPDATED)) == 1


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_members_and_viewers_may_not_change_roles_or_remove(client_for, people, role) -> None:
    client = client_for(people[role])
    target = people[Role.ADMIN].pk
    patch = client.patch(f"/api/organization/members/{target}/", {"role": "member"}, headers=ACME)
    assert _error(patch, 403)["code"] == "permission_denied"
    assert _error(client.delete(f"/api/organization/members/{target}/", headers=ACME), 403)["code"] == (
        "permission_denied"
    )
    assert Membership.objects.get(user=people[Role.ADMIN], organization__slug="acme").role == Role.ADMIN
    assert not AuditEvent.objects.filter(action__startswith="membership.").exists()


def test_only_an_owner_grants_or_takes_the_owner_role(client_for, people, acme) -> None:
    admin = client_for(people[Role.ADMIN])
    member, owner = people[Role.MEMBER].pk, people[Role.OWNER].pk
    grant = admin.patch(f"/api/organization/members/{member}/", {"role": "owner"}, headers=ACME)
    assert _error(grant, 403)["code"] == "permission_denied"
    demote = admin.patch(f"/api/organization/members/{owner}/", {"role": "member"}, headers=ACME)
    assert _error(demote, 403)["code"] == "permission_denied"
    assert _error(admin.delete(f"/api/organization/members/{owner}/", headers=ACME), 403)["code"] == (
        "permission_denied"
    )
    by_owner = client_for(people[Role.OWNER]).patch(
        f"/api/organization/members/{member}/", {"role": "owner"}, headers=ACME
    )
    assert by_owner.status_code == 200, by_owner.content
    assert Membership.objects.filter(organization=acme, role=Role.OWNER).count() == 2


def test_the_last_owner_cannot_be_demoted_or_removed(client_for, people, acme, superuser) -> None:
    owner = people[Role.OWNER]
    for client in (client_for(owner), client_for(superuser)):
        demote = client.patch(f"/api/organization/members/{owner.pk}/", {"role": "admin"}, headers=ACME)
        error = _error(demote, 400)
        assert error["code"] == "last_owner"
        assert "last owner" in error["message"]
        assert _error(client.delete(f"/api/organization/members/{owner.pk}/", headers=ACME), 400)["code"] == (
            "last_owner"
        )
    assert Membership.objects.get(user=owner, organization=acme).role == Role.OWNER
    # With a second owner, the first may step down.
    Membership.objects.filter(user=people[Role.ADMIN], organization=acme).update(role=Role.OWNER)
    step_down = client_for(owner).patch(f"/api/organization/members/{owner.pk}/", {"role": "admin"}, headers=ACME)
    assert step_down.status_code == 200, step_down.content


def test_removing_a_member_removes_them_from_its_teams_once_audited(client_for, people, acme) -> None:
    member = people[Role.MEMBER]
    team = Team.objects.create(organization=acme, name="Research", slug="research")
    TeamMembership.objects.create(team=team, user=member)
    response = client_for(people[Role.ADMIN]).delete(f"/api/organization/members/{member.pk}/", headers=ACME)
    assert response.status_code == 204, response.content
    assert not Membership.objects.filter(user=member, organization=acme).exists()
    assert not TeamMembership.objects.filter(user=member).exists()
    assert Membership.objects.filter(user=member, organization__slug="default").exists()  # elsewhere they stay
    (event,) = _events(Action.MEMBERSHIP_DELETED)
    assert event.organization == acme
    assert event.before["role"] == "member"
    assert event.before["teams"] == [team.pk]
    assert not _events(Action.TEAM_MEMBERSHIP_DELETED)
    # Their requests in the organization are refused from now on.
    assert _error(client_for(member).get("/api/organization/members/", headers=ACME), 401)["code"] == (
        "invalid_organization"
    )


def test_an_api_key_needs_the_admin_scope_to_change_roles(api_client, people, acme) -> None:
    from accounts.services import api_key_create

    secret = api_key_create(user=people[Role.OWNER], name="read", organization=acme, scopes=["read"]).secret
    headers = {"Authorization": f"Bearer {secret}"}
    assert api_client.get("/api/organization/members/", headers=headers).status_code == 200
    patch = api_client.patch(
        f"/api/organization/members/{people[Role.MEMBER].pk}/", {"role": "viewer"}, format="json", headers=headers
    )
    assert _error(patch, 403)["code"] == "insufficient_permissions"


# --- Teams ---------------------------------------------------------------------------------------


def test_an_admin_creates_renames_and_deletes_a_team_each_audited_once(client_for, people, acme) -> None:
    admin = client_for(people[Role.ADMIN])
    created = admin.post("/api/teams/", {"name": "Research Lab"}, headers=ACME)
    assert created.status_code == 201, created.content
    team = created.json()
    assert (team["slug"], team["members"]) == ("research-lab", [])
    assert Team.objects.get(pk=team["id"]).organization == acme

    by_slug = admin.patch("/api/teams/research-lab/", {"name": "Research"}, headers=ACME)
    assert by_slug.status_code == 200, by_slug.content
    assert by_slug.json()["name"] == "Research"
    by_id = client_for(people[Role.VIEWER]).get(f"/api/teams/{team['id']}/", headers=ACME)
    assert by_id.status_code == 200
    assert by_id.json()["name"] == "Research"

    assert admin.delete(f"/api/teams/{team['id']}/", headers=ACME).status_code == 204
    assert not Team.objects.filter(pk=team["id"]).exists()
    assert [len(_events(action)) for action in (Action.TEAM_CREATED, Action.TEAM_UPDATED, Action.TEAM_DELETED)] == [
        1,
        1,
        1,
    ]
    (updated,) = _events(Action.TEAM_UPDATED)
    assert (updated.before, updated.after, updated.organization) == (
        {"name": "Research Lab"},
        {"name": "Research"},
        acme,
    )


def test_a_taken_slug_is_a_400_naming_it(client_for, people, acme) -> None:
    Team.objects.create(organization=acme, name="Research", slug="research")
    response = client_for(people[Role.OWNER]).post("/api/teams/", {"name": "Research"}, headers=ACME)
    assert _error(response, 400)["param"] == "slug"
    # The same slug in another organization is fine.
    Membership.objects.create(user=people[Role.OWNER], organization=Organization.objects.get(slug="globex"))
    Team.objects.create(organization=Organization.objects.get(slug="globex"), name="X", slug="x")
    assert client_for(people[Role.OWNER]).post("/api/teams/", {"name": "X"}, headers=ACME).status_code == 201


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_members_and_viewers_read_teams_but_may_not_change_them(client_for, people, acme, role) -> None:
    team = Team.objects.create(organization=acme, name="Research", slug="research")
    client = client_for(people[role])
    assert [row["slug"] for row in _rows(client.get("/api/teams/", headers=ACME))] == ["research"]
    refusals = [
        client.post("/api/teams/", {"name": "New"}, headers=ACME),
        client.patch("/api/teams/research/", {"name": "Renamed"}, headers=ACME),
        client.delete("/api/teams/research/", headers=ACME),
        client.post("/api/teams/research/members/", {"user_id": people[role].pk}, headers=ACME),
        client.delete(f"/api/teams/research/members/{people[role].pk}/", headers=ACME),
    ]
    assert [response.status_code for response in refusals] == [403] * 5
    team.refresh_from_db()
    assert team.name == "Research"
    assert not TeamMembership.objects.exists()


def test_another_organizations_team_is_a_404(client_for, people, globex) -> None:
    theirs = Team.objects.create(organization=globex, name="Secret", slug="secret")
    admin = client_for(people[Role.ADMIN])
    for path in ("/api/teams/secret/", f"/api/teams/{theirs.pk}/"):
        assert _error(admin.get(path, headers=ACME), 404)["code"] == "team_not_found"
        assert admin.patch(path, {"name": "Mine"}, headers=ACME).status_code == 404
        assert admin.delete(path, headers=ACME).status_code == 404
        assert admin.post(f"{path}members/", {"user_id": people[Role.MEMBER].pk}, headers=ACME).status_code == 404
    assert Team.objects.filter(pk=theirs.pk, name="Secret").exists()
    assert not TeamMembership.objects.exists()


def test_team_members_are_added_and_removed_only_from_the_organization(client_for, people, acme) -> None:
    Team.objects.create(organization=acme, name="Research", slug="research")
    admin = client_for(people[Role.ADMIN])
    member = people[Role.MEMBER]
    added = admin.post("/api/teams/research/members/", {"user_id": member.pk}, headers=ACME)
    assert added.status_code == 201, added.content
    assert added.json()["username"] == member.username
    assert admin.post("/api/teams/research/members/", {"user_id": member.pk}, headers=ACME).status_code == 200
    listed = admin.get("/api/teams/research/", headers=ACME).json()
    assert [row["user_id"] for row in listed["members"]] == [member.pk]

    for stranger in (people["outsider"].pk, 999_999):
        refused = admin.post("/api/teams/research/members/", {"user_id": stranger}, headers=ACME)
        error = _error(refused, 400)
        assert (error["code"], error["param"]) == ("not_a_member", "user_id")
    assert not TeamMembership.objects.filter(user=people["outsider"]).exists()

    assert admin.delete(f"/api/teams/research/members/{member.pk}/", headers=ACME).status_code == 204
    missing = admin.delete(f"/api/teams/research/members/{member.pk}/", headers=ACME)
    assert _error(missing, 404)["code"] == "team_member_not_found"
    assert [len(_events(a)) for a in (Action.TEAM_MEMBERSHIP_CREATED, Action.TEAM_MEMBERSHIP_DELETED)] == [1, 1]
    (event,) = _events(Action.TEAM_MEMBERSHIP_CREATED)
    assert (event.organization, event.actor) == (acme, people[Role.ADMIN])
