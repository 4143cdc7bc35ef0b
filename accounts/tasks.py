"""Celery tasks for accounting."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import services


@shared_task(name="accounts.usage_record", acks_late=True)
def usage_record_task(**fields: Any) -> int | None:
    """Record one reply's usage (see ``services.usage_record``); return the record id or None.

    Idempotent: a redelivered task with the same ``request_id`` writes nothing.
    """
    record = services.usage_record(**fields)
    return record.pk if record else None
