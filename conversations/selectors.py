"""Reads for conversations: every lookup is scoped to who may see it."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from accounts.audit import audit_denied_lookup
from accounts.authentication import Principal
from chatbackend.errors import ApplicationError, NotFoundError

from .models import Conversation, Message


def conversation_list(*, actor: Principal) -> QuerySet[Conversation]:
    """Return the conversations ``actor`` may see: the platform superuser every organization's; in
    the organization the request acts in, its admins all of them, its other members their own."""
    queryset = Conversation.objects.select_related("model")
    if actor.user.is_superuser:
        return queryset
    queryset = queryset.filter(organization=actor.organization)
    return queryset if actor.is_admin else queryset.filter(owner=actor.user)


def conversation_get_for(*, actor: Principal, conversation_id: int, to_change: bool = False) -> Conversation:
    """Return conversation ``conversation_id`` if ``actor`` may see it (``conversation_list``).

    Raises ``NotFoundError`` (404) otherwise: another user's or another organization's conversation
    does not exist for you. Another organization's is also audited (``access.denied``,
    ``accounts.audit.audit_access_denied``: one query after the miss, none on success); another
    user's in the same organization is not. ``to_change``: the caller wants to change the conversation or chat in it,
    which only its owner may do: an organization's admins (and the platform superuser) read their
    members' conversations but never write to them, so anyone else who sees it gets
    ``ApplicationError`` 403 ``permission_denied``.
    """
    with audit_denied_lookup(
        actor=actor.user,
        organization=actor.organization,
        model=Conversation,
        lookup=Q(pk=conversation_id),
        code="conversation_not_found",
    ):
        try:
            conversation = conversation_list(actor=actor).get(pk=conversation_id)
        except (Conversation.DoesNotExist, ValueError, TypeError):
            raise NotFoundError("Conversation not found.", code="conversation_not_found") from None
    if to_change and conversation.owner_id != actor.user.pk:
        raise ApplicationError(
            "Only the conversation's owner may change it or chat in it; its organization's admins may read it.",
            code="permission_denied",
            status=403,
        )
    return conversation


def message_list(*, actor: Principal, conversation_id: int) -> QuerySet[Message]:
    """Return the messages of a conversation ``actor`` may see, oldest first. Raises ``NotFoundError``."""
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id)
    return conversation.messages.all()


def history_for_upstream(*, conversation: Conversation) -> list[dict[str, str]]:
    """Return the OpenAI ``messages`` for ``conversation``: system prompt, then its turns in order.

    Assistant turns that produced no text (failed, or stopped before the first token) are left
    out; the text of a stopped reply is kept, as the user saw it.
    """
    messages: list[dict[str, str]] = []
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    for role, content in conversation.messages.order_by("created_at", "id").values_list("role", "content"):
        if content:
            messages.append({"role": role, "content": content})
    return messages
