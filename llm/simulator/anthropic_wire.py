"""Anthropic's Messages API, as the simulator speaks it: ``POST /v1/messages``, whole or streamed.

Specs: https://docs.anthropic.com/en/api/messages (request, ``Message`` body, usage, errors
https://docs.anthropic.com/en/api/errors) and
https://docs.anthropic.com/en/docs/build-with-claude/streaming (SSE events).

A streamed reply is SSE events ``event: <type>\\ndata: {"type": "<type>", ...}\\n\\n`` in
Anthropic's order: ``message_start`` (the ``Message`` with empty ``content`` and the input usage),
``ping``, then per content block ``content_block_start``, its ``content_block_delta`` events and
``content_block_stop``, then ``message_delta`` (``stop_reason``, ``stop_sequence`` and the
cumulative ``usage``) and ``message_stop``. One delta per token, paced like the OpenAI side:
``message_start``, ``ping`` and the first block's start share the first token's write; the
block stops, ``message_delta`` and ``message_stop`` share the last token's.

What a reply holds (deterministic; see ``llm.simulator`` for the triggers):

- a ``thinking`` block (``thinking_delta`` per word, then one ``signature_delta``) when the request
  has ``thinking: {"type": "enabled", "budget_tokens": N}`` or the model name contains ``think``:
  ``max(1, reply_tokens // 2)`` words, the reply's first words in reverse order;
- a ``text`` block of ``reply_tokens`` words (``text_delta`` per word), the OpenAI side's reply;
  with ``output_config.format`` (structured outputs) the text is instead a JSON value of its
  schema (``anthropic_output.schema_value``) in ``text_delta`` fragments of 8 characters; no text
  block when ``tool_choice`` forces a tool (``any`` or ``tool``), as Anthropic prefills the call;
- a ``tool_use`` block when the request has ``tools`` (``tool_choice`` not ``none``) and its last
  turn is not answering a tool (no ``tool_result`` block in it), unless ``tool_choice`` is ``any``
  or ``tool``: it calls the first tool (or the one ``tool_choice`` names) with an input made from
  its ``input_schema`` (``anthropic_output.schema_value``: strings get reply words,
  integers/numbers their position, booleans ``true``; an open object ``{"reply": <words>}``),
  streamed as ``input_json_delta`` fragments of 8 characters after an empty one; ``stop_reason``
  ``tool_use``.

Output tokens are counted one per delta (thinking words, text words, JSON fragments; the signature
is free) and ``max_tokens`` cuts the reply there (``stop_reason`` ``max_tokens``, no tool call). A
field the Messages API does not have (top level, or in ``metadata`` but ``user_id``) is Anthropic's
400 ``<field>: Extra inputs are not permitted``; so are an ``output_config`` Anthropic refuses
(``anthropic_output``: a schema whose objects do not set ``additionalProperties: false``, an
unsupported keyword) and thinking with a ``tool_choice`` that forces a tool ("Thinking may not
be enabled when tool_choice forces tool use."). A ``stop_sequences`` entry equal to a word of the
text ends the text before it (``stop_reason`` ``stop_sequence``). Input tokens are
``count_prompt_tokens`` of the messages plus the system prompt (its words + 3). With any
``cache_control`` in the request, or a model name containing ``cache``, a quarter of them is
reported as ``cache_creation_input_tokens``, half as ``cache_read_input_tokens`` and the rest as
``input_tokens`` (so they add up to the same total).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .anthropic_output import InvalidOutputConfig, output_schema, schema_value
from .replies import WORDS, count_prompt_tokens, reply_word_indexes
from .wire import FAULT_HEADER, MALFORMED_CHUNK, SSE_HEADERS, Fault, fault_problem_message, read_fault

if TYPE_CHECKING:
    from .app import SimulatorConfig, SimulatorStats

__all__ = [
    "ERROR_TYPES",
    "MessagesRequest",
    "answer",
    "error_response",
    "message_body",
    "parse_messages_request",
    "reply_events",
]

API_VERSION_HEADER = "anthropic-version"
# Anthropic's error ``type`` per HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_IMAGE_MEDIA_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
_BLOCK_TYPES = frozenset(
    ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking", "search_result")
)
# The Messages request's fields (https://docs.anthropic.com/en/api/messages, betas included): any
# other is Anthropic's 400 "<field>: Extra inputs are not permitted", e.g. an OpenAI field
# (``response_format``, ``seed``) an adapter forgot to translate or leave out.
_REQUEST_FIELDS = frozenset(
    (
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    )
)
_JSON_FRAGMENT = 8  # characters of a tool's input per input_json_delta
_SIGNATURE = "c2ltdWxhdGVkLXRoaW5raW5nLXNpZ25hdHVyZQ=="  # base64 of "simulated-thinking-signature"
_ID_PREFIX = f"sim{os.getpid():x}{int(time.time()):x}"
_ids = itertools.count(1)
_WORD_JSON = tuple(json.dumps(word) for word in WORDS)
_SPACED_WORD_JSON = tuple(json.dumps(" " + word) for word in WORDS)
# A ``data:`` line that is not JSON (``malformed-line``), under an event name.
_MALFORMED_EVENT = b"event: content_block_delta\n" + MALFORMED_CHUNK


def _new_id(prefix: str) -> str:
    return f"{prefix}_{_ID_PREFIX}{next(_ids)}"


def error_body(status: int, message: str) -> dict[str, Any]:
    """Return Anthropic's error object ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    type_ = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": _new_id("req")}


