"""Celery tasks for NextChat sync: import a stored version, prune old versions."""

from __future__ import annotations

from celery import shared_task
from django.db import IntegrityError, InterfaceError, OperationalError

from .services import sync_document_import, sync_versions_prune


@shared_task(
    name="conversations.sync_import",
    acks_late=True,
    # IntegrityError: should not happen (one owner's imports are serialized by a row lock:
    # ``services._imports_serialize``); were it to, the retry finds the other's conversation.
    autoretry_for=(IntegrityError, OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=10,
)
def sync_import_task(version_id: int) -> int:
    """Import the sessions of a stored NextChat document version (``services.sync_document_import``).

    Queued after each write; idempotent (by NextChat's ids), so a redelivery changes nothing.
    """
    return sync_document_import(version_id=version_id)


@shared_task(name="conversations.sync_prune")
def sync_prune_task() -> int:
    """Delete versions past ``SYNC_VERSION_RETENTION_DAYS`` and stale Upstash chunks; return how many
    versions. Run by celery beat (settings ``CELERY_BEAT_SCHEDULE``)."""
    return sync_versions_prune()
