"""Anthropic's ``output_config`` and JSON values, as the simulator checks and writes them.

Spec: https://platform.claude.com/docs/en/build-with-claude/structured-outputs (``output_config.format``,
"JSON Schema limitations") and the anthropic SDK's ``OutputConfigParam`` (``effort``: ``low``,
``medium``, ``high``, ``xhigh``, ``max``; ``format``: ``{"type": "json_schema", "schema": {...}}``).

``output_schema`` returns the schema a reply must follow, or raises ``InvalidOutputConfig`` with
Anthropic's 400 message for what it refuses: a field ``output_config`` does not have, an unknown
``effort``, a ``format`` that is not ``json_schema`` with a ``schema`` object, an object schema
(``type`` ``object``, or ``properties`` without a ``type``) that does not set ``additionalProperties``
to false ("For 'object' type, 'additionalProperties' must be explicitly set to false", or "...
'additionalProperties: true' is not supported" for another value), and the keywords Anthropic
lists as not supported (``UNSUPPORTED_KEYWORDS``, a ``minItems`` other than 0 or 1).

``schema_value`` is the JSON value the simulator writes for a schema (a structured reply, or a
tool's input): an object holds one value per property (a string property gets a reply word, an
integer or number its position, a boolean ``true``, an array ``[]`` or one item when ``minItems``
is 1, an object its own values, ``null`` for ``null``); ``enum`` and ``const`` give their first
value, ``anyOf`` / ``oneOf`` / ``allOf`` their first schema, ``$ref`` its ``$defs`` entry. An open
object (``type`` ``object`` with no ``properties`` and ``additionalProperties`` not false) gets
``{"reply": <the reply's words>}``, as a model asked for "any JSON object" writes its answer in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .replies import WORDS

__all__ = ["EFFORTS", "UNSUPPORTED_KEYWORDS", "InvalidOutputConfig", "output_schema", "schema_value"]

EFFORTS = ("low", "medium", "high", "xhigh", "max")
UNSUPPORTED_KEYWORDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "maxItems",
    "minProperties",
    "maxProperties",
)
_SUBSCHEMA = ("items", "not", "additionalProperties", "contains", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_MAX_DEPTH = 16  # schema_value stops there (a recursive $ref)


class InvalidOutputConfig(Exception):
    """``output_config`` Anthropic would refuse with 400; the message is Anthropic's (``field: problem``)."""


def output_schema(output_config: Any) -> dict[str, Any] | None:
    """Return ``output_config.format.schema`` (None without one); raise ``InvalidOutputConfig`` as Anthropic would."""
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise InvalidOutputConfig("output_config: Input should be a valid dictionary")
    for name in output_config:
        if name not in ("effort", "format"):
            raise InvalidOutputConfig(f"output_config.{name}: Extra inputs are not permitted")
    effort = output_config.get("effort")
    if effort is not None and effort not in EFFORTS:
        choices = ", ".join(f"'{value}'" for value in EFFORTS)
        raise InvalidOutputConfig(f"output_config.effort: Input should be {choices}")
    output_format = output_config.get("format")
    if output_format is None:
        return None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        raise InvalidOutputConfig("output_config.format.type: Input should be 'json_schema'")
    schema = output_format.get("schema")
    if not isinstance(schema, dict):
        raise InvalidOutputConfig("output_config.format.schema: Field required")
    _check(schema, "output_config.format.schema")
    return schema


def _is_object(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return (
        kind == "object" or (isinstance(kind, list) and "object" in kind) or (kind is None and "properties" in schema)
    )


def _check(schema: Mapping[str, Any], where: str) -> None:
    if _is_object(schema):
        if "additionalProperties" not in schema:
            raise InvalidOutputConfig(
                f"{where}: For 'object' type, 'additionalProperties' must be explicitly set to false"
            )
        if schema["additionalProperties"] is not False:
            raise InvalidOutputConfig(
                f"{where}: For 'object' type, 'additionalProperties: {str(schema['additionalProperties']).lower()}' "
                "is not supported. Please set 'additionalProperties' to false"
            )
    for keyword in UNSUPPORTED_KEYWORDS:
        if keyword in schema:
            raise InvalidOutputConfig(f"{where}: The '{keyword}' keyword is not supported")
    if schema.get("minItems", 0) not in (0, 1):
        raise InvalidOutputConfig(f"{where}: 'minItems' values other than 0 or 1 are not supported")
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                if isinstance(sub, dict):
                    _check(sub, f"{where}.{key}.{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for position, sub in enumerate(value):
                if isinstance(sub, dict):
                    _check(sub, f"{where}.{key}.{position}")
        elif key in _SUBSCHEMA and isinstance(value, dict):
            _check(value, f"{where}.{key}")


def schema_value(schema: Any, indexes: Sequence[int], *, root: Mapping[str, Any] | None = None, at: int = 0) -> Any:
    """Return the JSON value the simulator writes for ``schema`` (module docstring).

    ``indexes``: the reply's word indexes (``replies.reply_word_indexes``); ``at``: the value's
    position among its object's properties; ``root``: the schema ``$ref`` resolves in.
    """
    return _value(schema, indexes, root if root is not None else schema, at, 0)


def _word(indexes: Sequence[int], at: int) -> str:
    return WORDS[indexes[at % len(indexes)]] if indexes else "word"


def _value(schema: Any, indexes: Sequence[int], root: Any, at: int, depth: int) -> Any:  # noqa: PLR0911 - one per schema kind
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, Mapping):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return _value(target, indexes, root, at, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _value(schema[key][0], indexes, root, at, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {} if schema.get("additionalProperties") is False else {"reply": " ".join(WORDS[i] for i in indexes)}
        return {
            name: _value(sub, indexes, root, position, depth + 1)
            for position, (name, sub) in enumerate(properties.items())
        }
    if kind == "array":
        return [_value(schema.get("items"), indexes, root, at, depth + 1)] if schema.get("minItems") == 1 else []
    if kind in ("integer", "number"):
        return at
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _word(indexes, at)
