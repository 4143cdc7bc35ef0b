"""Teams as key owners and metering subjects (issue 10, item 3): team keys, team-owned service keys,
team and organization budgets, and budgets managed by an organization's owners and admins."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from accounts.metering import MeteringSubject
from accounts.metering.budgets import SUBJECT_USAGE_FIELDS, budget_reserve, budget_usage
from accounts.models import APIKey, AuditEvent, Budget, Membership, Organization, Team, TeamMembership, UsageRecord
from accounts.services import api_key_create, team_service_user
from accounts.usage import UsageEvent, usage_record_many
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from llm.metering import reply_metering
from llm.selectors import enabled_model_cache, enabled_model_get
from tests.factories import LLMModelFactory, UserFactory
from tests.kit import assert_error, bearer

pytestmark = pytest.mark.django_db

ACME = {"OpenAI-Organization": "acme"}
KEYS = "/api/api-keys/"
BUDGETS = "/api/budgets/"


@pytest.fixture
def acme(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


@pytest.fixture
def team(acme) -> Team:
    return Team.objects.create(organization=acme, name="Research", slug="research")


def _member(organization: Organization, role: str = Membership.Role.MEMBER, team: Team | None = None) -> Any:
    user = UserFactory()
    Membership.objects.create(user=user, organization=organization, role=role)
    if team is not None:
        TeamMembership.objects.create(team=team, user=user)
    return user


# --- Team keys ----------------------------------------------------------------------------------


def test_a_team_member_assigns_a_key_to_the_team(client_for, acme, team) -> None:
    alice = _member(acme, team=team)

    response = client_for(alice).post(KEYS, {"name": "lab", "team": "research"}, format="json", headers=ACME)

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["team"], body["owner"], body["created_by"]) == ("research", "user", alice.username)
    key = APIKey.objects.get(pk=body["id"])
    assert (key.user, key.team, key.created_by, key.organization) == (alice, team, alice, acme)
    listed = client_for(alice).get(KEYS, headers=ACME).json()["results"]
    assert [(row["id"], row["team"], row["owner"]) for row in listed] == [(key.pk, "research", "user")]


def test_only_team_members_and_organization_admins_assign_keys_to_a_team(client_for, acme, team) -> None:
    outsider = _member(acme)
    admin = _member(acme, Membership.Role.ADMIN)

    refused = client_for(outsider).post(KEYS, {"name": "x", "team": "research"}, format="json", headers=ACME)
    assert_error(refused, 403, code="insufficient_permissions")
    allowed = client_for(admin).post(KEYS, {"name": "x", "team": "research"}, format="json", headers=ACME)
    assert allowed.status_code == 201, allowed.content
    assert APIKey.objects.get(pk=allowed.json()["id"]).user == admin


def test_another_organizations_team_reads_as_no_team(client_for, acme, team) -> None:
    """A slug of another organization's team gets the answer of a slug that names none: no leak."""
    home_team = Team.objects.create(organization=Organization.objects.default(), name="Home", slug="home")
    admin = _member(acme, Membership.Role.ADMIN)
    client = client_for(admin)

    foreign = client.post(KEYS, {"name": "x", "team": home_team.slug}, format="json", headers=ACME)
    missing = client.post(KEYS, {"name": "x", "team": "nowhere"}, format="json", headers=ACME)

    error = assert_error(foreign, 400, code="invalid", param="team")
    assert error["message"] == "team: this organization has no team 'home'."
    assert assert_error(missing, 400, param="team")["message"] == "team: this organization has no team 'nowhere'."
    assert not APIKey.objects.filter(name="x").exists()


