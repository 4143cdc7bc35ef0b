"""Adapter for OpenAI-compatible chat completion APIs (OpenAI, DeepSeek, vLLM, Ollama ``/v1``, ...).

Wire format: https://platform.openai.com/docs/api-reference/chat/streaming — ``POST
{base_url}/chat/completions`` with ``stream: true`` answers SSE events whose ``data`` is a
``chat.completion.chunk`` object, ending with ``data: [DONE]``. With ``stream_options:
{"include_usage": true}`` the last chunk before ``[DONE]`` has ``choices: []`` and ``usage``
(its ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``
are read too: ``_parse_usage``).

This is the hot path. Per read, it takes whatever body the socket has delivered (aiohttp's
``readany``), decodes it as UTF-8 incrementally, splits it into lines with httpx-sse's
``SSELineDecoder`` and into events with its ``SSEDecoder``; per event it does one ``json.loads``,
a few dict lookups and at most one ``ChatChunk``. ``stream`` yields the chunks of one read as one
batch: under load several events wait in the socket buffer, and the server can then relay them
to its client in one send instead of one per chunk. The transport is aiohttp (its connection
pool does O(1) work per request); the pooled session, the streamed POST with its error mapping
and the bytes-to-lines decoding are shared with the other adapters in ``llm.providers.http``.

CPU per chunk, measured with ``python -m bench.adapter_cpu`` (this process's ``process_time``
over the chunks yielded, requests included; 64-token replies from ``manage.py llm_simulator``
in another process; uvloop; ranges over 5 runs each on a shared 2-core machine), the
line-at-a-time adapter before, batches now (same simulator, 2026-12):

==============================================  ===========  ===========  =================
replies                                          before (µs)  now (µs)     chunks per batch
==============================================  ===========  ===========  =================
one at a time, a token every 10 ms               184–214      199–217      1.03
one at a time, a token every 1 ms                73–85        77–90        1.2
200 at once, a token every 10 ms                 24–39        21–37        1.1–2.7
200 at once, a token every 1 ms (upstream busy)  19–23        17–19        4–7.5
==============================================  ===========  ===========  =================

When a read holds one event the cost is unchanged: waking the idle process for each token
dominates it. When reads hold several (a busy machine or upstream; the cost then follows the
batch size, not the run) it is ~10–20 % lower: parsing alone (UTF-8, lines, events, ``json.loads``
~2.7 µs, ``ChatChunk``) is ~5 µs per chunk in batches of 4, ~7 µs one by one. The larger saving
is downstream: the server can relay a batch in one send.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from .base import ChatChunk, ChatProvider, ChatRequest, UpstreamError, Usage
from .http import SSE_REQUEST_HEADERS, SSEBodyDecoder, aclose_clients, failure, json_body, post_sse

__all__ = ["OpenAICompatibleProvider", "aclose_clients"]  # aclose_clients: re-exported from .http


class OpenAICompatibleProvider(ChatProvider):
    """Stream chat completions from an OpenAI-compatible ``/chat/completions`` endpoint."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunks (text, refusal, raw tool calls, annotations, finish_reason, usage, ...) in batches.

        Each batch holds every chunk parsed from what the upstream had sent by the time we read
        (one or more, never none), in order. Chunks that carry nothing (the role-only first
        delta, an empty delta without ``finish_reason``) are skipped; the finish chunk (an empty
        delta and ``finish_reason``) is a ``ChatChunk`` with only ``finish_reason``. Chunks that
        arrived before a failure are yielded before it is raised. Raises ``UpstreamError``: the
        upstream's error status (see its status mapping), 502 when unreachable, dropped or
        ending mid-stream (``upstream_disconnected``), sending an error object mid-stream, a
        malformed chunk or a line still unfinished past 16 MiB (``upstream_bad_response``), 504
        on a timeout. Cancellation or ``aclose()`` closes the upstream connection at once.
        """
        config = self.config
        body = {
            **request.parameters,
            "model": request.model,
            "messages": request.messages,
            "stream": True,
        }
        if config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        # Serialized as httpx did: compact, UTF-8, no NaN.
        data = json_body(body)
        headers = dict(SSE_REQUEST_HEADERS)
        if config.extra_headers:  # validated: never one of the headers set here
            headers.update(config.extra_headers)
        headers.update(self._auth_headers())
        url = self._url(request)
        batches = post_sse(config, url, data=data, headers=headers, decoder=_ChunkDecoder(self._safe), safe=self._safe)
        async with aclosing(batches):
            async for batch in batches:
                yield batch

    def _url(self, request: ChatRequest) -> str:
        """Return the URL of the streamed chat completion (``{base_url}/chat/completions``)."""
        return f"{self.config.base_url.rstrip('/')}/chat/completions"

    def _auth_headers(self) -> dict[str, str]:
        """Return the headers that carry the API key (``Authorization: Bearer``; none without a key)."""
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}


class _ChunkDecoder(SSEBodyDecoder):
    """Turn the body of a streamed chat completion, in pieces as read, into ``ChatChunk`` batches.

    ``http.SSEBodyDecoder`` does the bytes, text and lines; this parses the events: ``data:
    [DONE]`` sets ``done``; an error object mid-stream or a malformed chunk sets ``error``;
    ``finished`` tells whether a ``finish_reason`` has been seen.

    ``system_fingerprint``: the last one the upstream sent (OpenAI repeats it on every chunk; the
    role-only first chunk, which yields no ``ChatChunk``, already has it). It is read from chunks
    parsed in full only (content-only chunks take the fast path) and handed on once, on the first
    chunk of the next batch, when it is new: no work per chunk on the content path.
    """

    __slots__ = ("_call_count", "_calls", "_fingerprint_unsent", "system_fingerprint")

    def __init__(self, safe: Callable[[str], str]) -> None:
        super().__init__(safe)
        self.system_fingerprint: str | None = None
        self._fingerprint_unsent = False
        # The open tool call at each upstream ``index`` (see ``_tool_call_deltas``).
        self._calls: dict[int, list[Any]] = {}
        self._call_count = 0

    def _chunks(self, lines: list[str]) -> list[ChatChunk]:
        # The hot path: per event one SSEDecoder call per line, one json.loads, one _parse_chunk.
        batch: list[ChatChunk] = []
        decode_event = self._events.decode
        for line in lines:
            event = decode_event(line)
            if event is None:
                continue
            data = event.data
            if data == "[DONE]":
                self.done = True
                break
            if not data:  # keep-alive events and comments carry no data
                continue
            try:
                chunk = _content_chunk(data)
                if chunk is None:
                    payload = json.loads(data)
                    chunk = _parse_chunk(payload, self._safe)
                    if chunk is not None and chunk.tool_calls:
                        chunk.tool_calls = self._tool_call_deltas(chunk.tool_calls)
                    fingerprint = payload.get("system_fingerprint")
                    if fingerprint and fingerprint != self.system_fingerprint and isinstance(fingerprint, str):
                        self.system_fingerprint = fingerprint
                        self._fingerprint_unsent = True
            except UpstreamError as exc:
                self.error = exc
                break
            except (ValueError, TypeError, AttributeError, KeyError, IndexError):
                self.error = failure(
                    "upstream_bad_response", self._safe(f"upstream sent a malformed chunk: {data[:200]!r}")
                )
                break
            if chunk is not None:
                if chunk.finish_reason is not None:
                    self.finished = True
                batch.append(chunk)
        if self._fingerprint_unsent and batch:  # once per batch, not per chunk
            batch[0].system_fingerprint = self.system_fingerprint
            self._fingerprint_unsent = False
        return batch

    def _tool_call_deltas(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return the upstream's ``delta.tool_calls`` entries as OpenAI streams them, whatever the server.

        OpenAI's (https://platform.openai.com/docs/api-reference/chat-streaming): the first entry of
        a call has its ``index``, ``id``, ``type: "function"`` and ``function.name``; later ones only
        the ``index`` and an ``arguments`` fragment, since clients append every string they get
        (the openai SDK's stream helper concatenates ``id`` and ``name`` too). Some servers repeat
        the ``id`` and ``name`` on every entry (the helper then read the name
        ``get_weatherget_weather``), leave out ``type``, or number every call 0 (a new ``id`` at a
        used ``index``: the whole answer merged both calls into one, with both argument objects);
        here each call gets its own ``index`` (in order of appearance), an ``id`` (``call_...`` when
        the server sent none), ``type`` and its name, once. An ``extra_content`` (Gemini's thought
        signature, through Google's OpenAI-compatible endpoint) is passed on once per call.
        Runs for tool-call chunks only.
        """
        deltas = []
        for entry in entries:
            function = entry.get("function") or {}
            name, arguments = function.get("name"), function.get("arguments") or ""
            upstream_index, upstream_id = entry.get("index", 0), entry.get("id")
            extra = entry.get("extra_content")
            call = self._calls.get(upstream_index)
            if call is None or (upstream_id and call[0] and upstream_id != call[0]):
                # [upstream id, our index, name sent, extra_content sent]
                call = self._calls[upstream_index] = [upstream_id, self._call_count, bool(name), bool(extra)]
                self._call_count += 1
                delta: dict[str, Any] = {
                    "index": call[1],
                    "id": upstream_id or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": name or "", "arguments": arguments},
                }
            else:
                delta = {"index": call[1], "function": {"arguments": arguments}}
                if name and not call[2]:  # a name that came after the call's first entry
                    delta["function"]["name"] = name
                    call[2] = True
                if extra and call[3]:
                    extra = None
                call[3] = call[3] or bool(extra)
            if extra:
                delta["extra_content"] = extra
            deltas.append(delta)
        return deltas


