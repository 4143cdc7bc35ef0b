"""Writes for conversations: CRUD, and the start and end of a streamed reply."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.models import APIKey, UsageRecord, User
from accounts.services import usage_enqueue
from chatbackend.errors import ApplicationError
from llm.models import LLMModel
from llm.providers import ChatRequest
from llm.selectors import llm_model_get_enabled, provider_config_for

from .models import Conversation, Message
from .selectors import conversation_get_for, history_for_upstream
from .streaming import COMPLETED, FAILED, ReplyOutcome, ReplyPlan

MAX_MESSAGE_CHARS = 100_000


def conversation_create(*, owner: User, model_name: str, title: str = "", system_prompt: str = "") -> Conversation:
    """Create a conversation with the enabled model ``model_name``. Raises ``ApplicationError``."""
    model = llm_model_get_enabled(name=model_name)
    return Conversation.objects.create(owner=owner, model=model, title=title, system_prompt=system_prompt)


def conversation_update(*, conversation: Conversation, data: dict[str, Any]) -> Conversation:
    """Update ``title``, ``system_prompt`` and/or ``model`` (an enabled model's name) from ``data``."""
    fields: list[str] = []
    for name in ("title", "system_prompt"):
        if name in data:
            setattr(conversation, name, data[name])
            fields.append(name)
    if "model" in data:
        conversation.model = llm_model_get_enabled(name=data["model"])
        fields.append("model")
    if fields:
        conversation.save(update_fields=[*fields, "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete ``conversation`` and its messages (usage records stay, unlinked)."""
    conversation.delete()


def _validate_content(content: str) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ApplicationError("Message content must be a non-empty string.", code="empty_message", param="content")
    if len(content) > MAX_MESSAGE_CHARS:
        raise ApplicationError(
            f"Message content is longer than {MAX_MESSAGE_CHARS} characters.", code="message_too_long", param="content"
        )
    return content


def reply_start(*, user: User, api_key: APIKey | None, conversation_id: int, content: str) -> ReplyPlan:
    """Write the user's message and the assistant's placeholder; return the plan for the stream.

    One transaction: the user message (``completed``) and an empty assistant message
    (``streaming``) are written before any upstream call. The history sent upstream is the
    conversation's system prompt and messages. Raises ``NotFoundError`` for a conversation
    ``user`` may not see, ``ApplicationError`` for empty content or a disabled model.
    """
    content = _validate_content(content)
    conversation = conversation_get_for(user=user, conversation_id=conversation_id)
    model = llm_model_get_enabled(name=conversation.model.name)
    with transaction.atomic():
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=content, status=Message.Status.COMPLETED
        )
        history = history_for_upstream(conversation=conversation)
        assistant_message = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model_name=model.name,
        )
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    return ReplyPlan(
        provider=provider_config_for(model=model),
        request=ChatRequest(model=model.upstream_model, messages=history, parameters=dict(model.default_parameters)),
        model_name=model.name,
        # ``reply_finish`` returns whether the message was still there; ``Reply`` ignores it,
        # ``conversations.payloads.track_message`` reads it.
        finish=partial(
            reply_finish,
            message_id=assistant_message.pk,
            user_id=user.pk,
            api_key_id=api_key.pk if api_key else None,
            model=model,
        ),
        info={
            "conversation_id": conversation.pk,
            "user_message_id": user_message.pk,
            "message_id": assistant_message.pk,
            "model": model.name,
            "created_at": assistant_message.created_at,  # not sent in reply.start (conversations.payloads)
        },
    )


def should_account(outcome: ReplyOutcome) -> bool:
    """Return True when a reply consumed tokens: completed, stopped, or failed after output."""
    return outcome.status != FAILED or outcome.time_to_first_token_ms is not None


def reply_finish(
    outcome: ReplyOutcome, *, message_id: int, user_id: int, api_key_id: int | None, model: LLMModel
) -> bool:
    """Persist the end of a reply on its assistant message and queue its usage record.

    One write of the message (content so far, status, tokens, timings, error); the usage task is
    queued on commit, keyed by the message so a redelivery writes nothing twice. Returns False
    when the message no longer exists (its conversation was deleted while the reply streamed).
    """
    with transaction.atomic():
        written = Message.objects.filter(pk=message_id).update(
            content=outcome.content,
            status=outcome.status,
            finish_reason=outcome.finish_reason or "",
            prompt_tokens=outcome.usage.prompt_tokens,
            completion_tokens=outcome.usage.completion_tokens,
            time_to_first_token_ms=outcome.time_to_first_token_ms,
            duration_ms=outcome.duration_ms,
            error=outcome.error.message if outcome.error else "",
            updated_at=timezone.now(),
        )
        reply_usage_enqueue(
            outcome,
            request_id=f"message-{message_id}",
            source=UsageRecord.Source.CONVERSATION,
            user_id=user_id,
            api_key_id=api_key_id,
            model_id=model.pk,
            model_name=model.name,
            message_id=message_id,
        )
    return written > 0


def reply_usage_enqueue(
    outcome: ReplyOutcome,
    *,
    request_id: str,
    source: str,
    user_id: int,
    api_key_id: int | None,
    model_id: int,
    model_name: str,
    message_id: int | None = None,
) -> None:
    """Queue the usage record of a finished reply on commit, if it consumed tokens (``should_account``).

    ``request_id`` keys the record, so a redelivered task writes nothing twice.
    """
    if not should_account(outcome):
        return
    usage_enqueue(
        request_id=request_id,
        user_id=user_id,
        api_key_id=api_key_id,
        model_id=model_id,
        model_name=model_name,
        message_id=message_id,
        source=source,
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        estimated=outcome.usage_estimated,
        finish_status=outcome.status,
    )


def new_request_id() -> str:
    """Return a fresh id for a reply that has no message (``/v1`` requests): ``chatcmpl-<hex>``."""
    return f"chatcmpl-{uuid.uuid4().hex}"


__all__ = [
    "COMPLETED",
    "conversation_create",
    "conversation_delete",
    "conversation_update",
    "new_request_id",
    "reply_finish",
    "reply_start",
    "reply_usage_enqueue",
    "should_account",
]