def test_an_admin_creates_a_team_owned_key_held_by_the_teams_service_user(client_for, acme, team) -> None:
    admin = _member(acme, Membership.Role.OWNER)
    client = client_for(admin)

    response = client.post(KEYS, {"name": "ci", "team": "research", "owner": "team"}, format="json", headers=ACME)

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["team"], body["owner"], body["created_by"]) == ("research", "team", admin.username)
    key = APIKey.objects.select_related("user").get(pk=body["id"])
    bot = key.user
    assert bot.service_team == team and bot.is_service_account and bot.is_active
    assert not bot.has_usable_password()
    assert list(bot.memberships.values_list("organization__slug", "role")) == [("acme", "member")]
    assert TeamMembership.objects.filter(team=team, user=bot).exists()
    assert AuditEvent.objects.filter(action="api_key.created", object_id=str(key.pk), actor=admin).count() == 1
    # A second team-owned key reuses the service user; admins list both with the organization's keys.
    again = client.post(KEYS, {"name": "ci2", "team": "research", "owner": "team"}, format="json", headers=ACME)
    assert APIKey.objects.get(pk=again.json()["id"]).user == bot
    assert {row["name"] for row in client.get(KEYS, headers=ACME).json()["results"]} == {"ci", "ci2"}
    users = {row["username"]: row for row in client.get("/api/users/", headers=ACME).json()["results"]}
    assert users[bot.username]["is_service_account"] is True
    assert users[admin.username]["is_service_account"] is False


def test_a_team_key_creates_and_manages_keys_of_its_team_only(client_for, acme, team) -> None:
    """Review finding: a team's service key minted a key with no team, outside the team's budgets
    and model list, that outlived the team."""
    admin = _member(acme, Membership.Role.OWNER)
    Team.objects.create(organization=acme, name="Other", slug="other")
    created = client_for(admin).post(
        KEYS, {"name": "svc", "team": "research", "owner": "team"}, format="json", headers=ACME
    )
    service = APIClient(headers=bearer(created.json()["key"]))

    minted = service.post(KEYS, {"name": "minted"}, format="json")
    assert minted.status_code == 201, minted.content
    assert minted.json()["team"] == "research"  # the creating key's team, not none
    assert_error(
        service.post(KEYS, {"name": "x", "team": "other"}, format="json"), 403, code="insufficient_permissions"
    )
    # Another's key in the organization is beyond it.
    personal = api_key_create(user=admin, name="personal", organization=acme).api_key
    assert_error(service.delete(f"{KEYS}{personal.pk}/"), 404, code="api_key_not_found")
    assert APIKey.objects.get(pk=personal.pk).revoked_at is None


def test_leaving_a_team_revokes_the_keys_one_held_in_it(client_for, acme, team) -> None:
    """Review finding: a member removed from a team kept spending its budget with their team key."""
    admin = _member(acme, Membership.Role.ADMIN)
    member = _member(acme, team=team)
    team_key = api_key_create(user=member, name="team", organization=acme, team="research").api_key
    personal = api_key_create(user=member, name="personal", organization=acme).api_key
    service = client_for(admin).post(
        KEYS, {"name": "svc", "team": "research", "owner": "team"}, format="json", headers=ACME
    )

    removed = client_for(admin).delete(f"/api/teams/research/members/{member.pk}/", headers=ACME)

    assert removed.status_code == 204, removed.content
    assert APIKey.objects.get(pk=team_key.pk).revoked_at is not None
    assert APIKey.objects.get(pk=personal.pk).revoked_at is None  # not the team's
    assert APIKey.objects.get(pk=service.json()["id"]).revoked_at is None  # the team's own key stays
    assert AuditEvent.objects.filter(action="api_key.revoked", object_id=str(team_key.pk)).count() == 1


def test_team_owned_keys_need_an_admin_and_a_team(client_for, acme, team) -> None:
    member = _member(acme, team=team)
    admin = _member(acme, Membership.Role.ADMIN)

    by_member = client_for(member).post(
        KEYS, {"name": "x", "team": "research", "owner": "team"}, format="json", headers=ACME
    )
    no_team = client_for(admin).post(KEYS, {"name": "x", "owner": "team"}, format="json", headers=ACME)

    assert_error(by_member, 403, code="insufficient_permissions")
    assert_error(no_team, 400, param="owner")
    assert not Team.objects.get(pk=team.pk).memberships.filter(user__service_team__isnull=False).exists()


