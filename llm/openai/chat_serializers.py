"""DRF serializers that validate and document ``POST /v1/chat/completions``.

The request follows OpenAI's ``CreateChatCompletionRequest``
(https://platform.openai.com/docs/api-reference/chat/create). Fields are strict about JSON
types (``.fields``), so a wrong type is a 400 whose ``param`` names the field.

The response serializers at the end only document the bodies in OpenAPI: the view builds those
bodies as plain dicts, since they sit on the per-token hot path (FIELD-NOTES, "DRF and async").
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .fields import (
    CONTENT_SCHEMA,
    JSONObjectField,
    MessageContentField,
    MetadataField,
    StopField,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    ToolChoiceField,
)

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


# --- Messages and tools -----------------------------------------------------------------------


class ChatCompletionFunctionCallInputSerializer(serializers.Serializer):
    """A function call the assistant made: its ``name`` and JSON-encoded ``arguments``."""

    name = StrictCharField()
    arguments = StrictCharField(allow_blank=True)


class ChatCompletionToolCallInputSerializer(serializers.Serializer):
    """One entry of an assistant message's ``tool_calls``."""

    id = StrictCharField()
    type = StrictCharField(help_text="`function`")
    function = ChatCompletionFunctionCallInputSerializer()


class ChatCompletionMessageInputSerializer(serializers.Serializer):
    """One message of the conversation so far (OpenAI's ``ChatCompletionRequestMessage``).

    ``content`` is required except on an assistant message that carries ``tool_calls``;
    a ``tool`` message needs the ``tool_call_id`` it answers.
    """

    role = serializers.ChoiceField(choices=MESSAGE_ROLES)
    content = MessageContentField(required=False, allow_null=True)
    name = StrictCharField(required=False, allow_blank=True)  # blank allowed, as on the fast path below
    tool_calls = serializers.ListField(child=ChatCompletionToolCallInputSerializer(), required=False)
    tool_call_id = StrictCharField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        role = attrs["role"]
        if attrs.get("content") is None and not (role == "assistant" and attrs.get("tool_calls")):
            raise serializers.ValidationError({"content": "This field is required for this role."}, code="required")
        if role == "tool" and not attrs.get("tool_call_id"):
            raise serializers.ValidationError({"tool_call_id": "A tool message needs the tool_call_id it answers."})
        return attrs


_PLAIN_MESSAGE_ROLES = frozenset(("system", "developer", "user", "assistant"))
_PLAIN_MESSAGE_KEYS = frozenset(("role", "content", "name"))


_NAME_SCHEMA = {"type": "string", "description": "An optional name for the participant."}
_TOOL_CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1, "description": "`function`"},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1}, "arguments": {"type": "string"}},
            "required": ["name", "arguments"],
        },
    },
    "required": ["id", "type", "function"],
}


def _message_schema(roles: tuple[str, ...], properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"role": {"type": "string", "enum": list(roles)}, **properties},
        "required": ["role", *required],
    }


# OpenAI's ``ChatCompletionRequestMessage``, one branch per role, so the schema holds the rules of
# ``ChatCompletionMessageInputSerializer.validate``: content is required (not null) except on an
# assistant message with non-empty ``tool_calls``; a tool message needs ``tool_call_id``. anyOf,
# not oneOf: an assistant message with both content and tool calls matches both of its branches.
_MESSAGES_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "description": "The conversation so far, oldest first.",
    "items": {
        "anyOf": [
            _message_schema(
                ("system", "developer", "user"), {"content": CONTENT_SCHEMA, "name": _NAME_SCHEMA}, ["content"]
            ),
            _message_schema(
                ("assistant",),
                {
                    "content": CONTENT_SCHEMA,
                    "name": _NAME_SCHEMA,
                    "tool_calls": {"type": "array", "items": _TOOL_CALL_SCHEMA},
                },
                ["content"],
            ),
            _message_schema(
                ("assistant",),
                {
                    "content": {**CONTENT_SCHEMA, "nullable": True},
                    "name": _NAME_SCHEMA,
                    "tool_calls": {"type": "array", "items": _TOOL_CALL_SCHEMA, "minItems": 1},
                },
                ["tool_calls"],
            ),
            _message_schema(
                ("tool",),
                {"content": CONTENT_SCHEMA, "tool_call_id": {"type": "string", "minLength": 1}},
                ["content", "tool_call_id"],
            ),
        ]
    },
}


