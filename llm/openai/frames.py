"""The streamed ``/v1/chat/completions`` answer: the engine's events as ``chat.completion.chunk`` frames.

Wire format: https://platform.openai.com/docs/api-reference/chat/streaming (SSE: one
``data: {chat.completion.chunk}`` line per chunk, then ``data: [DONE]``); what NextChat reads of
it is in ``/work/shared/nextchat.md``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..providers import ChatChunk
from ..streaming import KEEPALIVE, PROVIDER, Reply, ReplyDelta, ReplyDone, ReplyFailed, ReplyOutcome
from .services import ChatCompletionPlan

# One encoder, built once: ``json.dumps`` with arguments builds a new encoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A JSON string literal (what ``_encode`` returns for a ``str``, without its type dispatch).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

# Frames are ``bytes``: ``StreamingHttpResponse`` passes bytes through, where it would look up
# the charset and encode every ``str`` part.
DONE = b"data: [DONE]\n\n"
KEEPALIVE_COMMENT = b": keep-alive\n\n"


def usage_object(outcome: ReplyOutcome) -> dict[str, Any]:
    """Return OpenAI's ``usage`` object (``CompletionUsage``) of a finished reply.

    Prompt, completion and total tokens; when the provider reported the usage (whatever its
    kind: ``llm.providers.Usage``), also ``prompt_tokens_details: {"cached_tokens"}`` and
    ``completion_tokens_details: {"reasoning_tokens"}``, as OpenAI sends them. Counted by our
    tokenizer (a stopped or cut stream), the breakdown is unknown and left out. Tokens written to
    a prompt cache (Anthropic's) have no field in OpenAI's schema: they count in ``prompt_tokens``.
    https://platform.openai.com/docs/api-reference/chat/object#chat/object-usage
    """
    usage = outcome.usage
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if outcome.usage_source == PROVIDER:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


async def chat_completion_frames(reply: Reply[ChatCompletionPlan], *, keepalive: float) -> AsyncIterator[bytes]:
    """Yield the SSE body of ``reply`` as UTF-8 bytes: its chunks, the usage chunk if asked for, ``[DONE]``.

    The chunks of one ``ReplyDelta`` (what the upstream had sent when we read) go out as one
    part, i.e. one write. The first frame carries ``role``; a frame of plain content (nearly
    every token) costs one JSON string escape; a chunk with the upstream's ``logprobs`` carries
    them as they came (OpenAI's ``choices[].logprobs``), one with a refusal its ``delta.refusal``
    (the openai SDK's stream helper turns them into ``refusal.delta`` / ``refusal.done`` events),
    one with annotations its ``delta.annotations`` as they came. ``: keep-alive`` comments flow every
    ``keepalive`` seconds while the upstream is silent before its first chunk (clients ignore
    comments). A failure after the headers is sent as ``data: {"error": ...}`` and ends the
    stream, as OpenAI does; so is a reply the server stopped (its key revoked, a shutdown).
    ``system_fingerprint`` is on every frame once the upstream sent one, as OpenAI sends it (the
    SDK's stream helper keeps the last chunk's); without one the key is left out (OpenAI's schema
    types it as a string when present). The adapter hands it on with the first chunk of a batch
    (``ChatChunk.system_fingerprint``), so it costs one test per batch.

    ``model`` is the model that served the reply (``Reply.model_name``: a fallback's name when one
    did), known once the first chunks arrived: the frames' common head is built then, once.
    """
    plan = reply.plan
    head = content_head = reasoning_head = b""  # built by ``begin`` at the first chunks or the end

    def begin(system_fingerprint: str | None = None) -> None:
        nonlocal head, content_head, reasoning_head
        fingerprint = f',"system_fingerprint":{_encode(system_fingerprint)}' if system_fingerprint else ""
        head = (
            f'data: {{"id":{_encode(plan.reply_id)},"object":"chat.completion.chunk","created":{plan.created},'
            f'"model":{_encode(reply.model_name)}{fingerprint},"choices":['
        ).encode()
        content_head = head + b'{"index":0,"delta":{"content":'
        reasoning_head = head + b'{"index":0,"delta":{"reasoning_content":'

    tail = b'],"usage":null}\n\n' if plan.include_usage else b"]}\n\n"
    content_tail = b'},"logprobs":null,"finish_reason":null}' + tail
    role_sent = False

    def frame(chunk: ChatChunk) -> bytes:
        nonlocal role_sent
        if role_sent and not (chunk.tool_calls or chunk.finish_reason or chunk.logprobs or chunk.annotations):
            content, reasoning = chunk.content, chunk.reasoning_content
            if content and not (reasoning or chunk.refusal):
                return content_head + _encode_str(content).encode() + content_tail
            if reasoning and not content:
                return reasoning_head + _encode_str(reasoning).encode() + content_tail
        delta: dict[str, Any] = {} if role_sent else {"role": "assistant"}
        role_sent = True
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.reasoning_content:
            delta["reasoning_content"] = chunk.reasoning_content
        if chunk.refusal:
            delta["refusal"] = chunk.refusal
        if chunk.tool_calls:
            delta["tool_calls"] = chunk.tool_calls
        if chunk.annotations:
            delta["annotations"] = chunk.annotations
        choice = {"index": 0, "delta": delta, "logprobs": chunk.logprobs, "finish_reason": chunk.finish_reason}
        return head + _encode(choice).encode() + tail

    async for event in reply.events(keepalive=keepalive):
        if type(event) is ReplyDelta:
            chunks = event.chunks
            fingerprint = chunks[0].system_fingerprint  # the adapter's new fingerprint, if any: once per batch
            if not head or fingerprint:  # the serving model is known from the reply's first chunks on
                begin(fingerprint)
            yield frame(chunks[0]) if len(chunks) == 1 else b"".join(map(frame, chunks))
        elif event is KEEPALIVE:
            yield KEEPALIVE_COMMENT
        elif type(event) is ReplyDone:
            if event.outcome.error is not None:  # stopped by the server (a revoked key, a shutdown)
                yield b"data: " + _encode(event.outcome.error.as_dict()).encode() + b"\n\n"
            elif plan.include_usage:
                if not head:  # a reply without a chunk
                    begin()
                yield head + b'],"usage":' + _encode(usage_object(event.outcome)).encode() + b"}\n\n" + DONE
            else:
                yield DONE
        elif type(event) is ReplyFailed:
            yield b"data: " + _encode(event.error.as_dict()).encode() + b"\n\n"


__all__ = ["DONE", "KEEPALIVE_COMMENT", "chat_completion_frames", "usage_object"]
