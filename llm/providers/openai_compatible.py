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
pool does O(1) work per request).

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

import asyncio
import codecs
import json
import re
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
from django.conf import settings

# A private module of httpx-sse, pinned to 0.4.3 in requirements.txt (its public API only reads
# httpx responses). ``SSELineDecoder().decode(text)`` takes any piece of the body's text and
# returns the lines it completes, without their endings ("\r\n", "\n" or "\r", even split across
# pieces), keeping an unfinished line for the next call; ``flush()`` returns that rest at the end.
# ``SSEDecoder().decode(line)`` returns a ``ServerSentEvent`` at the blank line that ends an event,
# else ``None``. That is how ``httpx_sse.EventSource.aiter_sse`` uses them, with httpx's
# ``aiter_text`` in front. ``test_httpx_sse_decoder_api`` fails if an upgrade changes this.
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from chatbackend.logging import redact

from .base import (
    PASSED_THROUGH_STATUSES,
    UPSTREAM_MESSAGES,
    ChatChunk,
    ChatProvider,
    ChatRequest,
    UpstreamError,
    Usage,
)

__all__ = ["OpenAICompatibleProvider", "aclose_clients"]

# One session (one connection pool) per event loop: aiohttp connections belong to the loop that
# opened them. Production has one loop per process; pytest-asyncio makes one per test.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()

