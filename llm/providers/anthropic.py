"""Adapter for Anthropic's Messages API (``Provider.kind`` ``anthropic``).

Wire format: https://docs.anthropic.com/en/api/messages (request and ``Message``) and
https://docs.anthropic.com/en/docs/build-with-claude/streaming (SSE events). ``POST
{base_url}/v1/messages`` (``base_url`` is ``https://api.anthropic.com``; one that already ends in
``/v1`` gets ``/messages``) with ``stream: true``, headers ``x-api-key`` and ``anthropic-version``
(``settings.LLM_ANTHROPIC_VERSION``, default ``2023-06-01``), plus the provider's extra headers
(e.g. ``anthropic-beta``).

The request (``ChatRequest``: OpenAI chat messages and fields) is translated by
``messages_body``:

- ``system`` / ``developer`` messages → ``system`` text blocks (wherever they stand);
- user content strings and ``text`` parts → ``text`` blocks (a part's ``cache_control`` is kept),
  ``image_url`` parts → ``image`` blocks (``data:`` URLs → ``base64`` sources, http(s) URLs →
  ``url`` sources); other part types are a 400;
- assistant ``tool_calls`` → ``tool_use`` blocks (``arguments`` parsed into ``input``), ``tool``
  messages → ``tool_result`` blocks in a user turn (before any text of that turn); consecutive
  turns of one role are merged, as Anthropic requires alternating turns; empty or whitespace-only
  text is dropped (Anthropic refuses text blocks without a non-whitespace character, where OpenAI
  takes them), and a last assistant turn (a prefill) loses its trailing whitespace (Anthropic
  refuses "final assistant content" that ends in it);
- ``max_completion_tokens`` / ``max_tokens`` → ``max_tokens``, which Anthropic requires: when the
  client sends neither, ``settings.LLM_ANTHROPIC_DEFAULT_MAX_TOKENS`` (default 4096);
- ``temperature``, ``top_p``, ``top_k`` as they are, but ``temperature`` capped at Anthropic's 1.0
  (OpenAI takes 0 to 2, and NextChat's slider goes to 2: a 1.5 would fail every request with
  Anthropic's 400, where 1.0 is its most random); ``stop`` (a string or a list) →
  ``stop_sequences``, empty ones left out (Anthropic refuses them); ``user`` →
  ``metadata.user_id``; function ``tools`` → ``{name, description, input_schema}``;
  ``tool_choice`` ``auto``/``none``/``required``/a named function → ``auto``/``none``/``any``/
  ``tool`` (a choice of another shape, naming a function not in ``tools``, or ``required``/named
  without ``tools`` is a 400 ``invalid_value`` on ``tool_choice``: ``base.tool_choice_function``);
  ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``;
- ``response_format`` (``anthropic_format``): ``json_schema`` with a schema → ``output_config.format``
  (structured outputs, the schema adapted to Anthropic's subset of JSON Schema); ``json_object``
  (or ``json_schema`` without a schema) → one more tool, forced, whose input is the reply: by name,
  or ``any`` when the client's tools may be called too; not added when the client forces a tool
  of its own;
- ``reasoning_effort`` ``minimal``/``low``/``medium``/``high``/``xhigh``/``max`` → ``thinking:
  {"type": "enabled", "budget_tokens": 1024/2048/8192/16384/24576/24576}`` (``none``: no thinking;
  a value outside OpenAI's is a 400 on ``reasoning_effort``), capped below ``max_tokens`` (OpenAI counts reasoning
  in ``max_completion_tokens`` too; without a client limit ``max_tokens`` becomes the default plus
  the budget; under 1025 tokens there is no room to think and no thinking is asked for). With
  thinking on, ``temperature`` and ``top_k`` are left out and ``top_p`` only kept from 0.95, as
  Anthropic refuses them otherwise. A request whose ``tool_choice`` forces a tool (``required``, a
  named function, or the JSON tool) asks for no thinking: Anthropic refuses thinking with a forced
  tool ("Thinking may not be enabled when tool_choice forces tool use");
- fields whose effect the client relies on and that the Messages API cannot give are a 400
  ``unsupported_parameter`` naming the field, before any request (``base.refuse_unsupported``):
  ``logprobs: true``/``top_logprobs`` (Anthropic reports none), a non-empty ``logit_bias``,
  ``modalities`` other than text, ``audio``, ``web_search_options``; ``n`` above 1 is a 400 too;
- every other OpenAI field (``frequency_penalty``, ``presence_penalty``, ``seed``,
  ``service_tier``, ``prediction``, ``metadata``, ``response_format: {"type": "text"}``, ...)
  has no Messages equivalent and changes nothing the client can count on: it is not sent.

Earlier turns' thinking is not sent back: OpenAI messages carry no thinking signatures, and
Anthropic requires the signed thinking of the assistant turn whose tool calls are being answered.
So a request whose last turn answers tool calls asks for no thinking (the reply after a tool
result does not think; the next user turn thinks again).

The stream becomes ``ChatChunk`` batches: ``text_delta`` → ``content``, ``thinking_delta`` →
``reasoning_content``, a ``tool_use`` block → OpenAI ``delta.tool_calls`` entries (its start:
``{index, id, type: "function", function: {name, arguments: ""}}``; each ``input_json_delta``:
``{index, function: {arguments: <fragment>}}``; ``index`` counts tool calls, not blocks), but the
JSON tool's block → ``content`` (its ``input_json_delta`` fragments, the JSON object's text),
``message_delta`` → a chunk with ``finish_reason`` (``end_turn``/``stop_sequence``/``pause_turn``
→ ``stop``, with the matched ``stop_sequence`` kept on the chunk, ``max_tokens``/
``model_context_window_exceeded`` → ``length``, ``tool_use`` → ``tool_calls`` (``stop`` when only
the JSON tool was called), ``refusal`` →
``content_filter``) then one with ``usage``: ``prompt_tokens`` =
``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``, ``cached_tokens``
= ``cache_read_input_tokens``, ``cache_creation_tokens`` = ``cache_creation_input_tokens``,
``completion_tokens`` = ``output_tokens`` (thinking included; Anthropic reports no separate
reasoning count). ``message_start``'s usage (the prompt's) → a ``Usage.prompt_only`` chunk first
in the first batch that has another chunk, so that a stream cut before ``message_delta`` keeps the
provider's prompt count and cache split. ``message_stop`` ends the stream; an ``error`` event is a 502. Signatures,
``ping`` and unknown events are skipped. Errors, timeouts, cancellation: ``llm.providers.http``.

Parsing is httpx-sse's line and event decoders, then ``json.loads`` per event, with a fast path for
``text_delta`` events (a regex and ``json.decoder.scanstring`` instead of a whole parse). CPU per
chunk, measured with ``python -m bench.adapter_cpu --kind anthropic`` against ``manage.py
llm_simulator --ttft-ms 5 --token-delay-ms 10 --reply-tokens 64`` in another process (uvloop; two
runs each, alternating with the OpenAI-compatible adapter on the same simulator, on a busy shared
2-core machine, 2026-12; the process's CPU over the chunks yielded, requests included):

==============================================  ==================  ============================
replies                                          anthropic (µs)      openai_compatible (µs)
==============================================  ==================  ============================
one at a time, a token every 10 ms               259–266             275–284
200 at once, a token every 10 ms                 27–34               30–32
==============================================  ==================  ============================

Parsing alone (bytes to ``ChatChunk``, a 64-token reply's whole body fed to the decoder) is
8.9 µs per chunk one event per read and 6.6 µs four per read (OpenAI-compatible: 8.1 and 5.7);
Anthropic sends ~6 more events per reply (``message_start``, ``ping``, block start and stop,
``message_stop``) that yield no chunk. Waking the process per token dominates either way.
The official SDK's raw event stream was not used: FIELD-NOTES measured it at 28 µs per event
(62 µs with its ``.stream()`` helper) against single-digit µs for this parse.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from django.conf import settings

from .anthropic_format import json_tool, json_tool_choice, output_format, wants_json_object
from .base import (
    TRANSLATION_ERRORS,
    ChatChunk,
    ChatProvider,
    ChatRequest,
    UpstreamError,
    Usage,
    reasoning_effort,
    refuse_unsupported,
    tool_choice_function,
    untranslatable,
)
from .http import SSE_REQUEST_HEADERS, SSEBodyDecoder, failure, json_body, post_sse

__all__ = ["ANTHROPIC_UNSUPPORTED", "FINISH_REASONS", "THINKING_BUDGETS", "AnthropicProvider", "messages_body"]

# stop_reason → OpenAI finish_reason (https://docs.anthropic.com/en/api/handling-stop-reasons).
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI fields a client relies on that the Messages API has no equivalent for: a 400, not a silent drop.
ANTHROPIC_UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "modalities",
    "audio",
    "web_search_options",
)
# OpenAI reasoning_effort → Anthropic thinking budget_tokens (its minimum is 1024).
# xhigh and max: the largest budget that, with the default max_tokens, fits every thinking model's output
# limit (Claude Opus 4's 32000 is the smallest).
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 24576}
_MIN_THINKING_BUDGET = 1024
# Anthropic's largest temperature (https://docs.anthropic.com/en/api/messages: 0.0 to 1.0).
_TEMPERATURE_MAX = 1.0
_IMAGE_MEDIA_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


def _unsupported(message: str) -> UpstreamError:
    """Return the 400 for a request the Messages API cannot express (nothing was sent upstream)."""
    return UpstreamError(message, code="unsupported_by_provider", status=400)


def messages_body(request: ChatRequest, *, default_max_tokens: int) -> dict[str, Any]:
    """Return the Messages API request body (``stream: true``) for ``request``; see the module docstring.

    Raises ``UpstreamError`` (status 400, ``unsupported_by_provider``) for what the Messages API
    cannot express: a content part other than text or image, an image that is not a data URL of
    JPEG/PNG/GIF/WebP or an http(s) URL, a tool call whose arguments are not a JSON object, a
    tool that is not a function, ``n`` above 1; ``ApplicationError`` 400 ``unsupported_parameter``
    for a field of ``ANTHROPIC_UNSUPPORTED`` that asks for something (``base.refuse_unsupported``),
    and ``invalid_value`` for a ``tool_choice`` it cannot name (``base.tool_choice_function``).
    """
    return _messages_request(request, default_max_tokens=default_max_tokens)[0]


def _messages_request(request: ChatRequest, *, default_max_tokens: int) -> tuple[dict[str, Any], str | None]:
    """Return ``messages_body``'s body and the name of the tool carrying a JSON-object reply (None: no such tool)."""
    parameters = request.parameters
    refuse_unsupported(parameters, ANTHROPIC_UNSUPPORTED, "Anthropic")
    system, turns = _system_and_turns(request.messages)
    if (parameters.get("n") or 1) > 1:
        raise _unsupported("The model provider returns one choice per request; n must be 1.")
    client_max = parameters.get("max_completion_tokens") or parameters.get("max_tokens")
    max_tokens = int(client_max or default_max_tokens)
    body: dict[str, Any] = {"model": request.model, "messages": turns, "max_tokens": max_tokens}
    if system:
        body["system"] = system
    tools = parameters.get("tools")
    if tools:
        body["tools"] = [_tool(tool) for tool in tools]
    tool_choice = _tool_choice(parameters.get("tool_choice"), parameters.get("parallel_tool_calls"), tools)
    response_format = parameters.get("response_format")
    structured = output_format(response_format)
    json_tool_name = None
    if structured is not None:
        body["output_config"] = {"format": structured}
    elif wants_json_object(response_format) and (tool_choice is None or tool_choice["type"] in ("auto", "none")):
        tool = json_tool(t["name"] for t in body.get("tools", ()))
        json_tool_name = tool["name"]
        body.setdefault("tools", []).append(tool)
        client_tools = bool(tools) and (tool_choice is None or tool_choice["type"] != "none")
        tool_choice = json_tool_choice(tool_choice, json_tool_name, client_tools=client_tools)
    if tool_choice is not None and body.get("tools"):
        body["tool_choice"] = tool_choice
    budget = THINKING_BUDGETS.get(reasoning_effort(parameters) or "")
    if turns and any(block["type"] == "tool_result" for block in turns[-1]["content"]):
        budget = None  # answering tool calls: see the module docstring
    if body.get("tool_choice", {}).get("type") in ("any", "tool"):
        budget = None  # Anthropic refuses thinking with a forced tool: see the module docstring
    if budget is not None and client_max is None:
        max_tokens = body["max_tokens"] = max_tokens + budget
    thinking = budget is not None and max_tokens > _MIN_THINKING_BUDGET
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": min(budget or 0, max_tokens - 1)}
    for name in ("temperature", "top_p", "top_k"):
        value = parameters.get(name)
        if value is None or (thinking and (name != "top_p" or value < 0.95)):
            continue
        body[name] = min(value, _TEMPERATURE_MAX) if name == "temperature" else value
    stop = parameters.get("stop")
    # Empty sequences end nothing on OpenAI and are Anthropic's 400: left out.
    stop_sequences = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
    if stop_sequences:
        body["stop_sequences"] = stop_sequences
    if parameters.get("user"):
        body["metadata"] = {"user_id": str(parameters["user"])}
    body["stream"] = True
    return body, json_tool_name


