"""Celery tasks that send the account lifecycle's emails (imported by ``accounts.tasks`` for discovery)."""

from __future__ import annotations

from celery import shared_task

from .services import email_verification_send, password_reset_send

# An unreachable mail server is retried a few times (1 s, doubling, jittered), then given up: the
# user can ask again.
_RETRY_MAIL: dict = {
    "autoretry_for": (OSError,),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 5,
}


@shared_task(name="accounts.password_reset_send", **_RETRY_MAIL)
def password_reset_send_task(email: str) -> int:
    """Send the password reset email(s) for ``email``; return how many (``password_reset_send``)."""
    return password_reset_send(email=email)


@shared_task(name="accounts.email_verification_send", **_RETRY_MAIL)
def email_verification_send_task(user_id: int) -> bool:
    """Send user ``user_id`` their email verification link (``email_verification_send``)."""
    return email_verification_send(user_id=user_id)
