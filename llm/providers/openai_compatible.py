"""Adapter for OpenAI-compatible chat completion APIs (OpenAI, DeepSeek, vLLM, Ollama ``/v1``, ...).

Wire format: https://platform.openai.com/docs/api-reference/chat/streaming — ``POST
{base_url}/chat/completions`` with ``stream: true`` answers SSE events whose ``data`` is a
``chat.completion.chunk`` object, ending with ``data: [DONE]``. With ``stream_options:
{"include_usage": true}`` the last chunk before ``[DONE]`` has ``choices: []`` and ``usage``.

This is the hot path: per chunk it does one ``json.loads``, a few dict lookups and at most one
``ChatChunk``. SSE framing is parsed by httpx-sse.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from django.conf import settings
from httpx_sse import EventSource, SSEError, aconnect_sse

from chatbackend.logging import redact

from .base import ChatChunk, ChatProvider, ChatRequest, UpstreamError, Usage

__all__ = ["OpenAICompatibleProvider", "aclose_clients"]

# One client (one connection pool) per event loop: httpx connections belong to the loop that
# opened them. Production has one loop per process; pytest-asyncio makes one per test.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()

_MAX_ERROR_MESSAGE = 500  # characters of an upstream error message worth showing


def _client() -> httpx.AsyncClient:
    """Return this event loop's shared client, creating it on first use."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        _forget_closed_loops()
        limits = httpx.Limits(
            max_connections=settings.LLM_UPSTREAM_MAX_CONNECTIONS,
            max_keepalive_connections=settings.LLM_UPSTREAM_MAX_KEEPALIVE,
        )
        client = httpx.AsyncClient(limits=limits)
        _clients[loop] = client
    return client


async def aclose_clients() -> None:
    """Close the running loop's shared client and forget clients of loops that are closed.

    For test teardown and process shutdown; the next request opens a fresh client.
    """
    client = _clients.pop(asyncio.get_running_loop(), None)
    _forget_closed_loops()
    if client is not None:
        await client.aclose()


def _forget_closed_loops() -> None:
    """Drop the clients of closed loops: their sockets died with the loop, and a client's sockets
    refer to its loop, so the weak key alone would never let the pair be collected."""
    for loop in [loop for loop in _clients if loop.is_closed()]:
        del _clients[loop]


class OpenAICompatibleProvider(ChatProvider):
    """Stream chat completions from an OpenAI-compatible ``/chat/completions`` endpoint."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Yield the reply's chunks (content, reasoning, raw tool calls, finish_reason), then usage.

        Chunks that carry nothing (e.g. a role-only first delta) are skipped. Raises
        ``UpstreamError``: the upstream's error status (see its status mapping), 502 when
        unreachable, dropped mid-stream or sending malformed chunks, 504 on a timeout.
        Cancellation or ``aclose()`` closes the upstream response at once (``async with``).
        """
        config = self.config
        body = {
            **request.parameters,
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.connect_timeout,
            pool=config.connect_timeout,
        )
        url = f"{config.base_url.rstrip('/')}/chat/completions"
        responded = False
        try:
            async with aconnect_sse(_client(), "POST", url, json=body, headers=headers, timeout=timeout) as source:
                responded = True
                if source.response.status_code >= 300:
                    raise await self._status_error(source.response)
                async for chunk in self._chunks(source):
                    yield chunk
        except SSEError as exc:  # before httpx.HTTPError: it subclasses httpx.TransportError
            raise UpstreamError(self._safe(f"upstream did not stream: {exc}"), code="upstream_bad_response") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamError(
                self._safe(f"upstream timed out ({type(exc).__name__})"), code="upstream_timeout", status=504
            ) from exc
        except httpx.ConnectError as exc:
            raise UpstreamError(self._safe(f"upstream unreachable: {exc}"), code="upstream_unreachable") from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            where = "mid-stream" if responded else "before responding"
            raise UpstreamError(
                self._safe(f"upstream closed the connection {where}: {exc}"), code="upstream_disconnected"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(self._safe(f"upstream request failed: {exc}")) from exc

    async def _chunks(self, source: EventSource) -> AsyncGenerator[ChatChunk, None]:
        """Yield a ``ChatChunk`` per meaningful SSE event until ``[DONE]``."""
        finished = False
        async for event in source.aiter_sse():
            data = event.data
            if data == "[DONE]":
                return
            if not data:  # keep-alive events and comments carry no data
                continue
            try:
                payload = json.loads(data)
                chunk = self._parse_chunk(payload)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                raise UpstreamError(
                    self._safe(f"upstream sent a malformed chunk: {data[:200]!r}"), code="upstream_bad_response"
                ) from exc
            if chunk is not None:
                finished = finished or chunk.finish_reason is not None
                yield chunk
        if not finished:
            # The body ended cleanly yet without [DONE] or a finish_reason: the reply is truncated.
            raise UpstreamError("upstream ended the stream before the reply was finished", code="upstream_disconnected")

    def _parse_chunk(self, payload: dict[str, Any]) -> ChatChunk | None:
        """Return the ``ChatChunk`` in one ``chat.completion.chunk`` object, or ``None`` if it is empty."""
        if "error" in payload:
            # vLLM, OpenRouter and others report late failures as an error object mid-stream.
            error = payload["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError(self._safe(f"upstream error mid-stream: {message}"), code="upstream_error")
        content = reasoning = ""
        tool_calls = finish_reason = usage = None
        choices = payload.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta:
                content = delta.get("content") or ""
                # DeepSeek and vLLM say reasoning_content; OpenRouter and Ollama say reasoning.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                tool_calls = delta.get("tool_calls") or None
            finish_reason = choice.get("finish_reason")
        raw_usage = payload.get("usage")
        if raw_usage:
            usage = Usage(
                prompt_tokens=int(raw_usage.get("prompt_tokens") or 0),
                completion_tokens=int(raw_usage.get("completion_tokens") or 0),
            )
        if not (content or reasoning or tool_calls or finish_reason or usage):
            return None
        return ChatChunk(
            content=content,
            reasoning_content=reasoning,
            tool_calls=tool_calls,
            finish_reason=finish_reason,
            usage=usage,
        )

    async def _status_error(self, response: httpx.Response) -> UpstreamError:
        """Return the ``UpstreamError`` for a non-2xx response, quoting OpenAI's error message."""
        status = response.status_code
        raw = (await response.aread()).decode("utf-8", "replace")
        message = raw[:_MAX_ERROR_MESSAGE]
        try:
            error = json.loads(raw)["error"]
            message = str(error["message"] if isinstance(error, dict) else error)[:_MAX_ERROR_MESSAGE]
        except (ValueError, TypeError, KeyError):
            pass  # not OpenAI's error shape: keep the start of the raw body
        if status in (401, 403):
            text, code = f"upstream rejected the provider's credentials ({status}): {message}", "upstream_auth_failed"
        elif status == 429:
            text, code = f"upstream rate limit (429): {message}", "upstream_rate_limited"
        else:
            text, code = f"upstream error {status}: {message}", "upstream_error"
        return UpstreamError(self._safe(text), upstream_status=status, code=code)

    def _safe(self, text: str) -> str:
        """Return ``text`` with this provider's API key (and anything key-shaped) removed."""
        if self.config.api_key:
            text = text.replace(self.config.api_key, "[REDACTED]")
        return redact(text)
