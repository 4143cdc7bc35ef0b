"""Request and response shapes of the conversations API (``docs/api.md``, "Conversations").

Input serializers parse and validate; output serializers shape. None of them saves: views hand
validated data to ``conversations.services``. Names are unique project-wide so OpenAPI
components never collide. Errors are documented with ``accounts.serializers.ErrorOutputSerializer``.
"""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from chatbackend.errors import ApplicationError
from chatbackend.fields import StrictCharField

from .models import Conversation, Message
from .services import MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS

# "At least one character that is not whitespace", whitespace being Python's (``str.isspace``: what
# ``clean_message_content`` strips), spelled out as \u escapes: ``\S`` would mean another set in the
# regex dialect of JSON Schema (ECMA 262), which leaves out U+001C..U+001F and U+0085.
_WHITESPACE = "".join(char for char in map(chr, range(0x3001)) if char.isspace())
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(char):04x}" for char in _WHITESPACE) + "]"


class ConversationOutputSerializer(serializers.ModelSerializer):
    """A conversation; ``model`` is the model's public name (what clients send as ``model``);
    ``completion_id`` the ``chatcmpl-...`` id of a stored chat completion (``store: true``), else null."""

    model = serializers.CharField(source="model.name", read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "title", "model", "system_prompt", "completion_id", "created_at", "updated_at"]
        read_only_fields = fields


class ConversationCreateInputSerializer(serializers.Serializer):
    """``{model, title?, system_prompt?}``; ``model`` must name an enabled model."""

    model = StrictCharField(max_length=200)
    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, required=False, default="")
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, required=False, default="", trim_whitespace=False
    )


class ConversationUpdateInputSerializer(serializers.Serializer):
    """Any of ``{title, system_prompt, model}``; fields left out stay as they are."""

    model = StrictCharField(max_length=200, required=False)
    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, required=False)
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, required=False, trim_whitespace=False
    )


class MessageOutputSerializer(serializers.ModelSerializer):
    """A message (``docs/api.md``, "Message"); times in milliseconds, ``model`` the model's name."""

    model = serializers.CharField(source="model_name", read_only=True)

    class Meta:
        model = Message
        fields = [
            "id",
            "role",
            "content",
            "status",
            "model",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "time_to_first_token_ms",
            "duration_ms",
            "error",
            "error_code",
            "created_at",
        ]
        read_only_fields = fields


class MessageSendInputSerializer(serializers.Serializer):
    """``{content}``: the user's message (documentation; the async send view parses it itself)."""

    content = StrictCharField(
        max_length=MAX_MESSAGE_CHARS, trim_whitespace=False, validators=[RegexValidator(NOT_BLANK_PATTERN)]
    )


class MessageSendOutputSerializer(serializers.Serializer):
    """The answer to a non-streamed send: both messages, the reply finished."""

    user_message = MessageOutputSerializer()
    assistant_message = MessageOutputSerializer()


class MessageStopOutputSerializer(serializers.Serializer):
    """The answer to a stop request: the reply asked to stop (it ends ``cancelled`` shortly)."""

    message_id = serializers.IntegerField()
    status = serializers.CharField(help_text="always 'stopping'")


def clean_message_content(value: Any) -> str:
    """Return ``value`` if it is a non-empty string (whitespace alone is empty) without NUL characters.

    Raises ``ApplicationError`` (400, ``param`` ``content``) otherwise. Stricter than a DRF
    ``CharField``, which would turn a number into text.
    """
    if not isinstance(value, str):
        raise ApplicationError("'content' must be a string.", code="invalid_type", param="content")
    if not value.strip():
        raise ApplicationError("Message content must be a non-empty string.", code="empty_message", param="content")
    if "\x00" in value:
        raise ApplicationError("Null characters are not allowed.", code="null_characters_not_allowed", param="content")
    return value


def message_data(*message_ids: int) -> list[dict[str, Any] | None]:
    """Return the messages ``message_ids`` as the API shows them, JSON-ready, in the order given.

    ``None`` for a message that no longer exists (its conversation was deleted meanwhile). Sync
    (one query); for the streaming interfaces, which report messages they have just written for
    the caller, so no visibility check is repeated here.
    """
    messages = Message.objects.in_bulk(message_ids)
    return [dict(MessageOutputSerializer(messages[pk]).data) if pk in messages else None for pk in message_ids]