@extend_schema_field(_MESSAGES_SCHEMA)
class ChatCompletionMessageListField(serializers.ListField):
    """``messages``: a non-empty list of ``ChatCompletionMessageInputSerializer`` objects.

    A NextChat request carries the whole conversation each time, so messages are checked on a
    fast path when they are plain ``{role, content: str, name?: str}`` objects (what the nested
    serializer would accept unchanged, ~0.3 µs instead of ~11 µs each); any other message goes
    through the serializer, which also writes the error messages.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", ChatCompletionMessageInputSerializer())
        kwargs.setdefault("allow_empty", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[Any]:
        if type(data) is list and data:
            for message in data:
                # ``role`` may be any JSON value (``{}`` is unhashable: test its type first); a
                # NUL character in ``content`` is left to the serializer, which rejects it.
                if type(message) is not dict:
                    break
                role, content = message.get("role"), message.get("content")
                if not (
                    type(role) is str
                    and role in _PLAIN_MESSAGE_ROLES
                    and type(content) is str
                    and "\x00" not in content
                    and message.keys() <= _PLAIN_MESSAGE_KEYS
                    and type(message.get("name", "")) is str
                ):
                    break
            else:
                return data
        return super().to_internal_value(data)


class ChatCompletionFunctionDefinitionInputSerializer(serializers.Serializer):
    """A function the model may call: ``name``, ``description``, JSON Schema ``parameters``."""

    name = StrictCharField()
    description = StrictCharField(required=False, allow_blank=True)
    parameters = JSONObjectField(required=False)
    strict = StrictBooleanField(required=False, allow_null=True)


class ChatCompletionToolInputSerializer(serializers.Serializer):
    """A tool the model may call. ``function`` is required when ``type`` is ``function``."""

    type = StrictCharField(help_text="`function` (or `custom`)")
    function = ChatCompletionFunctionDefinitionInputSerializer(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "function" and "function" not in attrs:
            raise serializers.ValidationError({"function": "This field is required."}, code="required")
        return attrs


class ChatCompletionStreamOptionsInputSerializer(serializers.Serializer):
    """``stream_options``: ``include_usage`` adds a last chunk with the reply's ``usage``."""

    include_usage = StrictBooleanField(required=False)
    include_obfuscation = StrictBooleanField(required=False)


# OpenAI's ResponseFormatJsonSchema.json_schema.name: "a-z, A-Z, 0-9, or underscores and dashes, max 64".
_JSON_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ChatCompletionResponseFormatInputSerializer(serializers.Serializer):
    """``response_format``: ``{type: text | json_object | json_schema, json_schema?}``.

    With ``json_schema``, ``json_schema`` is required, with a ``name`` (letters, digits, ``_``,
    ``-``; at most 64), and its ``schema``, when given, is an object (OpenAI's ``ResponseFormatJsonSchema``).
    """

    # Checked here so every provider kind gets the same 400, not a JSON reply without the schema
    # (Gemini's JSON mode) or an upstream's own wording.

    type = serializers.ChoiceField(choices=("text", "json_object", "json_schema"))
    json_schema = JSONObjectField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] != "json_schema":
            return attrs
        json_schema = attrs.get("json_schema")
        if json_schema is None:
            raise serializers.ValidationError(
                {"json_schema": "This field is required when type is 'json_schema'."}, code="required"
            )
        name = json_schema.get("name")
        if not isinstance(name, str) or not _JSON_SCHEMA_NAME.fullmatch(name):
            raise serializers.ValidationError(
                {"json_schema": {"name": "A name of 1 to 64 letters, digits, '_' or '-' is required."}}, code="invalid"
            )
        if "schema" in json_schema and not isinstance(json_schema["schema"], dict):
            raise serializers.ValidationError({"json_schema": {"schema": "Must be a JSON object."}}, code="invalid")
        return attrs


# --- The request ------------------------------------------------------------------------------


