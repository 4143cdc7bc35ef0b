"""Reads for share links: the owner's links, and a link by its token (anyone holding it)."""

from __future__ import annotations

from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.authentication import Principal
from accounts.keys import hash_secret
from chatbackend.errors import NotFoundError

from ..selectors import conversation_get_for
from .models import SharedConversation


def share_list(*, actor: Principal, conversation_id: int) -> QuerySet[SharedConversation]:
    """Return the links to conversation ``conversation_id`` (revoked and expired ones too), newest first.

    Only the conversation's owner lists them (``conversation_get_for(to_change=True)``: another
    user's conversation is a 404, one ``actor`` only reads a 403).
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id, to_change=True)
    return SharedConversation.objects.filter(conversation=conversation, created_by=actor.user).order_by(
        "-created_at", "-id"
    )


def share_get_for(*, actor: Principal, share_id: int) -> SharedConversation:
    """Return link ``share_id`` if ``actor`` made it in the organization it acts in.

    Raises ``NotFoundError`` (404 ``share_not_found``) otherwise: nobody else's link exists for
    ``actor``, admins' and the superuser's lookups included (a link is its maker's to revoke).
    """
    try:
        return SharedConversation.objects.get(pk=share_id, created_by=actor.user, organization=actor.organization)
    except (SharedConversation.DoesNotExist, ValueError, TypeError):
        raise NotFoundError("Share link not found.", code="share_not_found") from None


def share_get_by_token(*, token: str) -> SharedConversation:
    """Return the link whose token is ``token`` while it is live (not revoked, not expired, its
    conversation not in the trash: a link works again if the conversation is restored).

    Looked up by the token's SHA-256 digest (the unique index on ``token_hash``), so the token is
    never compared as text. Raises ``NotFoundError`` (404 ``share_not_found``) for an unknown,
    revoked or expired token alike: which one is not told.
    """
    share = (
        SharedConversation.objects.filter(
            token_hash=hash_secret(token), revoked_at__isnull=True, conversation__deleted_at__isnull=True
        )
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .first()
    )
    if share is None:
        raise NotFoundError("This shared conversation does not exist or is no longer shared.", code="share_not_found")
    return share
