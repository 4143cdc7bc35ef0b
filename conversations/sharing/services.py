"""Writes for share links: create one (the snapshot and its token), revoke one."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from django.utils import timezone

from accounts.authentication import Principal
from accounts.keys import hash_secret
from chatbackend.errors import ApplicationError

from ..models import Conversation, Message
from ..selectors import conversation_get_for, message_get_in, message_path
from .models import SharedConversation
from .selectors import share_get_for

# 32 random bytes: 43 URL-safe characters (``secrets.token_urlsafe``), ~256 bits.
TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class CreatedShare:
    """A new link and its token: the only time the token exists outside the client."""

    share: SharedConversation
    token: str


def share_snapshot(*, conversation: Conversation, leaf_id: int | None) -> list[dict[str, object]]:
    """Return the branch of ``conversation`` ending at ``leaf_id`` (None: the active leaf), root
    first, as the snapshot keeps it: ``[{role, content, model, created_at (ISO 8601)}]``.

    One query (``selectors.message_path``). Raises ``ApplicationError`` 409 ``reply_in_progress``
    when a message of the branch is still streaming: its text is written only when the reply ends,
    so the snapshot would keep an empty reply for good.
    """
    rows = message_path(conversation=conversation, leaf_id=leaf_id).values_list(
        "role", "content", "model_name", "created_at", "status"
    )
    snapshot: list[dict[str, object]] = []
    for role, content, model_name, created_at, status in rows:
        if status == Message.Status.STREAMING:
            raise ApplicationError(
                "A reply of this branch is still streaming: share it once the reply has ended.",
                code="reply_in_progress",
                status=409,
            )
        snapshot.append({"role": role, "content": content, "model": model_name, "created_at": created_at.isoformat()})
    return snapshot


def share_create(
    *, actor: Principal, conversation_id: int, leaf_id: int | None = None, expires_at: dt.datetime | None = None
) -> CreatedShare:
    """Share a snapshot of one branch of conversation ``conversation_id``, which ``actor`` owns.

    The branch ends at message ``leaf_id`` (None: the active leaf); ``expires_at`` (optional, in
    the future) ends the link. Only the owner shares: another user's conversation is a 404, one
    ``actor`` only reads (an organization's admin) a 403 (``conversation_get_for``). Raises
    ``NotFoundError`` 404 ``message_not_found`` for a ``leaf_id`` of no message of it,
    ``ApplicationError`` 400 ``empty_conversation`` when the branch has no message, 400
    ``invalid_expires_at`` for a time not in the future and 409 ``reply_in_progress`` while a reply
    of the branch streams (``share_snapshot``).
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True)
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("expires_at must be in the future.", code="invalid_expires_at", param="expires_at")
    if leaf_id is not None:
        leaf_id = message_get_in(conversation=conversation, message_id=leaf_id).pk
    elif conversation.active_leaf_id is None:
        raise ApplicationError("The conversation has no message to share.", code="empty_conversation")
    leaf_id = leaf_id if leaf_id is not None else conversation.active_leaf_id
    token = secrets.token_urlsafe(TOKEN_BYTES)
    share = SharedConversation.objects.create(
        conversation=conversation,
        organization=conversation.organization,
        created_by=actor.user,
        token_hash=hash_secret(token),
        title=conversation.title,
        messages=share_snapshot(conversation=conversation, leaf_id=leaf_id),
        leaf_message_id=leaf_id,
        expires_at=expires_at,
    )
    return CreatedShare(share=share, token=token)


def share_revoke(*, actor: Principal, share_id: int) -> SharedConversation:
    """Revoke link ``share_id`` of ``actor``'s (idempotent: a revoked link stays revoked at its first time).

    Raises ``NotFoundError`` (404 ``share_not_found``) for a link ``actor`` did not make in the
    organization it acts in.
    """
    share = share_get_for(actor=actor, share_id=share_id)
    if share.revoked_at is None:
        share.revoked_at = timezone.now()
        share.save(update_fields=["revoked_at"])
    return share


__all__ = ["CreatedShare", "share_create", "share_revoke", "share_snapshot"]
