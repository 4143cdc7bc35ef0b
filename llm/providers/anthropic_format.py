"""OpenAI's ``response_format`` on Anthropic's Messages API: structured outputs, or one forced tool.

OpenAI's two JSON modes (https://platform.openai.com/docs/api-reference/chat/create, ``response_format``)
have no Messages field of that name. ``anthropic.messages_body`` translates them with this module:

- ``json_schema`` with a ``schema`` → ``output_config: {"format": {"type": "json_schema", "schema":
  ...}}``, Anthropic's structured outputs
  (https://platform.claude.com/docs/en/build-with-claude/structured-outputs; ``OutputConfigParam``
  and ``JSONOutputFormatParam`` in the anthropic SDK): the model's text is decoded to fit the
  schema, and streams back as text, with thinking and tools as usual. Anthropic takes a subset of
  JSON Schema, so ``output_schema`` adapts the client's schema as Anthropic's own SDK adapts one
  (``transform_schema`` in ``anthropic.lib._parse``): every object schema that does not say gets
  ``additionalProperties: false`` (Anthropic requires it written out; OpenAI's strict mode means
  it), and the constraints Anthropic refuses (``UNSUPPORTED_KEYWORDS``, ``minItems`` above 1) move
  into that schema's ``description``, which the model still reads (they are no longer enforced).
  An explicit ``additionalProperties`` other than false (an open map) is sent as it is: Anthropic's
  400 tells the client, where closing it would silently answer ``{}``. ``name``, ``description``
  and ``strict`` have no equivalent (the output is always constrained). A model without structured
  outputs (``capabilities.structured_outputs`` in Anthropic's Models API) answers Anthropic's 400,
  passed through.
- ``json_object``, and ``json_schema`` without a ``schema`` → structured outputs cannot say "any
  JSON object" (every object must be closed), so the reply is forced through one tool,
  ``json_tool``: ``input_schema`` ``{"type": "object"}``, whose input (a JSON object, as OpenAI's
  JSON mode promises) the adapter hands on as the message ``content``, streamed fragment by
  fragment, ending with ``stop``. ``json_tool_choice`` says how it is forced. Anthropic counts the
  tool's input as output tokens and the tool definition as input tokens, so usage stays the
  provider's. An assistant prefill (``{``) is not used: Claude 4.6 and later refuse prefills.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "JSON_TOOL_NAME",
    "UNSUPPORTED_KEYWORDS",
    "json_tool",
    "json_tool_choice",
    "output_format",
    "output_schema",
    "wants_json_object",
]

JSON_TOOL_NAME = "json_reply"
_JSON_TOOL_DESCRIPTION = "Give your whole reply to the user as this tool's input: one JSON object."
# JSON Schema constraints Anthropic's structured outputs refuse (its "JSON Schema limitations";
# ``minItems`` is taken when 0 or 1). They go into the description, as Anthropic's SDK puts them.
UNSUPPORTED_KEYWORDS = frozenset(
    (
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
)
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = frozenset(("items", "not", "additionalProperties", "contains", "if", "then", "else"))
_SUBSCHEMA_LISTS = frozenset(("anyOf", "allOf", "oneOf", "prefixItems"))
_SUBSCHEMA_MAPS = frozenset(("properties", "patternProperties", "$defs", "definitions"))


def output_format(response_format: Any) -> dict[str, Any] | None:
    """Return ``output_config.format`` for a ``json_schema`` ``response_format`` with a schema, else None."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(schema, Mapping):
        return None
    return {"type": "json_schema", "schema": output_schema(schema)}


def wants_json_object(response_format: Any) -> bool:
    """Whether ``response_format`` asks for any JSON object: ``json_object``, or ``json_schema`` without a schema."""
    if not isinstance(response_format, Mapping):
        return False
    kind = response_format.get("type")
    return kind == "json_object" or (kind == "json_schema" and output_format(response_format) is None)


def output_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of the JSON Schema ``schema`` that Anthropic's structured outputs take (module docstring).

    Object schemas (``type`` ``object``, or ``properties`` without a ``type``) that do not set
    ``additionalProperties`` get ``false``; ``UNSUPPORTED_KEYWORDS`` and a ``minItems`` above 1 are
    removed and appended to the ``description`` as ``{minimum: 1, maxLength: 40}``.
    """
    converted: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            converted[key] = {name: _subschema(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            converted[key] = [_subschema(sub) for sub in value]
        elif key in _SUBSCHEMA and isinstance(value, Mapping):
            converted[key] = output_schema(value)
        elif key in UNSUPPORTED_KEYWORDS or (key == "minItems" and value not in (0, 1)):
            moved[key] = value
        else:
            converted[key] = value
    kind = schema.get("type")
    if (
        kind == "object" or (isinstance(kind, list) and "object" in kind) or (kind is None and "properties" in schema)
    ) and ("additionalProperties" not in converted):
        converted["additionalProperties"] = False
    if moved:
        note = "{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in moved.items()) + "}"
        description = converted.get("description")
        converted["description"] = f"{description}\n\n{note}" if isinstance(description, str) and description else note
    return converted


def _subschema(value: Any) -> Any:
    return output_schema(value) if isinstance(value, Mapping) else value


def json_tool(tool_names: Iterable[str]) -> dict[str, Any]:
    """Return the tool that carries a JSON-object reply, named ``JSON_TOOL_NAME`` unless a client tool has that name
    (then with underscores appended until it is unique)."""
    taken = set(tool_names)
    name = JSON_TOOL_NAME
    while name in taken:
        name += "_"
    return {"name": name, "description": _JSON_TOOL_DESCRIPTION, "input_schema": {"type": "object"}}


def json_tool_choice(client_choice: Mapping[str, Any] | None, name: str, *, client_tools: bool) -> dict[str, Any]:
    """Return Anthropic's ``tool_choice`` forcing a reply through the JSON tool ``name``.

    ``client_choice``: Anthropic's translation of the client's ``tool_choice`` (None when not sent),
    which is ``auto`` or ``none`` (a forced client tool needs no JSON tool: the caller does not add
    one). With client tools the model may call (``auto``), ``any`` tool: one of the client's (a
    tool call, as OpenAI's JSON mode allows) or the JSON tool (the reply); otherwise the JSON tool
    by name. ``disable_parallel_tool_use`` is kept.
    """
    choice: dict[str, Any]
    if client_tools and (client_choice is None or client_choice["type"] == "auto"):
        choice = {"type": "any"}
    else:
        choice = {"type": "tool", "name": name}
    if client_choice is not None and client_choice.get("disable_parallel_tool_use"):
        choice["disable_parallel_tool_use"] = True
    return choice
