"""The benchmark's seed step creates v1's caller with no limits and v1m's with every kind of enforcement.

v1 and v1m must differ only by enforcement: the same provider, upstream model, context window
and prices; v1m's user, key and model carry every rate limit, and budgets on the user and the key
when the project has a Budget model (``accounts.models.Budget``).
"""

from __future__ import annotations

import pytest

from accounts import models as account_models
from accounts.keys import hash_secret
from accounts.models import APIKey
from bench.seed import METERED_BUDGET_USD, METERED_LIMITS, seed
from conversations.models import Conversation
from llm.models import LLMModel

pytestmark = pytest.mark.django_db

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")


def _limits(subject: object) -> dict[str, int | None]:
    return {field: getattr(subject, field) for field in LIMIT_FIELDS}


def test_seed_creates_an_unmetered_and_a_metered_caller() -> None:
    seeded = seed(simulator_url="http://127.0.0.1:9/", simulator_api_key="upstream-key", conversations=3)

    plain_key = APIKey.objects.select_related("user").get(key_hash=hash_secret(seeded["api_key"]))
    metered = seeded["metered"]
    metered_key = APIKey.objects.select_related("user").get(key_hash=hash_secret(metered["api_key"]))
    assert metered_key.user != plain_key.user

    no_limits = dict.fromkeys(LIMIT_FIELDS)
    plain_model = LLMModel.objects.get(name=seeded["model"])
    assert _limits(plain_key) == _limits(plain_key.user) == _limits(plain_model) == no_limits

    metered_model = LLMModel.objects.get(name=metered["model"])
    assert metered["limits"] == METERED_LIMITS
    for subject in (metered_key, metered_key.user, metered_model):
        assert _limits(subject) == METERED_LIMITS, subject

    same = ("provider_id", "upstream_model", "context_window", "input_price_per_million", "output_price_per_million")
    assert metered_model.name != plain_model.name
    assert {f: getattr(metered_model, f) for f in same} == {f: getattr(plain_model, f) for f in same}
    assert plain_model.input_price_per_million > 0 and plain_model.output_price_per_million > 0
    assert plain_model.provider.base_url == "http://127.0.0.1:9/v1"

    conversations = Conversation.objects.filter(pk__in=seeded["conversations"])
    assert conversations.count() == 3
    assert {c.owner_id for c in conversations} == {plain_key.user_id}


def test_seed_puts_budgets_on_the_metered_user_and_key_when_the_project_has_budgets() -> None:
    seeded = seed(simulator_url="http://127.0.0.1:9", simulator_api_key="", conversations=0)

    metered = seeded["metered"]
    budget_model = getattr(account_models, "Budget", None)
    if budget_model is None:  # budgets not in this tree yet: v1m is metered by rate limits only
        assert metered["budgets"] == []
        return
    key = APIKey.objects.get(key_hash=hash_secret(metered["api_key"]))
    budgets = budget_model.objects.filter(pk__in=[b["id"] for b in metered["budgets"]])
    assert sorted((b.subject_kind, b.subject_id, b.period, b.limit_usd) for b in budgets) == sorted(
        [("api_key", key.pk, "monthly", METERED_BUDGET_USD), ("user", key.user_id, "monthly", METERED_BUDGET_USD)]
    )
    assert budget_model.objects.count() == 2  # none on v1's caller
