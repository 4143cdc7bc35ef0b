"""/api/usage/ and /api/users/: members see their own, admins see everyone's."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.services import api_key_create
from tests.factories import LLMModelFactory, UsageRecordFactory
from tests.kit import assert_error

USAGE = "/api/usage/"
USERS = "/api/users/"

pytestmark = pytest.mark.django_db

USAGE_FIELDS = {
    "id",
    "request_id",
    "username",
    "model_name",
    "source",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cost",
    "token_source",
    "finish_status",
    "created_at",
    "api_key_prefix",
}


def test_a_member_sees_only_their_own_usage(auth_client, user, other_user):
    model = LLMModelFactory(input_price_per_million="1.000000", output_price_per_million="2.000000")
    key = api_key_create(user=user, name="sdk").api_key
    UsageRecordFactory(
        user=user, request_id="mine-1", api_key=key, model=model, prompt_tokens=1000, completion_tokens=500
    )
    UsageRecordFactory(user=other_user, request_id="theirs-1", model=model)

    response = auth_client.get(USAGE)

    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 1
    row = page["results"][0]
    assert set(row) == USAGE_FIELDS
    assert row["request_id"] == "mine-1"
    assert row["username"] == user.username
    assert row["model_name"] == model.name
    assert row["source"] == "openai_api"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (1000, 500, 1500)
    assert isinstance(row["cost"], str)
    assert Decimal(row["cost"]) == Decimal("0.002")  # (1000 * 1 + 500 * 2) / 1e6
    assert row["token_source"] == "provider"
    assert row["finish_status"] == "completed"
    assert row["api_key_prefix"] == key.prefix


def test_usage_without_an_api_key_has_a_null_prefix(auth_client, user):
    UsageRecordFactory(user=user, request_id="conv-1")

    row = auth_client.get(USAGE).json()["results"][0]

    assert row["api_key_prefix"] is None
    assert row["source"] == "conversation"
    assert row["cost"] == "0.00000000"  # no model row to price it


def test_an_admin_sees_everyones_usage_newest_first(client_for, admin_user, user, other_user):
    UsageRecordFactory(user=user, request_id="a")
    UsageRecordFactory(user=other_user, request_id="b")

    response = client_for(admin_user).get(USAGE)

    assert response.status_code == 200
    assert [row["request_id"] for row in response.json()["results"]] == ["b", "a"]


def test_usage_needs_authentication(api_client):
    assert_error(api_client.get(USAGE), 401, code="not_authenticated")


def test_an_admin_lists_users(client_for, admin_user, user, other_user):
    response = client_for(admin_user).get(USERS)

    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 3
    assert {row["username"] for row in page["results"]} == {admin_user.username, user.username, other_user.username}
    assert set(page["results"][0]) == {
        "id",
        "username",
        "email",
        "role",
        "is_active",
        "is_service_account",
        "date_joined",
        "last_login",
    }
    assert "password" not in response.content.decode()


def test_a_superuser_counts_as_an_admin(client_for, superuser):
    assert client_for(superuser).get(USERS).status_code == 200


def test_a_member_cannot_list_users(auth_client):
    error = assert_error(auth_client.get(USERS), 403, code="permission_denied")

    assert error["type"] == "permission_error"
    assert error["code"] == "permission_denied"


def test_users_needs_authentication(api_client):
    assert_error(api_client.get(USERS), 401, code="not_authenticated")