def test_a_team_owned_key_outlives_its_creator(client_for, acme, team) -> None:
    admin = _member(acme, Membership.Role.ADMIN)
    own = api_key_create(user=admin, name="mine", organization=acme).secret
    created = client_for(admin).post(
        KEYS, {"name": "svc", "team": "research", "owner": "team"}, format="json", headers=ACME
    )
    secret = created.json()["key"]

    admin.is_active = False
    admin.save()

    assert APIClient(headers=bearer(own)).get("/api/auth/me/").status_code == 401
    me = APIClient(headers=bearer(secret)).get("/api/auth/me/")
    assert me.status_code == 200, me.content
    admin.delete()
    assert APIClient(headers=bearer(secret)).get("/api/auth/me/").status_code == 200
    assert APIKey.objects.get(pk=created.json()["id"]).created_by is None


def test_deleting_a_team_deactivates_its_service_user_and_deletes_its_keys(client_for, acme, team) -> None:
    admin = _member(acme, Membership.Role.ADMIN)
    client = client_for(admin)
    created = client.post(KEYS, {"name": "svc", "team": "research", "owner": "team"}, format="json", headers=ACME)
    secret = created.json()["key"]
    bot = APIKey.objects.get(pk=created.json()["id"]).user
    assert APIClient(headers=bearer(secret)).get("/api/auth/me/").status_code == 200

    assert client.delete("/api/teams/research/", headers=ACME).status_code == 204

    bot.refresh_from_db()
    assert (bot.is_active, bot.service_team_id) == (False, None)
    assert not APIKey.objects.filter(user=bot).exists()
    assert APIClient(headers=bearer(secret)).get("/api/auth/me/").status_code == 401
    # One row for the decision: the team's deletion.
    assert AuditEvent.objects.filter(action="team.deleted", object_id=str(team.pk), actor=admin).count() == 1


def test_an_organizations_teams_deleted_with_it_deactivate_their_service_users(acme, team) -> None:
    """Any delete of a team (the admin's, an organization's cascade) deactivates its service user, not people."""
    person = _member(acme, team=team)
    bot = team_service_user(team=team)
    other_team = Team.objects.create(organization=Organization.objects.default(), name="Home", slug="home")
    other_bot = team_service_user(team=other_team)

    Budget.objects.filter(organization=acme).delete()  # PROTECT: an organization with budgets is not deleted
    acme.delete()

    bot.refresh_from_db()
    person.refresh_from_db()
    other_bot.refresh_from_db()
    assert (bot.is_active, bot.service_team_id) == (False, None)
    assert person.is_active
    assert (other_bot.is_active, other_bot.service_team) == (True, other_team)


def test_admins_revoke_and_rotate_team_owned_keys_members_cannot(client_for, acme, team) -> None:
    admin = _member(acme, Membership.Role.ADMIN)
    member = _member(acme, team=team)
    created = client_for(admin).post(
        KEYS, {"name": "svc", "team": "research", "owner": "team"}, format="json", headers=ACME
    )
    key_id = created.json()["id"]

    assert_error(client_for(member).delete(f"{KEYS}{key_id}/", headers=ACME), 404)
    assert_error(client_for(admin).post(f"{KEYS}{key_id}/rotate/"), 404)  # acting in another organization
    rotated = client_for(admin).post(f"{KEYS}{key_id}/rotate/", headers=ACME)
    assert rotated.status_code == 200, rotated.content
    assert client_for(admin).delete(f"{KEYS}{key_id}/", headers=ACME).status_code == 204
    assert APIKey.objects.get(pk=key_id).revoked_at is not None


# --- Metering subjects --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_team_keys_request_is_metered_against_its_team_and_organization(acme, team) -> None:
    team.requests_per_minute = 7
    team.save()
    acme.tokens_per_minute = 900
    acme.save()
    alice = _member(acme, team=team)
    key = api_key_create(user=alice, name="k", organization=acme, team="research").api_key
    key = APIKey.objects.select_related("team").get(pk=key.pk)
    LLMModelFactory(name="metered")
    enabled_model_cache.clear()

    metering = reply_metering(
        request_id="r",
        user=alice,
        api_key=key,
        model=enabled_model_get(name="metered"),
        messages=[{"role": "user", "content": "hi"}],
        parameters={},
        organization=acme,
    )

    subjects = {subject.kind: subject for subject in metering.subjects}
    assert list(subjects) == ["user", "api_key", "team", "organization", "model"]
    assert (subjects["team"].id, subjects["team"].limits.requests_per_minute) == (team.pk, 7)
    assert (subjects["organization"].id, subjects["organization"].limits.tokens_per_minute) == (acme.pk, 900)


