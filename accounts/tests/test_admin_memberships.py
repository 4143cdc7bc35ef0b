"""The organization and team pages of the Django admin keep the rules the REST API keeps.

An operator editing members inline cannot leave an organization without its owner, cannot make a
team's service account more than a member, cannot put another organization's user in a team, and
removing a member from an organization takes them out of its teams (and revokes their team keys).
"""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import APIKey, Membership, Organization, Team, TeamMembership
from accounts.services import api_key_create, team_service_user
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

Role = Membership.Role


def _organization_form(organization: Organization, rows: list[dict[str, Any]]) -> dict[str, str]:
    data = {
        "name": organization.name,
        "slug": organization.slug,
        "memberships-TOTAL_FORMS": str(len(rows)),
        "memberships-INITIAL_FORMS": str(sum(1 for row in rows if "id" in row)),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        prefix = f"memberships-{index}-"
        data[prefix + "organization"] = str(organization.pk)
        data[prefix + "user"] = str(row["user"].pk)
        data[prefix + "role"] = row["role"]
        if "id" in row:
            data[prefix + "id"] = str(row["id"])
        if row.get("delete"):
            data[prefix + "DELETE"] = "on"
    return data


def _team_form(team: Team, rows: list[dict[str, Any]]) -> dict[str, str]:
    data = {
        "organization": str(team.organization_id),
        "name": team.name,
        "slug": team.slug,
        "memberships-TOTAL_FORMS": str(len(rows)),
        "memberships-INITIAL_FORMS": str(sum(1 for row in rows if "id" in row)),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        prefix = f"memberships-{index}-"
        data[prefix + "team"] = str(team.pk)
        data[prefix + "user"] = str(row["user"].pk)
        if "id" in row:
            data[prefix + "id"] = str(row["id"])
    return data


@pytest.fixture
def acme() -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


def test_the_last_owner_cannot_be_demoted_or_removed_in_the_admin(admin_site, acme) -> None:
    owner, member = UserFactory(), UserFactory()
    owning = Membership.objects.create(user=owner, organization=acme, role=Role.OWNER)
    plain = Membership.objects.create(user=member, organization=acme)
    url = f"/admin/accounts/organization/{acme.pk}/change/"
    member_row = {"id": plain.pk, "user": member, "role": Role.MEMBER}

    demoted = admin_site.post(
        url, _organization_form(acme, [{"id": owning.pk, "user": owner, "role": "admin"}, member_row])
    )
    removed = admin_site.post(
        url, _organization_form(acme, [{"id": owning.pk, "user": owner, "role": "owner", "delete": True}, member_row])
    )

    for response in (demoted, removed):
        assert response.status_code == 200  # the form again, with the error
        assert "must keep an owner" in response.content.decode()
    owning.refresh_from_db()
    assert owning.role == Role.OWNER

    # Handing the role over in the same save is fine.
    handed = admin_site.post(
        url,
        _organization_form(
            acme,
            [{"id": owning.pk, "user": owner, "role": "admin"}, {"id": plain.pk, "user": member, "role": "owner"}],
        ),
    )
    assert handed.status_code == 302, handed.content.decode()[:3000]
    assert set(Membership.objects.filter(organization=acme).values_list("user_id", "role")) == {
        (owner.pk, Role.ADMIN),
        (member.pk, Role.OWNER),
    }


def test_a_team_service_account_keeps_the_member_role_in_the_admin(admin_site, acme) -> None:
    team = Team.objects.create(organization=acme, name="Ops", slug="ops")
    service = team_service_user(team=team)
    membership = Membership.objects.get(user=service, organization=acme)

    response = admin_site.post(
        f"/admin/accounts/organization/{acme.pk}/change/",
        _organization_form(acme, [{"id": membership.pk, "user": service, "role": "admin"}]),
    )

    assert response.status_code == 200
    assert "service account keeps the member role" in response.content.decode()
    membership.refresh_from_db()
    assert membership.role == Role.MEMBER


def test_a_team_takes_only_members_of_its_organization_in_the_admin(admin_site, acme) -> None:
    team = Team.objects.create(organization=acme, name="Ops", slug="ops")
    insider, outsider = UserFactory(), UserFactory()  # both in the default organization
    Membership.objects.create(user=insider, organization=acme)
    url = f"/admin/accounts/team/{team.pk}/change/"

    refused = admin_site.post(url, _team_form(team, [{"user": outsider}]))
    accepted = admin_site.post(url, _team_form(team, [{"user": insider}]))

    assert refused.status_code == 200
    assert "not a member of the team" in refused.content.decode()
    assert accepted.status_code == 302, accepted.content.decode()[:3000]
    assert list(TeamMembership.objects.filter(team=team).values_list("user_id", flat=True)) == [insider.pk]


def test_removing_a_member_in_the_admin_takes_them_out_of_the_teams_and_revokes_their_team_keys(
    admin_site, acme
) -> None:
    owner, leaver = UserFactory(), UserFactory()
    owning = Membership.objects.create(user=owner, organization=acme, role=Role.OWNER)
    leaving = Membership.objects.create(user=leaver, organization=acme)
    team = Team.objects.create(organization=acme, name="Ops", slug="ops")
    TeamMembership.objects.create(team=team, user=leaver)
    team_key = api_key_create(user=leaver, name="svc", organization=acme, team="ops").api_key

    response = admin_site.post(
        f"/admin/accounts/organization/{acme.pk}/change/",
        _organization_form(
            acme,
            [
                {"id": owning.pk, "user": owner, "role": "owner"},
                {"id": leaving.pk, "user": leaver, "role": "member", "delete": True},
            ],
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert not TeamMembership.objects.filter(team=team, user=leaver).exists()
    assert APIKey.objects.get(pk=team_key.pk).revoked_at is not None


def test_adding_someone_who_became_a_member_since_the_page_loaded_is_a_form_error(admin_site, acme) -> None:
    # The page was loaded before another operator added the user: its rows do not list them, and the
    # (user, organization) and (team, user) unique constraints made the save a 500 (IntegrityError).
    user = UserFactory()
    owner = Membership.objects.create(user=UserFactory(), organization=acme, role=Role.OWNER)
    Membership.objects.create(user=user, organization=acme)  # by the other operator
    team = Team.objects.create(organization=acme, name="Ops", slug="ops")
    TeamMembership.objects.create(team=team, user=user)

    organization_page = admin_site.post(
        f"/admin/accounts/organization/{acme.pk}/change/",
        _organization_form(
            acme, [{"id": owner.pk, "user": owner.user, "role": Role.OWNER}, {"user": user, "role": Role.MEMBER}]
        ),
    )
    team_page = admin_site.post(f"/admin/accounts/team/{team.pk}/change/", _team_form(team, [{"user": user}]))

    for page in (organization_page, team_page):
        assert page.status_code == 200
        assert "This user is already a member" in page.content.decode()
    assert Membership.objects.filter(organization=acme, user=user).count() == 1
    assert TeamMembership.objects.filter(team=team, user=user).count() == 1


def test_a_member_removed_and_added_again_on_one_page_is_saved(admin_site, acme) -> None:
    owner = Membership.objects.create(user=UserFactory(), organization=acme, role=Role.OWNER)
    member = Membership.objects.create(user=UserFactory(), organization=acme)

    response = admin_site.post(
        f"/admin/accounts/organization/{acme.pk}/change/",
        _organization_form(
            acme,
            [
                {"id": owner.pk, "user": owner.user, "role": Role.OWNER},
                {"id": member.pk, "user": member.user, "role": Role.MEMBER, "delete": True},
                {"user": member.user, "role": Role.ADMIN},
            ],
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert Membership.objects.get(organization=acme, user=member.user).role == Role.ADMIN
