"""DRF serializers that validate and document ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

The request follows Anthropic's Messages API (https://docs.anthropic.com/en/api/messages). The
serializers check the top-level fields' JSON types and ranges, so a wrong type is a 400 whose
message starts with the field's name (``max_tokens: This field is required.``); the content
blocks inside ``system`` and ``messages`` are checked while they are translated
(``llm.anthropic.translate``), whose 400s name the block's path as Anthropic names it
(``messages.0.content.1.source``).

The response serializers at the end only document the bodies in OpenAPI: the view builds them
as plain dicts, on the per-token hot path (FIELD-NOTES, "DRF and async").
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..openai.fields import (
    JSONObjectField,
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
)

# JSON Schemas of the content blocks this server translates (``llm.anthropic.translate``); other
# keys of a block (``cache_control``, ``citations``) are allowed and ignored.
_TEXT_BLOCK = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_IMAGE_SOURCE = {
    "oneOf": [
        {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["base64"]},
                "media_type": {"type": "string", "enum": ["image/jpeg", "image/png", "image/gif", "image/webp"]},
                "data": {"type": "string", "minLength": 1},
            },
            "required": ["type", "media_type", "data"],
        },
        {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["url"]},
                "url": {"type": "string", "pattern": "^https?://"},
            },
            "required": ["type", "url"],
        },
    ]
}
_IMAGE_BLOCK = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["image"]}, "source": _IMAGE_SOURCE},
    "required": ["type", "source"],
}
_TOOL_RESULT_BLOCK = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["tool_result"]},
        "tool_use_id": {"type": "string", "minLength": 1},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]},
        "is_error": {"type": "boolean"},
    },
    "required": ["type", "tool_use_id"],
}
_TOOL_USE_BLOCK = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["tool_use"]},
        "id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "input": {"type": "object", "additionalProperties": True},
    },
    "required": ["type", "id", "name", "input"],
}
_THINKING_BLOCK = {
    "type": "object",
    "description": "Dropped: OpenAI-compatible upstreams take no reasoning back.",
    "properties": {"type": {"type": "string", "enum": ["thinking", "redacted_thinking"]}},
    "required": ["type"],
}
TEXT_BLOCKS_SCHEMA = {"type": "array", "items": _TEXT_BLOCK, "minItems": 1}
MESSAGE_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "properties": {
                "role": {"type": "string", "enum": ["user"]},
                "content": {
                    "oneOf": [
                        {"type": "string"},
                        {
                            "type": "array",
                            "items": {"oneOf": [_TEXT_BLOCK, _IMAGE_BLOCK, _TOOL_RESULT_BLOCK]},
                            "minItems": 1,
                        },
                    ]
                },
            },
            "required": ["role", "content"],
        },
        {
            "type": "object",
            "properties": {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": {
                    "oneOf": [
                        {"type": "string"},
                        {
                            "type": "array",
                            "items": {"oneOf": [_TEXT_BLOCK, _TOOL_USE_BLOCK, _THINKING_BLOCK]},
                            "minItems": 1,
                        },
                    ]
                },
            },
            "required": ["role", "content"],
        },
    ]
}


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}, "minItems": 1}]})
class ContentField(serializers.Field):
    """A message's ``content`` or the ``system`` prompt: a string or a list of content block objects.

    The blocks are checked by ``llm.anthropic.translate``; here only the JSON types.
    """

    default_error_messages = {
        "invalid": "Expected a string or a list of content blocks (objects with a 'type').",
        "empty": "Expected at least one content block.",
    }

    def to_internal_value(self, data: Any) -> str | list[dict[str, Any]]:
        if isinstance(data, str):
            return data
        if isinstance(data, list) and all(isinstance(block, dict) for block in data):
            if not data:
                self.fail("empty")
            return data
        self.fail("invalid")
        raise AssertionError  # unreachable: fail() raises  # pragma: no cover

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field({"oneOf": [{"type": "string"}, TEXT_BLOCKS_SCHEMA]})
class SystemField(ContentField):
    """The ``system`` prompt: a string or a list of ``text`` blocks."""


class AnthropicMessageInputSerializer(serializers.Serializer):
    """One turn of the conversation: ``role`` user or assistant, ``content`` a string or blocks.

    User turns take ``text``, ``image`` and ``tool_result`` blocks; assistant turns ``text``,
    ``tool_use`` and ``thinking`` (dropped) blocks.
    """

    role = serializers.ChoiceField(choices=("user", "assistant"))
    content = ContentField()


@extend_schema_field({"type": "array", "items": MESSAGE_SCHEMA, "minItems": 1})
class MessageListField(serializers.ListField):
    """``messages``: the turns so far, at least one (documented per role: ``MESSAGE_SCHEMA``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(child=AnthropicMessageInputSerializer(), min_length=1, **kwargs)


@extend_schema_field({"type": "string", "enum": ["custom", None], "nullable": True})  # 3.0.3: null listed too
class ToolTypeField(StrictCharField):
    """A tool's ``type``: ``custom`` or absent. Any string passes here so that the translation's 400
    names the tool (``tools.1.type``) and says why a server tool is refused."""


class AnthropicToolInputSerializer(serializers.Serializer):
    """A client tool: ``name``, ``description``, ``input_schema`` (a JSON Schema of its input object).

    Anthropic's server tools (``type`` such as ``web_search_20250305``) are refused by the translation.
    """

    type = ToolTypeField(required=False, allow_null=True)
    name = StrictCharField()
    description = StrictCharField(required=False, allow_blank=True)
    input_schema = JSONObjectField(required=False)


class AnthropicToolChoiceInputSerializer(serializers.Serializer):
    """``{"type": "auto" | "any" | "tool" | "none"}``; ``tool`` names the tool in ``name``."""

    type = serializers.ChoiceField(choices=("auto", "any", "tool", "none"))
    name = StrictCharField(required=False)
    disable_parallel_tool_use = StrictBooleanField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "tool" and not attrs.get("name"):
            raise serializers.ValidationError({"name": "A tool_choice of type 'tool' needs the tool's 'name'."})
        return attrs


class AnthropicThinkingInputSerializer(serializers.Serializer):
    """Extended thinking: ``{"type": "enabled", "budget_tokens": n}``, ``adaptive``, ``between_tools``
    or ``disabled``; ``display`` is accepted (thinking is always shown: there is no signature to keep)."""

    type = serializers.ChoiceField(choices=("enabled", "adaptive", "between_tools", "disabled"))
    budget_tokens = StrictIntegerField(required=False, min_value=1)
    display = serializers.ChoiceField(choices=("summarized", "omitted"), required=False, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["type"] == "enabled" and attrs.get("budget_tokens") is None:
            raise serializers.ValidationError({"budget_tokens": "Thinking of type 'enabled' needs 'budget_tokens'."})
        return attrs


class AnthropicOutputFormatInputSerializer(serializers.Serializer):
    """Structured output: ``{"type": "json_schema", "schema": {...}}``."""

    type = serializers.ChoiceField(choices=("json_schema",))
    schema = JSONObjectField()


class AnthropicOutputConfigInputSerializer(serializers.Serializer):
    """``effort`` (low, medium, high, xhigh, max) and ``format`` (a JSON schema the reply follows)."""

    effort = serializers.ChoiceField(choices=("low", "medium", "high", "xhigh", "max"), required=False, allow_null=True)
    format = AnthropicOutputFormatInputSerializer(required=False, allow_null=True)


class AnthropicMetadataInputSerializer(serializers.Serializer):
    """``user_id``: an opaque id of the end user (sent upstream as OpenAI's ``user``)."""

    user_id = StrictCharField(required=False, allow_null=True, allow_blank=True)


class MessageCountTokensInputSerializer(serializers.Serializer):
    """The body of ``POST /v1/messages/count_tokens``: the fields of a message request that are input."""

    model = StrictCharField(help_text="A model id from GET /v1/models.")
    messages = MessageListField()
    system = SystemField(required=False)
    tools = serializers.ListField(child=AnthropicToolInputSerializer(), required=False)
    tool_choice = AnthropicToolChoiceInputSerializer(required=False)
    thinking = AnthropicThinkingInputSerializer(required=False)
    output_config = AnthropicOutputConfigInputSerializer(required=False)
    # Accepted and ignored (``translate.IGNORED_FIELDS`` says why).
    cache_control = JSONObjectField(required=False, allow_null=True)
    speed = StrictCharField(required=False, allow_null=True)
    user_profile_id = StrictCharField(required=False)
    workspace_id = StrictCharField(required=False)


class MessageCreateInputSerializer(MessageCountTokensInputSerializer):
    """The body of ``POST /v1/messages`` (Anthropic's ``MessageCreateParams``).

    ``max_tokens`` is required, as Anthropic requires it. ``temperature``, ``top_p`` and ``top_k``
    (which SDK 2.x no longer sends, older clients do) are accepted; ``top_k`` is not sent upstream
    (OpenAI's API has no such field). Fields in ``translate.IGNORED_FIELDS`` are accepted and
    ignored; any other is a 400 (``translate.UNSUPPORTED_FIELDS`` says why for Anthropic's own).
    """

    max_tokens = StrictIntegerField(min_value=1)
    stream = StrictBooleanField(required=False, default=False)
    stop_sequences = serializers.ListField(child=StrictCharField(), required=False)
    temperature = StrictFloatField(required=False, min_value=0, max_value=1)
    top_p = StrictFloatField(required=False, min_value=0, max_value=1)
    top_k = StrictIntegerField(required=False, min_value=0)
    metadata = AnthropicMetadataInputSerializer(required=False)
    service_tier = StrictCharField(required=False)
    inference_geo = StrictCharField(required=False, allow_null=True)
    diagnostics = JSONObjectField(required=False, allow_null=True)


# --- Responses (documentation only) -----------------------------------------------------------


class AnthropicUsageOutputSerializer(serializers.Serializer):
    """Token counts of one reply: ``input_tokens`` (all of the prompt) and ``output_tokens``."""

    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_creation_input_tokens = serializers.IntegerField(allow_null=True)
    cache_read_input_tokens = serializers.IntegerField(allow_null=True)


class AnthropicContentBlockOutputSerializer(serializers.Serializer):
    """One block of the reply: ``text`` (``text``), ``thinking`` (``thinking``, ``signature``) or
    ``tool_use`` (``id``, ``name``, ``input``)."""

    type = serializers.ChoiceField(choices=("text", "thinking", "tool_use"))
    text = serializers.CharField(required=False)
    thinking = serializers.CharField(required=False)
    signature = serializers.CharField(required=False)
    id = serializers.CharField(required=False)
    name = serializers.CharField(required=False)
    input = serializers.DictField(required=False)


class AnthropicMessageOutputSerializer(serializers.Serializer):
    """The whole reply (Anthropic's ``Message``)."""

    id = serializers.CharField(help_text="`msg_...`; also the usage record's request id.")
    type = serializers.ChoiceField(choices=("message",))
    role = serializers.ChoiceField(choices=("assistant",))
    model = serializers.CharField()
    content = AnthropicContentBlockOutputSerializer(many=True)
    stop_reason = serializers.ChoiceField(
        choices=("end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"), allow_null=True
    )
    stop_sequence = serializers.CharField(allow_null=True)
    usage = AnthropicUsageOutputSerializer()


class MessageCountTokensOutputSerializer(serializers.Serializer):
    """The prompt's tokens by the model's tokenizer (``llm.tokens``)."""

    input_tokens = serializers.IntegerField()


class AnthropicModelListQuerySerializer(serializers.Serializer):
    """The query of Anthropic's ``GET /v1/models``: cursors (``after_id``, ``before_id``) and a page size.

    https://docs.anthropic.com/en/api/models-list. A cursor is a model ``id``; it need not name a
    model still listed: the page holds the ids after (or before) it in the list's order; with both,
    the ids between them, from ``after_id`` on.
    """

    after_id = serializers.CharField(required=False, help_text="the page of models right after this id")
    before_id = serializers.CharField(required=False, help_text="the page of models right before this id")
    limit = serializers.IntegerField(min_value=1, max_value=1000, default=20, help_text="models per page")


class AnthropicModelOutputSerializer(serializers.Serializer):
    """A model as Anthropic's ``GET /v1/models`` lists it (``ModelInfo``)."""

    type = serializers.ChoiceField(choices=("model",))
    id = serializers.CharField(help_text="the name clients send as `model`")
    display_name = serializers.CharField(help_text="the same name: models here have no other")
    created_at = serializers.DateTimeField(help_text="RFC 3339, UTC: when the model or alias was added here")
    lifecycle = serializers.ChoiceField(choices=("active",), help_text="always active: disabled models are not listed")
    max_input_tokens = serializers.IntegerField(help_text="the model's context window, tokens")
    max_tokens = serializers.IntegerField(
        allow_null=True, help_text="the most `max_tokens` may ask (the model's output cap); null when it has none"
    )


class AnthropicModelListOutputSerializer(serializers.Serializer):
    """Anthropic's ``GET /v1/models`` page."""

    # The metaclass moves declared fields out of the class body: this does not replace ``.data``.
    data = AnthropicModelOutputSerializer(many=True)  # type: ignore[assignment]
    has_more = serializers.BooleanField(help_text="whether more models follow in the direction of paging")
    first_id = serializers.CharField(allow_null=True, help_text="the first id of `data`: the page before's cursor")
    last_id = serializers.CharField(allow_null=True, help_text="the last id of `data`: the next page's cursor")


class AnthropicErrorDetailOutputSerializer(serializers.Serializer):
    type = serializers.CharField(help_text="e.g. invalid_request_error, authentication_error, rate_limit_error")
    message = serializers.CharField()


class AnthropicErrorOutputSerializer(serializers.Serializer):
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""

    type = serializers.ChoiceField(choices=("error",))
    error = AnthropicErrorDetailOutputSerializer()


__all__ = [
    "AnthropicErrorOutputSerializer",
    "AnthropicMessageOutputSerializer",
    "AnthropicModelListOutputSerializer",
    "AnthropicModelListQuerySerializer",
    "AnthropicModelOutputSerializer",
    "MessageCountTokensInputSerializer",
    "MessageCountTokensOutputSerializer",
    "MessageCreateInputSerializer",
]
