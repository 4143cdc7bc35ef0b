"""Celery task that emails invitations (imported by ``accounts.tasks`` for discovery)."""

from __future__ import annotations

from celery import shared_task

from ..lifecycle.tasks import _RETRY_MAIL
from .services import invitation_send


@shared_task(name="accounts.invitation_send", **_RETRY_MAIL)
def invitation_send_task(invitation_id: int) -> bool:
    """Email invitation ``invitation_id`` its link (``invitation_send``); False when no longer pending."""
    return invitation_send(invitation_id=invitation_id)
