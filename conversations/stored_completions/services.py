"""Writes for stored chat completions: keep a ``/v1/chat/completions`` exchange, change its metadata, delete it.

A request with ``store: true`` is planned by ``llm.openai.services`` as a ``StoredChatCompletionPlan``;
when its reply ends, the streaming engine persists the end in a worker thread (the usage write
path, after the last token went out) and calls ``stored_completion_save`` through
``settings.OPENAI_COMPLETION_STORE``: ``llm`` may not import this app (README, "Architecture").
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from django.db import IntegrityError, transaction

from llm.models import LLMModel
from llm.openai.services import StoredChatCompletionPlan
from llm.streaming import PROVIDER, ReplyOutcome, ReplyStatus

from ..content import content_text, storable_text, storable_tool_calls
from ..models import Conversation, Message
from ..services import conversation_delete, message_chain

logger = logging.getLogger(__name__)

_ROLES = frozenset(Message.Role.values)


def _role(role: Any) -> str:
    """Return ``role`` if it is one a message may have, else ``user`` (validation let no other through)."""
    return role if isinstance(role, str) and role in _ROLES else Message.Role.USER.value


def stored_completion_save(*, plan: StoredChatCompletionPlan, outcome: ReplyOutcome) -> Conversation | None:
    """Keep the exchange of a ``store: true`` reply as a conversation of its caller; return it.

    The conversation (``completion_id`` = the ``chatcmpl-...`` id, ``metadata``, created at the
    reply's ``created``) in the organization the request acted in, owned by its user, holds the
    request's messages as they came (their text; roles ``system``, ``developer``, ``user``,
    ``assistant``, ``tool``) and the reply as an assistant message written as
    ``conversations.services.reply_finish`` writes one: text, status (a stopped reply is
    ``cancelled``, a failed one ``failed``, with its ``error``), the model that served it, tokens,
    timings, and what OpenAI answers apart: the refusal, the provider's cached and reasoning tokens.
    Assistant messages keep their ``tool_calls`` (the request's as sent, the reply's as streamed),
    tool messages the ``tool_call_id`` they answer.
    One transaction. Nothing is kept for a reply its client got as an error status: one that failed
    before producing any output, or a whole (not streamed) reply that failed at all; nor twice (a
    second call for the same id is a no-op), nor when the requested model was deleted since (returns None).
    """
    if outcome.status is ReplyStatus.FAILED and (not plan.stream or outcome.time_to_first_token_ms is None):
        return None  # its client got an error status, not a completion (a whole reply's output is never sent)
    usage = plan.usage
    model_id = usage.model_id if usage is not None else None
    if model_id is None or not LLMModel.objects.filter(pk=model_id).exists():
        logger.warning("stored completion %s not kept: its model is gone", plan.reply_id)
        return None
    messages = [
        Message(
            role=_role(message.get("role")),
            content=content_text(message.get("content"), separator=""),
            tool_calls=storable_tool_calls(message.get("tool_calls")) if message.get("role") == "assistant" else None,
            tool_call_id=storable_text(str(message.get("tool_call_id") or "")) if message.get("role") == "tool" else "",
            status=Message.Status.COMPLETED,
        )
        for message in plan.request.messages
        if isinstance(message, dict)
    ]
    error = outcome.error
    provider_usage = outcome.usage_source == PROVIDER
    reply = Message(
        role=Message.Role.ASSISTANT,
        content=storable_text(outcome.text),  # a refusal kept as the reply's text, not lost
        refusal=storable_text(outcome.refusal),  # ... and apart, to read back as OpenAI's ``refusal``
        tool_calls=storable_tool_calls(outcome.tool_calls),
        status=outcome.status.value,
        model_name=outcome.model_name,
        finish_reason=outcome.finish_reason or "",
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        # The breakdown the client was answered (``llm.openai.frames.usage_object``): the provider's only.
        cached_tokens=outcome.usage.cached_tokens if provider_usage else None,
        reasoning_tokens=outcome.usage.reasoning_tokens if provider_usage else None,
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        duration_ms=outcome.duration_ms,  # never None: tells the reply from the request's messages (selectors)
        error=error.message if error else "",
        error_code=error.code if error else "",
    )
    try:
        with transaction.atomic():
            conversation = Conversation.objects.create(
                owner_id=plan.user_id,
                organization_id=plan.organization_id,
                model_id=model_id,
                completion_id=plan.reply_id,
                metadata=plan.metadata,
            )
            # ``created`` as the client was told it (auto_now_add set the row's own time).
            created = dt.datetime.fromtimestamp(plan.created, tz=dt.UTC)
            Conversation.objects.filter(pk=conversation.pk).update(created_at=created)
            conversation.created_at = created
            for message in (*messages, reply):
                message.conversation = conversation
            Message.objects.bulk_create([*messages, reply])  # in order: ids say the order
            message_chain(conversation=conversation, messages=[*messages, reply])  # the active branch
    except IntegrityError:  # kept already (the end written twice at a shutdown) or its owner deleted
        logger.info("stored completion %s not kept twice", plan.reply_id)
        return None
    return conversation


def stored_completion_metadata_update(*, conversation: Conversation, metadata: dict[str, str] | None) -> Conversation:
    """Replace the ``metadata`` of stored completion ``conversation`` (None: none); return it."""
    conversation.metadata = dict(metadata or {})
    conversation.save(update_fields=["metadata", "updated_at"])
    return conversation


def stored_completion_delete(*, conversation: Conversation) -> None:
    """Delete stored completion ``conversation`` and its messages (``conversations.services.conversation_delete``)."""
    conversation_delete(conversation=conversation)


__all__ = ["stored_completion_delete", "stored_completion_metadata_update", "stored_completion_save"]
