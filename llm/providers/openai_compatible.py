"""Adapter for OpenAI-compatible chat completion APIs (OpenAI, DeepSeek, vLLM, Ollama ``/v1``, ...).

Wire format: https://platform.openai.com/docs/api-reference/chat/streaming — ``POST
{base_url}/chat/completions`` with ``stream: true`` answers SSE events whose ``data`` is a
``chat.completion.chunk`` object, ending with ``data: [DONE]``. With ``stream_options:
{"include_usage": true}`` the last chunk before ``[DONE]`` has ``choices: []`` and ``usage``.

This is the hot path: per chunk it does one ``json.loads``, a few dict lookups and at most one
``ChatChunk``. The transport is aiohttp (its connection pool does O(1) work per request, and its
line reader is about twice as cheap per chunk as httpx's text decoding); SSE framing is parsed by
httpx-sse's decoder, fed one line at a time.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import httpx
from aiohttp.http_exceptions import LineTooLong
from django.conf import settings

# A private module of httpx-sse, pinned to 0.4.3 in requirements.txt: ``SSEDecoder().decode(line)``
# takes one line without its line ending and returns a ``ServerSentEvent`` at the blank line that
# ends an event, else ``None`` (how ``httpx_sse.EventSource.aiter_sse`` uses it). The public API
# only reads httpx responses. ``test_httpx_sse_decoder_api`` fails if an upgrade changes this.
from httpx_sse._decoders import SSEDecoder

from chatbackend.logging import redact

from .base import ChatChunk, ChatProvider, ChatRequest, UpstreamError, Usage

__all__ = ["OpenAICompatibleProvider", "aclose_clients"]

# One session (one connection pool) per event loop: aiohttp connections belong to the loop that
# opened them. Production has one loop per process; pytest-asyncio makes one per test.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()

_MAX_ERROR_MESSAGE = 500  # characters of an upstream error message worth showing
# Longest SSE line accepted. aiohttp's line iterator stops at 128 KiB by default; a single chunk
# (e.g. a tool call's whole arguments) may be longer. Beyond this the upstream is misbehaving.
_MAX_LINE_BYTES = 16 * 1024 * 1024
# What httpx-sse's ``aconnect_sse`` sent, and still send.
_SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store", "Content-Type": "application/json"}


def _session() -> aiohttp.ClientSession:
    """Return this event loop's shared session, creating it on first use."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        _forget_closed_loops()
        connector = aiohttp.TCPConnector(
            limit=settings.LLM_UPSTREAM_MAX_CONNECTIONS,
            limit_per_host=0,
            keepalive_timeout=settings.LLM_UPSTREAM_KEEPALIVE_SECONDS,
            # httpx's TLS defaults, which the adapter used before: certifi's CA bundle, or
            # SSL_CERT_FILE / SSL_CERT_DIR when set (aiohttp alone would use the system store).
            ssl=httpx.create_ssl_context(),
        )
        # trust_env: honour HTTP(S)_PROXY / NO_PROXY as httpx did. No total timeout: each request
        # sets its connect and read timeouts, and a reply may stream for as long as it keeps going.
        session = aiohttp.ClientSession(connector=connector, trust_env=True, timeout=aiohttp.ClientTimeout(total=None))
        _sessions[loop] = session
    return session


async def aclose_clients() -> None:
    """Close the running loop's shared session and forget sessions of loops that are closed.

    For test teardown and process shutdown; the next request opens a fresh session.
    """
    session = _sessions.pop(asyncio.get_running_loop(), None)
    _forget_closed_loops()
    if session is not None:
        await session.close()


def _forget_closed_loops() -> None:
    """Drop the sessions of closed loops: their sockets died with the loop, and a session refers
    to its loop, so the weak key alone would never let the pair be collected."""
    for loop in [loop for loop in _sessions if loop.is_closed()]:
        _sessions.pop(loop).detach()  # marks it closed: nothing left to await on a dead loop


class OpenAICompatibleProvider(ChatProvider):
    """Stream chat completions from an OpenAI-compatible ``/chat/completions`` endpoint."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        """Yield the reply's chunks (content, reasoning, raw tool calls, finish_reason), then usage.

        Chunks that carry nothing (e.g. a role-only first delta) are skipped. Raises
        ``UpstreamError``: the upstream's error status (see its status mapping), 502 when
        unreachable, dropped mid-stream or sending malformed chunks, 504 on a timeout.
        Cancellation or ``aclose()`` closes the upstream connection at once.
        """
        config = self.config
        body = {
            **request.parameters,
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Serialized as httpx did: compact, UTF-8, no NaN.
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        headers = dict(_SSE_HEADERS)
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        # connect: waiting for a pooled connection plus DNS, TCP and TLS (httpx's pool and connect
        # timeouts); sock_read: the longest silence, before the headers or between body reads.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        url = f"{config.base_url.rstrip('/')}/chat/completions"
        responded = False
        try:
            async with _session().post(
                url, data=data, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                responded = True
                try:
                    if response.status >= 300:
                        raise await self._status_error(response)
                    content_type = response.headers.get("Content-Type", "").partition(";")[0]
                    if "text/event-stream" not in content_type:
                        raise UpstreamError(
                            self._safe(
                                "upstream did not stream: Expected response header Content-Type to contain "
                                f"'text/event-stream', got {content_type!r}"
                            ),
                            code="upstream_bad_response",
                        )
                    async for chunk in self._chunks(response.content):
                        yield chunk
                except BaseException:
                    # Error, cancellation or aclose(): drop the connection now rather than leave
                    # it to the release bookkeeping, so the upstream stops generating at once.
                    response.close()
                    raise
        except UpstreamError:
            raise
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError subclasses it (and ClientError)
            raise UpstreamError(
                self._safe(f"upstream timed out ({type(exc).__name__})"), code="upstream_timeout", status=504
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(self._safe(f"upstream unreachable: {exc}"), code="upstream_unreachable") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # ServerDisconnectedError, a reset (ClientOSError), a truncated chunked body.
            where = "mid-stream" if responded else "before responding"
            raise UpstreamError(
                self._safe(f"upstream closed the connection {where}: {exc or type(exc).__name__}"),
                code="upstream_disconnected",
            ) from exc
        except LineTooLong as exc:
            raise UpstreamError(
                self._safe(f"upstream sent a line longer than {_MAX_LINE_BYTES} bytes"), code="upstream_bad_response"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(self._safe(f"upstream request failed: {exc or type(exc).__name__}")) from exc

    async def _chunks(self, content: aiohttp.StreamReader) -> AsyncGenerator[ChatChunk, None]:
        """Yield a ``ChatChunk`` per meaningful SSE event until ``[DONE]``."""
        finished = False
        decoder = SSEDecoder()
        readline = content.readline
        while raw := await readline(max_line_length=_MAX_LINE_BYTES):
            # The line ends with "\n" (but the body's last line may not); SSE also allows "\r\n"
            # and a bare "\r", which httpx-sse's line splitter accepted too.
            line = raw.decode("utf-8", "replace")
            if line[-1:] == "\n":
                line = line[:-1]
            if line[-1:] == "\r":
                line = line[:-1]
            for part in line.split("\r") if "\r" in line else (line,):
                event = decoder.decode(part)
                if event is None:
                    continue
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

    async def _status_error(self, response: aiohttp.ClientResponse) -> UpstreamError:
        """Return the ``UpstreamError`` for a non-2xx response, quoting OpenAI's error message."""
        status = response.status
        raw = (await response.read()).decode("utf-8", "replace")
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
