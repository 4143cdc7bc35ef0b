"""Celery tasks for accounting (``accounts.usage``) and budgets (``accounts.metering.budgets``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import redis.exceptions
from celery import shared_task
from django.db import InterfaceError, OperationalError

from .lifecycle.tasks import email_verification_send_task, password_reset_send_task  # noqa: F401 - Celery finds them here
from .metering.budgets import budget_reconcile, budget_settle_many
from .models import UsageRecord
from .organizations.tasks import invitation_send_task  # noqa: F401 - Celery finds it here
from .usage import UsageEvent, usage_cost, usage_record_many

# While the database or Redis (budget counters) is unreachable a batch is retried (published again
# with a countdown: 1 s, doubling up to 30 s, jittered) rather than dropped; about an hour of outage.
_RETRY_WHILE_DATABASE_DOWN: dict[str, Any] = {
    "autoretry_for": (
        OperationalError,
        InterfaceError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    ),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 120,
}


@shared_task(name="accounts.usage_record_batch", acks_late=True, **_RETRY_WHILE_DATABASE_DOWN)
def usage_record_batch_task(events: list[dict[str, Any]]) -> int:
    """Write a batch of usage records (``UsageEvent`` fields as dicts), then settle their budget
    reservations; return how many rows were new.

    Idempotent: a redelivered or retried batch writes nothing twice (``usage_record_many`` by
    request id; ``budget_settle_many`` settles a reservation once and deletes it). Late acks: a
    worker killed mid-task leaves it unacknowledged, and the broker redelivers it
    (``CELERY_VISIBILITY_TIMEOUT_SECONDS``). While the database or Redis is unreachable the task is
    retried with a backoff, not dropped.
    """
    batch = [UsageEvent.from_task(event) for event in events]
    written = usage_record_many(batch)
    budget_settle_many(batch)
    return written


@shared_task(name="accounts.usage_record", acks_late=True)
def usage_record_task(**fields: Any) -> int:
    """Write one usage record as queued by releases before batching; return 1 if it was new.

    Kept so that tasks queued before an upgrade are still recorded. Those carried no price: the
    model's current prices are read here, as those releases did.
    """
    model_field = UsageRecord._meta.get_field("model")
    prices = (
        model_field.related_model._default_manager.filter(pk=fields["model_id"])  # type: ignore[union-attr]
        .values("input_price_per_million", "output_price_per_million")
        .first()
        if fields.get("model_id") is not None
        else None
    ) or {"input_price_per_million": Decimal(0), "output_price_per_million": Decimal(0)}
    # Those releases reported no cache tokens: every prompt token at the input price.
    cost = usage_cost(
        prompt_tokens=fields["prompt_tokens"],
        completion_tokens=fields["completion_tokens"],
        input_price=prices["input_price_per_million"],
        output_price=prices["output_price_per_million"],
    )
    return usage_record_many([UsageEvent.from_task({**fields, "cost": str(cost)})])


@shared_task(name="accounts.budget_reconcile")
def budget_reconcile_task() -> dict[str, int]:
    """Release stale budget reservations and repair budget counters from the usage rows.

    Run by celery beat every ``BUDGET_RECONCILE_SECONDS`` (``CELERY_BEAT_SCHEDULE``); returns
    ``{"released", "checked", "repaired"}`` (``accounts.metering.budgets.budget_reconcile``).
    """
    result = budget_reconcile()
    return {"released": result.released, "checked": result.checked, "repaired": result.repaired}
