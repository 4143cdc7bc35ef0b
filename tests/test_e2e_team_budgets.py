"""Team budgets and team-owned keys end to end: two server processes, a real Celery worker, Redis and
PostgreSQL (issue 10, acceptance: "a team budget shared by two members' keys is enforced across two
server processes").

- Two members of a team, each with their own key assigned to the team: member A spends the team's
  budget on server 1; member B is refused on server 2 with 429 ``insufficient_quota`` naming the
  team's budget, while B's key without a team still works there; the budget's counter equals the
  sum of the usage rows that carry the team.
- An organization admin creates a team-owned key over HTTP; the admin is deactivated; the key keeps
  streaming replies on both servers (it belongs to the team's service user).

Needs ``REDIS_URL`` (the worker and the shared counters); skipped on the embedded defaults.
"""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db.models import Sum
from django.utils import timezone

from accounts.metering.budget_store import budget_store, to_units
from accounts.metering.budgets import budget_counter_key, budget_counter_repair, budget_period
from accounts.models import APIKey, Budget, Membership, Organization, Team, TeamMembership, UsageRecord, User
from accounts.services import api_key_create
from llm.models import Provider
from tests.conftest import E2EModels, E2EStack
from tests.factories import LLMModelFactory, UserFactory
from tests.kit import CHAT_URL, assert_error, bearer, chat_body, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PRICED_MODEL = "team-budget-model"
MAX_TOKENS = 50  # > E2E_REPLY_TOKENS: every reply completes, and costs less than its maximum
OUTPUT_PRICE = Decimal("1000")  # US dollars per million output tokens; input is free
MAX_COST = MAX_TOKENS * OUTPUT_PRICE / 1_000_000  # $0.05: what each request reserves
ACME = {"OpenAI-Organization": "acme-e2e"}


@pytest.fixture
def priced_model(e2e_stack: E2EStack, e2e_models: E2EModels) -> Any:
    """A model on the stack's simulator whose maximum cost per request is exactly ``MAX_COST``."""
    if not e2e_stack.shares_state:
        pytest.skip("budgets across processes need REDIS_URL (a shared store and a Celery worker)")
    return LLMModelFactory(
        name=PRICED_MODEL,
        provider=Provider.objects.get(name="simulator"),
        upstream_model="sim-1",
        input_price_per_million="0",
        output_price_per_million=str(OUTPUT_PRICE),
    )


@pytest.fixture
def team(e2e_stack: E2EStack, e2e_models: E2EModels) -> Team:
    organization = Organization.objects.create(name="Acme e2e", slug="acme-e2e")
    return Team.objects.create(organization=organization, name="Research", slug="research")


def _member(team: Team, role: str = Membership.Role.MEMBER) -> User:
    user = UserFactory(username=f"e2e-team-{secrets.token_hex(4)}")
    Membership.objects.create(user=user, organization=team.organization, role=role)
    TeamMembership.objects.create(team=team, user=user)
    return user


def _key(stack: E2EStack, user: User, team: Team | None) -> str:
    secret = api_key_create(
        user=user, name="e2e", organization=team.organization if team else None, team=team.slug if team else None
    ).secret
    stack.secrets.add(secret)
    return secret


def _stream(base_url: str, api_key: str, model: str = PRICED_MODEL) -> httpx.Response:
    body = chat_body(model, "Count to forty", stream=True, max_tokens=MAX_TOKENS)
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as client:
        response = client.post(CHAT_URL, json=body, headers=bearer(api_key))
        response.read()
        return response


def _accounted(stack: E2EStack, rows: int, **subject: Any) -> None:
    poll_until_sync(
        lambda: UsageRecord.objects.filter(**subject).count(), lambda n: n >= rows, within=60, what=f"{rows} rows"
    )
    poll_until_sync(stack.accounting_idle, within=60, what="the worker to finish its tasks")
    poll_until_sync(budget_store().reservations, lambda held: held == [], within=60, what="no reservation held")


