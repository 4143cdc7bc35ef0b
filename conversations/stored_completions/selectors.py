"""Reads for stored chat completions, always scoped to the caller: their own, in the organization they act in.

OpenAI scopes stored completions to a project; here a caller sees the completions they stored in
the organization the request acts in, and nobody else's (another user's or another organization's
is a 404, even for an organization's admins and the platform superuser, who read them as
conversations through ``/api/conversations/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch, Q, QuerySet
from django.db.models.fields.json import KeyTransform

from accounts.authentication import Principal
from chatbackend.errors import NotFoundError
from chatbackend.text import holds_nul

from ..models import Conversation, Message
from .positions import deleted_position

ORDERS = ("asc", "desc")


def completion_not_found_error(completion_id: str, *, param: str | None = None) -> NotFoundError:
    """Return the 404 of a completion id (the query parameter ``param``, if one) that names no stored
    completion of the caller."""
    return NotFoundError(
        f"No stored chat completion found with id '{completion_id}'.", code="completion_not_found", param=param
    )


def _replies() -> QuerySet[Message]:
    """The assistant messages a model generated (a backend-measured ``duration_ms``; the request's are
    written without one), oldest first: the stored completion's reply, then the conversation's later ones."""
    return Message.objects.filter(role=Message.Role.ASSISTANT, duration_ms__isnull=False).order_by("pk")


def _stored(*, actor: Principal) -> QuerySet[Conversation]:
    return (
        Conversation.objects.filter(
            owner=actor.user, organization=actor.organization, completion_id__isnull=False, deleted_at__isnull=True
        )
        .select_related("model")
        .prefetch_related(Prefetch("messages", queryset=_replies(), to_attr="generated_replies"))
    )


def stored_completion_get_for(*, actor: Principal, completion_id: str) -> Conversation:
    """Return the conversation of ``actor``'s stored completion ``completion_id`` (reply: ``stored_completion_reply``).

    Raises ``NotFoundError`` (404 ``completion_not_found``) for an id that is not one of ``actor``'s
    in the organization the request acts in (one holding a NUL character is nobody's: no query).
    """
    if holds_nul(completion_id):
        raise completion_not_found_error(completion_id)
    conversation = _stored(actor=actor).filter(completion_id=completion_id).first()
    if conversation is None:
        raise completion_not_found_error(completion_id)
    return conversation


def stored_completion_reply(conversation: Conversation) -> Message | None:
    """Return the reply of a stored completion fetched by this module: its first generated assistant message.

    Not its last: the conversation may be continued, regenerated or edited under ``/api/conversations/``
    (README, "Stored completions"), and those later replies are not the completion's. Its request's
    assistant messages (a history sent with it) were not generated here: they have no ``duration_ms``.
    """
    replies: list[Message] | None = getattr(conversation, "generated_replies", None)
    if replies is None:
        replies = list(_replies().filter(conversation=conversation)[:1])
    return replies[0] if replies else None


@dataclass(frozen=True)
class StoredCompletionPage:
    """One page of a list: ``items`` in the order asked, ``has_more`` when more follow it."""

    items: list[Conversation]
    has_more: bool


def stored_completion_list(
    *,
    actor: Principal,
    limit: int,
    order: str = "asc",
    after: str | None = None,
    model: str | None = None,
    metadata: dict[str, str] | None = None,
) -> StoredCompletionPage:
    """Return a page of ``actor``'s stored completions by creation time (``order``: ``asc`` or ``desc``).

    ``after``: the last completion id of the previous page (404 ``completion_not_found`` when it is
    not one of ``actor``'s; one deleted since goes on from where it stood, ``positions``); ``model``:
    only those of that model (the model the request went to: an alias counts as its target, as the
    completion's ``model`` names it, not as the alias);
    ``metadata``: only those whose metadata has every one of these key/value pairs. ``limit``: the
    page size (the caller bounds it). Two queries (the page, its replies), whatever the page size.
    No string may hold a NUL character (``chatbackend.text``): the caller refuses those.
    """
    queryset = _stored(actor=actor)
    if model:
        queryset = queryset.filter(model__name=model)
    for index, (key, value) in enumerate((metadata or {}).items()):
        # A key transform built from the key itself: any string is safe (no lookup parsing of "__").
        # KeyTransform, not KeyTextTransform: its exact lookup JSON-encodes the value on every
        # backend (SQLite reads the text one's plain value as malformed JSON).
        alias = f"metadata_{index}"
        queryset = queryset.alias(**{alias: KeyTransform(key, "metadata")}).filter(**{alias: value})
    descending = order == "desc"
    if after:
        anchor = (
            Conversation.objects.filter(owner=actor.user, organization=actor.organization, completion_id=after)
            .values_list("created_at", "pk")
            .first()
        )
        if anchor is None:  # deleted since the previous page (a cleanup loop)? Go on from where it stood.
            anchor = deleted_position(
                owner_id=actor.user.pk, organization_id=actor.organization.pk, completion_id=after
            )
        if anchor is None:
            raise completion_not_found_error(after, param="after")
        created_at, pk = anchor
        if descending:
            queryset = queryset.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, pk__lt=pk))
        else:
            queryset = queryset.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, pk__gt=pk))
    ordering = ("-created_at", "-pk") if descending else ("created_at", "pk")
    rows = list(queryset.order_by(*ordering)[: limit + 1])
    return StoredCompletionPage(items=rows[:limit], has_more=len(rows) > limit)


def stored_completion_messages(*, conversation: Conversation) -> list[Message]:
    """Return the request messages of stored completion ``conversation``, in order: those written before its reply.

    Messages added since (the conversation continued under ``/api/conversations/``) are not the request's.
    """
    reply = stored_completion_reply(conversation)
    messages = conversation.messages.order_by("pk")
    return list(messages if reply is None else messages.filter(pk__lt=reply.pk))


__all__ = [
    "ORDERS",
    "StoredCompletionPage",
    "completion_not_found_error",
    "stored_completion_get_for",
    "stored_completion_list",
    "stored_completion_messages",
    "stored_completion_reply",
]
