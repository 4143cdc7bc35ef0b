"""Model access per organization and team: the rule, the teams that apply, the admin's validation and audit.

The requests' side (``/v1``, ``/api/models``, SSE, WebSocket, invalidation) is ``llm/tests/test_model_access.py``.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from accounts.authentication import principal_for
from accounts.model_access import UNRESTRICTED, ModelAccess, model_access_for
from accounts.models import AuditEvent, Membership, Organization, Team, TeamMembership
from accounts.selectors import team_list_restricting_models
from accounts.services import api_key_create
from llm.models import ModelAlias
from tests.factories import LLMModelFactory, UserFactory

pytestmark = pytest.mark.django_db

Action = AuditEvent.Action


@pytest.mark.parametrize(
    ("lists", "names", "allowed"),
    [
        ((), ("anything",), True),  # no list: every model
        (({"a"},), ("a",), True),
        (({"a"},), ("b",), False),
        (({"m"},), ("alias-of-m", "m"), True),  # a model's name allows its aliases
        (({"alias-of-m"},), ("m", "m"), False),  # an alias's name allows only the alias
        (({"a", "b"}, {"b", "c"}), ("b",), True),  # every list must allow it
        (({"a", "b"}, {"b", "c"}), ("a",), False),
        (({"a"}, {"alias"}), ("alias", "a"), True),  # one list by the alias, the other by its model
    ],
)
def test_a_name_is_allowed_when_every_list_allows_it_or_its_model(lists, names, allowed) -> None:
    access = ModelAccess(tuple(frozenset(names) for names in lists))

    assert access.allows(*names) is allowed
    assert access.restricted is bool(lists)


def test_narrowing_by_an_empty_list_changes_nothing() -> None:
    assert UNRESTRICTED.narrowed([]) is UNRESTRICTED
    assert UNRESTRICTED.narrowed(["a"]).narrowed(()) == ModelAccess((frozenset({"a"}),))


def test_the_teams_that_apply_are_the_callers_teams_with_a_list_in_the_acting_organization() -> None:
    default = Organization.objects.default()
    acme = Organization.objects.create(name="Acme", slug="acme")
    user, other = UserFactory(), UserFactory()
    Membership.objects.create(user=user, organization=acme)
    restricting = Team.objects.create(organization=default, name="a", slug="a", allowed_models=["m"])
    open_team = Team.objects.create(organization=default, name="b", slug="b")  # empty list: imposes nothing
    elsewhere = Team.objects.create(organization=acme, name="c", slug="c", allowed_models=["m"])
    not_theirs = Team.objects.create(organization=default, name="d", slug="d", allowed_models=["m"])
    for team in (restricting, open_team, elsewhere):
        TeamMembership.objects.create(team=team, user=user)
    TeamMembership.objects.create(team=not_theirs, user=other)

    assert list(team_list_restricting_models(user=user, api_key=None, organization=default)) == [restricting]
    assert list(team_list_restricting_models(user=user, api_key=None, organization=acme)) == [elsewhere]
    # A key assigned to a team speaks for that team alone: only its list applies.
    team_key = api_key_create(user=user, name="team a", organization=default, team="a").api_key
    assert list(team_list_restricting_models(user=user, api_key=team_key, organization=default)) == [restricting]
    open_key = api_key_create(user=user, name="team b", organization=default, team="b").api_key
    assert list(team_list_restricting_models(user=user, api_key=open_key, organization=default)) == []


def test_a_requests_access_is_its_organizations_list_its_teams_union_and_its_keys() -> None:
    user = UserFactory()
    organization = Organization.objects.default()
    organization.allowed_models = ["a", "b", "c"]
    organization.save()
    for slug, names in (("t1", ["a"]), ("t2", ["b", "x"])):
        team = Team.objects.create(organization=organization, name=slug, slug=slug, allowed_models=names)
        TeamMembership.objects.create(team=team, user=user)
    key = api_key_create(user=user, name="k", allowed_models=["b", "c"]).api_key

    jwt_access = model_access_for(principal=principal_for(user=user))
    key_access = model_access_for(principal=principal_for(user=user, api_key=key))

    assert [name for name in "abcx" if jwt_access.allows(name)] == ["a", "b"]
    assert [name for name in "abcx" if key_access.allows(name)] == ["b"]


# --- Validation and audit in the admin ----------------------------------------------------------


@pytest.fixture
def names(db) -> None:
    """A model ``m`` and its alias ``fast``."""
    ModelAlias.objects.create(name="fast", model=LLMModelFactory(name="m"))


def test_clean_refuses_unknown_names_and_a_non_list_and_keeps_known_ones(names) -> None:
    organization = Organization(name="Acme", slug="acme", allowed_models=["m", "nope", "fast", "m"])
    with pytest.raises(ValidationError) as raised:
        organization.clean()
    assert raised.value.message_dict == {"allowed_models": ["No model or alias is called 'nope'."]}

    team = Team(organization=Organization.objects.default(), name="t", slug="t", allowed_models="m")
    with pytest.raises(ValidationError) as raised:
        team.clean()
    assert list(raised.value.message_dict) == ["allowed_models"]

    organization.allowed_models = ["m", "fast", "m"]
    organization.clean()
    assert organization.allowed_models == ["m", "fast"]  # repeats dropped
    organization.allowed_models = None  # the admin's emptied field
    organization.clean()
    assert organization.allowed_models == []


def organization_form(organization: Organization, allowed_models: str) -> dict[str, str]:
    return {
        "name": organization.name,
        "slug": organization.slug,
        "allowed_models": allowed_models,
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }


def test_the_admin_refuses_an_unknown_name_and_audits_a_list_change(admin_site, superuser, names) -> None:
    acme = Organization.objects.create(name="Acme", slug="acme")
    url = f"/admin/accounts/organization/{acme.pk}/change/"

    refused = admin_site.post(url, organization_form(acme, '["m", "nope"]'))
    assert refused.status_code == 200
    assert "No model or alias is called &#x27;nope&#x27;." in refused.content.decode()
    acme.refresh_from_db()
    assert acme.allowed_models == []
    assert not AuditEvent.objects.filter(action=Action.ORGANIZATION_UPDATED).exists()

    saved = admin_site.post(url, organization_form(acme, '["m", "fast"]'))
    assert saved.status_code == 302, saved.content.decode()[:2000]
    acme.refresh_from_db()
    assert acme.allowed_models == ["m", "fast"]
    (row,) = AuditEvent.objects.filter(action=Action.ORGANIZATION_UPDATED)
    assert (row.actor, row.organization, row.object_id) == (superuser, acme, str(acme.pk))
    assert (row.before, row.after) == ({"allowed_models": []}, {"allowed_models": ["m", "fast"]})


def test_a_teams_list_changed_in_the_admin_is_one_audit_row(admin_site, superuser, names) -> None:
    team = Team.objects.create(organization=Organization.objects.default(), name="T", slug="t", allowed_models=["m"])
    data = {
        "organization": str(team.organization_id),
        "name": "T",
        "slug": "t",
        "allowed_models": '["fast"]',
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }

    response = admin_site.post(f"/admin/accounts/team/{team.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:2000]
    (row,) = AuditEvent.objects.filter(action=Action.TEAM_UPDATED)
    assert (row.before, row.after) == ({"allowed_models": ["m"]}, {"allowed_models": ["fast"]})
