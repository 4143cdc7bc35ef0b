"""Listings act in the request's organization: keys, usage, budgets and users; viewers only read."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from accounts.models import Budget, Membership, Organization, UsageRecord
from accounts.services import api_key_create
from tests.factories import LLMModelFactory, UserFactory

pytestmark = pytest.mark.django_db

ACME = {"OpenAI-Organization": "acme"}


@pytest.fixture
def acme(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


def _ids(response: Any) -> set[int]:
    assert response.status_code == 200, response.content
    body = response.json()
    return {row["id"] for row in (body["results"] if isinstance(body, dict) else body)}


def _usage(user: Any, organization: Organization, request_id: str) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=request_id, user=user, organization=organization, model_name="m", source="openai_api",
        prompt_tokens=1, completion_tokens=1, cost=Decimal("0.01"), finish_status="completed",
    )  # fmt: skip


def test_keys_are_listed_per_organization(client_for, user, acme) -> None:
    Membership.objects.create(user=user, organization=acme)
    home = api_key_create(user=user, name="home").api_key
    at_acme = api_key_create(user=user, name="acme", organization=acme).api_key
    client = client_for(user)
    assert _ids(client.get("/api/api-keys/")) == {home.pk}
    assert _ids(client.get("/api/api-keys/", headers=ACME)) == {at_acme.pk}
    created = client.post("/api/api-keys/", {"name": "new"}, format="json", headers=ACME)
    assert created.status_code == 201, created.content
    assert _ids(client.get("/api/api-keys/", headers=ACME)) == {at_acme.pk, created.json()["id"]}


def test_an_organization_admin_sees_its_usage_members_and_budgets_only(client_for, user, acme) -> None:
    boss = UserFactory()
    Membership.objects.create(user=boss, organization=acme, role=Membership.Role.ADMIN)
    Membership.objects.create(user=user, organization=acme)
    theirs = _usage(user, acme, "r-acme")
    _usage(user, Organization.objects.default(), "r-home")
    budget = Budget.objects.create(
        name="acme", organization=acme, subject_kind="user", subject_id=user.pk, limit_usd=Decimal(5)
    )
    Budget.objects.create(name="home", subject_kind="user", subject_id=user.pk, limit_usd=Decimal(5))
    client = client_for(boss)

    assert _ids(client.get("/api/usage/", headers=ACME)) == {theirs.pk}
    assert _ids(client.get("/api/users/", headers=ACME)) == {boss.pk, user.pk}
    assert _ids(client.get("/api/budgets/", headers=ACME)) == {budget.pk}
    # Acting in the default organization, boss is a plain member there: own usage only, no user list.
    assert _ids(client.get("/api/usage/")) == set()
    assert client.get("/api/users/").status_code == 403


def test_a_viewer_reads_but_does_not_chat(client_for, user, acme) -> None:
    Membership.objects.create(user=user, organization=acme, role=Membership.Role.VIEWER)
    model = LLMModelFactory()
    client = client_for(user)

    assert client.get("/api/conversations/", headers=ACME).status_code == 200
    refused = client.post("/api/conversations/", {"model": model.name}, format="json", headers=ACME)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_permissions"
    # In the default organization, where the user is a member, they may.
    assert client.post("/api/conversations/", {"model": model.name}, format="json").status_code == 201


# The async endpoints read the key in a worker thread: its row must be committed.
@pytest.mark.django_db(transaction=True)
def test_a_viewers_key_is_refused_on_v1_before_the_body_is_read(api_client, user, acme) -> None:
    Membership.objects.create(user=user, organization=acme, role=Membership.Role.VIEWER)
    secret = api_key_create(user=user, name="viewer key", organization=acme).secret
    headers = {"Authorization": f"Bearer {secret}"}

    response = api_client.post("/v1/chat/completions", {}, format="json", headers=headers)

    assert response.status_code == 403, response.content
    assert response.json()["error"]["code"] == "insufficient_permissions"
    assert api_client.get("/v1/models", headers=headers).status_code == 200  # reading is fine
