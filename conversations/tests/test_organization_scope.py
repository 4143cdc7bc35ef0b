"""Conversations are scoped to the organization a request acts in (``OpenAI-Organization``).

Another organization's conversation is a 404, as another user's is; an organization's admins see
its members' conversations, not another organization's; the platform superuser sees across them.
"""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import Membership, Organization
from accounts.services import api_key_create
from conversations.models import Conversation
from tests.factories import ConversationFactory, LLMModelFactory, UserFactory

pytestmark = pytest.mark.django_db

HEADER = "OpenAI-Organization"


@pytest.fixture
def acme(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


def _join(user: Any, organization: Organization, role: str = Membership.Role.MEMBER) -> None:
    Membership.objects.create(user=user, organization=organization, role=role)


def _ids(response: Any) -> set[int]:
    assert response.status_code == 200, response.content
    return {row["id"] for row in response.json()["results"]}


def test_a_request_sees_the_conversations_of_the_organization_it_acts_in(client_for, user, acme) -> None:
    _join(user, acme)
    home = ConversationFactory(owner=user)  # the default organization
    at_acme = ConversationFactory(owner=user, organization=acme)
    client = client_for(user)

    assert _ids(client.get("/api/conversations/")) == {home.pk}
    assert _ids(client.get("/api/conversations/", headers={HEADER: "acme"})) == {at_acme.pk}
    # Acting in the default organization, the acme conversation does not exist.
    assert client.get(f"/api/conversations/{at_acme.pk}/").status_code == 404
    assert client.get(f"/api/conversations/{at_acme.pk}/messages/").status_code == 404
    assert client.get(f"/api/conversations/{at_acme.pk}/", headers={HEADER: "acme"}).status_code == 200


def test_a_new_conversation_belongs_to_the_organization_the_request_acts_in(client_for, user, acme) -> None:
    _join(user, acme)
    model = LLMModelFactory()
    response = client_for(user).post(
        "/api/conversations/", {"model": model.name}, format="json", headers={HEADER: "acme"}
    )
    assert response.status_code == 201, response.content
    assert Conversation.objects.get(pk=response.json()["id"]).organization == acme


def test_naming_an_organization_you_are_not_a_member_of_is_refused(client_for, user, acme) -> None:
    response = client_for(user).get("/api/conversations/", headers={HEADER: "acme"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_organization"
    assert "acme" in response.json()["error"]["message"]


# The async endpoints read the database in a worker thread: the rows must be committed.
@pytest.mark.django_db(transaction=True)
def test_the_async_endpoints_refuse_an_organization_you_are_not_a_member_of(api_client, user, token, acme) -> None:
    response = api_client.get("/v1/models", headers={"Authorization": f"Bearer {token}", HEADER: "acme"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_organization"


@pytest.mark.django_db(transaction=True)
def test_an_api_key_acts_in_its_own_organization(api_client, user, acme) -> None:
    _join(user, acme)
    secret = api_key_create(user=user, name="laptop").secret  # the default organization's
    mine = ConversationFactory(owner=user)
    ConversationFactory(owner=user, organization=acme)
    headers = {"Authorization": f"Bearer {secret}"}

    assert _ids(api_client.get("/api/conversations/", headers=headers)) == {mine.pk}
    refused = api_client.get("/v1/models", headers={**headers, HEADER: "acme"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_organization"


@pytest.mark.django_db(transaction=True)
def test_the_header_names_an_organization_by_slug_or_by_id(api_client, user, token, acme) -> None:
    # OpenAI's header carries an organization id; ours were matched by slug alone, so a client given
    # the ``id`` that /api/organizations/ lists (``OpenAI(organization=...)``) got a 401.
    _join(user, acme)
    at_acme = ConversationFactory(owner=user, organization=acme)
    ConversationFactory(owner=user)
    secret = api_key_create(user=user, name="acme", organization=acme).secret

    for credential in (token, secret):
        for value in ("acme", str(acme.pk)):
            headers = {"Authorization": f"Bearer {credential}", HEADER: value}
            assert api_client.get("/v1/models", headers=headers).status_code == 200, (credential, value)
            assert _ids(api_client.get("/api/conversations/", headers=headers)) == {at_acme.pk}


@pytest.mark.django_db(transaction=True)
def test_an_organization_refused_by_the_header_is_a_401_naming_the_header(api_client, user, token, acme) -> None:
    globex = Organization.objects.create(name="Globex", slug="globex")
    secret = api_key_create(user=user, name="laptop").secret  # the default organization's

    for credential in (token, secret):
        for value in ("globex", str(globex.pk), "org-AbCdEf123", "acme"):
            headers = {"Authorization": f"Bearer {credential}", HEADER: value}
            response = api_client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["code"] == "invalid_organization" and error["type"] == "authentication_error"
            assert HEADER in error["message"] and value in error["message"], error


def test_organization_admins_see_their_members_conversations_only(client_for, user, acme) -> None:
    boss = UserFactory()
    _join(boss, acme, Membership.Role.ADMIN)
    _join(user, acme)
    theirs = ConversationFactory(owner=user, organization=acme)
    ConversationFactory(owner=user)  # same user, default organization: not acme's
    outsider = UserFactory()
    ConversationFactory(owner=outsider)

    assert _ids(client_for(boss).get("/api/conversations/", headers={HEADER: "acme"})) == {theirs.pk}
    # A plain member of acme sees their own only.
    other_member = UserFactory()
    _join(other_member, acme)
    assert _ids(client_for(other_member).get("/api/conversations/", headers={HEADER: "acme"})) == set()
    assert client_for(other_member).get(f"/api/conversations/{theirs.pk}/", headers={HEADER: "acme"}).status_code == 404


def test_the_platform_superuser_sees_across_organizations(client_for, superuser, user, acme) -> None:
    home = ConversationFactory(owner=user)
    at_acme = ConversationFactory(owner=UserFactory(), organization=acme)
    client = client_for(superuser)
    assert {home.pk, at_acme.pk} <= _ids(client.get("/api/conversations/"))
    # ... and may act in any organization, as its owner.
    assert client.get(f"/api/conversations/{at_acme.pk}/", headers={HEADER: "acme"}).status_code == 200
