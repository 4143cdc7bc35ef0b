"""Account lifecycle as a client sees it: password change and reset, email verification, deactivation.

Emails go to Django's locmem backend (``mail.outbox``); they are queued when the transaction
commits, so the tests that send one run the commit callbacks (``django_capture_on_commit_callbacks``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.tokens import PasswordResetTokenGenerator, default_token_generator
from django.core import mail, signing
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from accounts.lifecycle.services import EMAIL_VERIFICATION_SALT
from accounts.models import APIKey, User
from accounts.services import api_key_create
from tests.factories import ConversationFactory, UserFactory
from tests.kit import assert_error, bearer

TOKEN = "/api/auth/token/"
REFRESH = "/api/auth/token/refresh/"
ME = "/api/auth/me/"
REGISTER = "/api/auth/register/"
CHANGE = "/api/auth/password/change/"
RESET = "/api/auth/password/reset/"
CONFIRM = "/api/auth/password/reset/confirm/"
VERIFY = "/api/auth/email/verify/"
RESEND = "/api/auth/email/verify/resend/"
NEW_PASSWORD = "an-entirely-new-passphrase-77"

pytestmark = pytest.mark.django_db


def login(api_client, username: str, password: str) -> dict:
    response = api_client.post(TOKEN, {"username": username, "password": password})
    assert response.status_code == 200, response.content
    return response.json()


def link_params(message: mail.EmailMessage, base_url: str) -> dict[str, str]:
    """Return the query parameters of the one link to ``base_url`` in ``message``'s body."""
    links = re.findall(rf"{re.escape(base_url)}\?\S+", message.body)
    assert len(links) == 1, message.body
    return {name: values[0] for name, values in parse_qs(urlsplit(links[0]).query).items()}


# --- Password change ---------------------------------------------------------------------------


def test_password_change_sets_the_password_ends_other_logins_and_answers_a_new_one(
    api_client, user, password, django_capture_on_commit_callbacks
):
    first = login(api_client, user.username, password)
    rotated = api_client.post(REFRESH, {"refresh": login(api_client, user.username, password)["refresh"]}).json()

    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(
            CHANGE, {"old_password": password, "new_password": NEW_PASSWORD}, headers=bearer(first["access"])
        )

    assert response.status_code == 200, response.content
    fresh = response.json()
    assert set(fresh) == {"access", "refresh"}
    user.refresh_from_db()
    assert user.check_password(NEW_PASSWORD)
    # Every earlier login's refresh token (a rotated one too) is refused; the new pair works.
    for old in (first["refresh"], rotated["refresh"]):
        assert_error(api_client.post(REFRESH, {"refresh": old}), 401, code="token_not_valid")
    # And their access tokens: those logins ended, though the tokens have not expired.
    for old in (first["access"], rotated["access"]):
        assert_error(api_client.get(ME, headers=bearer(old)), 401, code="token_not_valid")
    assert api_client.post(REFRESH, {"refresh": fresh["refresh"]}).status_code == 200
    assert api_client.get(ME, headers=bearer(fresh["access"])).json()["username"] == user.username
    assert_error(api_client.post(TOKEN, {"username": user.username, "password": password}), 401)
    login(api_client, user.username, NEW_PASSWORD)


def test_password_change_keeps_api_keys_working(api_client, user, password, api_key_secret):
    response = api_client.post(
        CHANGE, {"old_password": password, "new_password": NEW_PASSWORD}, headers=bearer(api_key_secret)
    )

    assert response.status_code == 200
    assert api_client.get(ME, headers=bearer(api_key_secret)).status_code == 200


def test_password_change_with_a_wrong_old_password_is_a_400_and_changes_nothing(auth_client, user, password):
    response = auth_client.post(CHANGE, {"old_password": "not-it", "new_password": NEW_PASSWORD})

    error = assert_error(response, 400, param="old_password", code="password_incorrect")
    assert "old_password" in error["fields"]
    user.refresh_from_db()
    assert user.check_password(password)


@pytest.mark.parametrize(
    ("new_password", "code"),
    [("short", "invalid"), ("password123", "password_too_common"), ("73915548203", "password_entirely_numeric")],
)
def test_password_change_to_a_weak_password_is_a_400_naming_new_password(
    auth_client, user, password, new_password, code
):
    response = auth_client.post(CHANGE, {"old_password": password, "new_password": new_password})

    assert_error(response, 400, param="new_password", code=code)
    user.refresh_from_db()
    assert user.check_password(password)


