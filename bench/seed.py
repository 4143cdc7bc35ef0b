"""Create what the benchmark needs, through the project's own services (run as a child process).

    DATABASE_URL=... python -m bench.seed --simulator-url http://127.0.0.1:PORT \
        --simulator-api-key KEY --conversations 6000

Creates a user, an API key (``accounts.services.api_key_create``), a provider pointing at the
simulator and a model on it, plus ``--conversations`` empty conversations (one per concurrent
stream of the rounds that need one, so histories stay short).

For the ``v1m`` path ("/v1, metered") it also creates a second user, API key and model alias (same
provider and upstream model) that every kind of enforcement applies to: requests per minute,
tokens per minute and concurrent streams set on all three (``METERED_LIMITS``: far above what any
benchmark round reaches, so they never refuse, but checked on every request), and a monthly budget
of ``METERED_BUDGET_USD`` on the user and on the key when the project has budgets
(``_create_budgets``). Both models carry the same prices (``PRICES``), so the two paths differ
only by enforcement.

Prints one JSON object on stdout: ``{"api_key": "sk-...", "model": "...", "conversations": [ids...],
"metered": {"api_key": "sk-...", "model": "...", "limits": {...}, "budgets": [...]}}``. The
secrets are printed to the parent through a pipe only; the benchmark never writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from decimal import Decimal
from typing import Any

MODEL_NAME = "bench-sim"
METERED_MODEL_NAME = "bench-sim-metered"
# Rate limits of the metered user, key and model: far above what a round can reach (the default
# levels peak at 2000 concurrent streams and a few thousand requests per minute; a request counts
# ~200 prompt tokens plus its 64 completion tokens), so they are checked on every request and
# never refuse. ``bench.run`` refuses levels above ``concurrent_streams``.
METERED_LIMITS = {
    "requests_per_minute": 1_000_000,
    "tokens_per_minute": 1_000_000_000,
    "concurrent_streams": 100_000,
}
METERED_BUDGET_USD = Decimal("1000000")  # per month, on the metered user and on its key
# US dollars per million tokens, on both models (gpt-4o's list prices): a reply has a cost to
# reserve and settle, the same on v1 and v1m. A whole benchmark reserves a few dollars.
PRICES = {"input_price_per_million": Decimal("2.5"), "output_price_per_million": Decimal("10")}
# The fields ``_create_budgets`` sets, as accounts.models.Budget has them on the budgets branch
# (h-bud c69edd7). A Budget model without them stops the seed step rather than being guessed at.
BUDGET_FIELDS = ("name", "subject_kind", "subject_id", "period", "limit_usd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator-url", required=True, help="simulator root, e.g. http://127.0.0.1:8001")
    parser.add_argument("--simulator-api-key", default="", help="the key the simulator requires (empty: none)")
    parser.add_argument("--conversations", type=int, default=0, help="how many conversations to create")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
    import django

    django.setup()

    seeded = seed(
        simulator_url=args.simulator_url, simulator_api_key=args.simulator_api_key, conversations=args.conversations
    )
    json.dump(seeded, sys.stdout)
    sys.stdout.write("\n")


def seed(*, simulator_url: str, simulator_api_key: str, conversations: int) -> dict[str, Any]:
    """Create the benchmark's users, keys, provider, models and ``conversations``; return what the run needs.

    Returns ``{"api_key", "model", "conversations": [ids], "metered": {"api_key", "model", "limits",
    "budgets"}}`` (the module docstring). Exits (``SystemExit``) when a conversation was not created
    or the Budget model is not the one ``_create_budgets`` knows.
    """
    from django.db import transaction

    from accounts.services import api_key_create, user_register
    from conversations.models import Conversation
    from conversations.services import conversation_create
    from llm.models import LLMModel, Provider

    with transaction.atomic():
        user = user_register(username=f"bench-{secrets.token_hex(4)}", password=secrets.token_urlsafe(18))
        secret = api_key_create(user=user, name="bench").secret
        provider, _ = Provider.objects.update_or_create(
            name="bench-simulator",
            defaults={
                "kind": Provider.Kind.OPENAI,
                "base_url": f"{simulator_url.rstrip('/')}/v1",
                "api_key": simulator_api_key,
                # Under saturation (2000 streams on 2 cores) the first chunk can be seconds late:
                # the benchmark measures that, it must not turn it into a timeout error.
                "connect_timeout": 60.0,
                "read_timeout": 300.0,
                "enabled": True,
            },
        )
        model_fields = {"provider": provider, "upstream_model": "sim-1", "context_window": 128_000, "enabled": True}
        LLMModel.objects.update_or_create(name=MODEL_NAME, defaults={**model_fields, **PRICES})
        metered = _seed_metered(model_fields)
        ids: list[int] = []
        if conversations > 0:
            # One through the service (validates the model), the rest in bulk: same rows.
            first = conversation_create(owner=user, model_name=MODEL_NAME, title="bench")
            ids.append(first.pk)
            rest = [Conversation(owner=user, model=first.model, title="bench") for _ in range(conversations - 1)]
            for batch_start in range(0, len(rest), 2000):
                created = Conversation.objects.bulk_create(rest[batch_start : batch_start + 2000])
                ids.extend(c.pk for c in created)
    if len(ids) != conversations or any(i is None for i in ids):
        sys.exit(f"bench.seed: created {len(ids)} conversations, wanted {conversations}")
    return {"api_key": secret, "model": MODEL_NAME, "conversations": ids, "metered": metered}


def _seed_metered(model_fields: dict[str, Any]) -> dict[str, Any]:
    """Create the ``v1m`` caller: a user, its API key and a model alias, all three rate-limited, and budgets.

    ``model_fields``: the unmetered model's provider, upstream model, context window (the alias
    is the same upstream model). Returns ``{"api_key": "sk-...", "model", "limits", "budgets"}``.
    """
    from accounts.services import api_key_create, user_register
    from llm.models import LLMModel

    user = user_register(username=f"bench-metered-{secrets.token_hex(4)}", password=secrets.token_urlsafe(18))
    created = api_key_create(user=user, name="bench metered")
    for subject in (user, created.api_key):
        for field, value in METERED_LIMITS.items():
            setattr(subject, field, value)
        subject.save(update_fields=list(METERED_LIMITS))
    LLMModel.objects.update_or_create(name=METERED_MODEL_NAME, defaults={**model_fields, **PRICES, **METERED_LIMITS})
    return {
        "api_key": created.secret,
        "model": METERED_MODEL_NAME,
        "limits": dict(METERED_LIMITS),
        "budgets": _create_budgets(user, created.api_key),
    }


def _create_budgets(user: Any, api_key: Any) -> list[dict[str, Any]]:
    """Create a monthly budget of ``METERED_BUDGET_USD`` on ``user`` and one on ``api_key``; describe them.

    Returns ``[{"id", "subject_kind", "subject_id", "period", "limit_usd"}, ...]``, or ``[]`` when
    the project has no ``accounts.models.Budget`` (budgets not merged yet: v1m is then metered by
    rate limits only, and the report's notes say so). Written against the Budget model of the
    budgets branch (``BUDGET_FIELDS``: subject kind "user" / "api_key" and id, period "monthly",
    limit in US dollars); exits naming the missing fields when the model has others, so that a
    changed model is adapted here (at merge) rather than guessed at. ``full_clean`` checks the
    values against the model's choices and validators.
    """
    from accounts import models

    budget_model = getattr(models, "Budget", None)
    if budget_model is None:
        return []
    fields = {field.name for field in budget_model._meta.get_fields()}
    missing = [name for name in BUDGET_FIELDS if name not in fields]
    if missing:
        sys.exit(
            f"bench.seed: accounts.models.Budget has no field(s) {', '.join(missing)}; "
            "adapt bench.seed._create_budgets to the model"
        )
    described = []
    for kind, subject in (("user", user), ("api_key", api_key)):
        budget = budget_model(
            name=f"bench {kind}",
            subject_kind=kind,
            subject_id=subject.pk,
            period="monthly",
            limit_usd=METERED_BUDGET_USD,
        )
        budget.full_clean()
        budget.save()
        described.append(
            {
                "id": budget.pk,
                "subject_kind": kind,
                "subject_id": subject.pk,
                "period": "monthly",
                "limit_usd": str(METERED_BUDGET_USD),
            }
        )
    return described


if __name__ == "__main__":
    main()
