"""/api/budgets/: admins manage every budget; members read the budgets that limit them (others' are 404)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from accounts.metering.budget_store import budget_store_reset
from accounts.metering.budgets import budget_cache
from accounts.models import Budget
from accounts.services import api_key_create
from tests.factories import UsageRecordFactory
from tests.kit import assert_error

BUDGETS = "/api/budgets/"

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _in_process_store(settings: Any) -> Any:
    """The in-process store: these tests read budgets, the reservation path has its own tests."""
    settings.REDIS_URL = ""
    budget_store_reset()
    budget_cache.clear()
    yield
    budget_store_reset()


def test_admin_creates_changes_and_deletes_a_budget(client_for, admin_user, user):
    admin = client_for(admin_user)
    response = admin.post(
        BUDGETS,
        {"name": "Alice monthly", "subject_kind": "user", "subject_id": user.id, "limit_usd": "25.00"},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["period"] == "monthly" and body["limit_usd"] == "25.00000000" and body["token_limit"] is None
    assert body["usage"]["spent_usd"] == "0.00000000" and body["usage"]["remaining_usd"] == "25.00000000"
    assert body["usage"]["resets_at"] is not None
    budget_id = body["id"]

    response = admin.patch(f"{BUDGETS}{budget_id}/", {"token_limit": 1000, "period": "daily"}, format="json")
    assert response.status_code == 200, response.content
    assert Budget.objects.get(pk=budget_id).token_limit == 1000
    assert response.json()["usage"]["remaining_tokens"] == 1000

    assert admin.delete(f"{BUDGETS}{budget_id}/").status_code == 204
    assert not Budget.objects.filter(pk=budget_id).exists()


def test_a_budget_for_a_missing_subject_is_refused(client_for, admin_user):
    response = client_for(admin_user).post(
        BUDGETS, {"name": "x", "subject_kind": "api_key", "subject_id": 999999, "limit_usd": "1"}, format="json"
    )
    assert_error(response, 400, code="invalid", param="subject_id")


def test_a_budget_whose_subject_is_gone_can_still_be_changed(client_for, admin_user, user):
    # Its subject was checked again on every save: a budget on a key deleted since (or a team, or a
    # member removed) could not be renamed, disabled or raised, only deleted.
    key = api_key_create(user=user, name="ci").api_key
    budget = Budget.objects.create(name="ci cap", subject_kind="api_key", subject_id=key.pk, limit_usd=Decimal("1"))
    key.delete()
    admin = client_for(admin_user)

    response = admin.patch(f"{BUDGETS}{budget.pk}/", {"enabled": False, "limit_usd": "2"}, format="json")

    assert response.status_code == 200, response.content
    budget.refresh_from_db()
    assert (budget.enabled, budget.limit_usd) == (False, Decimal("2"))
    # Pointing it at another missing subject is still refused.
    response = admin.patch(f"{BUDGETS}{budget.pk}/", {"subject_id": 987654}, format="json")
    assert_error(response, 400, code="invalid", param="subject_id")


@pytest.mark.parametrize(
    "field, value",
    [
        ("limit_usd", 5),
        ("limit_usd", "-1"),
        ("limit_usd", ""),
        ("limit_usd", " 1"),
        ("limit_usd", "1e3"),
        ("subject_id", "3"),
        ("enabled", "yes"),
        ("subject_kind", "group"),
    ],
)
def test_wrong_types_and_values_are_400(client_for, admin_user, user, field, value):
    body = {"name": "x", "subject_kind": "user", "subject_id": user.id, "limit_usd": "1", field: value}
    response = client_for(admin_user).post(BUDGETS, body, format="json")
    assert_error(response, 400, param=field)


def test_members_read_their_own_budgets_and_cannot_write(auth_client, user, other_user):
    key = api_key_create(user=user, name="sdk").api_key
    mine = Budget.objects.create(name="me", subject_kind="user", subject_id=user.id, limit_usd=Decimal("10"))
    on_key = Budget.objects.create(
        name="key", subject_kind="api_key", subject_id=key.id, limit_usd=Decimal("2"), period="lifetime"
    )
    theirs = Budget.objects.create(name="them", subject_kind="user", subject_id=other_user.id, limit_usd=Decimal(1))
    UsageRecordFactory(user=user, api_key=key, cost=Decimal("0.75"))
    UsageRecordFactory(user=other_user, cost=Decimal("0.5"))

    listed = auth_client.get(BUDGETS).json()["results"]
    assert [b["id"] for b in listed] == [mine.id, on_key.id]
    by_id = {b["id"]: b for b in auth_client.get(f"{BUDGETS}mine/").json()}
    assert by_id.keys() == {mine.id, on_key.id}
    assert by_id[mine.id]["usage"]["spent_usd"] == "0.75000000"
    assert by_id[mine.id]["usage"]["remaining_usd"] == "9.25000000"
    assert by_id[on_key.id]["usage"]["resets_at"] is None  # lifetime

    assert_error(auth_client.get(f"{BUDGETS}{theirs.id}/"), 404, code="budget_not_found")
    assert_error(auth_client.delete(f"{BUDGETS}{theirs.id}/"), 404)
    assert_error(auth_client.patch(f"{BUDGETS}{mine.id}/", {"limit_usd": "99"}, format="json"), 403)
    assert_error(auth_client.delete(f"{BUDGETS}{mine.id}/"), 403, code="permission_denied")
    body = {"name": "more", "subject_kind": "user", "subject_id": user.id, "limit_usd": "100"}
    assert_error(auth_client.post(BUDGETS, body, format="json"), 403, code="permission_denied")
    assert Budget.objects.get(pk=mine.id).limit_usd == Decimal(10)


def test_admin_filters_budgets(client_for, admin_user, user, other_user):
    Budget.objects.create(name="a", subject_kind="user", subject_id=user.id, limit_usd=Decimal(1))
    other = Budget.objects.create(name="b", subject_kind="user", subject_id=other_user.id, limit_usd=Decimal(1))
    admin = client_for(admin_user)
    response = admin.get(BUDGETS, {"subject_kind": "user", "subject_id": other_user.id, "period": ""})
    assert [b["id"] for b in response.json()["results"]] == [other.id]
    for bad in ({"subject_id": "0.5"}, {"subject_id": "1.0"}, {"subject_id": ""}, {"period": "yearly"}):
        assert_error(admin.get(BUDGETS, bad), 400)
    for subject_id in ("9223372036854775808", "-9223372036854775809", "0", "-1"):  # no row's id
        assert_error(admin.get(BUDGETS, {"subject_id": subject_id}), 400, code="invalid", param="subject_id")


def test_admin_site_lists_budgets_with_their_spend(admin_site, user):
    Budget.objects.create(name="Alice cap", subject_kind="user", subject_id=user.id, limit_usd=Decimal("3"))
    UsageRecordFactory(user=user, cost=Decimal("1.25"))
    page = admin_site.get("/admin/accounts/budget/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Alice cap" in text and user.username in text and "1.25" in text and "1.75" in text
    budget = Budget.objects.get(name="Alice cap")
    assert admin_site.get(f"/admin/accounts/budget/{budget.id}/change/").status_code == 200
    for query in ("Alice", str(user.id)):
        found = admin_site.get("/admin/accounts/budget/", {"q": query})
        assert found.status_code == 200 and "Alice cap" in found.content.decode(), query


def test_admin_site_refuses_a_budget_for_a_missing_subject(admin_site):
    page = admin_site.post(
        "/admin/accounts/budget/add/",
        {"name": "ghost", "subject_kind": "user", "subject_id": "987654", "period": "monthly", "limit_usd": "1"},
    )
    assert page.status_code == 200 and "No user has id 987654 in this organization." in page.content.decode()
    assert not Budget.objects.exists()