def test_password_change_needs_authentication_and_both_fields(api_client, auth_client):
    assert_error(api_client.post(CHANGE, {"old_password": "a", "new_password": NEW_PASSWORD}), 401)
    assert_error(auth_client.post(CHANGE, {"new_password": NEW_PASSWORD}), 400, param="old_password")
    assert_error(auth_client.post(CHANGE, {"old_password": 1, "new_password": NEW_PASSWORD}), 400, param="old_password")


def test_password_change_is_throttled_per_client(auth_client, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth_password": "2/minute"}}
    for _ in range(2):
        assert auth_client.post(CHANGE, {"old_password": "guess", "new_password": NEW_PASSWORD}).status_code == 400

    response = auth_client.post(CHANGE, {"old_password": "guess", "new_password": NEW_PASSWORD})

    assert_error(response, 429, code="throttled")


# --- Single sign-on ready: an account without a local password ----------------------------------


def test_an_account_without_a_password_works_with_api_keys(api_client):
    sso_user = UserFactory()
    sso_user.set_unusable_password()
    sso_user.save()
    secret = api_key_create(user=sso_user, name="sso").secret

    assert api_client.get(ME, headers=bearer(secret)).json()["username"] == sso_user.username
    created = api_client.post("/api/api-keys/", {"name": "another"}, headers=bearer(secret))
    assert created.status_code == 201
    # No password to log in with, to change, or to reset by email.
    assert_error(api_client.post(TOKEN, {"username": sso_user.username, "password": ""}), 400)
    change = api_client.post(CHANGE, {"old_password": "x", "new_password": NEW_PASSWORD}, headers=bearer(secret))
    assert_error(change, 400, param="old_password", code="password_not_set")
    assert api_client.post(RESET, {"email": sso_user.email}).status_code == 202
    assert mail.outbox == []


# --- Password reset ----------------------------------------------------------------------------


def test_password_reset_emails_a_link_that_sets_a_new_password(
    api_client, user, password, settings, django_capture_on_commit_callbacks
):
    settings.PASSWORD_RESET_URL = "https://chat.example.com/reset"
    earlier = login(api_client, user.username, password)

    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(RESET, {"email": user.email.upper()})

    assert response.status_code == 202
    assert "detail" in response.json()
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == [user.email]
    params = link_params(message, "https://chat.example.com/reset")
    assert set(params) == {"uid", "token"}

    confirmed = api_client.post(CONFIRM, {**params, "new_password": NEW_PASSWORD})

    assert confirmed.status_code == 204, confirmed.content
    login(api_client, user.username, NEW_PASSWORD)
    assert_error(api_client.post(REFRESH, {"refresh": earlier["refresh"]}), 401, code="token_not_valid")
    # A link works once: the new password makes it stale.
    again = api_client.post(CONFIRM, {**params, "new_password": "yet-another-passphrase-88"})
    assert_error(again, 400, param="token", code="invalid_link")


def test_password_reset_of_an_unknown_email_answers_the_same_and_sends_nothing(
    api_client, user, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        known = api_client.post(RESET, {"email": user.email})
        unknown = api_client.post(RESET, {"email": "nobody@example.com"})

    assert (unknown.status_code, unknown.json()) == (known.status_code, known.json()) == (202, known.json())
    assert [m.to for m in mail.outbox] == [[user.email]]


def test_password_reset_sends_nothing_to_a_deactivated_account(api_client, django_capture_on_commit_callbacks):
    inactive = UserFactory(is_active=False)

    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(RESET, {"email": inactive.email})

    assert response.status_code == 202
    assert mail.outbox == []


@pytest.mark.parametrize("body", [{}, {"email": "not-an-email"}, {"email": 5}])
def test_password_reset_with_a_bad_email_is_a_400(api_client, body):
    assert_error(api_client.post(RESET, body), 400, param="email")


def test_password_reset_is_throttled_per_client(api_client, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth_password": "2/minute"}}
    for _ in range(2):
        assert api_client.post(RESET, {"email": "a@example.com"}).status_code == 202

    assert_error(api_client.post(RESET, {"email": "a@example.com"}), 429, code="throttled")


def _uid(user: User) -> str:
    return urlsafe_base64_encode(force_bytes(user.pk))


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda user: {"uid": _uid(user), "token": "wrong-token"}, id="wrong token"),
        pytest.param(lambda user: {"uid": "!!", "token": default_token_generator.make_token(user)}, id="bad uid"),
        pytest.param(
            lambda user: {"uid": urlsafe_base64_encode(force_bytes(2**64)), "token": "x"}, id="uid out of range"
        ),
        pytest.param(
            lambda user: {"uid": _uid(UserFactory()), "token": default_token_generator.make_token(user)},
            id="another user's token",
        ),
    ],
)
def test_password_reset_confirm_with_a_bad_link_is_a_400(api_client, user, password, params):
    response = api_client.post(CONFIRM, {**params(user), "new_password": NEW_PASSWORD})

    assert_error(response, 400, param="token", code="invalid_link")
    user.refresh_from_db()
    assert user.check_password(password)