def error_response(status: int, message: str, *, retry_after: int | None = None) -> web.Response:
    """Return Anthropic's error response (its ``type`` from ``ERROR_TYPES``); a 429 carries ``retry-after``."""
    body = error_body(status, message)
    response = web.json_response(body, status=status, headers={"request-id": body["request_id"]})
    if retry_after is not None:
        response.headers["retry-after"] = str(retry_after)
    return response


def simulated_error(status: int, model: str, *, retry_after: int = 1) -> web.Response:
    """Return the error Anthropic would send with ``status`` (a 429 with ``retry-after`` seconds)."""
    if status == 429:
        message = "Number of request tokens has exceeded your per-minute rate limit (simulated)."
        return error_response(429, message, retry_after=retry_after)
    if status == 404:
        return error_response(404, f"model: {model}")
    if status == 529:
        return error_response(529, "Overloaded")
    if status >= 500:
        return error_response(status, "Internal server error")
    return error_response(status, f"Simulated error {status} for model {model}.")


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A validated Messages request: what the reply depends on.

    ``messages``: the turns as sent. ``system``: the system prompt's text. ``thinking``: whether
    the reply thinks. ``tool``: the tool to call (a ``tools`` entry), or None. ``cached``: whether
    usage reports cache tokens. ``output_schema``: ``output_config.format.schema``, the schema the
    text follows (None: words). ``forced_tool``: ``tool_choice`` is ``any`` or ``tool`` (no text).
    """

    model: str
    messages: list[dict[str, Any]]
    system: str
    stream: bool
    max_tokens: int
    stop_sequences: tuple[str, ...]
    thinking: bool
    tool: dict[str, Any] | None
    cached: bool
    output_schema: dict[str, Any] | None = None
    forced_tool: bool = False


class _Invalid(Exception):
    """A request Anthropic would refuse with 400; the message is Anthropic's style (``field: problem``)."""


def parse_messages_request(body: bytes) -> MessagesRequest | web.Response:
    """Return the request, or the 400 Anthropic would answer for it (a subset of its validation)."""
    try:
        data = json.loads(body)
    except ValueError:
        return error_response(400, "There was an error parsing the body of your request: invalid JSON.")
    if not isinstance(data, dict):
        return error_response(400, "The request body must be a JSON object.")
    try:
        return _validated(data)
    except _Invalid as exc:
        return error_response(400, str(exc))


