"""Reads for export: the lossless JSON document of conversations, and Markdown of one's active branch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.utils import timezone

from accounts.authentication import Principal

from ..models import Conversation, Message
from ..selectors import conversation_get_for

FORMAT = "chatbackend.conversations"
FORMAT_VERSION = 1

# The message fields exported, as the document names them (``model`` is ``Message.model_name``).
_MESSAGE_FIELDS = {
    "id": "id",
    "parent_id": "parent_id",
    "role": "role",
    "content": "content",
    "status": "status",
    "model": "model_name",
    "finish_reason": "finish_reason",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
    "time_to_first_token_ms": "time_to_first_token_ms",
    "duration_ms": "duration_ms",
    "error": "error",
    "error_code": "error_code",
    "created_at": "created_at",
    "updated_at": "updated_at",
}


def export_document(*, conversations: Iterable[Conversation]) -> dict[str, Any]:
    """Return the export document of ``conversations`` (already visible to the caller).

    Shape: ``{format, format_version, exported_at, conversations: [{id, title, model, system_prompt,
    metadata, parameters, pinned, archived_at, active_leaf, created_at, updated_at, messages: [{id,
    parent_id, role, content, status, model, finish_reason, prompt_tokens, completion_tokens,
    time_to_first_token_ms (ms), duration_ms (ms), error, error_code, created_at, updated_at}]}]}``
    (``parameters``: ``Conversation.parameters``); messages in id order (a parent before its
    children), every branch included. Times are ``datetime``s (the renderer writes ISO 8601). Two
    queries whatever the number of conversations: theirs (with their models) and all their messages.
    """
    conversations = list(conversations)
    by_conversation: dict[int, list[dict[str, Any]]] = {c.pk: [] for c in conversations}
    rows = (
        Message.objects.filter(conversation_id__in=list(by_conversation))
        .order_by("conversation_id", "id")
        .values("conversation_id", *_MESSAGE_FIELDS.values())
    )
    for row in rows.iterator(chunk_size=2000):
        by_conversation[row["conversation_id"]].append({name: row[field] for name, field in _MESSAGE_FIELDS.items()})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_at": timezone.now(),
        "conversations": [
            {
                "id": c.pk,
                "title": c.title,
                "model": c.model.name,
                "system_prompt": c.system_prompt,
                "metadata": c.metadata,
                "parameters": c.parameters,
                "pinned": c.pinned,
                "archived_at": c.archived_at,
                "active_leaf": c.active_leaf_id,
                "created_at": c.created_at,
                "updated_at": c.updated_at,
                "messages": by_conversation[c.pk],
            }
            for c in conversations
        ],
    }


def conversation_export(*, actor: Principal, conversation_id: int) -> dict[str, Any]:
    """Return the export document of conversation ``conversation_id``, which ``actor`` may read.

    Raises ``NotFoundError`` (404) for another user's conversation (``conversation_get_for``; an
    organization's admins may export what they may read).
    """
    conversation = conversation_get_for(actor=actor, conversation_id=conversation_id)
    return export_document(conversations=[conversation])


def conversation_export_all(*, actor: Principal) -> dict[str, Any]:
    """Return the export document of every conversation ``actor``'s user owns in the organization
    ``actor`` acts in (never other users', whatever ``actor``'s role; never the trash), oldest first."""
    conversations = Conversation.objects.filter(
        organization=actor.organization, owner=actor.user, deleted_at__isnull=True
    ).select_related("model")
    return export_document(conversations=conversations.order_by("created_at", "id"))


def active_path(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the messages of an exported ``conversation`` on its active branch, root first."""
    by_id = {m["id"]: m for m in conversation["messages"]}
    path: list[dict[str, Any]] = []
    current = by_id.get(conversation["active_leaf"])
    while current is not None and len(path) <= len(by_id):  # the bound: no loop on a malformed tree
        path.append(current)
        current = by_id.get(current["parent_id"])
    return path[::-1]


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines() or [""])


def conversation_markdown(conversation: dict[str, Any]) -> str:
    """Return an exported ``conversation`` as Markdown: its title, model and system prompt, then the
    messages of its active branch, each under a ``### Role`` heading (with the model that wrote an
    assistant message). Other branches are left out and counted in a closing note."""
    path = active_path(conversation)
    lines = [f"# {conversation['title'] or 'Conversation ' + str(conversation['id'])}", ""]
    lines += [f"- Model: `{conversation['model']}`", f"- Created: {conversation['created_at'].isoformat()}", ""]
    if conversation["system_prompt"]:
        lines += ["**System prompt**", "", _quote(conversation["system_prompt"]), ""]
    for message in path:
        heading = message["role"].capitalize()
        if message["model"] and message["role"] == Message.Role.ASSISTANT:
            heading += f" ({message['model']})"
        if message["status"] not in (Message.Status.COMPLETED, Message.Status.STREAMING):
            heading += f" [{message['status']}]"
        lines += [f"### {heading}", "", message["content"], ""]
    hidden = len(conversation["messages"]) - len(path)
    if hidden:
        lines += ["---", "", f"*{hidden} message(s) on other branches are not shown; the JSON export has them.*", ""]
    return "\n".join(lines)


def document_markdown(document: dict[str, Any]) -> str:
    """Return every conversation of an export ``document`` as Markdown, separated by rules."""
    return "\n---\n\n".join(conversation_markdown(c) for c in document["conversations"])
