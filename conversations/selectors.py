"""Reads for conversations: every lookup is scoped to who may see it."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from contextlib import closing
from dataclasses import dataclass
from typing import Any, cast

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL

from accounts.audit import audit_denied_lookup
from accounts.authentication import Principal
from chatbackend.errors import ApplicationError, NotFoundError
from llm.tokens import Tokenizer

from .models import Conversation, Message


def conversation_list(*, actor: Principal, deleted: bool | None = False) -> QuerySet[Conversation]:
    """Return the conversations ``actor`` may see: the platform superuser every organization's; in
    the organization the request acts in, its admins all of them, its other members their own.

    ``deleted``: False (the default) leaves out the trash (``Conversation.deleted_at``), which no
    ordinary lookup finds; True returns only the trash; None both.
    """
    queryset = Conversation.objects.select_related("model")
    if deleted is not None:
        queryset = queryset.filter(deleted_at__isnull=not deleted)
    if actor.user.is_superuser:
        return queryset
    queryset = queryset.filter(organization=actor.organization)
    return queryset if actor.is_admin else queryset.filter(owner=actor.user)


def conversation_trash_list(*, actor: Principal) -> QuerySet[Conversation]:
    """Return ``actor``'s own conversations in the trash (in the organization the request acts in;
    the platform superuser: in every organization), most recently deleted first. Only an owner
    restores or purges, so an admin's trash holds no member's conversation."""
    return conversation_list(actor=actor, deleted=True).filter(owner=actor.user).order_by("-deleted_at", "-id")


def conversation_get_for(
    *, actor: Principal, conversation_id: int, to_change: bool = False, deleted: bool | None = False
) -> Conversation:
    """Return conversation ``conversation_id`` if ``actor`` may see it (``conversation_list``).

    ``deleted`` as ``conversation_list``'s: by default a conversation in the trash is a 404.

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
            conversation = conversation_list(actor=actor, deleted=deleted).get(pk=conversation_id)
        except (Conversation.DoesNotExist, ValueError, TypeError):
            raise NotFoundError("Conversation not found.", code="conversation_not_found") from None
    if to_change and conversation.owner_id != actor.user.pk:
        raise ApplicationError(
            "Only the conversation's owner may change it or chat in it; its organization's admins may read it.",
            code="permission_denied",
            status=403,
        )
    return conversation


# The ids on the path from a message up to its conversation's root (parameters: the message's id,
# its conversation's id). Why a recursive CTE (``WITH RECURSIVE``, PostgreSQL and SQLite alike;
# Django has no API for it, hence raw SQL): the walk follows ``parent_id`` one primary-key lookup
# per message, so reading a path costs O(path length) whatever the size of the tree, in one query,
# and nothing derived from the tree has to be kept up to date. A materialized path column would make
# a deep message's path a string as long as its depth (O(n²) storage for a 10,000-message chat); a
# ``depth`` column alone finds no path. The first step checks the conversation, so a message id of
# another conversation gives nothing. The table is ``Message._meta.db_table``, spelled out so the
# query is a constant (a test checks the name).
PATH_SQL = (
    "WITH RECURSIVE path(id, parent_id) AS ("
    "SELECT id, parent_id FROM conversations_message WHERE id = %s AND conversation_id = %s "
    "UNION ALL SELECT m.id, m.parent_id FROM conversations_message m JOIN path ON m.id = path.parent_id"
    ") SELECT id FROM path"
)

# From a message down to a leaf, following the latest (highest id) child at each step; the leaf's id.
LATEST_LEAF_SQL = (
    "WITH RECURSIVE walk(id, depth) AS (SELECT id, 0 FROM conversations_message WHERE id = %s "
    "UNION ALL SELECT (SELECT MAX(c.id) FROM conversations_message c WHERE c.parent_id = walk.id), depth + 1 "
    "FROM walk WHERE walk.id IS NOT NULL"
    ") SELECT id FROM walk WHERE id IS NOT NULL ORDER BY depth DESC LIMIT 1"
)


def message_path(*, conversation: Conversation, leaf_id: int | None = None) -> QuerySet[Message]:
    """Return the messages from the root of ``conversation`` down to ``leaf_id``, in path order.

    ``leaf_id`` None: the conversation's ``active_leaf`` (no message: an empty queryset). Lazy: the
    path is one subquery (``PATH_SQL``), so filters, a count and a page of it are each one query,
    whose cost grows with the path's length and never with the rest of the conversation. Path order
    is id order: a message is always written after its parent.
    """
    leaf_id = conversation.active_leaf_id if leaf_id is None else leaf_id
    if leaf_id is None:
        return Message.objects.none()
    path_ids = RawSQL(PATH_SQL, (leaf_id, conversation.pk))  # noqa: S611 - values are parameters
    return Message.objects.filter(pk__in=path_ids).order_by("id")


