"""Reads for conversations: every lookup is scoped to who may see it."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import User
from chatbackend.errors import NotFoundError

from .models import Conversation, Message


def conversation_list(*, user: User) -> QuerySet[Conversation]:
    """Return the conversations ``user`` may see: all for admins, their own for members."""
    queryset = Conversation.objects.select_related("model")
    return queryset if user.is_admin else queryset.filter(owner=user)


def conversation_get_for(*, user: User, conversation_id: int) -> Conversation:
    """Return conversation ``conversation_id`` if ``user`` may see it.

    Raises ``NotFoundError`` (404) otherwise: another user's conversation does not exist for you.
    """
    try:
        return conversation_list(user=user).get(pk=conversation_id)
    except (Conversation.DoesNotExist, ValueError, TypeError):
        raise NotFoundError("Conversation not found.", code="conversation_not_found") from None


def message_list(*, user: User, conversation_id: int) -> QuerySet[Message]:
    """Return the messages of a conversation ``user`` may see, oldest first. Raises ``NotFoundError``."""
    conversation = conversation_get_for(user=user, conversation_id=conversation_id)
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
