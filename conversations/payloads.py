"""What the conversation streams (SSE and WebSocket) tell their client about a reply.

Both interfaces send the same events with the same payloads (``docs/api.md``, "SSE events" and
"WebSocket frames"); only the framing differs. ``reply_event`` turns one engine event
(``llm.streaming``) into ``(name, payload)``. The final message is built from what the reply
wrote (``reply.outcome``) and what ``reply_start`` knew (the plan), not read back from the
database: no query and no worker-thread hop at the end of a reply.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from rest_framework import serializers

from chatbackend.errors import ApplicationError
from llm.streaming import STARTED, Reply, ReplyDelta, ReplyDone, ReplyEvent, ReplyFailed

from .serializers import MessageOutputSerializer
from .services import ConversationReplyPlan, conversation_deleted_error

ConversationReply = Reply[ConversationReplyPlan]


def reply_event(reply: ConversationReply, event: ReplyEvent) -> tuple[str, dict[str, Any]] | None:
    """Return ``(event name, payload)`` of ``event`` for a conversation client, or None to send nothing.

    - ``reply.start``: ``{conversation_id, user_message_id, message_id, model}`` (the model asked
      for: sent before the upstream answers, so before any fallback could serve);
    - ``reply.delta``: ``{content}`` plus ``reasoning_content`` when the model sends it (the
      chunks of one ``ReplyDelta`` joined into one delta); a refusal (an OpenAI-compatible model
      declining, ``ChatChunk.refusal``) is ``content``: a conversation shows what the model said,
      and keeps it as the message's text (``ReplyOutcome.text``);
    - ``reply.done``: ``{message}`` (the assistant message; its ``model`` is the one that served);
    - ``error``: the error object plus ``message``; when the conversation was deleted while the
      reply streamed, the ``conversation_deleted`` error (404) and ``message`` None.
    Keep-alives are the interface's business (None here).
    """
    if type(event) is ReplyDelta:
        return delta_payload(event)
    if event is STARTED:
        plan = reply.plan
        return "reply.start", {
            "conversation_id": plan.conversation_id,
            "user_message_id": plan.user_message_id,
            "message_id": plan.message_id,
            "model": plan.model_name,
        }
    if type(event) is ReplyDone or type(event) is ReplyFailed:
        if not reply.plan.message_written:  # its conversation was deleted while it streamed
            return error_payload(conversation_deleted_error())
        if type(event) is ReplyFailed:
            return error_payload(event.error, reply_message_data(reply))
        return "reply.done", {"message": reply_message_data(reply)}
    return None


def error_payload(error: ApplicationError, message: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Return the ``error`` event: the error object (``{"error": {...}}``) plus ``message`` (or None)."""
    return "error", {**error.as_dict(), "message": message}


def delta_payload(event: ReplyDelta) -> tuple[str, dict[str, Any]] | None:
    """Return the ``reply.delta`` of ``event``'s chunks, or None when they carry no text."""
    chunks = event.chunks
    if len(chunks) == 1:
        content, reasoning = chunks[0].content or chunks[0].refusal, chunks[0].reasoning_content
    else:
        content = "".join(chunk.content or chunk.refusal for chunk in chunks)
        reasoning = "".join(chunk.reasoning_content for chunk in chunks)
    if reasoning:
        return "reply.delta", {"content": content, "reasoning_content": reasoning}
    if content:
        return "reply.delta", {"content": content}
    return None


@cache
def _created_at_field() -> serializers.Field:
    # The serializer's own field, so ``created_at`` is formatted exactly as the API shows it.
    return MessageOutputSerializer().fields["created_at"]


def reply_message_data(reply: ConversationReply) -> dict[str, Any] | None:
    """Return the assistant message of an ended ``reply`` as ``MessageOutputSerializer`` shows it.

    ``None`` when the message no longer exists (its conversation was deleted meanwhile).
    """
    outcome, plan = reply.outcome, reply.plan
    assert outcome is not None  # noqa: S101 - the reply has ended
    if not plan.message_written:
        return None
    # The same values, in the same field order, that ``reply_finish`` wrote and the serializer reads.
    return {
        "id": plan.message_id,
        "role": "assistant",
        "content": outcome.text,
        "status": outcome.status.value,
        "model": outcome.model_name,
        "finish_reason": outcome.finish_reason or "",
        "prompt_tokens": outcome.usage.prompt_tokens,
        "completion_tokens": outcome.usage.completion_tokens,
        "time_to_first_token_ms": outcome.time_to_first_token_ms,
        "duration_ms": outcome.duration_ms,
        "error": outcome.error.message if outcome.error else "",
        "error_code": outcome.error.code if outcome.error else "",
        "created_at": _created_at_field().to_representation(plan.created_at),
        "parent_id": plan.user_message_id,
        "sibling_ids": list(plan.sibling_ids),  # as they were when the reply started
        "context_dropped": plan.context_dropped,
        "context_dropped_through": plan.context_dropped_through,
    }


__all__ = ["ConversationReply", "delta_payload", "error_payload", "reply_event", "reply_message_data"]