def message_get_in(*, conversation: Conversation, message_id: Any, role: str | None = None) -> Message:
    """Return message ``message_id`` of ``conversation`` (of ``role`` when given).

    Raises ``NotFoundError`` (404 ``message_not_found``) for an id of no such message there.
    """
    queryset = conversation.messages.all() if role is None else conversation.messages.filter(role=role)
    try:
        return queryset.get(pk=message_id)
    except (Message.DoesNotExist, ValueError, TypeError):
        kind = f"{role} message" if role else "message"
        raise NotFoundError(f"No {kind} with this id in this conversation.", code="message_not_found") from None


def message_list(*, actor: Principal, conversation_id: int, branch: int | None = None) -> QuerySet[Message]:
    """Return the messages of a branch of a conversation ``actor`` may see, root first.

    The active branch (``Conversation.active_leaf`` up to the root), or with ``branch`` the path
    from that message up. Raises ``NotFoundError`` for a conversation ``actor`` may not see and for a
    ``branch`` that is no message of it.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id)
    if branch is not None:
        branch = message_get_in(conversation=conversation, message_id=branch).pk
    return message_path(conversation=conversation, leaf_id=branch)


def message_sibling_ids(*, messages: Iterable[Message]) -> dict[int, list[int]]:
    """Return, for each of ``messages``, the ids of the messages sharing its parent (itself too), ascending.

    Siblings are the alternatives a user moves between ("2/3"): the edits of a user message, the
    regenerations of a reply. One query for any number of messages (none for no message), served
    by the ``(conversation, parent)`` index; its rows are the siblings only.
    """
    messages = list(messages)
    if not messages:
        return {}
    query = Q()
    for conversation_id in {m.conversation_id for m in messages}:
        parents = {m.parent_id for m in messages if m.conversation_id == conversation_id}
        query |= Q(conversation_id=conversation_id, parent_id__in=parents - {None})
        if None in parents:
            query |= Q(conversation_id=conversation_id, parent__isnull=True)
    by_parent: dict[tuple[int, int | None], list[int]] = {}
    rows = Message.objects.filter(query).order_by("id").values_list("id", "conversation_id", "parent_id")
    for pk, conversation_id, parent_id in rows:
        by_parent.setdefault((conversation_id, parent_id), []).append(pk)
    return {m.pk: by_parent.get((m.conversation_id, m.parent_id), [m.pk]) for m in messages}


def message_tree(*, actor: Principal, conversation_id: int) -> tuple[Conversation, list[dict[str, Any]]]:
    """Return a conversation ``actor`` may see and its whole tree, compactly, in id order.

    Each node: ``{id, parent_id, role, status, created_at}`` (no content: a 10,000-message tree
    stays small). One query for the tree. Raises ``NotFoundError``.
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id)
    nodes = conversation.messages.order_by("id").values("id", "parent_id", "role", "status", "created_at")
    return conversation, [dict(node) for node in nodes]


def message_latest_leaf_id(*, message: Message) -> int:
    """Return the id of the leaf reached from ``message`` by following its latest child down.

    The branch a user means when they pick a message ("show me where this went"). One recursive
    query, O(depth below ``message``), served by the ``(parent, id)`` index.
    """
    with connection.cursor() as cursor:
        cursor.execute(LATEST_LEAF_SQL, [message.pk])
        row = cursor.fetchone()
    return row[0] if row else message.pk


def history_for_upstream(*, conversation: Conversation, leaf_id: int | None = None) -> list[dict[str, str]]:
    """Return the OpenAI ``messages`` for ``conversation``: system prompt, then the turns of one path.

    The path is the active one (``message_path``), or the one ending at ``leaf_id``; other branches
    are never sent. Assistant turns that produced no text (failed, or stopped before the first
    token) are left out; the text of a stopped reply is kept, as the user saw it.
    """
    messages: list[dict[str, str]] = []
    if conversation.system_prompt:
        messages.append({"role": "system", "content": conversation.system_prompt})
    for role, content in message_path(conversation=conversation, leaf_id=leaf_id).values_list("role", "content"):
        if content:
            messages.append({"role": role, "content": content})
    return messages