def test_a_team_budget_shared_by_two_members_is_enforced_across_two_servers(
    e2e_stack: E2EStack, priced_model: Any, team: Team
) -> None:
    alice, bob = _member(team), _member(team)
    alice_key, bob_key = _key(e2e_stack, alice, team), _key(e2e_stack, bob, team)
    bob_personal = _key(e2e_stack, bob, None)
    # Room for one request's maximum cost; after one settled reply (0.04 of it) no other fits.
    budget = Budget.objects.create(
        name="research team",
        organization=team.organization,
        subject_kind="team",
        subject_id=team.pk,
        limit_usd=MAX_COST + Decimal("0.02"),
    )
    server_1, server_2 = e2e_stack.server_urls[0], e2e_stack.server_urls[1]

    spent = _stream(server_1, alice_key)
    assert spent.status_code == 200, spent.text[:300]
    assert spent.text.rstrip().endswith("data: [DONE]"), spent.text[-300:]
    _accounted(e2e_stack, 1, team=team)

    refused = _stream(server_2, bob_key)
    error = assert_error(refused, 429, code="insufficient_quota", type="insufficient_quota")
    assert "'research team'" in error["message"], error
    again = _stream(server_1, alice_key)
    assert_error(again, 429, code="insufficient_quota")
    # Bob's own budget is untouched: his key without the team is served by the same server.
    personal = _stream(server_2, bob_personal)
    assert personal.status_code == 200, personal.text[:300]
    _accounted(e2e_stack, 3, team=team)

    rows = UsageRecord.objects.filter(team=team)
    assert set(rows.exclude(finish_status="refused").values_list("user_id", flat=True)) == {alice.pk}
    assert set(rows.filter(finish_status="refused").values_list("user_id", flat=True)) == {alice.pk, bob.pk}
    assert not UsageRecord.objects.filter(user=bob, team__isnull=True, finish_status="refused").exists()
    settled = rows.aggregate(total=Sum("cost"))["total"]
    assert Decimal(0) < settled <= budget.limit_usd
    state = budget_store().counter(budget_counter_key(budget, budget_period(budget.period, timezone.now())))
    assert (state.spent, state.reserved, state.holders) == (to_units(settled), 0, ())
    assert not budget_counter_repair(budget), "reconciliation found drift"


def test_a_team_owned_key_keeps_working_after_its_creator_is_deactivated(
    e2e_stack: E2EStack, e2e_models: E2EModels, team: Team
) -> None:
    password = "pw-" + secrets.token_urlsafe(12)
    e2e_stack.secrets.add(password)
    admin = _member(team, Membership.Role.ADMIN)
    admin.set_password(password)
    admin.save()
    model = E2EModels.names[0]
    with httpx.Client(base_url=e2e_stack.server_urls[0], timeout=30, trust_env=False) as client:
        login = client.post("/api/auth/token/", json={"username": admin.username, "password": password})
        assert login.status_code == 200, login.text
        created = client.post(
            "/api/api-keys/",
            json={"name": "ci", "team": "research", "owner": "team"},
            headers={**bearer(login.json()["access"]), **ACME},
        )
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    e2e_stack.secrets.add(secret)
    assert (created.json()["owner"], created.json()["created_by"]) == ("team", admin.username)
    own = _key(e2e_stack, admin, team)
    for url in e2e_stack.server_urls:  # both servers cache the principals of both keys
        assert _stream(url, secret, model).status_code == 200
        assert _stream(url, own, model).status_code == 200

    admin.is_active = False
    admin.save()

    for url in e2e_stack.server_urls:
        # The deactivation reaches every process (lookup caches are cleared by broadcast).
        poll_until_sync(lambda u=url: _stream(u, own, model).status_code, lambda s: s == 401, within=30, what="401")
        kept = _stream(url, secret, model)
        assert kept.status_code == 200, kept.text[:300]
        assert kept.text.rstrip().endswith("data: [DONE]"), kept.text[-300:]
    assert APIKey.objects.get(pk=created.json()["id"]).user.service_team == team