def _system_and_turns(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the ``system`` text blocks and the alternating ``messages`` turns of OpenAI ``messages``."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(block for block in _blocks(content) if block["type"] == "text")
            continue
        if role == "user":
            blocks = _blocks(content)
        elif role == "assistant":
            blocks = [block for block in _blocks(content) if block["type"] == "text"]
            blocks.extend(_tool_use(call) for call in message.get("tool_calls") or ())
        elif role == "tool":
            role, blocks = "user", [_tool_result(message)]
        else:
            raise _unsupported(f"The model provider does not take {role!r} messages.")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # a user turn's tool results come first (Anthropic refuses them after text)
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    if turns and turns[-1]["role"] == "assistant" and turns[-1]["content"][-1]["type"] == "text":
        last = turns[-1]["content"][-1]
        last["text"] = last["text"].rstrip()  # not whitespace-only: _blocks dropped those
    return system, turns


def _blocks(content: Any) -> list[dict[str, Any]]:
    """Return the text and image blocks of an OpenAI message ``content`` (a string or parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content and not content.isspace() else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if isinstance(part.get("text"), str) and part["text"] and not part["text"].isspace():
                block = {"type": "text", "text": part["text"]}
                if "cache_control" in part:  # OpenRouter's convention for Anthropic prompt caching
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url")))
        else:
            raise _unsupported(f"The model provider does not take {kind!r} content parts.")
    return blocks


def _image(image_url: Any) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise _unsupported("An image_url part needs a url.")
    match = _DATA_URL.fullmatch(url)
    if match:
        media_type, data = match.groups()
        if media_type not in _IMAGE_MEDIA_TYPES:
            raise _unsupported(f"The model provider takes JPEG, PNG, GIF or WebP images, not {media_type}.")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _unsupported("An image_url must be a base64 data: URL or an http(s) URL.")


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise _unsupported(f"The arguments of tool call {call.get('id')!r} must be a JSON object.")
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


def _tool_result(message: Mapping[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    content = _blocks(message.get("content"))
    if content:
        block["content"] = content
    return block


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise _unsupported(f"The model provider takes function tools only, not {tool.get('type')!r}.")
    function = tool["function"]
    converted = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _tool_choice(choice: Any, parallel: Any, tools: Any) -> dict[str, Any] | None:
    """Return Anthropic's ``tool_choice`` for OpenAI's ``tool_choice`` and ``parallel_tool_calls``.

    Raises ``ApplicationError`` 400 as ``base.tool_choice_function`` does.
    """
    name = tool_choice_function(choice, tools)
    if name is not None:
        converted: dict[str, Any] = {"type": "tool", "name": name}
    elif choice in ("auto", "none"):
        converted = {"type": choice}
    elif choice == "required":
        converted = {"type": "any"}
    elif parallel is False:
        converted = {"type": "auto"}
    else:
        return None
    if parallel is False and converted["type"] != "none":
        converted["disable_parallel_tool_use"] = True
    return converted


class AnthropicProvider(ChatProvider):
    """Stream chat completions from Anthropic's Messages API (``POST /v1/messages``)."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunks (content, reasoning, tool calls, finish_reason, usage) in batches.

        See the module docstring for the translation both ways. Raises ``UpstreamError`` as
        ``llm.providers.http.post_sse`` does (the same codes and statuses as the OpenAI-compatible
        adapter; an ``error`` event mid-stream is a 502 ``upstream_error``), and a 400 before any
        request for what the Messages API cannot express (``messages_body``). Cancellation or
        ``aclose()`` closes the upstream connection at once.
        """
        config = self.config
        try:
            body, json_tool_name = _messages_request(
                request, default_max_tokens=settings.LLM_ANTHROPIC_DEFAULT_MAX_TOKENS
            )
            data = json_body(body)
        except TRANSLATION_ERRORS as exc:  # a shape the translation did not expect: the request's fault
            raise untranslatable(exc) from exc
        headers = dict(SSE_REQUEST_HEADERS)
        if config.extra_headers:  # validated: never one of the headers set here
            headers.update(config.extra_headers)
        headers["anthropic-version"] = settings.LLM_ANTHROPIC_VERSION
        if config.api_key:
            headers["x-api-key"] = config.api_key
        base = config.base_url.rstrip("/")
        url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        batches = post_sse(
            config, url, data=data, headers=headers, decoder=_EventDecoder(self._safe, json_tool_name), safe=self._safe
        )
        async with aclosing(batches):
            async for batch in batches:
                yield batch


# A text_delta event as Anthropic writes nearly every token (compact JSON, this key order): its
# text is read without parsing the whole object. Anything else is parsed in full.
_TEXT_DELTA = re.compile(r'\{"type":"content_block_delta","index":\d+,"delta":\{"type":"text_delta","text":"')
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


class _EventDecoder(SSEBodyDecoder):
    """Turn a streamed Messages body into ``ChatChunk`` batches (``http.SSEBodyDecoder`` reads the lines).

    ``message_stop`` sets ``done``; ``message_delta`` (the stop reason) sets ``finished``; an
    ``error`` event or a malformed one sets ``error``. ``json_tool``: the name of the tool whose
    input is the reply's content (``anthropic_format``: JSON mode), or None.
    """

    __slots__ = ("_input", "_input_unsent", "_json_blocks", "_json_tool", "_tool_indexes")

    def __init__(self, safe: Callable[[str], str], json_tool: str | None = None) -> None:
        super().__init__(safe)
        self._json_tool = json_tool
        self._json_blocks: set[int] = set()  # content block indexes of the JSON tool's calls
        self._tool_indexes: dict[int, int] = {}  # content block index → tool call index
        self._input: dict[str, Any] = {}  # message_start's usage
        self._input_unsent = False  # message_start's usage is not passed on yet

    def _chunks(self, lines: list[str]) -> list[ChatChunk]:
        batch: list[ChatChunk] = []
        decode_event = self._events.decode
        for line in lines:
            event = decode_event(line)
            if event is None or not event.data:
                continue
            data = event.data
            try:
                match = _TEXT_DELTA.match(data)
                if match is not None:
                    text, end = _scanstring(data, match.end())
                    if data[end:] == "}}":
                        if text:
                            batch.append(ChatChunk(content=text))
                        continue
                chunk = self._event(json.loads(data))
            except UpstreamError as exc:
                self.error = exc
                break
            except (ValueError, TypeError, AttributeError, KeyError, IndexError):
                self.error = failure(
                    "upstream_bad_response", self._safe(f"upstream sent a malformed event: {data[:200]!r}")
                )
                break
            if self.done:
                break
            if chunk:
                batch.extend(chunk)
        if batch and self._input_unsent:
            # The prompt's usage as message_start reported it, first in the first batch with a chunk
            # (never a batch of its own: that would settle routing before the reply began). A stream
            # cut before message_delta is still billed the provider's prompt tokens and cache split.
            self._input_unsent = False
            batch.insert(0, ChatChunk(usage=_usage({**self._input, "output_tokens": 0}, prompt_only=True)))
        return batch

    def _event(self, payload: dict[str, Any]) -> list[ChatChunk] | None:
        """Return the chunks of one event object (``payload["type"]`` names it), or None."""
        kind = payload["type"]
        if kind == "content_block_delta":
            delta = payload["delta"]
            delta_type = delta["type"]
            if delta_type == "text_delta":
                return [ChatChunk(content=delta["text"])] if delta["text"] else None
            if delta_type == "thinking_delta":
                return [ChatChunk(reasoning_content=delta["thinking"])] if delta["thinking"] else None
            if delta_type == "input_json_delta" and delta["partial_json"]:
                if payload["index"] in self._json_blocks:
                    return [ChatChunk(content=delta["partial_json"])]
                index = self._tool_indexes[payload["index"]]
                return [ChatChunk(tool_calls=[{"index": index, "function": {"arguments": delta["partial_json"]}}])]
            return None  # signature_delta, citations_delta, an empty fragment
        if kind == "content_block_start":
            block = payload["content_block"]
            if block["type"] == "tool_use" and block["name"] == self._json_tool:
                self._json_blocks.add(payload["index"])
                return None
            if block["type"] == "tool_use":
                index = self._tool_indexes[payload["index"]] = len(self._tool_indexes)
                call = {"index": index, "id": block["id"], "type": "function"}
                call["function"] = {"name": block["name"], "arguments": ""}
                return [ChatChunk(tool_calls=[call])]
            if block["type"] == "text" and block.get("text"):
                return [ChatChunk(content=block["text"])]
            return None
        if kind == "message_start":
            self._input = payload["message"].get("usage") or {}
            self._input_unsent = bool(self._input)
            return None
        if kind == "message_delta":
            self.finished = True
            stop_reason = payload["delta"].get("stop_reason")
            if stop_reason == "tool_use" and not self._tool_indexes:
                stop_reason = "end_turn"  # only the JSON tool was called: its input is the reply
            matched = payload["delta"].get("stop_sequence") if stop_reason == "stop_sequence" else None
            chunks = [
                ChatChunk(
                    finish_reason=FINISH_REASONS.get(stop_reason, "stop"),
                    stop_sequence=matched if isinstance(matched, str) else None,
                )
            ]
            usage = {**self._input, **{k: v for k, v in (payload.get("usage") or {}).items() if v is not None}}
            if usage:
                chunks.append(ChatChunk(usage=_usage(usage)))
            return chunks
        if kind == "message_stop":
            self.done = True
            return None
        if kind == "error":
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            raise failure("upstream_error", self._safe(f"upstream error mid-stream: {message}"))
        return None  # ping, content_block_stop, and event types added later


def _usage(usage: Mapping[str, Any], *, prompt_only: bool = False) -> Usage:
    """Return the ``Usage`` of Anthropic's ``usage`` object (its input excludes the cache tokens);
    ``prompt_only``: message_start's, the prompt's alone (``Usage.prompt_only``)."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    creation = int(usage.get("cache_creation_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0) + read + creation,
        completion_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=read,
        cache_creation_tokens=creation,
        prompt_only=prompt_only,
    )