# Rows read per round trip while the history is read newest first: a reply in a long conversation
# reads about as many as fit in the context window, not the whole branch.
HISTORY_CHUNK_ROWS = 200


class ContextLengthExceeded(ApplicationError):
    """Not even the system prompt and the newest user message fit the model's context window.

    400 ``context_length_exceeded`` (OpenAI's code for a prompt over the window), ``param``
    ``messages``.
    """

    def __init__(self, *, prompt_tokens: int, max_prompt_tokens: int) -> None:
        super().__init__(
            f"This model's context window leaves {max(max_prompt_tokens, 0)} tokens for the prompt "
            f"after the reply's output reserve, but the system prompt and your message alone take "
            f"{prompt_tokens} tokens. Shorten the message or the system prompt, or use a model with "
            "a larger context window.",
            code="context_length_exceeded",
            param="messages",
        )


@dataclass(frozen=True, slots=True)
class FittedHistory:
    """What ``history_fitted`` chose to send upstream.

    ``messages``: OpenAI ``messages`` (system prompt first, then the newest turns that fit, in
    order). ``prompt_tokens``: their count by the tokenizer given, chat framing included (what
    metering counts). ``dropped``: how many messages of the branch with text were left out (the
    oldest); ``dropped_through``: the id of the newest of them (None when none was).
    """

    messages: list[dict[str, str]]
    prompt_tokens: int
    dropped: int
    dropped_through: int | None


def history_fitted(
    *, conversation: Conversation, leaf_id: int, tokenizer: Tokenizer, max_prompt_tokens: int
) -> FittedHistory:
    """Return the history of the branch ending at ``leaf_id`` (a user message) that fits ``max_prompt_tokens``.

    As ``history_for_upstream``, with the oldest messages left out until the prompt, counted by
    ``tokenizer`` (``Tokenizer.count_prompt``: the model's, as metering counts), is at most
    ``max_prompt_tokens`` (the model's context window minus the output reserve:
    ``llm.metering.prompt_budget_for``). The system prompt and the newest message are always kept;
    what is left out is always the oldest part of the branch, and the history never starts with
    an assistant message (a turn is dropped whole, as providers such as Anthropic's want a user
    message first).

    Queries: one read of the branch newest first, fetched ``HISTORY_CHUNK_ROWS`` at a time and
    stopped once the window is full (so a 10,000-message branch reads about what fits), plus one
    count when something was left out: as many queries whatever the branch's length. Raises
    ``ContextLengthExceeded`` (400) when the system prompt and the newest message alone do not fit.
    """
    system = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
    empty = tokenizer.count_prompt([])
    total = tokenizer.count_prompt(system)
    kept: list[tuple[int, dict[str, str]]] = []  # newest first
    dropped_through: int | None = None
    rows = message_path(conversation=conversation, leaf_id=leaf_id).order_by("-id").values_list("id", "role", "content")
    # closing: the rows not read (a server-side cursor on PostgreSQL) are let go at once.
    # A generator (Django's), typed as an iterator.
    chunks = cast(Generator[tuple[int, str, str]], rows.iterator(chunk_size=HISTORY_CHUNK_ROWS))
    with closing(chunks) as newest_first:
        for pk, role, content in newest_first:
            if not content:
                continue
            message = {"role": role, "content": content}
            cost = tokenizer.count_prompt([message]) - empty  # count_prompt adds up message by message
            if not kept:
                if total + cost > max_prompt_tokens:
                    raise ContextLengthExceeded(prompt_tokens=total + cost, max_prompt_tokens=max_prompt_tokens)
            elif total + cost > max_prompt_tokens:
                dropped_through = pk
                break
            kept.append((pk, message))
            total += cost
    if dropped_through is not None:
        # Keep whole turns: the oldest message kept must not be an orphaned reply.
        while len(kept) > 1 and kept[-1][1]["role"] == Message.Role.ASSISTANT:
            pk, message = kept.pop()
            dropped_through = pk
            total -= tokenizer.count_prompt([message]) - empty
    dropped = 0
    if dropped_through is not None:
        branch = message_path(conversation=conversation, leaf_id=leaf_id)
        dropped = branch.filter(pk__lte=dropped_through).exclude(content="").count()
    return FittedHistory(
        messages=system + [message for _, message in reversed(kept)],
        prompt_tokens=total,
        dropped=dropped,
        dropped_through=dropped_through,
    )
