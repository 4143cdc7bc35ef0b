"""API key expiry, scopes and rotation through the REST API (``/api/...``, DRF views).

The ``/v1`` side (OpenAI's shapes, the lookup cache, the model allowlist, the SSE send view) is
``llm/tests/test_api_key_restrictions.py``.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import APIKey, Budget
from accounts.services import api_key_create, api_key_revoke
from tests.factories import LLMModelFactory
from tests.kit import assert_error, bearer

KEYS = "/api/api-keys/"
ME = "/api/auth/me/"
USAGE = "/api/usage/"
BUDGETS = "/api/budgets/"
CONVERSATIONS = "/api/conversations/"

pytestmark = pytest.mark.django_db


def key_client(user, **restrictions) -> tuple[APIClient, APIKey, str]:
    created = api_key_create(user=user, name="restricted", **restrictions)
    return APIClient(headers=bearer(created.secret)), created.api_key, created.secret


def rotate(client: APIClient, key_id: int):
    return client.post(f"{KEYS}{key_id}/rotate/")


# --- Creation and listing -------------------------------------------------------------------


def test_create_with_restrictions_shows_them_and_so_does_the_list(auth_client):
    expires_at = timezone.now() + dt.timedelta(days=30)
    body = {
        "name": "ci",
        "expires_at": expires_at.isoformat(),
        "allowed_models": ["gpt-4o-mini", "fast", "gpt-4o-mini"],
        "scopes": ["chat"],
    }

    response = auth_client.post(KEYS, body, format="json")

    assert response.status_code == 201, response.content
    created = response.json()
    assert dt.datetime.fromisoformat(created["expires_at"]) == expires_at
    assert created["allowed_models"] == ["gpt-4o-mini", "fast"]  # repeats dropped, order kept
    assert created["scopes"] == ["chat"]
    listed = auth_client.get(KEYS).json()["results"][0]
    assert {name: listed[name] for name in ("expires_at", "allowed_models", "scopes")} == {
        name: created[name] for name in ("expires_at", "allowed_models", "scopes")
    }
    row = APIKey.objects.get()
    assert (row.expires_at, row.allowed_models, row.scopes) == (expires_at, ["gpt-4o-mini", "fast"], ["chat"])


@pytest.mark.parametrize(
    ("body", "param", "named"),
    [
        ({"scopes": ["chat", "write"]}, "scopes.1", '"write"'),
        ({"scopes": []}, "scopes", None),
        ({"scopes": "chat"}, "scopes", None),
        ({"allowed_models": "gpt-4o"}, "allowed_models", None),
        ({"allowed_models": [7]}, "allowed_models.0", None),  # index 0 is named too
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at", "2000-01-01T00:00:00+00:00"),
        ({"expires_at": "next week"}, "expires_at", None),
    ],
)
def test_bad_restrictions_are_a_400_naming_the_field(auth_client, body, param, named):
    response = auth_client.post(KEYS, {"name": "bad", **body}, format="json")

    error = assert_error(response, 400, code="invalid", param=param)
    if named:
        assert named in error["message"]
    assert not APIKey.objects.exists()


def test_a_key_creates_keys_only_within_its_own_restrictions(user):
    expires_at = timezone.now() + dt.timedelta(days=1)
    client, _, _ = key_client(user, scopes=["chat", "admin"], allowed_models=["m1", "m2"], expires_at=expires_at)

    inherited = client.post(KEYS, {"name": "child"}, format="json")
    narrower = client.post(KEYS, {"name": "narrow", "scopes": ["chat"], "allowed_models": ["m1"]}, format="json")
    wider_scopes = client.post(KEYS, {"name": "w", "scopes": ["read"]}, format="json")
    wider_models = client.post(KEYS, {"name": "w", "allowed_models": ["m3"]}, format="json")
    later = (expires_at + dt.timedelta(days=1)).isoformat()
    outliving = client.post(KEYS, {"name": "w", "expires_at": later}, format="json")

    assert inherited.status_code == 201
    child = inherited.json()
    assert (child["scopes"], child["allowed_models"]) == (["chat", "admin"], ["m1", "m2"])
    assert dt.datetime.fromisoformat(child["expires_at"]) == expires_at
    assert narrower.status_code == 201
    assert "read" in assert_error(wider_scopes, 403, code="insufficient_permissions")["message"]
    assert "m3" in assert_error(wider_models, 403, code="insufficient_permissions")["message"]
    assert_error(outliving, 403, code="insufficient_permissions")
    assert APIKey.objects.count() == 3


def test_a_jwt_caller_may_create_any_key(auth_client):
    response = auth_client.post(KEYS, {"name": "wide", "scopes": ["read", "admin"]}, format="json")

    assert response.status_code == 201
    assert response.json()["scopes"] == ["read", "admin"]


# --- Expiry ---------------------------------------------------------------------------------


def test_an_expired_key_is_an_openai_401_saying_when(user):
    created = api_key_create(user=user, name="old", expires_at=timezone.now() + dt.timedelta(hours=1))
    expired_at = timezone.now() - dt.timedelta(seconds=1)
    APIKey.objects.filter(pk=created.api_key.pk).update(expires_at=expired_at)

    response = APIClient(headers=bearer(created.secret)).get(ME)

    error = assert_error(response, 401, code="invalid_api_key", type="invalid_request_error")
    assert "expired" in error["message"]
    assert expired_at.isoformat() in error["message"]
    assert created.secret not in response.content.decode()
    assert response["WWW-Authenticate"]


def test_a_key_works_until_it_expires(user):
    client, _, _ = key_client(user, expires_at=timezone.now() + dt.timedelta(minutes=5))

    assert client.get(ME).status_code == 200


# --- Scopes on DRF views ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body", "missing"),
    [
        (["chat"], "get", USAGE, None, "read"),
        (["chat"], "get", ME, None, "read"),
        (["chat"], "get", CONVERSATIONS, None, "read"),
        (["read"], "post", CONVERSATIONS, {"model": "m"}, "chat"),
        (["chat", "read"], "get", KEYS, None, "admin"),
        (["chat", "read"], "post", KEYS, {"name": "x"}, "admin"),
        (["read"], "post", BUDGETS, {"name": "b"}, "admin"),
    ],
)
def test_a_key_without_the_scope_is_a_403_naming_it(user, scopes, method, path, body, missing):
    client, _, _ = key_client(user, scopes=scopes)

    response = getattr(client, method)(path, body, format="json") if body else getattr(client, method)(path)

    error = assert_error(response, 403, code="insufficient_permissions", type="invalid_request_error")
    assert f"'{missing}' scope" in error["message"]
    assert f"Missing scopes: {missing}" in error["message"]
    assert APIKey.objects.count() == 1  # nothing was created


@pytest.mark.parametrize(
    ("scopes", "method", "path"),
    [(["read"], "get", USAGE), (["read"], "get", ME), (["read"], "get", BUDGETS), (["admin"], "get", KEYS)],
)
def test_a_key_with_the_scope_passes(user, scopes, method, path):
    client, _, _ = key_client(user, scopes=scopes)

    assert getattr(client, method)(path).status_code == 200


def test_jwt_callers_are_not_limited_by_scopes(auth_client):
    assert auth_client.get(USAGE).status_code == 200
    assert auth_client.get(KEYS).status_code == 200


# --- Model allowlist on REST ----------------------------------------------------------------


def test_a_conversation_with_a_model_outside_the_allowlist_is_a_model_not_found(user):
    LLMModelFactory(name="m1")
    LLMModelFactory(name="m2")
    client, _, _ = key_client(user, allowed_models=["m1"])

    refused = client.post(CONVERSATIONS, {"model": "m2"}, format="json")
    missing = client.post(CONVERSATIONS, {"model": "m3"}, format="json")
    created = client.post(CONVERSATIONS, {"model": "m1"}, format="json")
    moved = client.patch(f"{CONVERSATIONS}{created.json()['id']}/", {"model": "m2"}, format="json")

    error = assert_error(refused, 404, code="model_not_found", param="model")
    assert error["message"].replace("m2", "m3") == assert_error(missing, 404)["message"]
    assert created.status_code == 201
    assert_error(moved, 404, code="model_not_found", param="model")
    assert client.get(f"{CONVERSATIONS}{created.json()['id']}/").json()["model"] == "m1"


# --- Rotation -------------------------------------------------------------------------------


def test_rotation_refuses_the_old_secret_and_accepts_the_new_on_the_same_row(auth_client, user):
    created = api_key_create(user=user, name="service", scopes=["read", "admin"], allowed_models=["m"])
    Budget.objects.create(
        name="cap", subject_kind=Budget.SubjectKind.API_KEY, subject_id=created.api_key.pk, limit_usd="5"
    )
    old = APIClient(headers=bearer(created.secret))
    assert old.get(ME).status_code == 200

    response = rotate(auth_client, created.api_key.pk)

    assert response.status_code == 200, response.content
    rotated = response.json()
    assert set(rotated) == {
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
        "key",
    }
    assert rotated["id"] == created.api_key.pk
    assert rotated["name"] == "service"
    assert (rotated["scopes"], rotated["allowed_models"]) == (["read", "admin"], ["m"])
    new_secret = rotated["key"]
    assert new_secret.startswith("sk-") and new_secret != created.secret
    assert rotated["prefix"] == new_secret[:10]
    assert_error(old.get(ME), 401, code="invalid_api_key")
    assert APIClient(headers=bearer(new_secret)).get(ME).status_code == 200
    assert APIKey.objects.count() == 1
    assert Budget.objects.get().subject_id == created.api_key.pk  # the budget stays attached
    listed = auth_client.get(KEYS).content.decode()
    assert new_secret not in listed and created.secret not in listed


def test_a_key_may_rotate_itself(user):
    client, api_key, secret = key_client(user, scopes=["admin"])

    response = rotate(client, api_key.pk)

    assert response.status_code == 200
    assert_error(client.get(KEYS), 401, code="invalid_api_key")
    assert APIClient(headers=bearer(response.json()["key"])).get(KEYS).status_code == 200


def test_rotating_anothers_or_a_revoked_key_is_refused(auth_client, user, other_user):
    theirs = api_key_create(user=other_user, name="theirs")
    mine = api_key_create(user=user, name="mine")
    api_key_revoke(user=user, api_key_id=mine.api_key.pk)

    assert_error(rotate(auth_client, theirs.api_key.pk), 404, code="api_key_not_found")
    assert_error(rotate(auth_client, 987654321), 404, code="api_key_not_found")
    assert_error(rotate(auth_client, mine.api_key.pk), 400, code="api_key_revoked")
    assert APIClient(headers=bearer(theirs.secret)).get(ME).status_code == 200


def test_rotation_needs_the_admin_scope(user):
    client, api_key, secret = key_client(user, scopes=["chat", "read"])

    assert_error(rotate(client, api_key.pk), 403, code="insufficient_permissions")
    assert client.get(ME).status_code == 200  # not rotated


def test_rotation_logs_no_secret(auth_client, user, caplog):
    created = api_key_create(user=user, name="quiet")

    with caplog.at_level(logging.DEBUG):
        new_secret = rotate(auth_client, created.api_key.pk).json()["key"]

    assert new_secret not in caplog.text and created.secret not in caplog.text


# --- The migration ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_existing_keys_every_scope_and_no_restriction():
    executor = MigrationExecutor(connection)
    before = [("accounts", "0008_usagerecord_deployment")]
    after = [("accounts", "0009_apikey_expiry_scopes_models")]
    executor.migrate(before)
    try:
        old_apps = executor.loader.project_state(before).apps
        old_user = old_apps.get_model("accounts", "User").objects.create(username="before")
        old_apps.get_model("accounts", "APIKey").objects.create(
            user=old_user, name="old", prefix="sk-old", key_hash="0" * 64
        )

        executor = MigrationExecutor(connection)
        executor.migrate(after)

        key = executor.loader.project_state(after).apps.get_model("accounts", "APIKey").objects.get()
        assert (key.scopes, key.allowed_models, key.expires_at) == (["chat", "read", "admin"], [], None)
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


def test_a_key_manages_only_keys_no_wider_than_itself(api_client, user):
    """A restricted key may not rotate (and so learn) or revoke a wider key of the same user."""
    narrow = api_key_create(user=user, name="narrow", scopes=["admin"], allowed_models=["cheap"])
    wide = api_key_create(user=user, name="wide")
    headers = {"Authorization": f"Bearer {narrow.secret}"}

    rotated = api_client.post(f"/api/api-keys/{wide.api_key.pk}/rotate/", headers=headers)
    assert rotated.status_code == 403, rotated.content
    assert "sk-" not in rotated.content.decode()
    assert api_client.delete(f"/api/api-keys/{wide.api_key.pk}/", headers=headers).status_code == 403
    # Within its bounds it may: itself, and a key it could have created.
    same = api_key_create(user=user, name="same", scopes=["admin"], allowed_models=["cheap"])
    assert api_client.post(f"/api/api-keys/{same.api_key.pk}/rotate/", headers=headers).status_code == 200
    assert api_client.post(f"/api/api-keys/{narrow.api_key.pk}/rotate/", headers=headers).status_code == 200
