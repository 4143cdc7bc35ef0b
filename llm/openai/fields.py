"""Strict JSON-typed DRF fields for the OpenAI-compatible ``/v1`` request bodies.

DRF's own fields would take ``"0.5"`` for a number or ``1`` for a string; OpenAI answers 400 to
both, so these reject a wrong JSON type and the 400's ``param`` names the field. The union
fields (``content``, ``stop``, ``tool_choice``) carry their OpenAPI schema.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from chatbackend import fields as core_fields
from chatbackend.text import holds_nul

MAX_STOP_SEQUENCES = 4
# OpenAI's ``Metadata``: at most 16 pairs, keys up to 64 characters, values up to 512.
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512


# --- Strict JSON-typed fields -----------------------------------------------------------------


StrictBooleanField = core_fields.StrictBooleanField


class StrictCharField(core_fields.StrictCharField):
    """A JSON string, as sent: no trimming, numbers are not strings."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)


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

# One branch per rule ``MessageContentField`` checks: a text part needs a string ``text``, an
# image part an object ``image_url`` with a string ``url``; other types pass through to the upstream.
_CONTENT_PART_SCHEMA = {
    "description": "A content part: `{type: text, text}`, `{type: image_url, image_url: {url, detail?}}`, "
    "`{type: input_audio, input_audio}` or `{type: file, file}`.",
    "anyOf": [
        {
            "type": "object",
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
            "required": ["type", "text"],
        },
        {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["image_url"]},
                "image_url": {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string"},
                        "detail": {"type": "string", "description": "auto, low or high"},
                    },
                    "required": ["url"],
                },
            },
            "required": ["type", "image_url"],
        },
        {
            "type": "object",
            "properties": {"type": {"type": "string", "not": {"enum": ["text", "image_url"]}}},
            "required": ["type"],
        },
    ],
}


# A message's ``content`` (not null): the text, or an array of content parts.
CONTENT_SCHEMA = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART_SCHEMA}],
    "description": "The message text, or an array of content parts.",
}


@extend_schema_field({**CONTENT_SCHEMA, "nullable": True})
class MessageContentField(serializers.Field):
    """A message's ``content``: a string, or a list of content parts, each an object with ``type``.

    A ``text`` part needs a string ``text``; an ``image_url`` part an object with a string ``url``.
    Text with a NUL character is rejected, as DRF's ``CharField`` rejects it everywhere else.
    Other part types are passed through for the upstream to judge.
    """

    default_error_messages = {
        "invalid": "Must be a string or an array of content parts.",
        "invalid_part": "Each content part must be an object with a string 'type'.",
        "invalid_text": "A 'text' content part needs a string 'text'.",
        "invalid_image": "An 'image_url' content part needs an object 'image_url' with a string 'url' "
        "(and a string 'detail', if any).",
        # DRF's CharField wording (ProhibitNullCharactersValidator), as on every other text field.
        "null_characters_not_allowed": "Null characters are not allowed.",
    }

    def to_internal_value(self, data: Any) -> str | list[dict[str, Any]]:
        if isinstance(data, str):
            if holds_nul(data):
                self.fail("null_characters_not_allowed")
            return data
        if not isinstance(data, list):
            self.fail("invalid")
        for part in data:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                self.fail("invalid_part")
            kind = part["type"]
            if kind == "text" and not isinstance(part.get("text"), str):
                self.fail("invalid_text")
            if kind == "text" and holds_nul(part["text"]):
                self.fail("null_characters_not_allowed")
            if kind == "image_url":
                image = part.get("image_url")
                if not (
                    isinstance(image, dict)
                    and isinstance(image.get("url"), str)
                    and isinstance(image.get("detail", ""), str)
                ):
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

    default_error_messages = {
        "invalid": "Must be 'none', 'auto', 'required' or an object with a string 'type'.",
        "invalid_function": "'function' must be an object with a string 'name'.",
    }

    def to_internal_value(self, data: Any) -> str | dict[str, Any]:
        if isinstance(data, str) and data in ("none", "auto", "required"):
            return data
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            function = data.get("function", {"name": ""})
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                self.fail("invalid_function")
            return data
        self.fail("invalid")

    def to_representation(self, value: Any) -> Any:
        return value


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_MAX_CHARS},
        "maxProperties": METADATA_MAX_PAIRS,
        "description": "Up to 16 key/value strings (keys up to 64 characters, values up to 512).",
    }
)
class MetadataField(serializers.DictField):
    """OpenAI's ``metadata``: at most 16 string pairs, keys up to 64 characters, values up to 512.

    https://platform.openai.com/docs/api-reference/chat/create#chat-create-metadata
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", StrictCharField(allow_blank=True, max_length=METADATA_VALUE_MAX_CHARS))
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict[str, str]:
        value: dict[str, str] = super().to_internal_value(data)
        if len(value) > METADATA_MAX_PAIRS:
            raise serializers.ValidationError(f"At most {METADATA_MAX_PAIRS} key/value pairs are allowed.")
        for key in value:
            if len(key) > METADATA_KEY_MAX_CHARS:
                raise serializers.ValidationError(f"Keys are at most {METADATA_KEY_MAX_CHARS} characters long.")
            if holds_nul(key):  # as DRF refuses it in values: PostgreSQL cannot store it
                raise serializers.ValidationError(
                    "Null characters are not allowed.", code="null_characters_not_allowed"
                )
        return value


__all__ = [
    "CONTENT_SCHEMA",
    "MAX_STOP_SEQUENCES",
    "METADATA_MAX_PAIRS",
    "JSONObjectField",
    "MetadataField",
    "MessageContentField",
    "StopField",
    "StrictBooleanField",
    "StrictCharField",
    "StrictFloatField",
    "StrictIntegerField",
    "ToolChoiceField",
]