def test_usage_rows_carry_the_keys_team_and_a_team_budget_sums_them(acme, team) -> None:
    alice, bob = _member(acme, team=team), _member(acme, team=team)
    keys = [api_key_create(user=u, name="k", organization=acme, team="research").api_key for u in (alice, bob)]
    events = [
        UsageEvent(
            request_id=f"r{n}",
            source="openai_api",
            user_id=key.user_id,
            api_key_id=key.pk,
            model_id=None,
            model_name="m",
            organization_id=acme.pk,
            team_id=key.team_id,
            prompt_tokens=1,
            completion_tokens=2,
            cost="0.25",
            token_source="provider",
            finish_status="completed",
        )  # fmt: skip
        for n, key in enumerate(keys)
    ]
    assert usage_record_many(events) == 2
    assert set(UsageRecord.objects.values_list("team_id", flat=True)) == {team.pk}
    budget = Budget.objects.create(
        name="research", organization=acme, subject_kind="team", subject_id=team.pk, limit_usd=Decimal(1)
    )
    org_budget = Budget.objects.create(
        name="acme", organization=acme, subject_kind="organization", subject_id=acme.pk, limit_usd=Decimal(2)
    )
    assert budget_usage(budget).spent_usd == Decimal("0.5")
    assert budget_usage(org_budget).spent_usd == Decimal("0.5")
    assert budget_usage(budget).spent_tokens == 6
    assert SUBJECT_USAGE_FIELDS["team"] == "team_id"


@pytest.mark.django_db(transaction=True)
async def test_a_team_budget_refuses_every_member_once_spent(store: str, acme: Organization, team: Team) -> None:
    budget = await Budget.objects.acreate(
        name="research", organization=acme, subject_kind="team", subject_id=team.pk, limit_usd=Decimal("0.02")
    )
    alice, bob = await run_sync(lambda: (_member(acme, team=team), _member(acme, team=team)))

    def subjects(user: Any) -> list[MeteringSubject]:
        return [MeteringSubject("user", user.pk), MeteringSubject("team", team.pk)]

    assert await budget_reserve(request_id="a", subjects=subjects(alice), max_cost=Decimal("0.015"), max_tokens=5)
    with pytest.raises(ApplicationError) as refused:
        await budget_reserve(request_id="b", subjects=subjects(bob), max_cost=Decimal("0.015"), max_tokens=5)
    assert (refused.value.status, refused.value.code) == (429, "insufficient_quota")
    assert "'research'" in refused.value.message
    # Bob's requests without the team (another key) are not limited by it.
    assert await budget_reserve(request_id="c", subjects=subjects(bob)[:1], max_cost=Decimal(1), max_tokens=5) is None
    assert budget.subject_kind == "team"


# --- Budgets: subjects and who manages them ---------------------------------------------------------


def test_budget_subjects_must_be_the_budgets_organizations(acme, team) -> None:
    home = Organization.objects.default()
    outsider = UserFactory()  # a member of the default organization only
    foreign_key = api_key_create(user=outsider, name="k").api_key
    member = _member(acme)
    cases = [
        ("team", team.pk, True),
        ("organization", acme.pk, True),
        ("user", member.pk, True),
        ("team", Team.objects.create(organization=home, name="H", slug="h").pk, False),
        ("organization", home.pk, False),
        ("user", outsider.pk, False),
        ("api_key", foreign_key.pk, False),
        ("team", 987654, False),
    ]
    for kind, subject_id, valid in cases:
        budget = Budget(name="b", organization=acme, subject_kind=kind, subject_id=subject_id, limit_usd=Decimal(1))
        if valid:
            budget.full_clean()
        else:
            with pytest.raises(ValidationError) as refused:
                budget.full_clean()
            assert refused.value.message_dict["subject_id"] == [
                f"No {budget.get_subject_kind_display().lower()} has id {subject_id} in this organization."
            ]


