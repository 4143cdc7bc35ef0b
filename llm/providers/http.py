"""The HTTP and SSE machinery every streaming adapter shares: one pooled aiohttp session per event
loop, the streamed POST with its error mapping, and a base class for SSE body decoders.

``post_sse`` is the one place that turns transport failures and upstream error statuses into
``UpstreamError`` (see its docstring for the mapping), so every provider kind reports them the same
way: the client sees a message that never names the upstream's host, port or a library's text,
the server log (``detail``) gets the rest, with the provider's key redacted.

SSE: https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream,
decoded by httpx-sse's line and event decoders (see ``SSEBodyDecoder``).
"""

from __future__ import annotations

import abc
import asyncio
import codecs
import datetime as dt
import json
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from django.conf import settings

# A private module of httpx-sse, pinned to 0.4.3 in requirements.txt (its public API only reads
# httpx responses). ``SSELineDecoder().decode(text)`` takes any piece of the body's text and
# returns the lines it completes, without their endings ("\r\n", "\n" or "\r", even split across
# pieces), keeping an unfinished line for the next call; ``flush()`` returns that rest at the end.
# ``SSEDecoder().decode(line)`` returns a ``ServerSentEvent`` at the blank line that ends an event,
# else ``None``. That is how ``httpx_sse.EventSource.aiter_sse`` uses them, with httpx's
# ``aiter_text`` in front. ``test_httpx_sse_decoder_api`` fails if an upgrade changes this.
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from yarl import URL

from .base import PASSED_THROUGH_STATUSES, UPSTREAM_MESSAGES, ChatChunk, ProviderConfig, UpstreamError

__all__ = [
    "MAX_ERROR_MESSAGE",
    "MAX_LINE_BYTES",
    "SSE_REQUEST_HEADERS",
    "SSEBodyDecoder",
    "aclose_clients",
    "failure",
    "json_body",
    "post_sse",
    "session",
    "upstream_proxy",
    "upstream_proxy_reset",
]

# One session (one connection pool) per event loop: aiohttp connections belong to the loop that
# opened them. Production has one loop per process; pytest-asyncio makes one per test.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()

MAX_ERROR_MESSAGE = 500  # characters of an upstream error message worth showing
# Longest SSE line accepted: a single chunk (e.g. a tool call's whole arguments) may be long, but a
# line still unfinished past this is an upstream misbehaving (and memory we will not spend).
MAX_LINE_BYTES = 16 * 1024 * 1024
# What httpx-sse's ``aconnect_sse`` sent, and still send.
SSE_REQUEST_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store", "Content-Type": "application/json"}


def session() -> aiohttp.ClientSession:
    """Return this event loop's shared session, creating it on first use."""
    loop = asyncio.get_running_loop()
    shared = _sessions.get(loop)
    if shared is None or shared.closed:
        _forget_closed_loops()
        connector = aiohttp.TCPConnector(
            limit=settings.LLM_UPSTREAM_MAX_CONNECTIONS,
            limit_per_host=0,
            keepalive_timeout=settings.LLM_UPSTREAM_KEEPALIVE_SECONDS,
            # httpx's TLS defaults, which the adapter used before: certifi's CA bundle, or
            # SSL_CERT_FILE / SSL_CERT_DIR when set (aiohttp alone would use the system store).
            ssl=httpx.create_ssl_context(),
        )
        # No trust_env: HTTP(S)_PROXY / NO_PROXY are honoured by ``upstream_proxy`` instead (aiohttp's
        # trust_env reads them, and ~/.netrc, in two worker threads on every request). No total
        # timeout: each request sets its connect and read timeouts, and a reply may stream for as
        # long as it keeps going. DummyCookieJar: upstream APIs set no cookies we should send back,
        # and a real jar is searched on every request.
        shared = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _sessions[loop] = shared
    return shared


# (scheme, host) -> the proxy an upstream request there goes through: (proxy URL, its credentials),
# or (None, None) for none. The environment's proxy settings are read
# once per upstream host and process: they are fixed when the process starts.
_proxies: dict[tuple[str, str], tuple[URL | None, aiohttp.BasicAuth | None]] = {}