def _validated(data: dict[str, Any]) -> MessagesRequest:
    for name in data:
        if name not in _REQUEST_FIELDS:
            raise _Invalid(f"{name}: Extra inputs are not permitted")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _Invalid("metadata: Input should be a valid dictionary")
    for name in metadata or ():
        if name != "user_id":
            raise _Invalid(f"metadata.{name}: Extra inputs are not permitted")
    model, messages, max_tokens = data.get("model"), data.get("messages"), data.get("max_tokens")
    for name, value in (("model", model), ("messages", messages), ("max_tokens", max_tokens)):
        if value is None:
            raise _Invalid(f"{name}: Field required")
    if not isinstance(model, str) or not model:
        raise _Invalid("model: Input should be a valid string")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _Invalid("max_tokens: Input should be an integer greater than or equal to 1")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages: at least one message is required")
    previous_tool_ids: set[str] = set()
    for position, message in enumerate(messages):
        previous_tool_ids = _check_message(position, message, previous_tool_ids)
    if _ends_in_whitespace(messages[-1]):
        raise _Invalid("messages: final assistant content cannot end with trailing whitespace")
    system = _system_text(data.get("system"))
    temperature = data.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 1):
        raise _Invalid("temperature: Input should be less than or equal to 1")
    stop_sequences = data.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) and s for s in stop_sequences):
        raise _Invalid("stop_sequences: Input should be a list of non-empty strings")
    asked_thinking = _thinking(data.get("thinking"), max_tokens)
    tool = _tool_to_call(data.get("tools"), data.get("tool_choice"), messages[-1])
    forced = isinstance(data.get("tool_choice"), dict) and data["tool_choice"].get("type") in ("any", "tool")
    if asked_thinking and forced:
        raise _Invalid("Thinking may not be enabled when tool_choice forces tool use.")
    try:
        schema = output_schema(data.get("output_config"))
    except InvalidOutputConfig as exc:
        raise _Invalid(str(exc)) from None
    cached = "cache" in model or '"cache_control"' in json.dumps(data, separators=(",", ":"))
    return MessagesRequest(
        model=model,
        messages=messages,
        system=system,
        stream=data.get("stream") is True,
        max_tokens=max_tokens,
        stop_sequences=tuple(stop_sequences),
        thinking=asked_thinking or "think" in model,
        tool=tool,
        cached=cached,
        output_schema=schema,
        forced_tool=forced,
    )