# A chunk that only adds content, as OpenAI, vLLM and the simulator write nearly every token
# (compact JSON, this key order): one choice, a delta of ``content`` alone, no logprobs, no
# finish_reason. Only the content is needed from it, so it is read without building the whole
# object (``json.loads`` and ``_parse_chunk`` were ~10 % of the server's CPU per token at 50
# streams). Anything else — another shape, spacing or key order, a usage object, an error —
# misses and is parsed in full. Inside a JSON string every quote is escaped, so ``"usage":{``
# and ``"error":`` can only match as keys.
_CONTENT_ONLY = re.compile(
    r'"choices":\[\{"index":0,"delta":\{"content":"((?:[^"\\]|\\.)*)"\},"logprobs":null,"finish_reason":null\}\]'
)
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _content_chunk(data: str) -> ChatChunk | None:
    """Return the ``ChatChunk`` of a content-only chunk's JSON ``data``, or None to parse it in full.

    Raises ``ValueError`` for an invalid string escape, as ``json.loads`` would.
    """
    match = _CONTENT_ONLY.search(data)
    if match is None or '"usage":{' in data or '"error":' in data:
        return None
    content = _scanstring(data, match.start(1))[0]
    return ChatChunk(content=content) if content else None


def _parse_usage(raw: dict[str, Any]) -> Usage:
    """Return the ``Usage`` of an OpenAI ``usage`` object (``CompletionUsage``), breakdown included.

    ``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``
    (https://platform.openai.com/docs/api-reference/chat/object#chat/object-usage) when present;
    DeepSeek reports its cache hits as ``prompt_cache_hit_tokens`` instead
    (https://api-docs.deepseek.com/api/create-chat-completion). A detail that is absent or null
    counts 0 (vLLM and Ollama send none; some servers send ``null`` objects). Runs once per reply.

    Raises ``ValueError`` / ``TypeError`` / ``AttributeError`` for a count that is not a number.
    """
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens") if prompt_details else None
    if cached is None:
        cached = raw.get("prompt_cache_hit_tokens")
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(cached or 0),
        reasoning_tokens=int((completion_details.get("reasoning_tokens") if completion_details else None) or 0),
    )