async def upstream_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """Return the proxy for an upstream request to ``url``: ``(proxy URL, credentials)``, or ``(None, None)``.

    From the environment, as curl, httpx and aiohttp's ``trust_env`` read it: ``HTTPS_PROXY`` /
    ``HTTP_PROXY`` (by the URL's scheme, any case) unless ``NO_PROXY`` names the host; the proxy's
    credentials from its URL, else from ``~/.netrc`` (aiohttp's ``get_env_proxy_for_url``, run in a
    worker thread since it may read that file). Cached per scheme and host, so a request pays a dict
    lookup: aiohttp's ``trust_env`` did this, and looked up ``~/.netrc`` credentials for the upstream
    itself, in two worker threads on every request. Upstreams authenticate with their API key, never
    with ``~/.netrc``.
    """
    parts = urlsplit(url)
    key = (parts.scheme, parts.hostname or "")
    proxy = _proxies.get(key)
    if proxy is None:
        try:
            proxy = await asyncio.to_thread(get_env_proxy_for_url, URL(url))
        except LookupError:  # no proxy for this URL (none set, or NO_PROXY names its host)
            proxy = (None, None)
        _proxies[key] = proxy
    return proxy


def upstream_proxy_reset() -> None:
    """Forget the proxies read from the environment (tests that change it)."""
    _proxies.clear()


async def aclose_clients() -> None:
    """Close the running loop's shared session and forget sessions of loops that are closed.

    For test teardown and process shutdown; the next request opens a fresh session.
    """
    shared = _sessions.pop(asyncio.get_running_loop(), None)
    _forget_closed_loops()
    if shared is not None:
        await shared.close()


def _forget_closed_loops() -> None:
    """Drop the sessions of closed loops: their sockets died with the loop, and a session refers
    to its loop, so the weak key alone would never let the pair be collected."""
    for loop in [loop for loop in _sessions if loop.is_closed()]:
        _sessions.pop(loop).detach()  # marks it closed: nothing left to await on a dead loop


def json_body(body: dict[str, object]) -> bytes:
    """Return ``body`` as an upstream request's body: compact UTF-8 JSON (RFC 8259), as httpx sent it.

    orjson, as the inbound parser (``chatbackend.parsers``): a long conversation's history is
    encoded once per reply, ~10x faster than the standard library's ``json``. What it holds came
    from that parser (no NaN or Infinity, 64-bit integers, string keys) or from the adapters.
    Raises ``TypeError`` (``orjson.JSONEncodeError``) for a value JSON cannot hold.
    """
    return orjson.dumps(body)


def where(url: object) -> str:
    """Return ``url`` for the log without its user info or query: a base URL may carry credentials."""
    parts = urlsplit(str(url))
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def described(exc: BaseException) -> str:
    """Return ``exc`` as ``Type: text`` for the log (its repr may hold a proxy's credentials)."""
    return f"{type(exc).__name__}: {exc}"


def failure(code: str, detail: str, *, status: int | None = None) -> UpstreamError:
    """Return the ``UpstreamError`` ``code``: its client message from ``UPSTREAM_MESSAGES``, ``detail`` for the log."""
    return UpstreamError(UPSTREAM_MESSAGES[code], code=code, status=status, detail=detail)


def received_before_failure(content: aiohttp.StreamReader) -> bytes:
    """Return the body bytes ``content`` received before its connection failed (b"" if none).

    ``StreamReader.readany`` raises the connection's error before returning what is buffered
    (aiohttp 3.x, ``streams.py``); ``_read_nowait`` is the same read without that check.
    """
    read_nowait = getattr(content, "_read_nowait", None)
    return read_nowait(-1) if read_nowait is not None else b""


def retry_after_ms(value: str | None) -> float | None:
    """Return OpenAI's ``retry-after-ms`` header (milliseconds) in seconds, or None when absent or not a number."""
    try:
        seconds = float(value) / 1000 if value else None
    except ValueError:
        return None
    return max(seconds, 0.0) if seconds is not None and seconds != float("inf") else None


