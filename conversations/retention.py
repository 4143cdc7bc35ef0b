"""Retention: purge what an organization's ``RetentionPolicy`` says it no longer keeps."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from django.db.models import BooleanField, ExpressionWrapper, Q
from django.utils import timezone

from .models import Conversation, RetentionPolicy
from .services import conversations_delete

logger = logging.getLogger(__name__)

# Conversations deleted per transaction: a few queries per batch instead of a few per conversation,
# and no lock held on more rows than this at once.
RETENTION_BATCH_SIZE = 500


@dataclass(frozen=True)
class RetentionResult:
    """How many conversations a run purged: inactive ones, and ones in the trash too long."""

    inactive: int = 0
    trash: int = 0


def retention_due(*, policy: RetentionPolicy, now: dt.datetime) -> tuple[Q, Q]:
    """Return the conditions (inactive, trashed too long) a conversation of ``policy``'s organization
    is due under at ``now``; ``Q(pk__in=[])`` (nothing) for a period left empty."""
    nothing = Q(pk__in=[])
    inactive = nothing
    if (cutoff := _days_before(now, policy.delete_after_days)) is not None:
        inactive = Q(updated_at__lt=cutoff)
    trash = nothing
    if (cutoff := _days_before(now, policy.trash_purge_after_days)) is not None:
        trash = Q(deleted_at__lt=cutoff)
    return inactive, trash


def _days_before(now: dt.datetime, days: int | None) -> dt.datetime | None:
    """Return ``days`` days before ``now``; None for no period, and for one reaching before year 1.

    The admin takes any positive 32-bit number of days: one past the calendar (about 739,000 days
    now, or past timedelta's 999,999,999) raised OverflowError, which failed the run for every
    organization. Nothing is that old, so such a period purges nothing, as an empty one.
    """
    if days is None:
        return None
    try:
        return now - dt.timedelta(days=days)
    except OverflowError:
        return None


def retention_apply(*, now: dt.datetime | None = None) -> RetentionResult:
    """Purge, in every organization with a ``RetentionPolicy``, the conversations it keeps no longer.

    Due: last activity (``updated_at``) older than ``delete_after_days`` days, trashed or not; in the
    trash (``deleted_at``) longer than ``trash_purge_after_days`` days. They are deleted
    ``RETENTION_BATCH_SIZE`` at a time with ``services.conversations_delete`` (their messages go,
    usage records stay with ``message`` null, a reply streaming in one is stopped). Organizations
    without a policy, and periods left empty, keep everything. Idempotent: a conversation deleted
    concurrently is skipped.
    """
    now = now or timezone.now()
    inactive_count = trash_count = 0
    policies = RetentionPolicy.objects.filter(
        Q(delete_after_days__isnull=False) | Q(trash_purge_after_days__isnull=False)
    )
    for policy in policies:
        inactive, trash = retention_due(policy=policy, now=now)
        due = Conversation.objects.filter(inactive | trash, organization_id=policy.organization_id)
        # Counted as inactive when both apply: that period alone would have purged it.
        due = due.annotate(is_inactive=ExpressionWrapper(inactive, output_field=BooleanField()))
        after = 0  # the batches go by id: each a short indexed query, whatever the number due
        while batch := dict(
            due.filter(pk__gt=after).order_by("pk").values_list("pk", "is_inactive")[:RETENTION_BATCH_SIZE]
        ):
            after = max(batch)
            for pk in conversations_delete(conversation_ids=list(batch)):
                if batch[pk]:
                    inactive_count += 1
                else:
                    trash_count += 1
    if inactive_count or trash_count:
        logger.info("retention purged %s inactive and %s trashed conversations", inactive_count, trash_count)
    return RetentionResult(inactive=inactive_count, trash=trash_count)