def test_password_reset_confirm_with_an_expired_link_is_a_400(api_client, user, settings):
    class TwoMinutesAgo(PasswordResetTokenGenerator):
        def _now(self) -> datetime:
            return datetime.now() - timedelta(minutes=2)

    settings.PASSWORD_RESET_TIMEOUT = 60
    stale = TwoMinutesAgo().make_token(user)

    response = api_client.post(CONFIRM, {"uid": _uid(user), "token": stale, "new_password": NEW_PASSWORD})

    assert_error(response, 400, param="token", code="invalid_link")


def test_password_reset_confirm_with_a_weak_password_is_a_400_and_keeps_the_link(api_client, user):
    params = {"uid": _uid(user), "token": default_token_generator.make_token(user)}

    assert_error(api_client.post(CONFIRM, {**params, "new_password": "password123"}), 400, param="new_password")
    assert api_client.post(CONFIRM, {**params, "new_password": NEW_PASSWORD}).status_code == 204


# --- Email verification ------------------------------------------------------------------------


@pytest.fixture
def verification_required(settings):
    settings.EMAIL_VERIFICATION_REQUIRED = True
    settings.EMAIL_VERIFICATION_URL = "https://chat.example.com/verify"


def register(api_client, django_capture_on_commit_callbacks, **fields) -> dict:
    body = {"username": "vera", "password": "a-long-passphrase-42", "email": "vera@example.com", **fields}
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(REGISTER, body)
    assert response.status_code == 201, response.content
    return response.json()


def test_a_registered_account_verifies_its_email_before_it_may_log_in(
    api_client, verification_required, django_capture_on_commit_callbacks
):
    created = register(api_client, django_capture_on_commit_callbacks)

    assert created["email_verified"] is False
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["vera@example.com"]
    refused = api_client.post(TOKEN, {"username": "vera", "password": "a-long-passphrase-42"})
    assert "verify" in assert_error(refused, 403, code="email_not_verified", type="permission_error")["message"]
    # A wrong password still says only that: nothing about the account's state.
    assert_error(api_client.post(TOKEN, {"username": "vera", "password": "wrong"}), 401)

    token = link_params(mail.outbox[0], "https://chat.example.com/verify")["token"]
    assert api_client.post(VERIFY, {"token": token}).status_code == 204
    assert api_client.post(VERIFY, {"token": token}).status_code == 204  # twice is harmless

    assert User.objects.get(username="vera").email_verified
    login(api_client, "vera", "a-long-passphrase-42")


def test_an_unverified_accounts_api_key_is_refused_with_a_403(api_client, verification_required):
    unverified = UserFactory(email_verified=False)
    secret = api_key_create(user=unverified, name="early").secret

    assert_error(api_client.get(ME, headers=bearer(secret)), 403, code="email_not_verified")
    assert_error(api_client.get("/api/api-keys/", headers=bearer(secret)), 403, code="email_not_verified")


def test_registration_requires_an_email_when_verification_is_on(api_client, verification_required):
    response = api_client.post(REGISTER, {"username": "noemail", "password": "a-long-passphrase-42"})

    assert_error(response, 400, param="email", code="required")
    assert not User.objects.filter(username="noemail").exists()


def test_without_verification_registration_sends_nothing(api_client, django_capture_on_commit_callbacks):
    created = register(api_client, django_capture_on_commit_callbacks)

    assert created["email_verified"] is True
    assert mail.outbox == []
    login(api_client, "vera", "a-long-passphrase-42")


def _signed(payload: dict, *, age_seconds: int) -> str:
    class Earlier(signing.TimestampSigner):
        def timestamp(self) -> str:
            return signing.b62_encode(int(time.time()) - age_seconds)

    return Earlier(salt=EMAIL_VERIFICATION_SALT).sign_object(payload, compress=True)


def test_email_verify_with_a_bad_or_expired_token_is_a_400(api_client, settings):
    unverified = UserFactory(email_verified=False)
    settings.EMAIL_VERIFICATION_MAX_AGE_SECONDS = 60
    payload = {"user": unverified.pk, "email": unverified.email}

    expired = api_client.post(VERIFY, {"token": _signed(payload, age_seconds=120)})
    forged = api_client.post(VERIFY, {"token": _signed(payload, age_seconds=0)[:-2] + "xx"})
    other_salt = api_client.post(VERIFY, {"token": signing.dumps(payload)})
    old_email = api_client.post(VERIFY, {"token": _signed({**payload, "email": "old@example.com"}, age_seconds=0)})

    assert_error(expired, 400, param="token", code="link_expired")
    for response in (forged, other_salt, old_email):
        assert_error(response, 400, param="token", code="invalid_link")
    assert_error(api_client.post(VERIFY, {}), 400, param="token")
    unverified.refresh_from_db()
    assert not unverified.email_verified
    assert api_client.post(VERIFY, {"token": _signed(payload, age_seconds=0)}).status_code == 204


