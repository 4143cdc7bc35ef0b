"""The streamed ``/v1/chat/completions`` response: ``chat.completion.chunk`` frames over SSE.

Wire format: https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads
of it is in ``/work/shared/nextchat.md``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import StreamingHttpResponse

from chatbackend.errors import ApplicationError
from llm.providers import ChatChunk

from ..streaming import Reply

# One encoder, built once: ``json.dumps`` with arguments builds a new encoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A JSON string literal (what ``_encode`` returns for a ``str``, without its type dispatch).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

# Frames are ``bytes``: ``StreamingHttpResponse`` passes bytes through, where it would look up
# the charset and encode every ``str`` chunk.
_DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


class ChatCompletionStreamingResponse(StreamingHttpResponse):
    """``text/event-stream`` of ``chat.completion.chunk`` frames, then ``data: [DONE]``.

    Headers: ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` so proxies pass each
    frame on at once (FIELD-NOTES, "HTTP streaming"). It must never be gzipped (each chunk would
    become its own gzip member): keep ``GZipMiddleware`` off this path. ``close()`` abandons the
    reply if the frames were never iterated (the client left while the headers were being
    sent), so the reply is still persisted as ``cancelled``.
    """

    def __init__(self, reply: Reply, *, include_usage: bool) -> None:
        frames = _chunk_frames(reply, include_usage, float(settings.SSE_KEEPALIVE_SECONDS))
        super().__init__(frames, content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"
        self.reply = reply

    def close(self) -> None:
        try:
            if self.reply.outcome is None:
                _abandon(self.reply)
        finally:
            super().close()


_abandoned: set[asyncio.Task[None]] = set()


def _abandon(reply: Reply) -> None:
    """Close ``reply`` from sync code: on the event loop if there is one in this thread, else via async_to_sync."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # Django's ASGI handler calls close() in a worker thread
        async_to_sync(reply.aclose)()
        return
    task = loop.create_task(reply.aclose())
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


async def _chunk_frames(reply: Reply, include_usage: bool, keepalive_seconds: float) -> AsyncIterator[bytes]:
    """Yield the SSE frames of ``reply``, as UTF-8 bytes: its chunks, the usage chunk if asked for, ``[DONE]``.

    Until the first chunk arrives, an SSE comment (``: keep-alive``) every ``keepalive_seconds``
    keeps proxies from dropping the idle connection (FIELD-NOTES, "HTTP streaming"); clients
    ignore comments. The hot path: the envelope of every frame is serialized and encoded once,
    so a frame of plain content (or of plain reasoning) costs one JSON string escape and one
    encode. A failure after the headers is sent as ``data: {"error": ...}`` and ends the stream
    (as OpenAI does); ``Reply.chunks`` persisted it ``failed``. A client that leaves raises
    ``CancelledError`` here (or ``GeneratorExit`` at a ``yield``); the reply is persisted
    ``cancelled`` and the upstream request closed, however far it got. There is no
    ``system_fingerprint``: OpenAI's schema types it as a string when present, and there is no
    fingerprint to report.
    """
    info = reply.plan.info
    head = (
        f'data: {{"id":{_encode(info["id"])},"object":"chat.completion.chunk","created":{info["created"]},'
        f'"model":{_encode(info["model"])},"choices":['
    ).encode()
    tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    content_head = head + b'{"index":0,"delta":{"content":'
    reasoning_head = head + b'{"index":0,"delta":{"reasoning_content":'
    content_tail = b'},"logprobs":null,"finish_reason":null}' + tail
    role_sent = False

    def frame(chunk: ChatChunk) -> bytes | None:
        nonlocal role_sent
        if not (chunk.content or chunk.reasoning_content or chunk.tool_calls or chunk.finish_reason):
            return None  # e.g. the upstream's usage-only chunk: usage is sent at the end
        delta: dict[str, Any] = {} if role_sent else {"role": "assistant"}
        role_sent = True
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.reasoning_content:
            delta["reasoning_content"] = chunk.reasoning_content
        if chunk.tool_calls:
            delta["tool_calls"] = chunk.tool_calls
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}
        return head + _encode(choice).encode() + tail

    chunks = cast(AsyncGenerator[ChatChunk, None], reply.chunks())  # an async generator: closed below
    try:
        first = asyncio.ensure_future(anext(chunks))
        try:
            while not first.done():
                await asyncio.wait((first,), timeout=keepalive_seconds)
                if not first.done():
                    yield KEEPALIVE
        except BaseException:  # the client left while the upstream was silent
            first.cancel()
            await asyncio.wait((first,))
            raise
        try:
            data = frame(first.result())
        except StopAsyncIteration:  # an upstream that finished without a single chunk
            pass
        else:
            if data:
                yield data
            async for chunk in chunks:
                # The frames of nearly every token: content alone, or reasoning alone.
                if role_sent and not (chunk.tool_calls or chunk.finish_reason):
                    content, reasoning = chunk.content, chunk.reasoning_content
                    if content and not reasoning:
                        yield content_head + _encode_str(content).encode() + content_tail
                        continue
                    if reasoning and not content:
                        yield reasoning_head + _encode_str(reasoning).encode() + content_tail
                        continue
                data = frame(chunk)
                if data:
                    yield data
    except ApplicationError as exc:
        yield b"data: " + _encode(exc.as_dict()).encode() + b"\n\n"
        return
    finally:
        await chunks.aclose()
        if reply.outcome is None:  # cancelled before chunks() ever ran
            await reply.aclose()
    if include_usage:
        yield head + b'],"usage":' + _encode(reply_usage(reply)).encode() + b"}\n\n"
    yield _DONE


def reply_usage(reply: Reply) -> dict[str, int]:
    """Return OpenAI's ``usage`` object of a finished reply: prompt, completion and total tokens."""
    assert reply.outcome is not None  # noqa: S101
    usage = reply.outcome.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


__all__ = ["KEEPALIVE", "ChatCompletionStreamingResponse", "reply_usage"]
