"""The audit log: one row per audited action, with who, what, when, where and before/after; no secrets."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import APIKey, AuditEvent, Budget, User
from accounts.services import api_key_create
from tests.factories import PASSWORD
from tests.kit import assert_error

pytestmark = pytest.mark.django_db

Action = AuditEvent.Action


def all_rows_json() -> str:
    """Every audit row, every column, as one JSON text: what a secret must never be found in."""
    return json.dumps(list(AuditEvent.objects.values()), default=str)


def only_row(action: str) -> AuditEvent:
    rows = list(AuditEvent.objects.filter(action=action))
    assert len(rows) == 1, [(row.action, row.actor_username) for row in AuditEvent.objects.all()]
    return rows[0]


# --- Logins ---------------------------------------------------------------------------------


def test_a_jwt_login_writes_one_success_row(api_client, user):
    response = api_client.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})

    assert response.status_code == 200
    row = only_row(Action.LOGIN_SUCCEEDED)
    assert (row.actor, row.actor_username, row.ip) == (user, user.username, "127.0.0.1")
    assert (row.object_type, row.object_id) == ("accounts.user", str(user.pk))
    assert AuditEvent.objects.count() == 1
    assert PASSWORD not in all_rows_json()
    assert response.data["access"] not in all_rows_json()


def test_a_failed_jwt_login_writes_one_anonymous_row_with_the_username_tried(api_client, user):
    response = api_client.post(
        "/api/auth/token/", {"username": user.username, "password": "wrong-password-1"}, REMOTE_ADDR="203.0.113.9"
    )
    unknown = api_client.post("/api/auth/token/", {"username": "nobody", "password": "wrong-password-2"})

    assert response.status_code == 401 and unknown.status_code == 401
    rows = list(AuditEvent.objects.order_by("id"))
    assert [row.action for row in rows] == [Action.LOGIN_FAILED, Action.LOGIN_FAILED]
    assert [(row.actor, row.actor_username) for row in rows] == [(None, user.username), (None, "nobody")]
    assert [row.object_id for row in rows] == [str(user.pk), ""]
    assert rows[0].ip == "203.0.113.9"
    assert rows[0].after == {"locked_out": False}
    assert "wrong-password" not in all_rows_json()


def test_a_locked_out_login_is_one_failed_row_saying_so(api_client, user, settings):
    settings.AXES_FAILURE_LIMIT = 2
    first = api_client.post("/api/auth/token/", {"username": user.username, "password": "wrong-password-1"})
    api_client.post("/api/auth/token/", {"username": user.username, "password": "wrong-password-2"})

    locked = api_client.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})

    assert (first.status_code, locked.status_code) == (401, 429)
    rows = list(AuditEvent.objects.order_by("id"))
    assert [row.action for row in rows] == [Action.LOGIN_FAILED] * 3  # the right password, refused, too
    assert (rows[0].after, rows[-1].after) == ({"locked_out": False}, {"locked_out": True})


def test_the_ip_is_the_trusted_client_address_not_a_forwarded_header_from_anyone(api_client, user):
    # TrustedProxyMiddleware (the ASGI edge) has already resolved REMOTE_ADDR; a header a client
    # wrote itself changes nothing here.
    api_client.post(
        "/api/auth/token/",
        {"username": user.username, "password": PASSWORD},
        REMOTE_ADDR="198.51.100.7",
        HTTP_X_FORWARDED_FOR="10.9.9.9",
    )

    assert only_row(Action.LOGIN_SUCCEEDED).ip == "198.51.100.7"


def test_a_client_address_that_is_no_ip_is_recorded_as_none(api_client, user):
    response = api_client.post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, REMOTE_ADDR="unix-socket"
    )

    assert response.status_code == 200
    assert only_row(Action.LOGIN_SUCCEEDED).ip is None


def test_admin_logins_are_audited(client, superuser):
    failed = client.post("/admin/login/", {"username": superuser.username, "password": "not-it-42"})
    succeeded = client.post("/admin/login/?next=/admin/", {"username": superuser.username, "password": PASSWORD})

    assert failed.status_code == 200 and succeeded.status_code == 302
    assert [(row.action, row.actor_id, row.actor_username) for row in AuditEvent.objects.order_by("id")] == [
        (Action.LOGIN_FAILED, None, superuser.username),
        (Action.LOGIN_SUCCEEDED, superuser.pk, superuser.username),
    ]
    assert "not-it-42" not in all_rows_json() and PASSWORD not in all_rows_json()


# --- API keys -------------------------------------------------------------------------------


def test_creating_a_key_writes_one_row_without_its_secret(auth_client, user):
    response = auth_client.post("/api/api-keys/", {"name": "laptop"})

    assert response.status_code == 201
    row = only_row(Action.API_KEY_CREATED)
    api_key = APIKey.objects.get()
    assert (row.actor, row.object_type, row.object_id) == (user, "accounts.apikey", str(api_key.pk))
    assert row.before is None
    assert row.after["name"] == "laptop" and row.after["user"] == user.pk and row.after["key_hash"] == "[set]"
    assert AuditEvent.objects.count() == 1
    assert response.data["key"] not in all_rows_json()
    assert api_key.key_hash not in all_rows_json()


def test_revoking_a_key_writes_one_row_once(auth_client, user, other_user):
    api_key = api_key_create(user=user, name="laptop").api_key
    others = api_key_create(user=other_user, name="theirs").api_key

    first = auth_client.delete(f"/api/api-keys/{api_key.pk}/")
    again = auth_client.delete(f"/api/api-keys/{api_key.pk}/")
    not_mine = auth_client.delete(f"/api/api-keys/{others.pk}/")

    assert (first.status_code, again.status_code, not_mine.status_code) == (204, 204, 404)
    row = only_row(Action.API_KEY_REVOKED)
    api_key.refresh_from_db()
    assert (row.actor, row.object_id) == (user, str(api_key.pk))
    assert row.before == {"revoked_at": None}
    recorded = dt.datetime.fromisoformat(row.after["revoked_at"])
    assert abs(recorded - api_key.revoked_at) < dt.timedelta(milliseconds=1)


def test_the_admin_revoke_action_names_the_operator(admin_site, superuser, user):
    api_key = api_key_create(user=user, name="one").api_key

    admin_site.post("/admin/accounts/apikey/", {"action": "revoke_selected", "_selected_action": [api_key.pk]})

    row = only_row(Action.API_KEY_REVOKED)
    assert (row.actor, row.actor_username, row.object_id) == (superuser, superuser.username, str(api_key.pk))


def test_deleting_a_key_in_the_admin_writes_one_row_without_its_secret(admin_site, superuser, user):
    api_key = api_key_create(user=user, name="laptop").api_key
    key_hash = api_key.key_hash

    response = admin_site.post(f"/admin/accounts/apikey/{api_key.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302 and not APIKey.objects.exists()
    row = only_row(Action.API_KEY_DELETED)
    assert (row.actor, row.object_type, row.object_id) == (superuser, "accounts.apikey", str(api_key.pk))
    assert row.before["name"] == "laptop" and row.before["key_hash"] == "[set]" and row.after is None
    assert row.organization_id == api_key.organization_id
    assert key_hash not in all_rows_json()


def test_the_admin_bulk_delete_writes_one_row_per_key(admin_site, user):
    keys = [api_key_create(user=user, name=name).api_key for name in ("one", "two")]

    admin_site.post(
        "/admin/accounts/apikey/",
        {"action": "delete_selected", "_selected_action": [k.pk for k in keys], "post": "yes"},
    )

    assert not APIKey.objects.exists()
    rows = AuditEvent.objects.filter(action=Action.API_KEY_DELETED)
    assert sorted(rows.values_list("object_id", flat=True)) == sorted(str(k.pk) for k in keys)


def test_deleting_a_user_in_the_admin_still_deletes_their_keys_and_records_each(admin_site, superuser, user):
    api_key = api_key_create(user=user, name="laptop").api_key

    response = admin_site.post(f"/admin/accounts/user/{user.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not User.objects.filter(pk=user.pk).exists() and not APIKey.objects.exists()
    row = only_row(Action.API_KEY_DELETED)
    assert (row.actor, row.object_id) == (superuser, str(api_key.pk))
    assert only_row(Action.USER_DELETED).object_id == str(user.pk)


def test_an_operator_deleting_their_own_account_with_keys_is_recorded_by_username(admin_site, superuser):
    api_key = api_key_create(user=superuser, name="mine").api_key

    response = admin_site.post(f"/admin/accounts/user/{superuser.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302 and not APIKey.objects.exists()
    row = only_row(Action.API_KEY_DELETED)
    assert (row.actor_id, row.actor_username, row.object_id) == (None, superuser.username, str(api_key.pk))


# --- Budgets --------------------------------------------------------------------------------


def test_budget_changes_over_rest_write_one_row_each_with_before_and_after(client_for, admin_user, user):
    client = client_for(admin_user)
    body = {"name": "monthly", "subject_kind": "user", "subject_id": user.pk, "limit_usd": "25.00"}

    created = client.post("/api/budgets/", body)
    budget_id = created.data["id"]
    changed = client.patch(f"/api/budgets/{budget_id}/", {"limit_usd": "30.00"})
    unchanged = client.patch(f"/api/budgets/{budget_id}/", {"limit_usd": "30.00"})
    deleted = client.delete(f"/api/budgets/{budget_id}/")

    assert [r.status_code for r in (created, changed, unchanged, deleted)] == [201, 200, 200, 204]
    rows = list(AuditEvent.objects.filter(object_type="accounts.budget").order_by("id"))
    assert [row.action for row in rows] == [Action.BUDGET_CREATED, Action.BUDGET_UPDATED, Action.BUDGET_DELETED]
    assert {row.actor for row in rows} == {admin_user}
    assert {row.object_id for row in rows} == {str(budget_id)}
    assert rows[0].after["limit_usd"] == "25.00000000" and rows[0].after["subject_id"] == user.pk
    assert (rows[1].before, rows[1].after) == ({"limit_usd": "25.00000000"}, {"limit_usd": "30.00000000"})
    assert rows[2].before["limit_usd"] == "30.00000000" and rows[2].after is None


def test_a_member_refused_a_budget_write_leaves_no_row(auth_client, user):
    response = auth_client.post(
        "/api/budgets/", {"name": "mine", "subject_kind": "user", "subject_id": user.pk, "limit_usd": "1"}
    )

    assert response.status_code == 403
    assert not AuditEvent.objects.exclude(action=Action.LOGIN_SUCCEEDED).exists()


def test_a_budget_changed_in_the_admin_writes_one_row(admin_site, superuser, user):
    budget = Budget.objects.create(name="b", subject_kind="user", subject_id=user.pk, limit_usd=Decimal("5"))
    data = {
        "name": "b",
        "enabled": "on",
        "subject_kind": "user",
        "subject_id": str(user.pk),
        "period": "monthly",
        "limit_usd": "7",
        "token_limit": "",
    }

    response = admin_site.post(f"/admin/accounts/budget/{budget.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:2000]
    row = only_row(Action.BUDGET_UPDATED)
    assert (row.actor, row.object_id) == (superuser, str(budget.pk))
    assert (row.before, row.after) == ({"limit_usd": "5.00000000"}, {"limit_usd": "7.00000000"})


# --- Users ----------------------------------------------------------------------------------


def user_change_data(user: User, **overrides: Any) -> dict[str, Any]:
    data = {
        "username": user.username,
        "first_name": "",
        "last_name": "",
        "email": user.email,
        "role": user.role,
        "is_active": "on",
        "email_verified": "on" if user.email_verified else None,
        "last_login_0": "",
        "last_login_1": "",
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def test_a_role_change_in_the_admin_is_one_role_changed_row(admin_site, superuser, user):
    response = admin_site.post(f"/admin/accounts/user/{user.pk}/change/", user_change_data(user, role="admin"))

    assert response.status_code == 302, response.content.decode()[:3000]
    row = only_row(Action.USER_ROLE_CHANGED)
    assert (row.actor, row.object_id, row.object_repr) == (superuser, str(user.pk), user.username)
    assert (row.before, row.after) == ({"role": "member"}, {"role": "admin"})
    assert AuditEvent.objects.exclude(action=Action.LOGIN_SUCCEEDED).count() == 1


def test_an_email_change_is_a_user_updated_row(admin_site, user):
    admin_site.post(f"/admin/accounts/user/{user.pk}/change/", user_change_data(user, email="new@example.com"))

    row = only_row(Action.USER_UPDATED)
    assert (row.before, row.after) == ({"email": user.email}, {"email": "new@example.com"})


def test_an_operator_sets_a_users_rate_limits_in_the_admin(admin_site, user):
    # README: users have rate limits "set in the admin"; the user page had no field for them.
    page = admin_site.get(f"/admin/accounts/user/{user.pk}/change/").content.decode()
    assert 'name="requests_per_minute"' in page and 'name="concurrent_streams"' in page

    data = user_change_data(user, requests_per_minute="60", tokens_per_minute="100000", concurrent_streams="2")
    response = admin_site.post(f"/admin/accounts/user/{user.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:3000]
    user.refresh_from_db()
    assert (user.requests_per_minute, user.tokens_per_minute, user.concurrent_streams) == (60, 100000, 2)
    row = only_row(Action.USER_UPDATED)
    assert row.after == {"requests_per_minute": 60, "tokens_per_minute": 100000, "concurrent_streams": 2}


def test_adding_a_user_in_the_admin_never_records_the_password(admin_site, superuser):
    response = admin_site.post(
        "/admin/accounts/user/add/",
        {
            "username": "ops",
            "email": "ops@example.com",
            "role": "admin",
            "usable_password": "true",
            "password1": "a-long-passphrase-42",
            "password2": "a-long-passphrase-42",
        },
    )

    assert response.status_code == 302
    row = only_row(Action.USER_CREATED)
    created = User.objects.get(username="ops")
    assert (row.actor, row.object_id) == (superuser, str(created.pk))
    assert row.after["role"] == "admin" and row.after["password"] == "[set]"
    assert row.after["groups"] == [] and "last_login" not in row.after
    assert "a-long-passphrase-42" not in all_rows_json()
    assert created.password not in all_rows_json()


def test_a_password_changed_in_the_admin_is_one_masked_row(admin_site, superuser, user):
    response = admin_site.post(
        f"/admin/accounts/user/{user.pk}/password/",
        {"password1": "another-long-secret-77", "password2": "another-long-secret-77", "set_usable_password": "true"},
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    row = only_row(Action.USER_UPDATED)
    assert (row.actor, row.object_id) == (superuser, str(user.pk))
    assert (row.before, row.after) == ({"password": "[set]"}, {"password": "[changed]"})
    user.refresh_from_db()
    assert "another-long-secret-77" not in all_rows_json() and user.password not in all_rows_json()


def test_deleting_a_user_keeps_their_rows(api_client, user):
    api_client.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})

    user.delete()

    row = only_row(Action.LOGIN_SUCCEEDED)
    assert (row.actor_id, row.actor_username) == (None, user.username)


def test_an_operator_deleting_their_own_account_in_the_admin_is_recorded_by_username(admin_site, superuser):
    response = admin_site.post(f"/admin/accounts/user/{superuser.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302 and not User.objects.filter(pk=superuser.pk).exists()
    row = only_row(Action.USER_DELETED)
    assert (row.actor_id, row.actor_username, row.object_id) == (None, superuser.username, str(superuser.pk))


# --- Append-only ----------------------------------------------------------------------------


def test_rows_cannot_be_changed_or_deleted(api_client, user):
    api_client.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    row = AuditEvent.objects.get()

    row.actor_username = "someone-else"
    with pytest.raises(TypeError):
        row.save()
    with pytest.raises(TypeError):
        row.delete()
    with pytest.raises(TypeError):
        AuditEvent.objects.update(actor_username="x")
    with pytest.raises(TypeError):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get().actor_username == user.username


def test_the_admin_shows_rows_read_only(admin_site, user):
    api_key_create(user=user, name="one")
    row = only_row(Action.API_KEY_CREATED)

    changelist = admin_site.get("/admin/accounts/auditevent/", {"action__exact": "api_key.created"})
    by_actor = admin_site.get("/admin/accounts/auditevent/", {"actor__id__exact": str(user.pk)})
    change = admin_site.get(f"/admin/accounts/auditevent/{row.pk}/change/")
    delete = admin_site.post(f"/admin/accounts/auditevent/{row.pk}/delete/", {"post": "yes"})
    add = admin_site.get("/admin/accounts/auditevent/add/")

    assert changelist.status_code == 200 and "api_key.created" in changelist.content.decode()
    assert by_actor.status_code == 200
    assert change.status_code == 200 and 'name="action"' not in change.content.decode()
    assert (delete.status_code, add.status_code) == (403, 403)
    assert AuditEvent.objects.filter(pk=row.pk).exists()


# --- REST: GET /api/audit-log/ --------------------------------------------------------------


@pytest.fixture
def events(client_for, user, other_user) -> list[AuditEvent]:
    """Three rows: ``user`` created two keys (one an hour ago), ``other_user`` one."""
    for someone, name in ((user, "old"), (other_user, "theirs"), (user, "new")):
        assert client_for(someone).post("/api/api-keys/", {"name": name}).status_code == 201
    rows = list(AuditEvent.objects.filter(action=Action.API_KEY_CREATED).order_by("id"))
    # Rows are append-only through the ORM; a test dates one back through raw SQL.
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE accounts_auditevent SET created_at = %s WHERE id = %s",
            [timezone.now() - dt.timedelta(hours=1), rows[0].pk],
        )
    return rows


def test_admins_list_the_log_newest_first_with_filters(client_for, admin_user, user, events):
    client = client_for(admin_user)

    everything = client.get("/api/audit-log/")
    by_actor = client.get("/api/audit-log/", {"actor": user.pk})
    by_action = client.get("/api/audit-log/", {"action": "api_key.revoked"})
    since = client.get("/api/audit-log/", {"since": (timezone.now() - dt.timedelta(minutes=5)).isoformat()})
    until = client.get("/api/audit-log/", {"until": (timezone.now() - dt.timedelta(minutes=5)).isoformat()})

    assert everything.status_code == 200
    assert [row["id"] for row in everything.data["results"]] == [events[2].pk, events[1].pk, events[0].pk]
    first = everything.data["results"][0]
    assert first["action"] == "api_key.created" and first["object_type"] == "accounts.apikey"
    assert first["after"]["name"] == "new"
    assert {row["id"] for row in by_actor.data["results"]} == {events[0].pk, events[2].pk}
    assert by_action.data["results"] == []
    assert {row["id"] for row in since.data["results"]} == {events[1].pk, events[2].pk}
    assert [row["id"] for row in until.data["results"]] == [events[0].pk]


@pytest.mark.parametrize(
    ("since", "found"),
    [("2000-01-01T00:00:00+20:00", 3), ("0001-01-01T00:00:00+10:00", 3), ("9999-12-31T23:00:00-10:00", 0)],
)
def test_any_valid_utc_offset_is_a_filter_not_a_server_error(client_for, admin_user, events, since, found):
    # ISO 8601 allows offsets up to 23:59; PostgreSQL refuses 16 hours or more, and some are no UTC time.
    response = client_for(admin_user).get("/api/audit-log/", {"since": since})
    assert response.status_code == 200, response.content
    assert len(response.data["results"]) == found


def test_failed_logins_are_found_by_the_username_tried(client_for, api_client, admin_user):
    api_client.post("/api/auth/token/", {"username": "mallory", "password": "guess-1"})

    found = client_for(admin_user).get("/api/audit-log/", {"actor_username": "mallory"})

    assert [(row["action"], row["actor"]) for row in found.data["results"]] == [("login.failed", None)]


def test_the_admin_exports_selected_rows_as_csv(admin_site, events):
    response = admin_site.post(
        "/admin/accounts/auditevent/",
        {"action": "export_csv", "_selected_action": [events[0].pk, events[2].pk]},
    )

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [row["id"] for row in rows] == [str(events[0].pk), str(events[2].pk)]  # oldest first
    assert json.loads(rows[1]["after"])["name"] == "new"


def test_bad_filters_are_400(client_for, admin_user):
    client = client_for(admin_user)

    for params in ({"action": "nope"}, {"actor": "x"}, {"since": "yesterday"}, {"format": "xml"}):
        response = client.get("/api/audit-log/", params)
        assert response.status_code == 400, params
        assert "error" in response.json()


@pytest.mark.parametrize("actor", ["9223372036854775808", "-9223372036854775809", "0", "-1", "99999999999999999999"])
def test_an_actor_that_is_no_row_id_is_a_400_naming_it(client_for, admin_user, actor):
    # Outside 1..2**63-1 no row has the id; SQLite could not even take the number (a 500).
    response = client_for(admin_user).get("/api/audit-log/", {"actor": actor})
    assert_error(response, 400, code="invalid", param="actor")


def test_the_largest_row_id_is_a_filter(client_for, admin_user, events):
    response = client_for(admin_user).get("/api/audit-log/", {"actor": str(2**63 - 1)})
    assert response.status_code == 200 and response.json()["results"] == []


def test_members_and_anonymous_callers_cannot_read_the_log(auth_client, api_client, events):
    member = auth_client.get("/api/audit-log/")
    member_csv = auth_client.get("/api/audit-log/", {"format": "csv"})
    anonymous = api_client.get("/api/audit-log/")

    assert member.status_code == 403 and member.json()["error"]["code"] == "permission_denied"
    assert member_csv.status_code == 403 and member_csv["Content-Type"].startswith("application/json")
    assert anonymous.status_code == 401


def test_the_log_exports_as_csv(client_for, admin_user, user, events):
    response = client_for(admin_user).get("/api/audit-log/", {"format": "csv", "actor": user.pk})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == 'attachment; filename="audit-log.csv"'
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [row["id"] for row in rows] == [str(events[2].pk), str(events[0].pk)]
    assert rows[0]["action"] == "api_key.created" and rows[0]["actor_username"] == user.username
    assert json.loads(rows[0]["after"])["name"] == "new"


def test_rows_of_a_deleted_actor_are_found_by_their_username_in_the_admin(admin_site, user, events):
    username = user.username
    user.delete()

    page = admin_site.get("/admin/accounts/auditevent/", {"q": username})

    assert page.status_code == 200
    assert f"/admin/accounts/auditevent/{events[2].pk}/change/" in page.content.decode()
    assert f"/admin/accounts/auditevent/{events[1].pk}/change/" not in page.content.decode()