def test_resend_sends_a_new_link_only_to_an_unverified_account(api_client, django_capture_on_commit_callbacks):
    unverified = UserFactory(email_verified=False)
    verified = UserFactory()

    with django_capture_on_commit_callbacks(execute=True):
        responses = [api_client.post(RESEND, {"email": e}) for e in (unverified.email, verified.email, "x@example.com")]

    assert {(r.status_code, r.json()["detail"]) for r in responses} == {(202, responses[0].json()["detail"])}
    assert [m.to for m in mail.outbox] == [[unverified.email]]


# --- Deactivation ------------------------------------------------------------------------------


def deactivate(client, user: User, action: str = "deactivate"):
    return client.post(f"/api/users/{user.pk}/{action}/")


def test_an_admin_deactivates_a_user_whose_key_and_tokens_stop_working(
    api_client, client_for, admin_user, user, password, api_key_secret
):
    tokens = login(api_client, user.username, password)
    conversation = ConversationFactory(owner=user)

    response = deactivate(client_for(admin_user), user)

    assert response.status_code == 200
    assert response.json()["is_active"] is False
    assert_error(api_client.get(ME, headers=bearer(api_key_secret)), 401, code="user_inactive")
    assert_error(api_client.get(ME, headers=bearer(tokens["access"])), 401)
    assert_error(api_client.post(REFRESH, {"refresh": tokens["refresh"]}), 401)
    assert_error(api_client.post(TOKEN, {"username": user.username, "password": password}), 401)
    # Their data stays; their keys are not revoked.
    assert user.conversations.filter(pk=conversation.pk).exists()
    assert APIKey.objects.get(user=user).revoked_at is None

    reactivated = deactivate(client_for(admin_user), user, "reactivate")

    assert reactivated.json()["is_active"] is True
    assert api_client.get(ME, headers=bearer(api_key_secret)).status_code == 200
    # The logins the deactivation ended stay ended.
    assert_error(api_client.post(REFRESH, {"refresh": tokens["refresh"]}), 401, code="token_not_valid")
    login(api_client, user.username, password)


def test_deactivate_is_for_admins_only(client_for, user, other_user, admin_user, superuser):
    assert_error(deactivate(client_for(user), other_user), 403, code="permission_denied")
    assert_error(deactivate(client_for(user), other_user, "reactivate"), 403, code="permission_denied")
    assert_error(deactivate(client_for(admin_user), admin_user), 400, code="cannot_deactivate_self")
    assert_error(deactivate(client_for(admin_user), superuser), 403, code="permission_denied")
    assert_error(client_for(admin_user).post("/api/users/999999/deactivate/"), 404, code="user_not_found")
    assert_error(client_for(admin_user).post(f"/api/users/{2**64}/reactivate/"), 404, code="user_not_found")
    assert_error(APIClientNoAuth().post(f"/api/users/{other_user.pk}/deactivate/"), 401)
    assert User.objects.filter(is_active=False).count() == 0
    assert deactivate(client_for(superuser), admin_user).status_code == 200


def APIClientNoAuth():  # noqa: N802 - reads as the class it builds
    from rest_framework.test import APIClient

    return APIClient()


def test_the_admin_actions_deactivate_and_reactivate(admin_site, user, other_user, api_key_secret):
    changelist = "/admin/accounts/user/"

    response = admin_site.post(changelist, {"action": "deactivate_selected", "_selected_action": [user.pk]})

    assert response.status_code == 302
    user.refresh_from_db()
    assert not user.is_active
    other_user.refresh_from_db()
    assert other_user.is_active
    assert_error(APIClientNoAuth().get(ME, headers=bearer(api_key_secret)), 401, code="user_inactive")

    admin_site.post(changelist, {"action": "reactivate_selected", "_selected_action": [user.pk]})

    user.refresh_from_db()
    assert user.is_active


def test_a_password_reset_verifies_the_email_it_reached(api_client, verification_required):
    unverified = UserFactory(email_verified=False)
    params = {"uid": _uid(unverified), "token": default_token_generator.make_token(unverified)}

    assert api_client.post(CONFIRM, {**params, "new_password": NEW_PASSWORD}).status_code == 204

    unverified.refresh_from_db()
    assert unverified.email_verified
    login(api_client, unverified.username, NEW_PASSWORD)
