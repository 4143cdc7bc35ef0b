"""The export document's shape, which is also what the import validates (``docs/api.md``, "Export and import").

One definition for both directions, so that whatever an export writes an import reads back.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from chatbackend.fields import ID_MAX, StrictCharField
from llm.openai.fields import MetadataField, StrictBooleanField

from ..models import Message
from ..serializers import ConversationOutputSerializer, ConversationParametersSerializer
from ..services import MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS
from .selectors import FORMAT, FORMAT_VERSION

_COUNT_MAX = 2**31 - 1  # PostgreSQL integer: a token count
# The most conversations one document holds, and messages one conversation.
MAX_CONVERSATIONS = 10_000
MAX_MESSAGES = 100_000


class TransferMessageSerializer(serializers.Serializer):
    """One message: its id in the document and its parent's (null: a first message)."""

    id = serializers.IntegerField(min_value=1, max_value=ID_MAX)
    parent_id = serializers.IntegerField(allow_null=True, min_value=1, max_value=ID_MAX)
    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = StrictCharField(allow_blank=True, trim_whitespace=False)
    status = serializers.ChoiceField(
        choices=Message.Status.choices,
        default=Message.Status.COMPLETED,
        help_text="An import keeps it, except `streaming`, which becomes `cancelled` (nothing streams it).",
    )
    model = StrictCharField(max_length=200, allow_blank=True, default="", help_text="The model that wrote it.")
    finish_reason = StrictCharField(max_length=32, allow_blank=True, default="")
    prompt_tokens = serializers.IntegerField(allow_null=True, default=None, min_value=0, max_value=_COUNT_MAX)
    completion_tokens = serializers.IntegerField(allow_null=True, default=None, min_value=0, max_value=_COUNT_MAX)
    time_to_first_token_ms = serializers.FloatField(allow_null=True, default=None, min_value=0)
    duration_ms = serializers.FloatField(allow_null=True, default=None, min_value=0)
    error = StrictCharField(allow_blank=True, default="", trim_whitespace=False)
    error_code = StrictCharField(max_length=64, allow_blank=True, default="")
    created_at = serializers.DateTimeField(required=False, help_text="Kept by an import (default: now).")
    updated_at = serializers.DateTimeField(required=False)


class TransferConversationSerializer(serializers.Serializer):
    """One conversation and its whole message tree."""

    id = serializers.IntegerField(required=False, help_text="Its id where it was exported (an import makes a new one).")
    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, default="")
    model = StrictCharField(
        max_length=200,
        help_text="The model's name. An import uses it when the caller may use it, else the first model the "
        "caller may use by name (the response's `models_replaced` says so).",
    )
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, default="", trim_whitespace=False
    )
    metadata = MetadataField(default=dict)
    parameters = ConversationParametersSerializer(
        default=dict,
        help_text="OpenAI request fields sent with every reply (`temperature`, `top_p`, `max_tokens`, "
        "`presence_penalty`, `frequency_penalty`; from a template). Absent: none.",
    )
    pinned = StrictBooleanField(default=False, help_text="Pinned: listed first. Absent: false.")
    archived_at = serializers.DateTimeField(
        allow_null=True, default=None, help_text="When it was archived (null or absent: not archived)."
    )
    active_leaf = serializers.IntegerField(
        allow_null=True,
        default=None,
        help_text="The id of the last message of the active branch (null with messages: the last message).",
        min_value=1,
        max_value=ID_MAX,
    )
    created_at = serializers.DateTimeField(required=False)
    updated_at = serializers.DateTimeField(required=False)
    messages = TransferMessageSerializer(many=True, max_length=MAX_MESSAGES)  # type: ignore[call-arg]


class TransferDocumentSerializer(serializers.Serializer):
    """The export document: ``{format, format_version, exported_at, conversations}``."""

    format = serializers.ChoiceField(choices=[FORMAT], help_text=f"Always `{FORMAT}`.")
    format_version = serializers.ChoiceField(
        choices=[FORMAT_VERSION], help_text="The document's version: 1 (an import refuses others)."
    )
    exported_at = serializers.DateTimeField(required=False)
    conversations = TransferConversationSerializer(many=True, max_length=MAX_CONVERSATIONS)  # type: ignore[call-arg]


class NextChatBackupInputSerializer(serializers.Serializer):
    """NextChat's ``backup.json``: its app state, ``{"chat-next-web-store": {"sessions": [{id, topic,
    mask: {modelConfig: {model}, context}, messages: [{id, role, content, date, model?}]}]}, ...}``.
    Documentation only: the import reads it as ``conversations.sync`` reads a synced document."""

    chat_next_web_store = serializers.DictField(help_text="NextChat's chat store: `{sessions: [...]}`.")

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        fields["chat-next-web-store"] = fields.pop("chat_next_web_store")  # its name is no identifier
        return fields


class ModelReplacedOutputSerializer(serializers.Serializer):
    """A model name of the document that the caller may not use, and the model used instead."""

    requested = serializers.CharField()
    model = serializers.CharField()


class ImportOutputSerializer(serializers.Serializer):
    """What an import made: the document's kind and the conversations (new ones; NextChat's updated
    when imported before)."""

    imported_from = serializers.ChoiceField(
        choices=["chatbackend", "nextchat"], help_text="The document's kind: this server's export, or NextChat's."
    )
    conversations = ConversationOutputSerializer(many=True)
    models_replaced = ModelReplacedOutputSerializer(many=True)
    templates_imported = serializers.IntegerField(
        help_text="How many of NextChat's masks (its mask-store) were made or updated as templates (0 for this "
        "server's export)."
    )