def _parse_chunk(payload: dict[str, Any], safe: Callable[[str], str]) -> ChatChunk | None:
    """Return the ``ChatChunk`` in one ``chat.completion.chunk`` object, or ``None`` if it carries nothing.

    The choice's ``logprobs`` object is kept as it is when it lists tokens (``ChatChunk.logprobs``);
    ``delta.refusal`` (the model declining) and ``delta.annotations`` (``url_citation`` objects)
    are read like ``content`` and ``tool_calls``. ``system_fingerprint`` is the decoder's business.

    Raises ``UpstreamError`` for an error object (``{"error": ...}``, message passed through
    ``safe``), and ``TypeError``/``AttributeError``/... for a payload of the wrong shape.
    """
    if "error" in payload:
        # vLLM, OpenRouter and others report late failures as an error object mid-stream.
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise failure("upstream_error", safe(f"upstream error mid-stream: {message}"))
    content = reasoning = refusal = ""
    tool_calls = finish_reason = usage = logprobs = annotations = None
    choices = payload.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta:
            content = delta.get("content") or ""
            # DeepSeek and vLLM say reasoning_content; OpenRouter and Ollama say reasoning.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            tool_calls = delta.get("tool_calls") or None
            refusal = delta.get("refusal") or ""
            annotations = delta.get("annotations") or None
        finish_reason = choice.get("finish_reason")
        logprobs = choice.get("logprobs")
        # Passed on only when it lists tokens (OpenAI sends {"content": [], ...} with the role chunk).
        if logprobs is not None and not (
            isinstance(logprobs, dict) and (logprobs.get("content") or logprobs.get("refusal"))
        ):
            logprobs = None
    raw_usage = payload.get("usage")
    if raw_usage:
        usage = _parse_usage(raw_usage)
    if not (content or reasoning or tool_calls or finish_reason or usage or logprobs or refusal or annotations):
        return None
    return ChatChunk(
        content=content,
        reasoning_content=reasoning,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        usage=usage,
        logprobs=logprobs,
        refusal=refusal,
        annotations=annotations,
    )
