"""API keys through /api/api-keys/: the secret shown once, stored hashed, usable, revocable, private."""

from __future__ import annotations

import hashlib

import pytest
from rest_framework.test import APIClient

from accounts.models import APIKey
from accounts.services import api_key_create
from tests.kit import assert_error, bearer

KEYS = "/api/api-keys/"
ME = "/api/auth/me/"

pytestmark = pytest.mark.django_db


def test_create_shows_the_secret_once_and_the_list_never(auth_client, user):
    response = auth_client.post(KEYS, {"name": "nextchat"}, format="json")

    assert response.status_code == 201
    created = response.json()
    shown = {
        "id",
        "name",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
        "expires_at",
        "allowed_models",
        "scopes",
        "team",
        "owner",
        "created_by",
    }
    assert set(created) == {*shown, "key"}
    secret = created["key"]
    assert secret.startswith("sk-")
    assert len(secret) > 40
    assert created["name"] == "nextchat"
    assert created["prefix"] == secret[:10]
    assert created["last_used_at"] is None
    assert created["revoked_at"] is None
    assert created["expires_at"] is None
    assert created["allowed_models"] == []
    assert created["scopes"] == ["chat", "read", "admin"]  # unrestricted unless asked

    listed = auth_client.get(KEYS)

    assert listed.status_code == 200
    page = listed.json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 1
    assert set(page["results"][0]) == shown
    assert page["results"][0]["id"] == created["id"]
    assert secret not in listed.content.decode()
    assert hashlib.sha256(secret.encode()).hexdigest() not in listed.content.decode()


def test_the_database_stores_only_the_sha256_of_the_secret(auth_client):
    secret = auth_client.post(KEYS, {"name": "sdk"}, format="json").json()["key"]

    row = APIKey.objects.values().get()

    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    for column, value in row.items():
        assert secret not in str(value), column


def test_a_key_authenticates_me_and_records_its_use(user, api_key_secret):
    response = APIClient(headers=bearer(api_key_secret)).get(ME)

    assert response.status_code == 200
    assert response.json()["username"] == user.username
    assert APIKey.objects.get().last_used_at is not None


def test_a_revoked_key_is_a_401(auth_client, api_key_secret):
    key_id = APIKey.objects.get().id

    response = auth_client.delete(f"{KEYS}{key_id}/")

    assert response.status_code == 204
    error = assert_error(APIClient(headers=bearer(api_key_secret)).get(ME), 401, code="api_key_revoked")
    assert error["code"] == "api_key_revoked"
    listed = auth_client.get(KEYS).json()["results"]
    assert listed[0]["revoked_at"] is not None
    assert auth_client.delete(f"{KEYS}{key_id}/").status_code == 204  # revoking again is harmless


def test_a_member_cannot_see_or_revoke_anothers_keys(auth_client, other_user):
    theirs = api_key_create(user=other_user, name="theirs")
    auth_client.post(KEYS, {"name": "mine"}, format="json")

    listed = auth_client.get(KEYS).json()
    response = auth_client.delete(f"{KEYS}{theirs.api_key.id}/")

    assert [key["name"] for key in listed["results"]] == ["mine"]
    error = assert_error(response, 404, code="api_key_not_found")
    assert error["type"] == "not_found_error"
    theirs.api_key.refresh_from_db()
    assert theirs.api_key.revoked_at is None
    assert APIClient(headers=bearer(theirs.secret)).get(ME).status_code == 200


@pytest.mark.parametrize("key_id", [0, 987654321, 2**70])
def test_revoking_an_unknown_key_is_a_404(auth_client, key_id):
    assert_error(auth_client.delete(f"{KEYS}{key_id}/"), 404, code="api_key_not_found")


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "name"), ({"name": ["a", "b"]}, "name"), ({"name": ""}, "name"), ({"name": "x" * 101}, "name")],
)
def test_create_with_a_bad_name_is_a_400_naming_the_param(auth_client, body, param):
    response = auth_client.post(KEYS, body, format="json")

    assert_error(response, 400, param=param, code="invalid")
    assert not APIKey.objects.exists()


def test_create_with_malformed_json_is_a_400_json_error(auth_client):
    response = auth_client.post(KEYS, data="{not json", content_type="application/json")

    assert_error(response, 400, code="parse_error")


def test_api_keys_need_authentication(api_client):
    assert_error(api_client.get(KEYS), 401, code="not_authenticated")
    assert_error(api_client.post(KEYS, {"name": "x"}, format="json"), 401, code="not_authenticated")
    assert not APIKey.objects.exists()


def test_an_api_key_can_manage_keys_too(user, api_key_secret):
    client = APIClient(headers=bearer(api_key_secret))

    response = client.post(KEYS, {"name": "second"}, format="json")

    assert response.status_code == 201
    assert client.get(KEYS).json()["count"] == 2