@pytest.mark.parametrize("role", [Membership.Role.OWNER, Membership.Role.ADMIN])
def test_organization_admins_manage_their_organizations_budgets(client_for, acme, team, role) -> None:
    boss = _member(acme, role)
    client = client_for(boss)
    body = {"name": "research", "subject_kind": "team", "subject_id": team.pk, "limit_usd": "10.00"}

    created = client.post(BUDGETS, body, format="json", headers=ACME)

    assert created.status_code == 201, created.content
    budget = Budget.objects.get(pk=created.json()["id"])
    assert (budget.organization, budget.subject_kind, budget.subject_id) == (acme, "team", team.pk)
    event = AuditEvent.objects.get(action="budget.created", object_id=str(budget.pk))
    assert (event.actor, event.organization) == (boss, acme)
    org_wide = {"name": "acme", "subject_kind": "organization", "subject_id": acme.pk, "limit_usd": "50"}
    assert client.post(BUDGETS, org_wide, format="json", headers=ACME).status_code == 201
    changed = client.patch(f"{BUDGETS}{budget.pk}/", {"limit_usd": "12"}, format="json", headers=ACME)
    assert changed.status_code == 200, changed.content
    assert AuditEvent.objects.filter(action="budget.updated", object_id=str(budget.pk), actor=boss).count() == 1
    assert client.delete(f"{BUDGETS}{budget.pk}/", headers=ACME).status_code == 204
    assert AuditEvent.objects.filter(action="budget.deleted", object_id=str(budget.pk), actor=boss).count() == 1


def test_organization_admins_cannot_reach_other_organizations_budgets_or_subjects(client_for, acme, team) -> None:
    boss = _member(acme, Membership.Role.ADMIN)
    home_budget = Budget.objects.create(
        name="home", subject_kind="organization", subject_id=Organization.objects.default().pk, limit_usd=Decimal(1)
    )
    home_team = Team.objects.create(organization=Organization.objects.default(), name="H", slug="h")
    client = client_for(boss)

    assert_error(client.get(f"{BUDGETS}{home_budget.pk}/", headers=ACME), 404)
    assert_error(client.patch(f"{BUDGETS}{home_budget.pk}/", {"limit_usd": "9"}, format="json", headers=ACME), 404)
    assert_error(client.delete(f"{BUDGETS}{home_budget.pk}/", headers=ACME), 404)
    for kind, subject_id in (("team", home_team.pk), ("organization", home_team.organization_id)):
        body = {"name": "x", "subject_kind": kind, "subject_id": subject_id, "limit_usd": "1"}
        assert_error(client.post(BUDGETS, body, format="json", headers=ACME), 400, param="subject_id")
    # Acting in the default organization, where boss is a plain member: no writes.
    body = {"name": "x", "subject_kind": "team", "subject_id": home_team.pk, "limit_usd": "1"}
    assert_error(client.post(BUDGETS, body, format="json"), 403, code="permission_denied")
    assert Budget.objects.filter(name="x").count() == 0
    assert Budget.objects.get(pk=home_budget.pk).limit_usd == Decimal(1)


@pytest.mark.parametrize("role", [Membership.Role.MEMBER, Membership.Role.VIEWER])
def test_members_and_viewers_do_not_manage_budgets(client_for, acme, team, role) -> None:
    someone = _member(acme, role, team=team)
    body = {"name": "x", "subject_kind": "team", "subject_id": team.pk, "limit_usd": "1"}
    assert client_for(someone).post(BUDGETS, body, format="json", headers=ACME).status_code == 403


def test_members_see_the_team_and_organization_budgets_that_limit_them(client_for, acme, team) -> None:
    alice = _member(acme, team=team)
    api_key_create(user=alice, name="k", organization=acme, team="research")
    other_team = Team.objects.create(organization=acme, name="Other", slug="other")
    mine = {
        Budget.objects.create(
            name=kind, organization=acme, subject_kind=kind, subject_id=subject_id, limit_usd=Decimal(1)
        ).pk
        for kind, subject_id in (("team", team.pk), ("organization", acme.pk))
    }
    Budget.objects.create(
        name="other", organization=acme, subject_kind="team", subject_id=other_team.pk, limit_usd=Decimal(1)
    )

    response = client_for(alice).get(f"{BUDGETS}mine/", headers=ACME)

    assert response.status_code == 200, response.content
    assert {row["id"] for row in response.json()} == mine
