"""Writes for import: our export document (new trees, ids mapped) or NextChat's ``backup.json``."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.authentication import Principal
from chatbackend.errors import ApplicationError

from ..conversation_templates.models import ConversationTemplate
from ..models import Conversation, Message
from ..sync.services import ModelChooser, is_nextchat_state, nextchat_masks_import, nextchat_sessions_import
from .selectors import FORMAT
from .serializers import TransferDocumentSerializer


@dataclass(slots=True)
class ImportResult:
    """What an import made: ``source`` (``chatbackend`` or ``nextchat``), the conversations,
    ``models_replaced``: ``{requested, model}`` for each model name the caller may not use, and the
    templates made or updated from NextChat's masks."""

    source: str
    conversations: list[Conversation]
    models_replaced: list[dict[str, str]] = field(default_factory=list)
    templates: list[ConversationTemplate] = field(default_factory=list)


def _invalid(message: str, param: str | None = None) -> ApplicationError:
    return ApplicationError(message, code="invalid_import", param=param)


def conversations_import(*, actor: Principal, data: Any) -> ImportResult:
    """Import ``data`` (a parsed JSON body) as conversations of ``actor``'s user in the organization
    it acts in, all or nothing (one transaction).

    ``data`` is told by its shape: our export document (``"format": "chatbackend.conversations"``)
    makes new conversations, each tree recreated with new ids (parents and the active leaf mapped,
    times kept; a ``streaming`` message becomes ``cancelled``); NextChat's app state (its
    ``backup.json``: a ``chat-next-web-store`` object) is imported as a synced document is
    (``conversations.sync.services.nextchat_sessions_import``: idempotent by NextChat's ids), and its
    masks become templates (``nextchat_masks_import``, idempotent too). A model
    name ``actor`` may not use (unknown, disabled, or outside its keys', teams' and organization's
    lists: ``accounts.model_access``) is replaced by the first model it may use by name, and
    reported. Raises ``ApplicationError`` 400 ``invalid_import`` (with ``param`` the field's path),
    400 ``invalid`` with ``fields`` for fields failing validation, 400 when ``actor`` may use no model.
    """
    if is_nextchat_state(data):
        with transaction.atomic():
            conversations = nextchat_sessions_import(principal=actor, state=data)
            templates = nextchat_masks_import(principal=actor, state=data)
        return ImportResult("nextchat", conversations, templates=templates)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _invalid(
            f'The body is neither an export of this server (an object with "format": "{FORMAT}") nor '
            'NextChat\'s backup.json (an object with "chat-next-web-store").'
        )
    serializer = TransferDocumentSerializer(data=data)
    serializer.is_valid(raise_exception=True)
    documents = serializer.validated_data["conversations"]
    orders = [_tree_order(document, f"conversations.{i}") for i, document in enumerate(documents)]
    models = ModelChooser(actor)
    result = ImportResult("chatbackend", [])
    with transaction.atomic():
        for document, order in zip(documents, orders, strict=True):
            model = models.named(document["model"])
            if model is None:
                model = models.fallback()
                replaced = {"requested": document["model"], "model": model.name}
                if replaced not in result.models_replaced:
                    result.models_replaced.append(replaced)
            result.conversations.append(_conversation_create(actor, document, order, model))
    return result


def _tree_order(document: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Return the messages of ``document`` parents first (smallest id first among those ready), so
    that new ids, given in this order, keep a message after its parent (``message_path`` relies on
    it). Raises ``ApplicationError`` 400 for a repeated id, a parent that is no message of the
    conversation, a cycle, and an ``active_leaf`` that is no message of it."""
    messages = document["messages"]
    by_id: dict[int, dict[str, Any]] = {}
    for index, message in enumerate(messages):
        if message["id"] in by_id:
            raise _invalid(f"Message id {message['id']} appears twice.", f"{where}.messages.{index}.id")
        by_id[message["id"]] = message
    children: dict[int | None, list[int]] = {}
    for index, message in enumerate(messages):
        parent = message["parent_id"]
        if parent is not None and parent not in by_id:
            raise _invalid(
                f"parent_id {parent} is no message of this conversation.", f"{where}.messages.{index}.parent_id"
            )
        children.setdefault(parent, []).append(message["id"])
    ready = list(children.get(None, []))
    heapq.heapify(ready)
    order = []
    while ready:
        message_id = heapq.heappop(ready)
        order.append(by_id[message_id])
        for child in children.get(message_id, []):
            heapq.heappush(ready, child)
    if len(order) != len(messages):
        raise _invalid("The messages' parents form a cycle: every message must descend from a first message.", where)
    leaf = document["active_leaf"]
    if leaf is not None and leaf not in by_id:
        raise _invalid(f"active_leaf {leaf} is no message of this conversation.", f"{where}.active_leaf")
    return order


def _conversation_create(
    actor: Principal, document: dict[str, Any], order: list[dict[str, Any]], model: Any
) -> Conversation:
    """Write one conversation and its messages: three statements whatever their number (batched)."""
    now = timezone.now()
    conversation = Conversation.objects.create(
        organization=actor.organization,
        owner=actor.user,
        title=document["title"],
        model=model,
        system_prompt=document["system_prompt"],
        metadata=document["metadata"],
        parameters=document["parameters"],
        pinned=document["pinned"],
        archived_at=document["archived_at"],
    )
    messages = [
        Message(
            conversation=conversation,
            role=item["role"],
            content=item["content"],
            status=Message.Status.CANCELLED if item["status"] == Message.Status.STREAMING else item["status"],
            model_name=item["model"],
            finish_reason=item["finish_reason"],
            prompt_tokens=item["prompt_tokens"],
            completion_tokens=item["completion_tokens"],
            time_to_first_token_ms=item["time_to_first_token_ms"],
            duration_ms=item["duration_ms"],
            error=item["error"],
            error_code=item["error_code"],
        )
        for item in order
    ]
    # Parents are linked after the insert, which gives the ids; the times, which the insert sets to
    # now (``auto_now_add``), are put back in the same update.
    Message.objects.bulk_create(messages, batch_size=1000)
    new_id = {item["id"]: message.pk for item, message in zip(order, messages, strict=True)}
    for item, message in zip(order, messages, strict=True):
        message.parent_id = new_id[item["parent_id"]] if item["parent_id"] is not None else None
        message.created_at = item.get("created_at") or now
        message.updated_at = item.get("updated_at") or message.created_at
    Message.objects.bulk_update(messages, ["parent", "created_at", "updated_at"], batch_size=1000)
    leaf = document["active_leaf"]
    conversation.active_leaf_id = new_id[leaf] if leaf is not None else (messages[-1].pk if messages else None)
    conversation.created_at = document.get("created_at") or now
    conversation.updated_at = document.get("updated_at") or now
    Conversation.objects.filter(pk=conversation.pk).update(
        active_leaf_id=conversation.active_leaf_id,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
    )
    return conversation