def retry_after_seconds(value: str | None) -> float | None:
    """Return a ``Retry-After`` header's delay in seconds (RFC 9110 §10.2.3: seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


class SSEBodyDecoder(abc.ABC):
    """Turn a streamed SSE body, in pieces as read, into ``ChatChunk`` batches; subclasses parse events.

    ``decode(raw)`` takes the next bytes of the body and returns the chunks of the events they
    complete; ``flush()`` does the same for what is left at the end of the body. Bytes become
    text through an incremental UTF-8 decoder (a character may be split across reads), text
    becomes lines through httpx-sse's ``SSELineDecoder``, and ``_chunks`` (the subclass) turns
    lines into events with ``self._events`` (httpx-sse's ``SSEDecoder``) and events into chunks.
    Parsing stops at the first of: the stream's end marker (the subclass sets ``done``), or a
    failure kept in ``error`` (the subclass's, or a line still unfinished past ``MAX_LINE_BYTES``)
    for ``post_sse`` to raise once it has passed on the chunks before it. ``finished`` says
    whether the reply's end (a finish reason) has been seen: a body that ends cleanly without
    ``done`` or ``finished`` is a truncated reply.
    """

    __slots__ = ("_events", "_lines", "_safe", "_text", "_unfinished", "done", "error", "finished")

    # Whether the reply is whole once a finish reason is seen, for a format without an end marker
    # (Gemini's): a connection that drops after it lost nothing.
    END_AT_FINISH = False

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
        if self._unfinished > MAX_LINE_BYTES:
            # readany() has no line limit: without this an endless line would grow in memory.
            self.error = failure("upstream_bad_response", f"upstream sent a line longer than {MAX_LINE_BYTES} bytes")
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

    @abc.abstractmethod
    def _chunks(self, lines: list[str]) -> list[ChatChunk]:
        """Return the chunks of the events ``lines`` complete; set ``done``, ``finished``, ``error``."""


async def post_sse(
    config: ProviderConfig,
    url: str,
    *,
    data: bytes,
    headers: dict[str, str],
    decoder: SSEBodyDecoder,
    safe: Callable[[str], str],
    read_error: Callable[[aiohttp.ClientResponse, Callable[[str], str]], Awaitable[UpstreamError]] | None = None,
) -> AsyncGenerator[list[ChatChunk], None]:
    """POST ``data`` to ``url`` and yield ``decoder``'s chunk batches as the SSE body arrives.

    A batch is every chunk decoded from one read (aiohttp's ``readany``: all the socket has
    delivered), never empty. Chunks received before a failure are yielded before it is raised.
    Raises ``UpstreamError``: the upstream's error status (``status_error``); 502 when
    unreachable (``upstream_unreachable``), dropped or ending before the reply's end
    (``upstream_disconnected``), not streaming SSE, or the decoder's error
    (``upstream_bad_response`` / ``upstream_error``), or a request the provider's settings cannot
    make (``upstream_error``: aiohttp's ``ValueError``); 504 on a connect or read timeout
    (``config.connect_timeout``: waiting for a pooled connection, DNS, TCP and TLS;
    ``config.read_timeout``: the longest silence, before the headers or between reads).
    Cancellation or ``aclose()`` closes the upstream connection at once. ``safe`` redacts the
    provider's key from every message and detail. ``read_error``: how the provider's error
    responses read (default ``status_error``, OpenAI's and Anthropic's shape).
    """
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=config.connect_timeout,
        sock_connect=config.connect_timeout,
        sock_read=config.read_timeout,
    )
    responded = False
    try:
        # proxy_auth, not the proxy_headers aiohttp 3.14's deprecation warning suggests: those reach
        # only a CONNECT tunnel (an https upstream), not a request forwarded to an http one.
        proxy, proxy_auth = await upstream_proxy(url)
        async with session().post(
            url,
            data=data,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            proxy=proxy,
            proxy_auth=proxy_auth,
        ) as response:
            responded = True
            try:
                if response.status >= 300:
                    raise await (read_error or status_error)(response, safe)
                content_type = response.headers.get("Content-Type", "").partition(";")[0]
                if "text/event-stream" not in content_type:
                    raise failure(
                        "upstream_bad_response", safe(f"upstream did not stream: its Content-Type is {content_type!r}")
                    )
                # readany() returns all the body the socket has delivered so far (waiting only
                # when there is none): under load several events are waiting, and they go on as
                # one batch, which the server can write to its client in one send.
                content = response.content
                readany = content.readany
                while True:
                    try:
                        raw = await readany()
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                        # The connection failed: aiohttp's readany() raises at once and drops
                        # the bytes it had already received. Those hold text the model generated
                        # (and the client must get, and be billed for): decode them first.
                        batch = decoder.decode(received_before_failure(content))
                        if batch:
                            yield batch
                        if decoder.done or (decoder.END_AT_FINISH and decoder.finished):
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
                    # The body ended cleanly yet without its end marker or a finish reason: truncated.
                    raise failure("upstream_disconnected", "upstream ended the stream before the reply was finished")
            except BaseException:
                # Error, cancellation or aclose(): drop the connection now rather than leave it
                # to the release bookkeeping, so the upstream stops generating at once.
                response.close()
                raise
    except UpstreamError:
        raise
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError subclasses it (and ClientError)
        raise failure(
            "upstream_timeout", safe(f"upstream {where(url)} timed out ({type(exc).__name__})"), status=504
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise failure("upstream_unreachable", safe(f"upstream {where(url)} unreachable: {described(exc)}")) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # ServerDisconnectedError, a reset (ClientOSError), a truncated chunked body.
        moment = "mid-stream" if responded else "before responding"
        detail = f"upstream {where(url)} closed the connection {moment}: {described(exc)}"
        raise failure("upstream_disconnected", safe(detail)) from exc
    except aiohttp.ClientError as exc:
        raise failure("upstream_error", safe(f"upstream {where(url)} request failed: {described(exc)}")) from exc
    except ValueError as exc:
        if responded:
            raise
        # aiohttp refuses a request it cannot build from the provider's settings: an API key sent as
        # 'Authorization: Bearer' and a base URL's user info (HTTP Basic, the same header), which the
        # admin refuses but an older or scripted row may hold. A misconfigured provider, not a 500.
        raise failure("upstream_error", safe(f"upstream {where(url)} request not sent: {described(exc)}")) from exc


async def status_error(response: aiohttp.ClientResponse, safe: Callable[[str], str]) -> UpstreamError:
    """Return the ``UpstreamError`` for a non-2xx response, quoting the upstream's error message.

    The message is read from ``{"error": {"message": ...}}`` (OpenAI's shape, and Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``) or ``{"error": "..."}``, else the body's
    start. 401/403 → 502 ``upstream_auth_failed``; 429 → 429 ``upstream_rate_limited`` with the
    ``Retry-After`` seconds on ``retry_after``; 400/404/413/422 → as they are, quoting the message;
    anything else → 502 ``upstream_error``.
    """
    status = response.status
    raw = (await response.read()).decode("utf-8", "replace")
    message = raw[:MAX_ERROR_MESSAGE]
    try:
        error = json.loads(raw)["error"]
        message = str(error["message"] if isinstance(error, dict) else error)[:MAX_ERROR_MESSAGE]
    except (ValueError, TypeError, KeyError):
        pass  # not a known error shape: keep the start of the raw body
    detail = safe(f"upstream {where(response.url)} answered {status}: {raw[:MAX_ERROR_MESSAGE]}")
    if status in (401, 403):
        text, code = UPSTREAM_MESSAGES["upstream_auth_failed"], "upstream_auth_failed"
    elif status == 429:
        text, code = f"The model provider's rate limit was reached: {message}", "upstream_rate_limited"
    elif status in PASSED_THROUGH_STATUSES:  # the client's request can be fixed: say what is wrong
        text, code = f"The model provider refused the request ({status}): {message}", "upstream_error"
    else:
        text, code = f"{UPSTREAM_MESSAGES['upstream_error']} (status {status})", "upstream_error"
    retry_after = None
    if status in (429, 503, 529):  # OpenAI's retry-after-ms is the finer of its two headers
        retry_after = retry_after_ms(response.headers.get("retry-after-ms"))
        if retry_after is None:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    return UpstreamError(safe(text), upstream_status=status, code=code, detail=detail, retry_after=retry_after)