def _check_message(position: int, message: Any, previous_tool_ids: set[str]) -> set[str]:
    """Check one turn; return the ``tool_use`` ids it holds (its successor must answer them)."""
    where = f"messages.{position}"
    if not isinstance(message, dict):
        raise _Invalid(f"{where}: Input should be a valid dictionary")
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant"):
        raise _Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    if isinstance(content, str):
        if previous_tool_ids:
            raise _Invalid(f"{where}: tool_use ids were found without tool_result blocks immediately after")
        return set()
    if not isinstance(content, list):
        raise _Invalid(f"{where}.content: Input should be a valid string or list")
    tool_ids: set[str] = set()
    answered: set[str] = set()
    for index, block in enumerate(content):
        at = f"{where}.content.{index}"
        if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
            raise _Invalid(f"{at}: Input tag does not match any of the expected block types")
        kind = block["type"]
        if kind == "text" and not (isinstance(block.get("text"), str) and block["text"]):
            raise _Invalid(f"{at}.text: text content blocks must be non-empty")
        elif kind == "text" and not block["text"].strip():
            raise _Invalid(f"{at}.text: text content blocks must contain non-whitespace text")
        elif kind == "image":
            _check_image(at, block.get("source"))
        elif kind == "tool_use":
            if role != "assistant" or not isinstance(block.get("id"), str) or not isinstance(block.get("input"), dict):
                raise _Invalid(f"{at}: tool_use blocks need an id and an input object, in an assistant turn")
            tool_ids.add(block["id"])
        elif kind == "tool_result":
            if role != "user" or block.get("tool_use_id") not in previous_tool_ids:
                raise _Invalid(
                    f"{at}: unexpected `tool_use_id` found in `tool_result` blocks: {block.get('tool_use_id')}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                )
            answered.add(block["tool_use_id"])
    if previous_tool_ids - answered:
        raise _Invalid(
            f"{where}: tool_use ids were found without tool_result blocks immediately after: "
            f"{', '.join(sorted(previous_tool_ids - answered))}"
        )
    return tool_ids


def _check_image(at: str, source: Any) -> None:
    if not isinstance(source, dict):
        raise _Invalid(f"{at}.source: Field required")
    if source.get("type") == "url":
        if not (isinstance(source.get("url"), str) and source["url"].startswith(("https://", "http://"))):
            raise _Invalid(f"{at}.source.url: Input should be a valid URL")
        return
    if source.get("type") != "base64":
        raise _Invalid(f"{at}.source.type: Input should be 'base64' or 'url'")
    if source.get("media_type") not in _IMAGE_MEDIA_TYPES:
        raise _Invalid(
            f"{at}.source.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
        )
    try:
        base64.b64decode(source.get("data") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _Invalid(f"{at}.source.data: The image data is not valid base64.") from None
    if not source.get("data"):
        raise _Invalid(f"{at}.source.data: Field required")


def _ends_in_whitespace(message: dict[str, Any]) -> bool:
    """Whether ``message`` is an assistant turn (a prefill, when last) whose text ends in whitespace."""
    if message.get("role") != "assistant":
        return False
    content = message.get("content")
    if isinstance(content, list):
        content = content[-1].get("text") if content and content[-1].get("type") == "text" else None
    return isinstance(content, str) and content != content.rstrip()


def _system_text(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system
    ):
        return " ".join(b["text"] for b in system)
    raise _Invalid("system: Input should be a valid string or a list of text blocks")


def _thinking(thinking: Any, max_tokens: int) -> bool:
    """Return whether ``thinking`` enables thinking; raise ``_Invalid`` as Anthropic does for a bad one."""
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _Invalid("thinking.type: Input should be 'enabled' or 'disabled'")
    if thinking["type"] == "disabled":
        return False
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
        raise _Invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
    if budget >= max_tokens:
        raise _Invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return True


def _tool_to_call(tools: Any, tool_choice: Any, last: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the ``tools`` entry the reply calls, or None (see the module docstring)."""
    if tools is None:
        if tool_choice is not None:
            raise _Invalid("tool_choice may only be specified while providing tools.")
        return None
    if not isinstance(tools, list):
        raise _Invalid("tools: Input should be a valid list")
    for index, tool in enumerate(tools):
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"]):
            raise _Invalid(f"tools.{index}.name: Field required")
        schema = tool.get("input_schema")
        if not (isinstance(schema, dict) and schema.get("type") == "object"):
            raise _Invalid(f"tools.{index}.custom.input_schema.type: Input should be 'object'")
    choice = tool_choice or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _Invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if kind == "none" or not tools:
        return None
    if kind == "tool":
        named = [t for t in tools if t["name"] == choice.get("name")]
        if not named:
            raise _Invalid(f"Tool '{choice.get('name')}' not found in provided tools")
        return named[0]
    content = last.get("content")
    answering = isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)
    return None if answering and kind == "auto" else tools[0]


def _tool_input(tool: Mapping[str, Any], indexes: list[int]) -> dict[str, Any]:
    """Return the input the reply passes to ``tool``: ``anthropic_output.schema_value`` of its ``input_schema``."""
    value = schema_value(tool["input_schema"], indexes)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class _Usage:
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int

    def as_dict(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }


def _input_usage(request: MessagesRequest) -> _Usage:
    total = count_prompt_tokens(request.messages) + (len(request.system.split()) + 3 if request.system else 0)
    if not request.cached:
        return _Usage(total, 0, 0)
    creation, read = total // 4, total // 2
    return _Usage(total - creation - read, creation, read)


@dataclass(slots=True)
class _Reply:
    """The planned reply: its blocks (``(type, pieces)``: words or JSON fragments), stop and usage."""

    blocks: list[tuple[str, list[str], dict[str, Any]]]
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


def _plan(request: MessagesRequest, reply_tokens: int) -> _Reply:
    """Return the reply to ``request`` (see the module docstring), cut at ``max_tokens``."""
    indexes = reply_word_indexes(request.messages, reply_tokens)
    budget = request.max_tokens
    blocks: list[tuple[str, list[str], dict[str, Any]]] = []
    stop_reason, stop_sequence = "end_turn", None

    def take(pieces: list[str]) -> list[str]:
        nonlocal budget, stop_reason
        if len(pieces) > budget:
            pieces, stop_reason = pieces[:budget], "max_tokens"
        budget -= len(pieces)
        return pieces

    if request.thinking:
        thought = [_WORD_JSON[i] if n == 0 else _SPACED_WORD_JSON[i] for n, i in enumerate(reversed(indexes))]
        blocks.append(("thinking", take(thought[: max(1, reply_tokens // 2)]), {}))
    if request.forced_tool and request.tool is not None:
        text: list[str] = []  # Anthropic prefills a forced tool call: no text comes before it
    elif request.output_schema is not None:
        value = json.dumps(schema_value(request.output_schema, indexes))
        text = take([json.dumps(value[i : i + _JSON_FRAGMENT]) for i in range(0, len(value), _JSON_FRAGMENT)])
    else:
        words = indexes
        for position, index in enumerate(indexes):
            if WORDS[index] in request.stop_sequences:
                words, stop_sequence = indexes[:position], WORDS[index]
                break
        text = take([_WORD_JSON[i] if n == 0 else _SPACED_WORD_JSON[i] for n, i in enumerate(words)])
    if text:
        blocks.append(("text", text, {}))
    if stop_sequence is not None and stop_reason == "end_turn":
        stop_reason = "stop_sequence"
    if request.tool is not None and stop_reason == "end_turn":
        arguments = json.dumps(_tool_input(request.tool, indexes))
        fragments = [arguments[i : i + _JSON_FRAGMENT] for i in range(0, len(arguments), _JSON_FRAGMENT)]
        pieces = take([json.dumps(""), *(json.dumps(f) for f in fragments)])
        if stop_reason == "end_turn":
            blocks.append(
                ("tool_use", pieces, {"id": _new_id("toolu"), "name": request.tool["name"], "input": arguments})
            )
            stop_reason = "tool_use"
    output = request.max_tokens - budget
    return _Reply(blocks, stop_reason, stop_sequence, output)


def _event(kind: str, payload: str) -> bytes:
    return f"event: {kind}\ndata: {payload}\n\n".encode()


def _start_json(kind: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if kind == "text":
        return {"type": "text", "text": ""}
    return {"type": "tool_use", "id": extra["id"], "name": extra["name"], "input": {}}


_DELTA_TYPES = {
    "thinking": ("thinking_delta", "thinking"),
    "text": ("text_delta", "text"),
    "tool_use": ("input_json_delta", "partial_json"),
}


def reply_events(request: MessagesRequest, reply_tokens: int) -> tuple[list[bytes], int]:
    """Return the streamed reply as one ``bytes`` per token (the first and last carry the framing
    events, see the module docstring) and the output token count."""
    reply = _plan(request, reply_tokens)
    usage = _input_usage(request)
    message: dict[str, Any] = {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage.as_dict(1),
    }
    head = _event("message_start", json.dumps({"type": "message_start", "message": message}))
    head += _event("ping", '{"type": "ping"}')
    ticks: list[bytes] = []
    pending = head
    for index, (kind, pieces, extra) in enumerate(reply.blocks):
        start = {"type": "content_block_start", "index": index, "content_block": _start_json(kind, extra)}
        pending += _event("content_block_start", json.dumps(start))
        delta_type, field = _DELTA_TYPES[kind]
        prefix = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"{delta_type}","{field}":'
        for piece in pieces:
            ticks.append(pending + _event("content_block_delta", prefix + piece + "}}"))
            pending = b""
        if kind == "thinking":
            signature = {"type": "signature_delta", "signature": _SIGNATURE}
            pending += _event(
                "content_block_delta", json.dumps({"type": "content_block_delta", "index": index, "delta": signature})
            )
        pending += _event("content_block_stop", json.dumps({"type": "content_block_stop", "index": index}))
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
        "usage": usage.as_dict(reply.output_tokens),
    }
    pending += _event("message_delta", json.dumps(delta)) + _event("message_stop", '{"type": "message_stop"}')
    if ticks:
        ticks[-1] += pending
    else:
        ticks.append(pending)
    return ticks, reply.output_tokens


def message_body(request: MessagesRequest, reply_tokens: int) -> dict[str, Any]:
    """Return the whole ``Message`` object answering ``request``."""
    reply = _plan(request, reply_tokens)
    content: list[dict[str, Any]] = []
    for kind, pieces, extra in reply.blocks:
        text = "".join(json.loads(piece) for piece in pieces)
        if kind == "thinking":
            content.append({"type": "thinking", "thinking": text, "signature": _SIGNATURE})
        elif kind == "text":
            content.append({"type": "text", "text": text})
        else:
            content.append({"type": "tool_use", "id": extra["id"], "name": extra["name"], "input": json.loads(text)})
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": _input_usage(request).as_dict(reply.output_tokens),
    }


def _unauthorized(request: web.Request, api_key: str) -> web.Response | None:
    """Return Anthropic's 401 when ``api_key`` is required and the request does not carry it.

    The key goes in ``x-api-key`` (the API reference's header, which our adapter sends) or as
    ``Authorization: Bearer <key>`` (what the anthropic SDK 2.x sends for ``api_key``).
    """
    if not api_key:
        return None
    sent = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    if hmac.compare_digest(sent.encode(), api_key.encode()):
        return None
    if not sent:
        return error_response(401, "x-api-key header is required")
    # Unmasked on purpose, as the OpenAI side's: tests prove clients redact it.
    return error_response(401, f"invalid x-api-key: {sent}")


async def answer(
    request: web.Request,
    *,
    config: SimulatorConfig,
    stats: SimulatorStats,
    model_fault: Callable[[str], Fault],
) -> web.StreamResponse:
    """Answer ``POST /v1/messages``: auth, validation, faults (as on the OpenAI side), then the reply."""
    stats.requests_started += 1
    denied = _unauthorized(request, config.api_key)
    if denied is None and API_VERSION_HEADER not in request.headers:
        denied = error_response(400, "anthropic-version: header is required")
    parsed = denied if denied is not None else parse_messages_request(await request.read())
    if isinstance(parsed, web.Response):
        stats.requests_failed += 1
        return parsed
    header = request.headers.get(FAULT_HEADER)
    fault = read_fault(header) if header is not None else model_fault(parsed.model)
    if isinstance(fault, str):
        stats.requests_failed += 1
        return error_response(400, fault_problem_message(fault))
    if fault.status is not None:
        stats.requests_failed += 1
        return simulated_error(fault.status, parsed.model, retry_after=fault.retry_after)
    if parsed.stream:
        return await _stream(request, parsed, fault, config, stats)
    return await _complete(request, parsed, fault, config, stats)


async def _complete(
    request: web.Request, parsed: MessagesRequest, fault: Fault, config: SimulatorConfig, stats: SimulatorStats
) -> web.Response:
    """Return the ``Message`` after the time the stream would have taken (faults as the OpenAI side's)."""
    body = message_body(parsed, config.reply_tokens)
    ttft = config.ttft_ms / 1000 if fault.ttft is None else fault.ttft
    try:
        await asyncio.sleep(
            ttft + fault.stall + config.token_delay_ms / 1000 * max(body["usage"]["output_tokens"] - 1, 0)
        )
    except asyncio.CancelledError:
        stats.requests_disconnected += 1
        raise
    if fault.cut_after is not None:
        stats.requests_failed += 1
        if fault.drops:
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        return web.Response(body=MALFORMED_CHUNK.removeprefix(b"data: "), content_type="application/json")
    stats.requests_completed += 1
    return web.json_response(body, headers={"request-id": _new_id("req")})


async def _stream(
    request: web.Request, parsed: MessagesRequest, fault: Fault, config: SimulatorConfig, stats: SimulatorStats
) -> web.StreamResponse:
    """Stream the reply's events, one token's write every ``token_delay_ms`` after ``ttft_ms``.

    ``fault``: as on the OpenAI side (``app._Simulator._stream``): ``ttft`` replaces the time to
    the first token, ``stall`` pauses before token ``stall_after``, and the stream breaks after
    ``cut_after`` tokens with a malformed ``data:`` line (then the body ends) or a dropped connection.
    """
    ticks, _ = reply_events(parsed, config.reply_tokens)
    drops = fault.drops
    if fault.cut_after is not None:
        ticks = ticks[: fault.cut_after] or [b""]
        if not drops:
            ticks[-1] += _MALFORMED_EVENT
    stall_at = fault.stall_after if fault.stall > 0 and fault.stall_after < len(ticks) else -1
    delay = config.token_delay_ms / 1000
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(headers={**SSE_HEADERS, "request-id": _new_id("req")})
    stats.active_streams += 1
    try:
        await response.prepare(request)
        due = loop.time() + (config.ttft_ms / 1000 if fault.ttft is None else fault.ttft)
        for position, frame in enumerate(ticks):
            if position == stall_at:
                await asyncio.sleep(fault.stall)
                due = loop.time()
            await asyncio.sleep(max(due - loop.time(), 0))
            due += delay
            await response.write(frame)
        if drops:
            stats.requests_failed += 1
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        if fault.cut_after is not None:
            stats.requests_failed += 1
        else:
            stats.requests_completed += 1
    except asyncio.CancelledError:
        stats.requests_disconnected += 1
        raise
    except ConnectionResetError:
        stats.requests_disconnected += 1
    finally:
        stats.active_streams -= 1
    return response