_MAX_ERROR_MESSAGE = 500  # characters of an upstream error message worth showing
# Longest SSE line accepted: a single chunk (e.g. a tool call's whole arguments) may be long, but a
# line still unfinished past this is an upstream misbehaving (and memory we will not spend).
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
        # DummyCookieJar: upstream APIs set no cookies we should send back, and a real jar is
        # searched on every request.
        session = aiohttp.ClientSession(
            connector=connector,
            trust_env=True,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
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


def _where(url: object) -> str:
    """Return ``url`` for the log without its user info: a base URL may carry credentials."""
    parts = urlsplit(str(url))
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _described(exc: BaseException) -> str:
    """Return ``exc`` as ``Type: text`` for the log (its repr may hold a proxy's credentials)."""
    return f"{type(exc).__name__}: {exc}"


def _failure(code: str, detail: str, *, status: int | None = None) -> UpstreamError:
    """Return the ``UpstreamError`` ``code``: its client message from ``UPSTREAM_MESSAGES``, ``detail`` for the log."""
    return UpstreamError(UPSTREAM_MESSAGES[code], code=code, status=status, detail=detail)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Return the seconds an error response asks to wait: ``retry-after-ms`` (OpenAI's), else
    ``Retry-After`` in seconds (RFC 9110 section 10.2.3; an HTTP date is not read), else None."""
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    return None


def _received_before_failure(content: aiohttp.StreamReader) -> bytes:
    """Return the body bytes ``content`` received before its connection failed (b"" if none).

    ``StreamReader.readany`` raises the connection's error before returning what is buffered
    (aiohttp 3.x, ``streams.py``); ``_read_nowait`` is the same read without that check.
    """
    read_nowait = getattr(content, "_read_nowait", None)
    return read_nowait(-1) if read_nowait is not None else b""


class OpenAICompatibleProvider(ChatProvider):
    """Stream chat completions from an OpenAI-compatible ``/chat/completions`` endpoint."""

    async def stream(self, request: ChatRequest) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunks (content, reasoning, raw tool calls, finish_reason, usage, logprobs) in batches.

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
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        headers = dict(_SSE_HEADERS)
        if config.extra_headers:  # validated: never one of the headers set here
            headers.update(config.extra_headers)
        headers.update(self._auth_headers())
        # connect: waiting for a pooled connection plus DNS, TCP and TLS (httpx's pool and connect
        # timeouts); sock_read: the longest silence, before the headers or between body reads.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        url = self._url(request)
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
                        raise _failure(
                            "upstream_bad_response",
                            self._safe(f"upstream did not stream: its Content-Type is {content_type!r}"),
                        )
                    # readany() returns all the body the socket has delivered so far (waiting
                    # only when there is none): under load several events are waiting, and they
                    # go on as one batch, which the server can write to its client in one send.
                    decoder = _ChunkDecoder(self._safe)
                    content = response.content
                    readany = content.readany
                    while True:
                        try:
                            raw = await readany()
                        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                            # The connection failed: aiohttp's readany() raises at once and drops
                            # the bytes it had already received. Those hold text the model generated
                            # (and the client must get, and be billed for): decode them first.
                            batch = decoder.decode(_received_before_failure(content))
                            if batch:
                                yield batch
                            if decoder.done:
                                return
                            raise
                        if not raw:
                            break
                        batch = decoder.decode(raw)
                        if batch:
                            yield batch
                        if decoder.error is not None:
                            raise decoder.error
                        if decoder.done:
                            return
                    batch = decoder.flush()
                    if batch:
                        yield batch
                    if decoder.error is not None:
                        raise decoder.error
                    if not (decoder.done or decoder.finished):
                        # The body ended cleanly yet without [DONE] or a finish_reason: the reply is truncated.
                        raise _failure(
                            "upstream_disconnected", "upstream ended the stream before the reply was finished"
                        )
                except BaseException:
                    # Error, cancellation or aclose(): drop the connection now rather than leave
                    # it to the release bookkeeping, so the upstream stops generating at once.
                    response.close()
                    raise
        except UpstreamError:
            raise
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError subclasses it (and ClientError)
            raise _failure(
                "upstream_timeout", self._safe(f"upstream {_where(url)} timed out ({type(exc).__name__})"), status=504
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            detail = f"upstream {_where(url)} unreachable: {_described(exc)}"
            raise _failure("upstream_unreachable", self._safe(detail)) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # ServerDisconnectedError, a reset (ClientOSError), a truncated chunked body.
            where = "mid-stream" if responded else "before responding"
            detail = f"upstream {_where(url)} closed the connection {where}: {_described(exc)}"
            raise _failure("upstream_disconnected", self._safe(detail)) from exc
        except aiohttp.ClientError as exc:
            detail = f"upstream {_where(url)} request failed: {_described(exc)}"
            raise _failure("upstream_error", self._safe(detail)) from exc

    def _url(self, request: ChatRequest) -> str:
        """Return the URL of the streamed chat completion (``{base_url}/chat/completions``)."""
        return f"{self.config.base_url.rstrip('/')}/chat/completions"

    def _auth_headers(self) -> dict[str, str]:
        """Return the headers that carry the API key (``Authorization: Bearer``; none without a key)."""
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

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
        detail = self._safe(f"upstream {_where(response.url)} answered {status}: {raw[:_MAX_ERROR_MESSAGE]}")
        if status in (401, 403):
            text, code = UPSTREAM_MESSAGES["upstream_auth_failed"], "upstream_auth_failed"
        elif status == 429:
            text, code = f"The model provider's rate limit was reached: {message}", "upstream_rate_limited"
        elif status in PASSED_THROUGH_STATUSES:  # the client's request can be fixed: say what is wrong
            text, code = f"The model provider refused the request ({status}): {message}", "upstream_error"
        else:
            text, code = f"{UPSTREAM_MESSAGES['upstream_error']} (status {status})", "upstream_error"
        retry_after = _retry_after(response.headers) if status == 429 else None
        return UpstreamError(
            self._safe(text), upstream_status=status, code=code, detail=detail, retry_after=retry_after
        )

    def _safe(self, text: str) -> str:
        """Return ``text`` with this provider's API key (and anything key-shaped) removed."""
        if self.config.api_key:
            text = text.replace(self.config.api_key, "[REDACTED]")
        return redact(text)


class _ChunkDecoder:
    """Turn the body of a streamed chat completion, in pieces as read, into ``ChatChunk`` batches.

    ``decode(raw)`` takes the next bytes of the body and returns the chunks of the events they
    complete; ``flush()`` does the same for what is left at the end of the body. Bytes become
    text through an incremental UTF-8 decoder (a character may be split across reads), text
    becomes lines through httpx-sse's ``SSELineDecoder`` and lines become events through its
    ``SSEDecoder`` (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream).
    Parsing stops at the first of: ``data: [DONE]`` (``done``), or a failure, kept in ``error``
    (an error object mid-stream, a malformed chunk, a line still unfinished past
    ``_MAX_LINE_BYTES``) for the caller to raise once it has passed on the chunks before it.
    ``finished`` tells whether a ``finish_reason`` has been seen.
    """

    __slots__ = ("_events", "_lines", "_safe", "_text", "_unfinished", "done", "error", "finished")

    def __init__(self, safe: Callable[[str], str]) -> None:
        self._safe = safe
        self._text = codecs.getincrementaldecoder("utf-8")("replace")
        self._lines = SSELineDecoder()
        self._events = SSEDecoder()
        self._unfinished = 0  # bytes since the last line ending
        self.done = False
        self.finished = False
        self.error: UpstreamError | None = None

    def decode(self, raw: bytes) -> list[ChatChunk]:
        """Return the chunks of the events that ``raw``, the next bytes of the body, completes."""
        end = max(raw.rfind(b"\n"), raw.rfind(b"\r"))
        self._unfinished = self._unfinished + len(raw) if end < 0 else len(raw) - end - 1
        if self._unfinished > _MAX_LINE_BYTES:
            # readany() has no line limit: without this an endless line would grow in memory.
            self.error = _failure("upstream_bad_response", f"upstream sent a line longer than {_MAX_LINE_BYTES} bytes")
            return []
        text = self._text.decode(raw)
        if not text:  # only the start of a multi-byte character so far
            return []
        return self._chunks(self._lines.decode(text))

    def flush(self) -> list[ChatChunk]:
        """Return the chunks of the events that the end of the body completes."""
        if self.done or self.error is not None:
            return []
        text = self._text.decode(b"", final=True)
        lines = self._lines.decode(text) if text else []
        return self._chunks(lines + self._lines.flush())

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
                chunk = _content_chunk(data) or _parse_chunk(json.loads(data), self._safe)
            except UpstreamError as exc:
                self.error = exc
                break
            except (ValueError, TypeError, AttributeError, KeyError, IndexError):
                self.error = _failure(
                    "upstream_bad_response", self._safe(f"upstream sent a malformed chunk: {data[:200]!r}")
                )
                break
            if chunk is not None:
                if chunk.finish_reason is not None:
                    self.finished = True
                batch.append(chunk)
        return batch


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

    The choice's ``logprobs`` object is kept as it is when it lists tokens (``ChatChunk.logprobs``).

    Raises ``UpstreamError`` for an error object (``{"error": ...}``, message passed through
    ``safe``), and ``TypeError``/``AttributeError``/... for a payload of the wrong shape.
    """
    if "error" in payload:
        # vLLM, OpenRouter and others report late failures as an error object mid-stream.
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise _failure("upstream_error", safe(f"upstream error mid-stream: {message}"))
    content = reasoning = ""
    tool_calls = finish_reason = usage = logprobs = None
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
        logprobs = choice.get("logprobs")
        # Passed on only when it lists tokens (OpenAI sends {"content": [], ...} with the role chunk).
        if logprobs is not None and not (
            isinstance(logprobs, dict) and (logprobs.get("content") or logprobs.get("refusal"))
        ):
            logprobs = None
    raw_usage = payload.get("usage")
    if raw_usage:
        usage = _parse_usage(raw_usage)
    if not (content or reasoning or tool_calls or finish_reason or usage or logprobs):
        return None
    return ChatChunk(
        content=content,
        reasoning_content=reasoning,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        usage=usage,
        logprobs=logprobs,
    )
