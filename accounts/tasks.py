"""Celery tasks for accounting (``accounts.usage``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from .models import UsageRecord
from .usage import UsageEvent, usage_cost, usage_record_many

# While the database is unreachable a batch is retried (published again with a countdown: 1 s,
# doubling up to 30 s, jittered) rather than dropped; about an hour of outage in all.
_RETRY_WHILE_DATABASE_DOWN: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 120,
}


@shared_task(name="accounts.usage_record_batch", acks_late=True, **_RETRY_WHILE_DATABASE_DOWN)
def usage_record_batch_task(events: list[dict[str, Any]]) -> int:
    """Write a batch of usage records (``UsageEvent`` fields as dicts); return how many were new.

    Idempotent: a redelivered or retried batch writes nothing twice (``usage_record_many``).
    While the database is unreachable the task is retried with a backoff, not dropped.
    """
    return usage_record_many(UsageEvent.from_task(event) for event in events)


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
    cost = usage_cost(
        prompt_tokens=fields["prompt_tokens"],
        completion_tokens=fields["completion_tokens"],
        input_price=prices["input_price_per_million"],
        output_price=prices["output_price_per_million"],
    )
    return usage_record_many([UsageEvent.from_task({**fields, "cost": str(cost)})])
