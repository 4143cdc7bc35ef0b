"""The one JSON parser of every request body and WebSocket frame: strict JSON, bounded depth.

``json_loads`` is used by DRF (``JSONParser``, the ``/api`` REST endpoints), by the plain async
views (``accounts.endpoints.parse_json``: ``/v1``, ``/dashboard``, the conversation send view)
and by the conversation WebSocket. It parses with orjson, which follows RFC 8259 strictly: no
``NaN``/``Infinity`` (Python's ``json`` accepts them, and they later fail to serialize), no lone
UTF-16 surrogates (PostgreSQL cannot store them), no trailing commas, and at most 1024 levels of
nesting (Python's ``json`` recursed until ``RecursionError``: a 500). On top of that a value may
nest at most ``MAX_JSON_DEPTH`` levels: deeper structures are never a legitimate chat request, and
the code that later walks them (DRF, ``json.dumps`` when a body is forwarded upstream) recurses.

Every failure is ``JSONParseError`` (a ``ValueError``) with a message fit for the client.
"""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework import parsers
from rest_framework.exceptions import ParseError

# Deepest nesting of arrays and objects accepted in a body (the body itself is level 1). A chat
# request is 4 levels deep (body, messages, message, content parts); JSON Schemas of tools go deeper.
MAX_JSON_DEPTH = 64

_NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")  # what Python's json would have accepted


class JSONParseError(ValueError):
    """A body or frame that is not acceptable JSON; ``str(error)`` is a message for the client."""


def json_loads(raw: bytes | str) -> Any:
    """Return the JSON value of ``raw`` (UTF-8 bytes or text).

    Raises ``JSONParseError`` for invalid JSON (RFC 8259: https://www.rfc-editor.org/rfc/rfc8259),
    ``NaN``/``Infinity``, invalid UTF-8 or lone surrogates, and nesting deeper than
    ``MAX_JSON_DEPTH``.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        if data[exc.pos : exc.pos + 9].startswith(_NON_FINITE) or data[max(exc.pos - 1, 0) :].startswith(b"-Inf"):
            raise JSONParseError(
                "NaN and Infinity are not valid JSON numbers (RFC 8259); send a finite number or null."
            ) from None
        if exc.msg.startswith("depth limit exceeded"):
            raise JSONParseError(_too_deep()) from None
        raise JSONParseError(f"Invalid JSON: {exc}.") from None
    if isinstance(value, dict | list) and _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise JSONParseError(_too_deep())
    return value


def _too_deep() -> str:
    return f"The JSON nests arrays and objects deeper than {MAX_JSON_DEPTH} levels."


def _nested_deeper_than(value: dict[str, Any] | list[Any], limit: int) -> bool:
    """Return whether ``value`` nests arrays/objects more than ``limit`` levels deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        stack.extend((child, depth + 1) for child in children if type(child) is dict or type(child) is list)
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser on ``json_loads``: the same strict rules on ``/api`` as on ``/v1``.

    Raises DRF's ``ParseError`` (400, code ``parse_error``) with ``json_loads``'s message.
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            return json_loads(raw)
        except JSONParseError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


__all__ = ["MAX_JSON_DEPTH", "JSONParseError", "JSONParser", "json_loads"]