class ChatCompletionCreateInputSerializer(serializers.Serializer):
    """The body of ``POST /v1/chat/completions`` (OpenAI's ``CreateChatCompletionRequest``).

    Only ``n`` = 1 is supported. Fields not listed here are passed through to the upstream as
    they are (provider extensions such as vLLM's ``top_k``); ``stream`` and ``stream_options``
    are ours, never the upstream's.
    """

    model = StrictCharField(help_text="A model id from GET /v1/models.")
    messages = ChatCompletionMessageListField(min_length=1)
    stream = StrictBooleanField(required=False, allow_null=True, default=False)
    stream_options = ChatCompletionStreamOptionsInputSerializer(required=False, allow_null=True)
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    n = StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=1,  # in the schema too (minimum = maximum = 1): other values are a 400
        error_messages={"min_value": "Only n=1 is supported.", "max_value": "Only n=1 is supported."},
        help_text="Only 1 is supported.",
    )
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    stop = StopField(required=False, allow_null=True)
    presence_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    frequency_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    seed = StrictIntegerField(required=False, allow_null=True)
    tools = serializers.ListField(child=ChatCompletionToolInputSerializer(), required=False)
    tool_choice = ToolChoiceField(required=False)
    parallel_tool_calls = StrictBooleanField(required=False)
    response_format = ChatCompletionResponseFormatInputSerializer(required=False)
    user = StrictCharField(required=False, allow_blank=True)
    logit_bias = serializers.DictField(
        child=StrictIntegerField(min_value=-100, max_value=100), required=False, allow_null=True
    )
    logprobs = StrictBooleanField(required=False, allow_null=True)
    top_logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=20)
    reasoning_effort = StrictCharField(required=False, allow_null=True, help_text="e.g. low, medium, high")
    metadata = MetadataField(
        required=False, allow_null=True, help_text="Kept with a stored completion (`store: true`); not sent upstream."
    )
    store = StrictBooleanField(
        required=False,
        allow_null=True,
        help_text="true: keep this completion, readable at GET /v1/chat/completions; not sent upstream.",
    )
    service_tier = StrictCharField(required=False, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # OpenAI's rule (CreateChatCompletionRequest.top_logprobs: "logprobs must be set to true if
        # this parameter is used"), stated in the schema by chatbackend.schema.document_request_rules.
        if attrs.get("top_logprobs") is not None and attrs.get("logprobs") is not True:
            raise serializers.ValidationError(
                {"top_logprobs": "'logprobs' must be true when 'top_logprobs' is set."}, code="invalid"
            )
        return attrs


# --- Responses (documentation only) -----------------------------------------------------------


class ChatCompletionUsageOutputSerializer(serializers.Serializer):
    """Token counts of one reply (OpenAI's ``CompletionUsage``)."""

    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class ChatCompletionFunctionCallOutputSerializer(serializers.Serializer):
    """A function the model called: ``name`` and JSON-encoded ``arguments``."""

    name = serializers.CharField()
    arguments = serializers.CharField()


class ChatCompletionToolCallOutputSerializer(serializers.Serializer):
    """One tool call of the assistant's message."""

    id = serializers.CharField()
    type = serializers.CharField(help_text="`function`")
    function = ChatCompletionFunctionCallOutputSerializer()


class ChatCompletionMessageOutputSerializer(serializers.Serializer):
    """The assistant's message in a ``chat.completion``."""

    role = serializers.ChoiceField(choices=("assistant",))
    content = serializers.CharField(allow_null=True)
    refusal = serializers.CharField(allow_null=True)
    reasoning_content = serializers.CharField(required=False, help_text="the model's thinking, when it sends any")
    tool_calls = ChatCompletionToolCallOutputSerializer(many=True, required=False)


class ChatCompletionChoiceOutputSerializer(serializers.Serializer):
    """The one choice of a ``chat.completion``."""

    index = serializers.IntegerField()
    message = ChatCompletionMessageOutputSerializer()
    logprobs = serializers.JSONField(allow_null=True)
    finish_reason = serializers.CharField(help_text="stop, length, tool_calls or content_filter")


class ChatCompletionOutputSerializer(serializers.Serializer):
    """A non-streamed reply (OpenAI's ``CreateChatCompletionResponse``)."""

    id = serializers.CharField(help_text="chatcmpl-...")
    object = serializers.ChoiceField(choices=("chat.completion",))
    created = serializers.IntegerField(help_text="Unix time, seconds")
    model = serializers.CharField()
    choices = ChatCompletionChoiceOutputSerializer(many=True)
    usage = ChatCompletionUsageOutputSerializer()


class ChatCompletionChunkDeltaOutputSerializer(serializers.Serializer):
    """What one chunk adds to the reply."""

    role = serializers.ChoiceField(choices=("assistant",), required=False, help_text="first chunk only")
    content = serializers.CharField(required=False)
    reasoning_content = serializers.CharField(required=False)
    tool_calls = serializers.ListField(child=serializers.JSONField(), required=False)


class ChatCompletionChunkChoiceOutputSerializer(serializers.Serializer):
    """The one choice of a ``chat.completion.chunk``."""

    index = serializers.IntegerField()
    delta = ChatCompletionChunkDeltaOutputSerializer()
    logprobs = serializers.JSONField(allow_null=True)
    finish_reason = serializers.CharField(allow_null=True)


@extend_schema_field(
    {
        # "The usage object or null": OpenAPI 3.0 cannot make a $ref nullable (``nullable`` beside an
        # ``allOf`` does not apply inside it), so null is its own branch.
        "oneOf": [{"$ref": "#/components/schemas/ChatCompletionUsageOutput"}, {"enum": [None], "nullable": True}],
        "description": "null on every chunk but the last, which has choices [] (include_usage only)",
    }
)
class ChatCompletionChunkUsageField(serializers.JSONField):
    """``usage`` of a chunk: the ``ChatCompletionUsageOutputSerializer`` object, or null."""


class ChatCompletionChunkOutputSerializer(serializers.Serializer):
    """The JSON of one ``data:`` line of a streamed reply (OpenAI's ``CreateChatCompletionStreamResponse``).

    ``choices`` is empty and ``usage`` set on the last chunk, sent only when the request had
    ``stream_options.include_usage``; ``data: [DONE]`` follows. A failure after the first chunk
    is sent as a ``data:`` line holding an error body, and the stream ends.
    """

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=("chat.completion.chunk",))
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = ChatCompletionChunkChoiceOutputSerializer(many=True)
    usage = ChatCompletionChunkUsageField(required=False, help_text="only with stream_options.include_usage")


__all__ = [
    "MESSAGE_ROLES",
    "ChatCompletionChunkOutputSerializer",
    "ChatCompletionCreateInputSerializer",
    "ChatCompletionOutputSerializer",
]
