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
from chatbackend.fields import ID_MAX, StrictBooleanField, StrictCharField
from chatbackend.text import holds_nul
from llm.openai.fields import StrictFloatField, StrictIntegerField

from .conversation_templates.models import PARAMETER_NAMES
from .conversation_templates.nextchat import PARAMETER_RANGES
from .models import Conversation, Message
from .selectors import message_sibling_ids
from .services import MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS

# "At least one character that is not whitespace", whitespace being Python's (``str.isspace``: what
# ``clean_message_content`` strips), spelled out as \u escapes: ``\S`` would mean another set in the
# regex dialect of JSON Schema (ECMA 262), which leaves out U+001C..U+001F and U+0085.
_WHITESPACE = "".join(char for char in map(chr, range(0x3001)) if char.isspace())
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(char):04x}" for char in _WHITESPACE) + "]"


class ConversationOutputSerializer(serializers.ModelSerializer):
    """A conversation; ``model`` is the model's public name (what clients send as ``model``);
    ``parameters`` and ``template`` come from the template it was made from, if any;
    ``completion_id`` the ``chatcmpl-...`` id of a stored chat completion (``store: true``), else null."""

    model = serializers.CharField(source="model.name", read_only=True)
    active_leaf = serializers.IntegerField(
        source="active_leaf_id",
        allow_null=True,
        read_only=True,
        help_text="The last message of the active branch (null: no message yet).",
    )
    archived = serializers.BooleanField(read_only=True, help_text="Archived: left out of the list by default.")

    parameters = serializers.DictField(
        read_only=True, help_text="OpenAI request fields sent with every reply (from a template; {}: none)."
    )
    template = serializers.IntegerField(
        source="template_id", allow_null=True, read_only=True, help_text="The template it was made from, if any."
    )

    class Meta:
        model = Conversation
        fields = [
            "id",
            "title",
            "model",
            "system_prompt",
            "parameters",
            "template",
            "active_leaf",
            "completion_id",
            "pinned",
            "archived",
            "archived_at",
            "deleted_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields
        extra_kwargs = {"deleted_at": {"help_text": "When it went to the trash (null: not in the trash)."}}


class ConversationSearchResultOutputSerializer(ConversationOutputSerializer):
    """A conversation found by a search, with its ``rank`` and best matching message."""

    rank = serializers.FloatField(source="search_rank", read_only=True, help_text="Higher is a better match.")
    message_id = serializers.IntegerField(
        source="search_message_id",
        allow_null=True,
        read_only=True,
        help_text="The best matching message (null: only the title matched).",
    )
    snippet = serializers.SerializerMethodField(
        help_text="Plain text of that message around the first query word found in it (null: title match)."
    )

    class Meta(ConversationOutputSerializer.Meta):
        fields = [*ConversationOutputSerializer.Meta.fields, "rank", "message_id", "snippet"]
        read_only_fields = fields

    def get_snippet(self, conversation: Conversation) -> str | None:
        return self.context.get("snippets", {}).get(getattr(conversation, "search_message_id", None))


def parameter_field(name: str) -> serializers.Field:
    """Return the input field of parameter ``name`` (``PARAMETER_RANGES``): a JSON number in its range, or null."""
    low, high, integer = PARAMETER_RANGES[name]
    if integer:
        return StrictIntegerField(
            min_value=int(low),
            max_value=int(high),
            allow_null=True,
            required=False,
            default=None,
            help_text="null: the default",
        )
    return StrictFloatField(
        min_value=low, max_value=high, allow_null=True, required=False, default=None, help_text="null: the default"
    )


class ConversationParametersSerializer(serializers.Serializer):
    """A conversation's ``parameters``: OpenAI request fields sent with every reply, each in the range
    a template takes (null or absent: the model's default). Other keys are ignored."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {name: parameter_field(name) for name in PARAMETER_NAMES}

    def to_internal_value(self, data: Any) -> dict[str, float | int]:
        values = super().to_internal_value(data)
        return {name: value for name, value in values.items() if value is not None}


class ConversationCreateInputSerializer(serializers.Serializer):
    """``{model, title?, system_prompt?}``; ``model`` must name an enabled model."""

    model = StrictCharField(max_length=200)
    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, required=False, default="")
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, required=False, default="", trim_whitespace=False
    )


class ConversationUpdateInputSerializer(serializers.Serializer):
    """Any of ``{title, system_prompt, model, active_leaf, pinned, archived, parameters}``; fields left out stay."""

    model = StrictCharField(max_length=200, required=False)
    title = StrictCharField(max_length=MAX_TITLE_CHARS, allow_blank=True, required=False)
    system_prompt = StrictCharField(
        max_length=MAX_SYSTEM_PROMPT_CHARS, allow_blank=True, required=False, trim_whitespace=False
    )
    active_leaf = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=ID_MAX,
        help_text="Switch branches: the id of a message of this conversation, which becomes the last "
        "message of the active branch (the next message follows it).",
    )
    pinned = StrictBooleanField(required=False, help_text="Pin (true) or unpin: pinned ones list first.")
    archived = StrictBooleanField(
        required=False, help_text="Archive (true) or unarchive: archived ones leave the default list."
    )
    parameters = ConversationParametersSerializer(
        required=False,
        help_text="Replaces the OpenAI request fields sent with every reply (`temperature`, `top_p`, "
        "`max_tokens`, `presence_penalty`, `frequency_penalty`; null or absent: the model's default; {}: none).",
    )


class MessageOutputSerializer(serializers.ModelSerializer):
    """A message (``docs/api.md``, "Message"); times in milliseconds, ``model`` the model's name.

    ``sibling_ids``: the messages with the same parent, itself included, ascending (a UI's "2/3").
    Read from ``context["sibling_ids"]`` (``selectors.message_sibling_ids``, one query for a page),
    else queried for this message alone.
    """

    model = serializers.CharField(source="model_name", read_only=True)
    parent_id = serializers.IntegerField(
        allow_null=True, read_only=True, help_text="The message this one follows (null: a first message)."
    )
    sibling_ids = serializers.SerializerMethodField(
        help_text="Ids of the messages sharing this one's parent (edits, regenerations), itself included, ascending."
    )
    context_dropped = serializers.IntegerField(
        read_only=True,
        help_text="A reply's branch did not fit the model's context window: how many of its oldest messages "
        "were left out of the request (0: the whole branch was sent).",
    )
    context_dropped_through = serializers.IntegerField(
        allow_null=True,
        read_only=True,
        help_text="The id of the newest message left out of the reply's request (every message of the branch "
        "up to it was); null when none was.",
    )

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
            "parent_id",
            "sibling_ids",
            "context_dropped",
            "context_dropped_through",
        ]
        read_only_fields = fields

    def get_sibling_ids(self, message: Message) -> list[int]:
        known = self.context.get("sibling_ids")
        if known is not None and message.pk in known:
            return list(known[message.pk])
        return message_sibling_ids(messages=[message])[message.pk]


class MessageTreeNodeOutputSerializer(serializers.Serializer):
    """One message of the tree, without its content."""

    id = serializers.IntegerField()
    parent_id = serializers.IntegerField(allow_null=True)
    role = serializers.ChoiceField(choices=Message.Role.choices)
    status = serializers.ChoiceField(choices=Message.Status.choices)
    created_at = serializers.DateTimeField()


class MessageTreeOutputSerializer(serializers.Serializer):
    """A conversation's whole message tree, in id order (so a parent comes before its children)."""

    active_leaf = serializers.IntegerField(allow_null=True, help_text="The last message of the active branch.")
    messages = MessageTreeNodeOutputSerializer(many=True)


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
    if holds_nul(value):
        raise ApplicationError("Null characters are not allowed.", code="null_characters_not_allowed", param="content")
    return value


def message_data(*message_ids: int) -> list[dict[str, Any] | None]:
    """Return the messages ``message_ids`` as the API shows them, JSON-ready, in the order given.

    ``None`` for a message that no longer exists (its conversation was deleted meanwhile). Sync
    (two queries: the messages, their siblings); for the streaming interfaces, which report
    messages they have just written for the caller, so no visibility check is repeated here.
    """
    messages = Message.objects.in_bulk(message_ids)
    context = {"sibling_ids": message_sibling_ids(messages=messages.values())}
    return [
        dict(MessageOutputSerializer(messages[pk], context=context).data) if pk in messages else None
        for pk in message_ids
    ]
