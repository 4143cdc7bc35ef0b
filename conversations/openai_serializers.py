"""DRF serializers that validate and document the OpenAI-compatible ``/v1`` request bodies.

The request follows OpenAI's ``CreateChatCompletionRequest``
(https://platform.openai.com/docs/api-reference/chat/create). Fields are strict about JSON
types (DRF's own fields would take ``"0.5"`` for a number or ``1`` for a string; OpenAI answers
400 to both), so a wrong type is a 400 whose ``param`` names the field.

The response serializers at the end only document the bodies in OpenAPI: the views build those
bodies as plain dicts, since they sit on the per-token hot path (FIELD-NOTES, "DRF and async").
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4


# --- Strict JSON-typed fields -----------------------------------------------------------------


class StrictCharField(serializers.CharField):
    """A JSON string, as sent: no trimming, numbers are not strings."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number: strings and booleans are rejected."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: strings, booleans and fractions are rejected."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean: ``"true"`` and ``1`` are rejected."""

    def to_internal_value(self, data: Any) -> bool:
        if data is not True and data is not False:
            self.fail("invalid")
        return data


class JSONObjectField(serializers.DictField):
    """A JSON object passed through as it is (JSON Schemas, metadata, ...)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", serializers.JSONField())
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.fail("not_a_dict", input_type=type(data).__name__)
        return data  # untouched: nested values are the upstream's business


# --- Content, stop, tool_choice: unions of JSON types -----------------------------------------

_CONTENT_PART_SCHEMA = {
    "type": "object",
    "description": "A content part: `{type: text, text}`, `{type: image_url, image_url: {url, detail?}}`, "
    "`{type: input_audio, input_audio}` or `{type: file, file}`.",
    "properties": {
        "type": {"type": "string", "example": "text"},
        "text": {"type": "string"},
        "image_url": {
            "type": "object",
            "properties": {"url": {"type": "string"}, "detail": {"type": "string", "enum": ["auto", "low", "high"]}},
            "required": ["url"],
        },
    },
    "required": ["type"],
    "additionalProperties": True,
}


@extend_schema_field(
    {
        "oneOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART_SCHEMA}],
        "nullable": True,
        "description": "The message text, or an array of content parts.",
    }
)
class MessageContentField(serializers.Field):
    """A message's ``content``: a string, or a list of content parts, each an object with ``type``.

    A ``text`` part needs a string ``text``; an ``image_url`` part an object with a string ``url``.
    Other part types are passed through for the upstream to judge.
    """

    default_error_messages = {
        "invalid": "Must be a string or an array of content parts.",
        "invalid_part": "Each content part must be an object with a string 'type'.",
        "invalid_text": "A 'text' content part needs a string 'text'.",
        "invalid_image": "An 'image_url' content part needs an object 'image_url' with a string 'url'.",
    }

    def to_internal_value(self, data: Any) -> str | list[dict[str, Any]]:
        if isinstance(data, str):
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        for part in data:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                self.fail("invalid_part")
            kind = part["type"]
            if kind == "text" and not isinstance(part.get("text"), str):
                self.fail("invalid_text")
            if kind == "image_url":
                image = part.get("image_url")
                if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                    self.fail("invalid_image")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES}],
        "nullable": True,
        "description": f"Up to {MAX_STOP_SEQUENCES} sequences where the upstream stops generating.",
    }
)
class StopField(serializers.Field):
    """``stop``: a string or a list of up to four strings."""

    default_error_messages = {"invalid": f"Must be a string or an array of at most {MAX_STOP_SEQUENCES} strings."}

    def to_internal_value(self, data: Any) -> str | list[str]:
        if isinstance(data, str):
            return data
        if isinstance(data, list) and len(data) <= MAX_STOP_SEQUENCES and all(isinstance(item, str) for item in data):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "example": "function"},
                    "function": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
                },
                "required": ["type"],
            },
        ],
        "description": "`none`, `auto`, `required`, or `{type: function, function: {name}}`.",
    }
)
class ToolChoiceField(serializers.Field):
    """``tool_choice``: ``none`` / ``auto`` / ``required``, or an object naming a tool."""

    default_error_messages = {"invalid": "Must be 'none', 'auto', 'required' or an object with a string 'type'."}

    def to_internal_value(self, data: Any) -> str | dict[str, Any]:
        if data in ("none", "auto", "required"):
            return data
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


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
    name = StrictCharField(required=False)
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
                if not (
                    type(message) is dict
                    and message.get("role") in _PLAIN_MESSAGE_ROLES
                    and type(message.get("content")) is str
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


class ChatCompletionResponseFormatInputSerializer(serializers.Serializer):
    """``response_format``: ``{type: text | json_object | json_schema, json_schema?}``."""

    type = serializers.ChoiceField(choices=("text", "json_object", "json_schema"))
    json_schema = JSONObjectField(required=False)


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
    n = StrictIntegerField(required=False, allow_null=True, help_text="Only 1 is supported.")
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
    metadata = serializers.DictField(child=StrictCharField(allow_blank=True), required=False, allow_null=True)
    store = StrictBooleanField(required=False, allow_null=True)
    service_tier = StrictCharField(required=False, allow_null=True)

    def validate_n(self, value: int | None) -> int | None:
        if value not in (None, 1):
            raise serializers.ValidationError("Only n=1 is supported.", code="unsupported_value")
        return value


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


class OpenAIModelOutputSerializer(serializers.Serializer):
    """A model as ``/v1/models`` lists it (OpenAI's ``Model``)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=("model",))
    created = serializers.IntegerField(help_text="Unix time, seconds")
    owned_by = serializers.CharField(help_text="the provider's name")


class OpenAIModelListOutputSerializer(serializers.Serializer):
    """``GET /v1/models`` (OpenAI's ``ListModelsResponse``)."""

    object = serializers.ChoiceField(choices=("list",))
    # The metaclass moves declared fields out of the class body: this does not replace ``.data``.
    data = OpenAIModelOutputSerializer(many=True)  # type: ignore[assignment]


class BillingUsageQuerySerializer(serializers.Serializer):
    """The query of ``GET /dashboard/billing/usage``: a UTC date range, end exclusive."""

    start_date = serializers.DateField(input_formats=["%Y-%m-%d"], help_text="YYYY-MM-DD, inclusive")
    end_date = serializers.DateField(input_formats=["%Y-%m-%d"], help_text="YYYY-MM-DD, exclusive")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["end_date"] < attrs["start_date"]:
            raise serializers.ValidationError({"end_date": "Must not be before start_date."})
        return attrs


class BillingUsageOutputSerializer(serializers.Serializer):
    """The caller's spending in the range, as NextChat reads it."""

    object = serializers.ChoiceField(choices=("list",))
    total_usage = serializers.FloatField(help_text="US cents")


class BillingSubscriptionOutputSerializer(serializers.Serializer):
    """The caller's spending limit, as NextChat reads it (``hard_limit_usd``)."""

    object = serializers.ChoiceField(choices=("billing_subscription",))
    has_payment_method = serializers.BooleanField()
    hard_limit_usd = serializers.FloatField()
    soft_limit_usd = serializers.FloatField()
    system_hard_limit_usd = serializers.FloatField()
    access_until = serializers.IntegerField(help_text="Unix time, seconds; 0: no end")


__all__ = [
    "BillingSubscriptionOutputSerializer",
    "BillingUsageOutputSerializer",
    "BillingUsageQuerySerializer",
    "ChatCompletionChunkOutputSerializer",
    "ChatCompletionCreateInputSerializer",
    "ChatCompletionOutputSerializer",
    "OpenAIModelListOutputSerializer",
    "OpenAIModelOutputSerializer",
]
