"""What the conversation streams (SSE and WebSocket) tell their client about a reply.

Both interfaces send the same ``reply.start`` payload and, at the end, the assistant message as
``MessageOutputSerializer`` shows it (``docs/api.md``, "Message"). That message is built here
from what the reply wrote (``reply.outcome``) and what ``reply_start`` knew (``plan.info``),
not read back from the database: no query and no worker thread hop at the end of a reply.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from rest_framework import serializers

from .serializers import MessageOutputSerializer
from .streaming import Reply, ReplyOutcome, ReplyPlan

# The ``plan.info`` keys sent in ``reply.start``; ``reply_start`` also puts the assistant message's
# ``created_at`` there, for ``reply_message_data``.
START_KEYS = ("conversation_id", "user_message_id", "message_id", "model")
_WRITTEN = "message_written"  # set in ``plan.info`` by ``track_message``'s finish


def reply_start_data(info: dict[str, Any]) -> dict[str, Any]:
    """Return the ``reply.start`` payload: ``conversation_id``, ``user_message_id``, ``message_id``, ``model``."""
    return {key: info[key] for key in START_KEYS}


def track_message(plan: ReplyPlan) -> ReplyPlan:
    """Make ``plan`` note whether its end found the assistant message to write; return ``plan``.

    ``reply_finish`` returns False when the message is gone (its conversation was deleted while
    the reply streamed); ``reply_message_data`` then reports ``None``, as a read-back would.
    """
    finish, info = plan.finish, plan.info

    def finish_and_note(outcome: ReplyOutcome) -> None:
        info[_WRITTEN] = finish(outcome)

    plan.finish = finish_and_note
    return plan


@cache
def _created_at_field() -> serializers.Field:
    # The serializer's own field, so ``created_at`` is formatted exactly as the API shows it.
    return MessageOutputSerializer().fields["created_at"]


def reply_message_data(reply: Reply) -> dict[str, Any] | None:
    """Return the assistant message of an ended ``reply`` as ``MessageOutputSerializer`` shows it.

    ``None`` when the message no longer exists. ``reply.plan`` must come from ``reply_start``
    through ``track_message``, and the reply must have ended (``reply.outcome`` set).
    """
    outcome = reply.outcome
    info = reply.plan.info
    assert outcome is not None  # noqa: S101
    if not info.get(_WRITTEN):
        return None
    # The same values, in the same field order, that ``reply_finish`` wrote and the serializer reads.
    return {
        "id": info["message_id"],
        "role": "assistant",
        "content": outcome.content,
        "status": outcome.status,
        "model": info["model"],
        "finish_reason": outcome.finish_reason or "",
        "prompt_tokens": outcome.usage.prompt_tokens,
        "completion_tokens": outcome.usage.completion_tokens,
        "time_to_first_token_ms": outcome.time_to_first_token_ms,
        "duration_ms": outcome.duration_ms,
        "error": outcome.error.message if outcome.error else "",
        "created_at": _created_at_field().to_representation(info["created_at"]),
    }


__all__ = ["START_KEYS", "reply_message_data", "reply_start_data", "track_message"]
