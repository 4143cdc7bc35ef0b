"""The one JSON parser of every request body and WebSocket frame: strict JSON, bounded depth and size.

``json_loads`` is used by DRF (``JSONParser``, the ``/api`` REST endpoints), by the plain async
views (``accounts.endpoints.parse_json``: ``/v1``, ``/dashboard``, the conversation send view)
and by the conversation WebSocket. It parses with orjson, which follows RFC 8259 strictly: no
``NaN``/``Infinity`` (Python's ``json`` accepts them, and they later fail to serialize), no lone
UTF-16 surrogates (PostgreSQL cannot store them), no trailing commas, and at most 1024 levels of
nesting (Python's ``json`` recursed until ``RecursionError``: a 500). On top of that a value may
nest at most ``MAX_JSON_DEPTH`` levels: deeper structures are never a legitimate chat request, and
the code that later walks them (DRF, ``json.dumps`` when a body is forwarded upstream) recurses.

Every failure is ``JSONParseError`` (a ``ValueError``) with a message fit for the client.

Size: ``read_body`` reads a body bounded by a ``BodyLimit``; DRF's ``JSONParser`` below reads every
``/api`` REST body with it: ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (413 ``request_too_large``, what the
plain async views answer through Django's ``HttpRequest.body``), or the view's own
``request_body_limit`` (``POST /api/conversations/import/``: ``SYNC_MAX_DOCUMENT_BYTES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from django.conf import settings
from rest_framework import parsers, renderers
from rest_framework.exceptions import ParseError

from .errors import ApplicationError, request_too_large_error

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


# How a null character comes in a JSON body: JSON has no other way to write one in a string.
_ESCAPED_NULL = b"\\u0000"


def null_character_path(value: Any, raw: bytes | None = None) -> str | None:
    """Return where parsed JSON ``value`` holds a null character (U+0000, which PostgreSQL's text and
    ``jsonb`` cannot store): the path of the first string holding one (``messages[0].content``), or
    of the object whose key holds one (``""`` for ``value`` itself); None when there is none.

    ``raw``: the body ``value`` was parsed from, when at hand: a body without the escape ``\\u0000``
    holds no null character, and is not walked. Iterative (no recursion), in document order.
    """
    if raw is not None and _ESCAPED_NULL not in raw:
        return None
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if type(node) is str:
            if "\x00" in node:
                return path
        elif type(node) is dict:
            children = []
            for key, child in node.items():
                if "\x00" in key:
                    return path
                children.append((child, f"{path}.{key}" if path else key))
            stack.extend(reversed(children))
        elif type(node) is list:
            stack.extend(reversed([(child, f"{path}[{index}]") for index, child in enumerate(node)]))
    return None


class Readable(Protocol):
    """A body to read: Django's ``HttpRequest`` (its ``read``), a file."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes of a request body an endpoint reads, and its answer to a larger one.

    ``setting``: the name of the setting holding the limit, in bytes; read on each request (so
    ``override_settings`` applies). Its value ``None`` means no limit, as Django's
    ``DATA_UPLOAD_MAX_MEMORY_SIZE = None`` does.
    ``error``: the 413 ``ApplicationError`` for a larger body, given its declared size in bytes
    (``Content-Length``) when that was already too large, else None.
    """

    setting: str
    error: Callable[[int | None], ApplicationError]

    @property
    def max_bytes(self) -> int | None:
        """Return the limit in bytes (None: no limit)."""
        value: int | None = getattr(settings, self.setting)
        return value


# Every body not limited otherwise: Django's own limit, with the plain async views' 413.
DEFAULT_BODY_LIMIT = BodyLimit("DATA_UPLOAD_MAX_MEMORY_SIZE", request_too_large_error)


def read_body(stream: Readable | None, *, content_length: str | int | None, limit: BodyLimit) -> bytes:
    """Return the body in ``stream``, reading at most ``limit.max_bytes`` + 1 bytes of it.

    ``content_length``: the request's ``Content-Length`` (``META["CONTENT_LENGTH"]``), if any; a
    declared size over the limit is refused before anything is read. The read itself stops one
    byte past the limit, so a chunked body (no ``Content-Length``) or an understated one (under
    ASGI the server hands Django the whole body, whatever the header said) is refused without
    being read whole into memory: how Django's ``HttpRequest.body`` bounds its read.

    Raises ``limit.error(...)`` (an ``ApplicationError``, 413) for a body over the limit.
    """
    if stream is None:
        return b""
    max_bytes = limit.max_bytes
    if max_bytes is None:
        return stream.read()
    try:
        declared = int(content_length or 0)
    except ValueError:  # not a number: no declared size (servers reject it before us)
        declared = 0
    if declared > max_bytes:
        raise limit.error(declared)
    raw = stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise limit.error(None)
    return raw


class JSONParser(parsers.BaseParser):
    """DRF's JSON parser on ``json_loads`` and ``read_body``: the same strict rules and size limit on
    ``/api`` as on ``/v1``.

    A view may set ``request_body_limit`` (a ``BodyLimit``) to take larger bodies than
    ``DATA_UPLOAD_MAX_MEMORY_SIZE``; the conversation import does. Not a subclass of DRF's
    ``JSONParser``: DRF 3.18 hands that one ``request.body``, which Django caps at
    ``DATA_UPLOAD_MAX_MEMORY_SIZE`` whatever the view allows; this one gets the request stream.

    Raises ``ApplicationError`` 413 (``request_too_large``, or the view's limit's code) for a body
    too large, DRF's ``ParseError`` (400, code ``parse_error``) with ``json_loads``'s message for
    one that is not acceptable JSON.
    """

    media_type = "application/json"
    renderer_class = renderers.JSONRenderer  # what the browsable API's raw-data form renders

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        context = parser_context or {}
        limit = getattr(context.get("view"), "request_body_limit", None) or DEFAULT_BODY_LIMIT
        request = context.get("request")
        meta = request.META if request is not None else {}
        # DRF's own reading of the header (rest_framework.request.Request._load_stream).
        content_length = meta.get("CONTENT_LENGTH", meta.get("HTTP_CONTENT_LENGTH"))
        raw = read_body(stream, content_length=content_length, limit=limit)
        try:
            return json_loads(raw)
        except JSONParseError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


__all__ = [
    "DEFAULT_BODY_LIMIT",
    "MAX_JSON_DEPTH",
    "BodyLimit",
    "JSONParseError",
    "JSONParser",
    "Readable",
    "json_loads",
    "null_character_path",
    "read_body",
]
