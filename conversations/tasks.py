"""Celery tasks for conversations."""

from __future__ import annotations

import logging

from celery import shared_task

from .retention import retention_apply
from .services import reply_recover_orphans
from .sync.tasks import sync_import_task, sync_prune_task  # noqa: F401 - Celery finds them here
from .titles import conversation_title_generate

logger = logging.getLogger(__name__)


@shared_task(name="conversations.reply_recover_orphans")
def reply_recover_orphans_task(orphan_after_seconds: float | None = None) -> int:
    """Recover the replies whose server process died (``services.reply_recover_orphans``); return how many.

    Run by celery beat every ``REPLY_ORPHAN_AFTER_SECONDS / 2`` (settings ``CELERY_BEAT_SCHEDULE``).
    """
    return reply_recover_orphans(orphan_after_seconds=orphan_after_seconds)


@shared_task(name="conversations.conversation_title")
def conversation_title_task(conversation_id: int, message_id: int) -> str | None:
    """Write the title of conversation ``conversation_id`` after its first reply ``message_id``
    (``titles.conversation_title_generate``); return it, or None when none was set.

    Queued by ``titles.conversation_title_request``. Never fails: whatever goes wrong (the title
    model disabled, the request refused, failed or timed out) is logged, and the conversation
    stays untitled.
    """
    try:
        return conversation_title_generate(conversation_id=conversation_id, message_id=message_id)
    except Exception:
        logger.warning("the title of conversation %s was not written", conversation_id, exc_info=True)
        return None


@shared_task(name="conversations.retention_apply")
def retention_apply_task() -> dict[str, int]:
    """Purge what the organizations' retention policies keep no longer (``retention.retention_apply``);
    return how many: ``{"inactive": n, "trash": n}``. Run by celery beat every
    ``RETENTION_INTERVAL_SECONDS`` (settings ``CELERY_BEAT_SCHEDULE``)."""
    result = retention_apply()
    return {"inactive": result.inactive, "trash": result.trash}
