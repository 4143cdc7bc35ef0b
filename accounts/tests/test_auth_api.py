"""Registration, JWT login/refresh/logout and /api/auth/me/, as a client sees them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from accounts.models import User
from tests.kit import access_token, assert_error, bearer

REGISTER = "/api/auth/register/"
TOKEN = "/api/auth/token/"
REFRESH = "/api/auth/token/refresh/"
LOGOUT = "/api/auth/logout/"
ME = "/api/auth/me/"

pytestmark = pytest.mark.django_db


def login(api_client, username: str, password: str) -> dict:
    response = api_client.post(TOKEN, {"username": username, "password": password}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


# --- register -------------------------------------------------------------------------------


def test_register_creates_a_member_and_answers_its_public_fields(api_client):
    body = {"username": "alice", "password": "a-long-passphrase-42", "email": "alice@example.com", "role": "admin"}

    response = api_client.post(REGISTER, body, format="json")

    assert response.status_code == 201
    data = response.json()
    assert set(data) == {"id", "username", "email", "role", "email_verified"}
    assert data["username"] == "alice"
    assert data["email"] == "alice@example.com"
    assert data["role"] == "member"  # a client cannot pick its own role
    user = User.objects.get(pk=data["id"])
    assert user.role == User.Role.MEMBER
    assert user.check_password("a-long-passphrase-42")
    assert user.password != "a-long-passphrase-42"


def test_register_without_email_then_login(api_client):
    response = api_client.post(REGISTER, {"username": "bob", "password": "a-long-passphrase-42"}, format="json")
    assert response.status_code == 201
    assert response.json()["email"] == ""

    tokens = login(api_client, "bob", "a-long-passphrase-42")

    assert set(tokens) == {"access", "refresh"}


def test_register_rejects_a_taken_username(api_client, user):
    response = api_client.post(REGISTER, {"username": user.username, "password": "a-long-passphrase-42"}, format="json")

    error = assert_error(response, 400, param="username", code="invalid")
    assert error["type"] == "invalid_request_error"
    assert "username" in error["fields"]
    assert User.objects.filter(username=user.username).count() == 1


def test_register_rejects_a_username_taken_in_another_case(api_client, user):
    # The admin's user form (Django's) refuses it too: "Admin" beside "admin" reads as the administrator.
    taken = user.username.upper()

    response = api_client.post(REGISTER, {"username": taken, "password": "a-long-passphrase-42"}, format="json")

    error = assert_error(response, 400, param="username", code="invalid")
    assert error["fields"] == {"username": ["A user with that username already exists."]}
    assert not User.objects.filter(username=taken).exists()


def test_register_rejects_a_weak_password(api_client):
    response = api_client.post(REGISTER, {"username": "carol", "password": "123"}, format="json")

    assert_error(response, 400, param="password", code="invalid")
    assert not User.objects.filter(username="carol").exists()


def test_register_malformed_json_is_a_400_json_error(api_client):
    response = api_client.post(REGISTER, data='{"username": "dave", ', content_type="application/json")

    error = assert_error(response, 400, code="parse_error")
    assert error["code"] == "parse_error"


def test_register_wrong_types_name_the_param(api_client):
    response = api_client.post(REGISTER, {"username": {"x": 1}, "password": "a-long-passphrase-42"}, format="json")

    assert_error(response, 400, param="username", code="invalid")


def test_register_is_throttled_per_client(api_client, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth_register": "2/minute"}}
    for name in ("t1", "t2"):
        response = api_client.post(REGISTER, {"username": name, "password": "a-long-passphrase-42"}, format="json")
        assert response.status_code == 201

    response = api_client.post(REGISTER, {"username": "t3", "password": "a-long-passphrase-42"}, format="json")

    error = assert_error(response, 429, code="throttled")
    assert error["type"] == "rate_limit_error"
    assert "Retry-After" in response
    assert not User.objects.filter(username="t3").exists()


# --- login, refresh, logout -----------------------------------------------------------------


def test_login_returns_a_working_access_token(api_client, user, password):
    tokens = login(api_client, user.username, password)

    response = api_client.get(ME, headers=bearer(tokens["access"]))

    assert response.status_code == 200
    assert response.json()["username"] == user.username


def test_login_with_a_wrong_password_is_a_401_json_error(api_client, user):
    response = api_client.post(TOKEN, {"username": user.username, "password": "wrong"}, format="json")

    error = assert_error(response, 401, code="no_active_account")
    assert error["type"] == "authentication_error"
    assert "access" not in response.json()


def test_login_without_fields_is_a_400_naming_the_field(api_client):
    response = api_client.post(TOKEN, {"password": "x"}, format="json")

    assert_error(response, 400, param="username", code="invalid")


def test_login_is_throttled_per_client(api_client, user, password, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth_login": "2/minute"}}
    login(api_client, user.username, password)
    login(api_client, user.username, password)

    response = api_client.post(TOKEN, {"username": user.username, "password": password}, format="json")

    assert_error(response, 429, code="throttled")


def test_refresh_rotates_and_blacklists_the_old_refresh_token(api_client, user, password):
    tokens = login(api_client, user.username, password)

    response = api_client.post(REFRESH, {"refresh": tokens["refresh"]}, format="json")

    assert response.status_code == 200
    rotated = response.json()
    assert set(rotated) == {"access", "refresh"}
    assert rotated["refresh"] != tokens["refresh"]
    reused = api_client.post(REFRESH, {"refresh": tokens["refresh"]}, format="json")
    assert assert_error(reused, 401)["code"] == "token_not_valid"
    again = api_client.post(REFRESH, {"refresh": rotated["refresh"]}, format="json")
    assert again.status_code == 200


def test_refresh_with_garbage_is_a_401_json_error(api_client):
    response = api_client.post(REFRESH, {"refresh": "not-a-token"}, format="json")

    assert_error(response, 401, code="token_not_valid")


def test_refresh_token_of_a_deleted_user_is_a_401_json_error(api_client, user):
    refresh = str(RefreshToken.for_user(user))
    user.delete()

    response = api_client.post(REFRESH, {"refresh": refresh}, format="json")

    assert_error(response, 401, code="no_active_account")


def test_logout_blacklists_the_refresh_token(api_client, user, password):
    tokens = login(api_client, user.username, password)

    response = api_client.post(LOGOUT, {"refresh": tokens["refresh"]}, format="json")

    assert response.status_code == 204
    assert response.content == b""
    refreshed = api_client.post(REFRESH, {"refresh": tokens["refresh"]}, format="json")
    assert assert_error(refreshed, 401)["code"] == "token_not_valid"
    logged_out_again = api_client.post(LOGOUT, {"refresh": tokens["refresh"]}, format="json")
    assert_error(logged_out_again, 401, code="token_not_valid")


def test_the_access_token_of_a_logged_out_login_is_refused_and_another_logins_is_not(
    api_client, user, password, django_capture_on_commit_callbacks
):
    ended, other = login(api_client, user.username, password), login(api_client, user.username, password)
    assert api_client.get(ME, headers=bearer(ended["access"])).status_code == 200

    with django_capture_on_commit_callbacks(execute=True):
        assert api_client.post(LOGOUT, {"refresh": ended["refresh"]}, format="json").status_code == 204

    error = assert_error(api_client.get(ME, headers=bearer(ended["access"])), 401, code="token_not_valid")
    assert "logged out" in error["message"]
    assert api_client.get(ME, headers=bearer(other["access"])).status_code == 200


def test_logout_with_a_bad_token_is_a_json_error(api_client):
    garbage = api_client.post(LOGOUT, {"refresh": "garbage"}, format="json")
    missing = api_client.post(LOGOUT, {}, format="json")

    assert_error(garbage, 401, code="token_not_valid")
    assert_error(missing, 400, param="refresh", code="invalid")


def test_logout_with_an_access_token_is_a_401(api_client, user):
    response = api_client.post(LOGOUT, {"refresh": access_token(user)}, format="json")

    assert_error(response, 401, code="token_not_valid")


# --- me and bad credentials -----------------------------------------------------------------


def test_me_answers_the_callers_account(auth_client, user):
    response = auth_client.get(ME)

    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"id", "username", "email", "role", "date_joined"}
    assert (data["id"], data["username"], data["email"], data["role"]) == (user.id, user.username, user.email, "member")
    assert parse_datetime(data["date_joined"]) == user.date_joined


def test_me_without_credentials_is_a_401_json_error(api_client):
    response = api_client.get(ME)

    assert_error(response, 401, code="not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_me_with_an_expired_access_token_is_a_401_json_error(api_client, user):
    token = AccessToken.for_user(user)
    token.set_exp(from_time=timezone.now() - timedelta(hours=1))
    response = api_client.get(ME, headers=bearer(str(token)))

    error = assert_error(response, 401, code="token_not_valid")
    assert error["code"] == "token_not_valid"
    assert error["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("Bearer garbage", "token_not_valid"),
        ("Bearer a.b.c", "token_not_valid"),
        ("Bearer sk-not-a-real-key", "invalid_api_key"),
        ("Basic dXNlcjpwdw==", "not_authenticated"),
    ],
)
def test_me_with_garbage_credentials_is_a_401_json_error(api_client, header, code):
    response = api_client.get(ME, headers={"Authorization": header})

    assert_error(response, 401, code=code, type="authentication_error")


def test_me_with_an_inactive_users_token_is_a_401(api_client, user):
    access = access_token(user)
    user.is_active = False
    user.save()

    response = api_client.get(ME, headers=bearer(access))

    assert_error(response, 401, code="authentication_failed")
