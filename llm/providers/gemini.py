"""Adapter for Google's Gemini API (``streamGenerateContent`` over SSE).

Wire format: https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent —
``POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with the key in
``x-goog-api-key``; each SSE event's ``data`` is a whole ``GenerateContentResponse``
(https://ai.google.dev/api/generate-content#generatecontentresponse) and the body just ends after
the last one (no ``[DONE]``). ``Provider.base_url`` is ``https://generativelanguage.googleapis.com``;
the request body is ``gemini_request.gemini_request_body``'s translation of the OpenAI messages and
parameters.

Back to ``ChatChunk`` (one per ``GenerateContentResponse`` of the first candidate):

- text parts → ``content``; parts with ``thought: true`` → ``reasoning_content``;
- each ``functionCall`` part → an OpenAI ``delta.tool_calls`` entry with its whole arguments at
  once: ``{"index": n, "id": <Gemini's id, else "call_<random>">, "type": "function",
  "function": {"name", "arguments": <JSON>}}``, plus ``extra_content.google.thought_signature``
  when the part has a ``thoughtSignature`` (Gemini 3 wants it back with the call; see
  ``gemini_request``). Gemini has no switch for parallel calls (``functionCallingConfig`` takes a
  ``mode`` and ``allowedFunctionNames`` only), so a client's ``parallel_tool_calls: false`` is kept
  here: only the reply's first ``functionCall`` is handed on (the first carries the turn's
  thought signature), and the model calls the next after that call's result. The calls left out
  were generated, so Gemini's usage, which counts them, is billed as it is;
- a candidate's ``logprobsResult`` (asked for with ``logprobs``; ``gemini_request``) → the chunk's
  ``logprobs``, OpenAI's ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}]}], "refusal": null}``: one entry per ``chosenCandidates`` step, its alternatives from
  ``topCandidates`` at the same step, ``bytes`` the token's UTF-8; on the chunks with text only;
- ``finishReason`` → ``finish_reason``: ``STOP`` → ``stop`` (``tool_calls`` when the reply called
  functions), ``MAX_TOKENS`` → ``length``, ``SAFETY``, ``RECITATION``, ``BLOCKLIST``,
  ``PROHIBITED_CONTENT``, ``SPII``, ``IMAGE_SAFETY``… → ``content_filter``, others → ``stop``;
  a prompt blocked outright (``promptFeedback.blockReason``, no candidates) → ``content_filter``;
- the ``usageMetadata`` of the finishing response (else the last one sent) → a last ``ChatChunk(usage=...)``:
  ``prompt_tokens`` = ``promptTokenCount`` (+ ``toolUsePromptTokenCount``; the cached tokens are
  already inside it), ``completion_tokens`` = ``candidatesTokenCount`` + ``thoughtsTokenCount``,
  ``cached_tokens`` = ``cachedContentTokenCount``, ``reasoning_tokens`` = ``thoughtsTokenCount``;
- Gemini repeats ``usageMetadata`` on every response, the prompt's count among it: the first
  response with output (and any later one whose ``promptTokenCount`` changed) is preceded by a
  ``Usage.prompt_only`` chunk of it, as Anthropic's ``message_start``, so a stream cut before its
  finishing response is billed the prompt the provider reported (the engine counts the completion).

Errors are the shared ``UpstreamError`` mapping (``llm.providers.http``), reading Google's
``{"error": {"code", "message", "status", "details"}}``; in addition Google's **400** for a wrong
key (reason ``API_KEY_INVALID``) is an auth failure (502), and a 429's
``google.rpc.RetryInfo.retryDelay`` (or a ``Retry-After`` header) becomes ``retry_after``. A body
that ends without a ``finishReason`` is ``upstream_disconnected``.

Transport and parsing are every adapter's (``llm.providers.http.post_sse``): the per-loop aiohttp
session, ``readany`` batches, httpx-sse's line and event decoders; here one ``json.loads`` per event. CPU per chunk,
measured with ``python -m bench.adapter_cpu --kind gemini`` against ``manage.py llm_simulator``
in another process (64-token replies, a token every 10 ms, uvloop; 2 runs each, alternating with
``--kind openai`` on the same simulator, a shared and busy 2-core machine, 2026-12-02):

==========================================  ===========  ===========
replies                                      gemini (µs)  openai (µs)
==========================================  ===========  ===========
one at a time (1.04 chunks per batch)        286–315      257–272
200 at once (2.8–4.6 chunks per batch)       39           34–37
==========================================  ===========  ===========

Parsing alone (bytes to ``ChatChunk``, the simulator's 64 events fed one per read, best of 5
in-process): ~23 µs per Gemini event against ~16 µs per OpenAI chunk on the same machine at the
same time. Gemini's events are larger (each repeats ``usageMetadata``, ``modelVersion`` and
``responseId``) and get no content-only fast path: every event is a full ``json.loads``. The
``google-genai`` SDK was not used for the stream: building its pydantic ``GenerateContentResponse``
from an already-parsed event took ~430 µs per event in the same measurement, and it brings its
own HTTP client, outside the shared pool.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import aiohttp

from .base import (
    PASSED_THROUGH_STATUSES,
    TRANSLATION_ERRORS,
    UPSTREAM_MESSAGES,
    ChatChunk,
    ChatProvider,
    ChatRequest,
    UpstreamError,
    Usage,
    untranslatable,
)
from .gemini_request import gemini_request_body

# The adapters' shared transport (one aiohttp session per event loop) and error helpers.
from .http import (
    MAX_ERROR_MESSAGE,
    SSE_REQUEST_HEADERS,
    SSEBodyDecoder,
    failure,
    json_body,
    post_sse,
    retry_after_ms,
    retry_after_seconds,
    where,
)

__all__ = ["GeminiProvider", "usage_from_metadata"]

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
}


def usage_from_metadata(metadata: dict[str, Any]) -> Usage:
    """Return the ``Usage`` of Gemini's ``usageMetadata`` (https://ai.google.dev/api/generate-content#UsageMetadata)."""

    def count(name: str) -> int:
        return int(metadata.get(name) or 0)

    thoughts = count("thoughtsTokenCount")
    return Usage(
        prompt_tokens=count("promptTokenCount") + count("toolUsePromptTokenCount"),
        completion_tokens=count("candidatesTokenCount") + thoughts,
        cached_tokens=count("cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def _prompt_usage(metadata: dict[str, Any]) -> Usage:
    """Return the ``Usage.prompt_only`` report of a response's ``usageMetadata`` before the finishing one:
    its prompt counts (and cache split), the completion's not yet known."""
    usage = usage_from_metadata(metadata)
    return Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=0, cached_tokens=usage.cached_tokens, prompt_only=True
    )


def _retry_delay(error: Any) -> float | None:
    """Return the seconds of a Google error's ``google.rpc.RetryInfo`` detail (``"retryDelay": "1.5s"``)."""
    for detail in (error.get("details") or []) if isinstance(error, dict) else []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(float(delay[:-1]), 0.0)
            except ValueError:
                return None
    return None


class GeminiProvider(ChatProvider):
    """Stream a chat completion from Gemini's ``streamGenerateContent`` (``request.model`` is the model id)."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunks (content, reasoning, tool calls, finish_reason, then usage) in batches.

        Raises ``ApplicationError`` 400 before any request for messages Gemini cannot take (see
        ``gemini_request``), and ``UpstreamError`` as ``OpenAICompatibleProvider.stream`` does
        (statuses, unreachable, timeouts, drops, malformed events, an error object mid-stream).
        Cancellation or ``aclose()`` closes the upstream connection at once.
        """
        config = self.config
        try:
            body = gemini_request_body(request.messages, request.parameters)
            data = json_body(body)
        except TRANSLATION_ERRORS as exc:  # a shape the translation did not expect: the request's fault
            raise untranslatable(exc) from exc
        headers = dict(SSE_REQUEST_HEADERS)
        if config.extra_headers:
            headers.update(config.extra_headers)
        if config.api_key:
            headers["x-goog-api-key"] = config.api_key
        url = (
            f"{config.base_url.rstrip('/')}/v1beta/models/{quote(request.model, safe='')}:streamGenerateContent?alt=sse"
        )
        batches = post_sse(
            config,
            url,
            data=data,
            headers=headers,
            decoder=_ResponseDecoder(self._safe, one_call=request.parameters.get("parallel_tool_calls") is False),
            safe=self._safe,
            read_error=self._status_error,
        )
        async with aclosing(batches):
            async for batch in batches:
                yield batch

    async def _status_error(self, response: aiohttp.ClientResponse, safe: Callable[[str], str]) -> UpstreamError:
        """Return the ``UpstreamError`` for a non-2xx response, quoting Google's error message."""
        status = response.status
        raw = (await response.read()).decode("utf-8", "replace")
        message, error = raw[:MAX_ERROR_MESSAGE], None
        try:
            error = json.loads(raw)["error"]
            message = str(error["message"] if isinstance(error, dict) else error)[:MAX_ERROR_MESSAGE]
        except (ValueError, TypeError, KeyError):
            pass
        detail = safe(f"upstream {where(response.url)} answered {status}: {raw[:MAX_ERROR_MESSAGE]}")
        retry_after = None
        if status in (401, 403) or (status == 400 and "API_KEY_INVALID" in raw):
            text, code = UPSTREAM_MESSAGES["upstream_auth_failed"], "upstream_auth_failed"
            status_for_client: int | None = 502
        elif status == 429:
            text, code, status_for_client = (
                f"The model provider's rate limit was reached: {message}",
                "upstream_rate_limited",
                None,
            )
            retry_after = retry_after_ms(response.headers.get("retry-after-ms"))
            if retry_after is None:
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if retry_after is None:
                retry_after = _retry_delay(error)
        elif status in PASSED_THROUGH_STATUSES:
            text, code = f"The model provider refused the request ({status}): {message}", "upstream_error"
            status_for_client = None
        else:
            text, code = f"{UPSTREAM_MESSAGES['upstream_error']} (status {status})", "upstream_error"
            status_for_client = None
        return UpstreamError(
            safe(text),
            upstream_status=status,
            code=code,
            status=status_for_client,
            detail=detail,
            retry_after=retry_after,
        )


def _token_logprob(candidate: dict[str, Any]) -> dict[str, Any]:
    """Return OpenAI's ``{token, logprob, bytes}`` of a ``LogprobsResult.Candidate`` (``logProbability`` 0 is left out
    of Google's JSON, as protobuf leaves out zero values)."""
    token = candidate.get("token") or ""
    return {"token": token, "logprob": float(candidate.get("logProbability") or 0.0), "bytes": list(token.encode())}


def _token_logprobs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Return OpenAI's ``logprobs.content`` (``ChatCompletionTokenLogprob`` list) of a candidate's ``logprobsResult``.

    ``chosenCandidates[i]`` is step ``i``'s token, ``topCandidates[i].candidates`` its alternatives
    (https://ai.google.dev/api/generate-content#LogprobsResult; the google-genai SDK's ``LogprobsResult``).
    """
    tops = result.get("topCandidates") or []
    entries = []
    for step, chosen in enumerate(result.get("chosenCandidates") or ()):
        alternatives = (tops[step].get("candidates") or []) if step < len(tops) else []
        entries.append({**_token_logprob(chosen), "top_logprobs": [_token_logprob(a) for a in alternatives]})
    return entries


class _ResponseDecoder(SSEBodyDecoder):
    """Turn the body of a ``streamGenerateContent?alt=sse`` response, in pieces as read, into chunk batches.

    ``http.SSEBodyDecoder`` does the bytes, text and lines; this parses the events, one
    ``GenerateContentResponse`` JSON each. Gemini has no end marker: ``finished`` (a
    ``finishReason``, or a blocked prompt) ends the reply (``END_AT_FINISH``); ``error``: an error
    object or a malformed event. ``one_call``: the client sent ``parallel_tool_calls: false``, so
    only the reply's first ``functionCall`` is handed on.
    """

    __slots__ = ("_calls", "_metadata", "_one_call", "_prompt_reported")
    END_AT_FINISH = True

    def __init__(self, safe: Callable[[str], str], *, one_call: bool = False) -> None:
        super().__init__(safe)
        self._one_call = one_call
        self._calls = 0  # functionCall parts so far: the next tool call's index
        self._metadata: dict[str, Any] | None = None  # the last usageMetadata received
        self._prompt_reported: Any = None  # the promptTokenCount of the last prompt-only usage chunk

    def _chunks(self, lines: list[str]) -> list[ChatChunk]:
        batch: list[ChatChunk] = []
        for line in lines:
            event = self._events.decode(line)
            if event is None or not event.data or self.finished:
                continue
            try:
                batch.extend(self._payload_chunks(json.loads(event.data)))
            except UpstreamError as exc:
                self.error = exc
                break
            except (ValueError, TypeError, AttributeError, KeyError, IndexError):
                self.error = failure(
                    "upstream_bad_response", self._safe(f"upstream sent a malformed event: {event.data[:200]!r}")
                )
                break
        return batch

    def _payload_chunks(self, payload: dict[str, Any]) -> list[ChatChunk]:
        """Return the chunks of one ``GenerateContentResponse`` (none, one, or one plus the usage chunk)."""
        if "error" in payload:
            error = payload["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise failure("upstream_error", self._safe(f"upstream error mid-stream: {message}"))
        candidates = payload.get("candidates")
        finish_reason = None
        content: list[str] = []
        reasoning: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        logprobs = None
        if candidates:
            candidate = candidates[0]
            for part in (candidate.get("content") or {}).get("parts") or ():
                text = part.get("text")
                if isinstance(text, str):
                    (reasoning if part.get("thought") else content).append(text)
                call = part.get("functionCall")
                if call is not None and not (self._one_call and self._calls):
                    tool_calls.append(self._tool_call(call, part.get("thoughtSignature")))
            result = candidate.get("logprobsResult")
            if result and any(content):
                logprobs = {"content": _token_logprobs(result), "refusal": None}
            reason = candidate.get("finishReason")
            if reason and reason != "FINISH_REASON_UNSPECIFIED":
                finish_reason = _FINISH_REASONS.get(reason, "stop")
                if finish_reason == "stop" and self._calls:
                    finish_reason = "tool_calls"
        elif (payload.get("promptFeedback") or {}).get("blockReason"):
            finish_reason = "content_filter"
        chunks = []
        if content or reasoning or tool_calls or finish_reason:
            chunks.append(
                ChatChunk(
                    content="".join(content),
                    reasoning_content="".join(reasoning),
                    tool_calls=tool_calls or None,
                    finish_reason=finish_reason,
                    logprobs=logprobs,
                )
            )
        metadata = payload.get("usageMetadata")
        if metadata:
            self._metadata = metadata
        if finish_reason is not None:
            self.finished = True
            # Gemini sends the full usage with the finishing response; else the last one it sent.
            if self._metadata:
                chunks.append(ChatChunk(usage=usage_from_metadata(self._metadata)))
        elif chunks and self._metadata and self._metadata.get("promptTokenCount") != self._prompt_reported:
            # The prompt's count as the responses so far reported it, first in a batch with output
            # (never a chunk alone: a batch of usage alone would settle routing before the reply
            # began), once per count: one comparison per response. A stream cut before its
            # finishing response is still billed the provider's prompt tokens.
            self._prompt_reported = self._metadata.get("promptTokenCount")
            chunks.insert(0, ChatChunk(usage=_prompt_usage(self._metadata)))
        return chunks

    def _tool_call(self, call: dict[str, Any], signature: Any) -> dict[str, Any]:
        """Return the OpenAI ``delta.tool_calls`` entry of a ``functionCall`` part (whole arguments)."""
        entry: dict[str, Any] = {
            "index": self._calls,
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)},
        }
        if isinstance(signature, str) and signature:
            entry["extra_content"] = {"google": {"thought_signature": signature}}
        self._calls += 1
        return entry
