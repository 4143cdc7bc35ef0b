"""Request validation and OpenAPI documentation of the stored chat completions endpoints.

The views build their bodies as plain dicts (``apis``); the output serializers only document them,
as ``llm.openai.chat_serializers`` does for ``POST /v1/chat/completions``. Shapes are OpenAI's
(``ChatCompletionList``, ``ChatCompletionMessageList``, ``ChatCompletionDeleted``).
"""

from __future__ import annotations

from rest_framework import serializers

from llm.openai.chat_serializers import ChatCompletionChoiceOutputSerializer, ChatCompletionOutputSerializer
from llm.openai.fields import MetadataField

from ..models import Message


class StoredCompletionUpdateInputSerializer(serializers.Serializer):
    """``{metadata}``: the stored completion's new metadata (null: none); required."""

    metadata = MetadataField(allow_null=True)


class StoredCompletionChoiceOutputSerializer(ChatCompletionChoiceOutputSerializer):
    """The choice of a stored completion: ``finish_reason`` null for a reply stopped or cut off before one came."""

    finish_reason = serializers.CharField(
        allow_null=True, help_text="stop, length, tool_calls or content_filter; null: stopped or cut off before any"
    )


class StoredCompletionOutputSerializer(ChatCompletionOutputSerializer):
    """A stored chat completion: a ``chat.completion`` with its ``metadata`` and ``status``."""

    # The metaclass moves declared fields out of the class body: this replaces the parent's field only.
    choices = StoredCompletionChoiceOutputSerializer(many=True)  # type: ignore[assignment]
    metadata = serializers.DictField(child=serializers.CharField(allow_blank=True))
    status = serializers.ChoiceField(
        choices=[Message.Status.COMPLETED, Message.Status.CANCELLED, Message.Status.FAILED],
        help_text=(
            "An extension: `cancelled` or `failed` when the reply was stopped or cut off (its text so far;"
            " its `finish_reason` null when it ended before the upstream sent one)."
        ),
    )


class StoredCompletionListOutputSerializer(serializers.Serializer):
    """A page of stored chat completions (OpenAI's ``ChatCompletionList``)."""

    object = serializers.ChoiceField(choices=["list"])
    data = StoredCompletionOutputSerializer(many=True)  # type: ignore[assignment]
    first_id = serializers.CharField(allow_blank=True, help_text='"" for an empty page')
    last_id = serializers.CharField(allow_blank=True, help_text='"" for an empty page')
    has_more = serializers.BooleanField()


class StoredCompletionMessageOutputSerializer(serializers.Serializer):
    """A request message of a stored completion; ``id`` is ``<completion_id>-<index>``."""

    id = serializers.CharField()
    role = serializers.ChoiceField(choices=Message.Role.values)
    content = serializers.CharField(allow_blank=True, help_text="its text (the text parts of a list, joined)")
    refusal = serializers.CharField(allow_null=True)
    content_parts = serializers.JSONField(allow_null=True, help_text="always null: the text is in content")
    tool_call_id = serializers.CharField(required=False, help_text="a tool message's: the id of the call it answers")


class StoredCompletionMessageListOutputSerializer(serializers.Serializer):
    """A page of a stored completion's messages (OpenAI's ``ChatCompletionMessageList``)."""

    object = serializers.ChoiceField(choices=["list"])
    data = StoredCompletionMessageOutputSerializer(many=True)  # type: ignore[assignment]
    first_id = serializers.CharField(allow_blank=True)
    last_id = serializers.CharField(allow_blank=True)
    has_more = serializers.BooleanField()


class StoredCompletionDeletedOutputSerializer(serializers.Serializer):
    """OpenAI's ``ChatCompletionDeleted``."""

    object = serializers.ChoiceField(choices=["chat.completion.deleted"])
    id = serializers.CharField()
    deleted = serializers.BooleanField()


__all__ = [
    "StoredCompletionChoiceOutputSerializer",
    "StoredCompletionDeletedOutputSerializer",
    "StoredCompletionListOutputSerializer",
    "StoredCompletionMessageListOutputSerializer",
    "StoredCompletionMessageOutputSerializer",
    "StoredCompletionOutputSerializer",
    "StoredCompletionUpdateInputSerializer",
]
