"""The shared test kit: helpers every app's tests use (fixtures live in the ``conftest.py`` files).

- Constants: the simulators' reply lengths, one per pace (the root conftest starts them), and
  ``SIMULATOR_API_KEY``.
- ``poll_until`` / ``poll_until_sync``: wait for a condition instead of sleeping.
- ``chat_body`` / ``post_chat``: a ``/v1/chat/completions`` request through ``AsyncClient``.
- NextChat: ``nextchat_chat_request`` and the headers of its browser and server modes.
- ``access_token(user)``: a JWT access token; ``bearer(credential)``: the headers that carry a JWT
  or an ``sk-...`` key. One convention: credentials travel as a headers dict.
- ``assert_error``: the project's one error shape (OpenAI's), on any kind of response.
- ``asgi_request``: one HTTP request through the project's ASGI application, the way a server
  drives it (chunked bodies, a client that disconnects); ``http_scope`` its ASGI scope.
- Streamed bodies: ``streamed_content`` reads a Django streaming response; ``sse_data``,
  ``chunk_objects`` and ``chunk_text`` take a ``/v1`` stream apart; ``sse_events`` parses the
  conversation stream's named events; ``conversation_sse`` opens a conversation reply's stream
  on a running server (end-to-end tests).
- ``listed_messages``: a conversation's messages as its API lists them.
- ``run_python``: a child Python process at the project root, with an environment of the test's.
- ``usage_records``: the usage records written, once this process's accounting queue is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web
from django.test import AsyncClient
from httpx_sse import EventSource, ServerSentEvent, connect_sse
from rest_framework_simplejwt.tokens import AccessToken

from accounts.models import UsageRecord, User
from accounts.usage import usage_flush
from chatbackend.asyncdb import run_sync
from llm.tests.openai_schema import validate_against

T = TypeVar("T")

# The simulators' paces (the root conftest starts one process of each): tokens per reply.
FAST_REPLY_TOKENS = 12  # ``simulator``, ``keyed_simulator``
SLOW_REPLY_TOKENS = 200  # ``slow_simulator``: 50 ms apart, 10 s in all; tests stop it long before
SLEEPY_REPLY_TOKENS = 5  # ``sleepy_simulator``: after 5 s of silence
SILENT_REPLY_TOKENS = 6  # ``silent_simulator``: after 1.5 s of silence
SIMULATOR_API_KEY = "sk-simulator-secret-0123456789abcdef"  # what ``keyed_simulator`` requires
E2E_REPLY_TOKENS = 40  # the end-to-end stack's simulator (tests/conftest.py): 30 ms apart

CHAT_URL = "/v1/chat/completions"

# --- Waiting for a condition -------------------------------------------------------------------


async def poll_until(
    probe: Callable[[], T | Awaitable[T]],
    predicate: Callable[[T], object] = bool,
    *,
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call ``probe()`` (awaiting its result if it is awaitable) until ``predicate`` holds for it; return it.

    The event loop runs between calls, so other tasks make progress. Fails the test
    (``AssertionError`` naming ``what`` and the last value) after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if predicate(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {within} s (last value: {value!r})")
        await asyncio.sleep(interval)


def poll_until_sync(
    probe: Callable[[], T],
    predicate: Callable[[T], object] = bool,
    *,
    within: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """``poll_until`` for sync code: call ``probe()`` until ``predicate`` holds for its value; return it."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {within} s (last value: {value!r})")
        time.sleep(interval)


# --- /v1 requests -----------------------------------------------------------------------------


def chat_body(model: str, text: str = "Say hello", **fields: Any) -> dict[str, Any]:
    """Return a chat completion request body: one user message ``text`` to ``model``, plus ``fields``."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


async def post_chat(client: Any, body: Any, headers: dict[str, str]) -> Any:
    """POST ``body`` (a dict as JSON, or raw ``str``/``bytes``) to ``/v1/chat/completions`` with an ``AsyncClient``."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return await client.post(CHAT_URL, data=data, content_type="application/json", headers=headers)


# --- NextChat's requests (ChatGPT-Next-Web v2.16, /work/shared/nextchat.md) -------------------

NEXTCHAT_ORIGIN = "http://localhost:3000"


def nextchat_chat_request(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """Return a chat turn as NextChat's ``ChatGPTApi.chat`` builds it (streamed, ``gpt-4o-mini``), plus ``fields``."""
    return {
        "messages": messages,
        "stream": True,
        "model": "gpt-4o-mini",
        "temperature": 0.5,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
        **fields,
    }


def nextchat_browser_headers(key: str, *, stream: bool) -> dict[str, str]:
    """Return the headers NextChat's browser client sends with ``key`` (``app/client/api.ts`` ``getHeaders``)."""
    return {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream" if stream else "application/json",
        **bearer(key),
        "Cache-Control": "no-store",
        "Origin": NEXTCHAT_ORIGIN,
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
    }


def nextchat_server_headers(key: str) -> dict[str, str]:
    """Return the headers NextChat's server sends when it relays a request with ``key`` (its body chunked)."""
    return {
        "Content-Type": "application/json",
        "Accept": "*/*",
        "Cache-Control": "no-store",
        "User-Agent": "Next.js Middleware",
        **bearer(key),
    }


# --- Credentials -------------------------------------------------------------------------------


def access_token(user: User) -> str:
    """Return a JWT access token for ``user`` (no database access: safe on an event loop)."""
    return str(AccessToken.for_user(user))


def bearer(credential: str) -> dict[str, str]:
    """Return the headers that present ``credential`` (a JWT or an ``sk-...`` key): ``Authorization: Bearer``.

    Every client takes them: Django's ``Client`` / ``AsyncClient`` and DRF's ``APIClient`` (per
    request or as ``APIClient(headers=...)``), httpx, the ASGI driver.
    """
    return {"Authorization": f"Bearer {credential}"}


# --- Error responses ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_http_server(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` (aiohttp) on a free port of 127.0.0.1 and yield its root URL
    (``http://127.0.0.1:<port>``); stop it on exit. For upstreams a test scripts itself."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def assert_refused_before_upstream(
    simulator: Any, body: dict[str, Any], headers: dict[str, str], *, code: str, param: str, says: str
) -> dict[str, Any]:
    """Assert that ``/v1/chat/completions`` with ``body`` is a 400 ``code`` on ``param`` whose message
    holds ``says``, answered before any request reached ``simulator`` (an
    ``llm.tests.simulator_process.SimulatorProcess``); return the ``error`` object."""
    before = await simulator.astats()
    response = await post_chat(AsyncClient(), body, headers)
    assert response.status_code == 400, response.content
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and says in error["message"]
    assert (await simulator.astats())["requests_started"] == before["requests_started"]
    return error


async def assert_unsupported_parameter(
    simulator: Any, model: str, fields: dict[str, Any], param: str, provider: str, headers: dict[str, str]
) -> None:
    """Assert that ``/v1/chat/completions`` to ``model`` with ``fields`` is refused, streamed and whole,
    with OpenAI's 400 ``unsupported_parameter`` naming ``param`` and ``provider``, before any request
    reaches ``simulator`` (``assert_refused_before_upstream``)."""
    for stream in (False, True):
        body = chat_body(model, stream=stream, **fields)
        error = await assert_refused_before_upstream(
            simulator, body, headers, code="unsupported_parameter", param=param, says=f"'{param}'"
        )
        assert error["type"] == "invalid_request_error" and provider in error["message"]


def assert_error(
    response: Any, status: int, *, code: str | None = None, param: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """Assert ``response`` is the project's JSON error with ``status``; return its ``error`` object.

    The shape is OpenAI's everywhere (``{"error": {"message", "type", "param", "code"}}``), so the
    body is validated against OpenAI's ``ErrorResponse`` schema. ``code``, ``param`` and ``type``,
    when given, must match. ``response``: anything with ``status_code``, ``headers`` and
    ``content`` (a Django test response, an httpx response, an ``ASGIResult``).
    """
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response.headers["Content-Type"] == "application/json", response.headers["Content-Type"]
    body = json.loads(response.content)
    validate_against("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= error.keys(), error
    assert error["message"], error
    for name, expected in (("code", code), ("param", param), ("type", type)):
        if expected is not None:
            assert error[name] == expected, (name, error)
    return error


# --- Driving the ASGI application --------------------------------------------------------------


@dataclass
class ASGIResult:
    """What a client received: ``status_code``, ``headers``, the whole ``content`` and each body ``frames`` part."""

    status_code: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    content: bytes = b""
    frames: list[bytes] = field(default_factory=list)
    # Messages the application sent after the server cancelled it (``cancel_after_frames``).
    sent_after_cancel: list[dict[str, Any]] = field(default_factory=list)
    # The body part whose send the client left during, never received (``disconnect_during_frame``).
    undelivered: bytes = b""


def http_scope(method: str, path: str, headers: Iterable[tuple[str, str]], *, port: int = 8000) -> dict[str, Any]:
    """Return an ASGI 3.0 HTTP scope for ``method path`` on localhost with ``headers`` (name, value).

    ``path`` may end in ``?query`` (sent as the scope's ``query_string``).
    Spec: https://asgi.readthedocs.io/en/latest/specs/www.html#http-connection-scope
    """
    path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode("latin1"),
        "root_path": "",
        "headers": [(name.lower().encode("latin1"), value.encode("latin1")) for name, value in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", port),
    }


async def asgi_request(
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes | Iterable[bytes] = b"",
    disconnect_after_frames: int | None = None,
    disconnect_during_frame: int | None = None,
    disconnect_on_start: bool = False,
    cancel_after_frames: int | None = None,
    cancel_after_seconds: float | None = None,
    application: Any = None,
) -> ASGIResult:
    """Run one HTTP request through the project's ASGI application, the way a server does.

    ``application``: default ``chatbackend.asgi.application`` (the entry point servers run).
    ``body``: bytes, or parts that arrive as separate ``http.request`` messages (a chunked body
    when no ``content-length`` header is given). With ``disconnect_after_frames``, the client
    disconnects once that many body parts arrived: Django then cancels the view's task. With
    ``disconnect_during_frame``, it disconnects while that body part (1-based) is being sent, which
    it never receives (kept in ``undelivered``): the send blocks like a stalled socket until Django
    cancels it. With ``disconnect_on_start``, it disconnects while the headers are being sent, and the send
    blocks like a stalled socket until Django cancels it. With ``cancel_after_frames``, the
    server cancels the application's task once that many body parts arrived, as uvicorn does past
    its ``--timeout-graceful-shutdown`` and daphne on SIGTERM (``cancel_after_seconds``: that long
    after the request); what the application sends after that is kept in ``sent_after_cancel``
    (a real server would not deliver it). Fails after 30 s.
    """
    if application is None:
        from chatbackend.asgi import application  # imported late: importing it tunes the GC
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    parts = [body] if isinstance(body, bytes) else list(body) or [b""]
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for index, part in enumerate(parts):
        inbox.put_nowait({"type": "http.request", "body": part, "more_body": index < len(parts) - 1})
    result = ASGIResult()
    cancelled = False

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        if cancelled:
            result.sent_after_cancel.append(message)
        elif message["type"] == "http.response.start":
            result.status_code = message["status"]
            result.headers = httpx.Headers([(k.decode("latin1"), v.decode("latin1")) for k, v in message["headers"]])
            if disconnect_on_start:
                inbox.put_nowait({"type": "http.disconnect"})
                await asyncio.Event().wait()  # a socket that never drains: only a cancellation ends it
        elif message.get("body") and len(result.frames) + 1 == disconnect_during_frame:
            result.undelivered = message["body"]
            inbox.put_nowait({"type": "http.disconnect"})
            await asyncio.Event().wait()  # a socket that never drains: only a cancellation ends it
        elif message.get("body"):
            result.frames.append(message["body"])
            result.content += message["body"]
            if disconnect_after_frames is not None and len(result.frames) == disconnect_after_frames:
                inbox.put_nowait({"type": "http.disconnect"})
            if cancel_after_frames is not None and len(result.frames) == cancel_after_frames:
                cancel()

    def cancel() -> None:
        nonlocal cancelled
        cancelled = True
        served.cancel()

    served = asyncio.ensure_future(application(http_scope(method, path, pairs), receive, send))
    if cancel_after_seconds is not None:
        asyncio.get_running_loop().call_later(cancel_after_seconds, cancel)
    done, _ = await asyncio.wait((served,), timeout=30)
    if not done:
        served.cancel()
        raise AssertionError(f"{method} {path} was not answered within 30 s")
    if not (cancelled and served.cancelled()):
        served.result()
    return result


# --- Streamed bodies ---------------------------------------------------------------------------


async def streamed_content(response: Any) -> bytes:
    """Return the whole body of a Django streaming response (``AsyncClient``), read to its end."""
    return b"".join([part async for part in response.streaming_content])


def sse_data(raw: bytes) -> list[str]:
    """Return the ``data:`` payloads of a ``/v1`` SSE body, checking its framing (``data: ...\\n\\n``).

    Comment events (``: keep-alive``) are checked and left out.
    Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
    """
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-200:]
    payloads = []
    for event in text[:-2].split("\n\n"):
        assert "\n" not in event, event
        if event == ": keep-alive":
            continue
        assert event.startswith("data: "), event
        payloads.append(event[len("data: ") :])
    return payloads


def chunk_objects(payloads: list[str]) -> list[dict[str, Any]]:
    """Parse the chunk payloads before ``[DONE]`` and validate each against OpenAI's schema."""
    assert payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    for chunk in chunks:
        validate_against("CreateChatCompletionStreamResponse", chunk)
    return chunks


def chunk_text(chunks: Iterable[dict[str, Any]]) -> str:
    """Return the text of ``chat.completion.chunk`` objects: every ``choices[0].delta.content`` joined."""
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk.get("choices"))


async def sse_events(response: Any, raw: list[bytes] | None = None) -> list[ServerSentEvent]:
    """Parse a Django streaming response's SSE body with httpx-sse (``raw`` collects each part as sent)."""

    async def body() -> AsyncIterator[bytes]:
        async for part in response.streaming_content:
            if raw is not None:
                raw.append(part)
            yield part

    stream = httpx.Response(200, headers={"content-type": response["Content-Type"]}, content=body())
    return [event async for event in EventSource(stream).aiter_sse()]


# --- Conversations ---------------------------------------------------------------------------


def conversation_sse(
    http: httpx.Client, conversation_id: int, credential: str, content: str = "Tell me a long story"
) -> AbstractContextManager[EventSource]:
    """Send ``content`` to a conversation on a server and open its reply's SSE stream (httpx-sse).

    ``with conversation_sse(http, id, key) as source: for sse in source.iter_sse(): ...``
    """
    return connect_sse(
        http,
        "POST",
        f"/api/conversations/{conversation_id}/messages/",
        json={"content": content},
        headers=bearer(credential),
    )


async def listed_messages(conversation_id: int, token: str) -> dict[int, dict[str, Any]]:
    """Return the conversation's messages as ``GET /api/conversations/{id}/messages/`` shows them, by id."""
    response = await AsyncClient().get(f"/api/conversations/{conversation_id}/messages/", headers=bearer(token))
    assert response.status_code == 200, response.content[:500]
    return {message["id"]: message for message in response.json()["results"]}


# --- Child processes ---------------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_python(
    *args: str, env: Mapping[str, str] | None = None, unset: Iterable[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` (this interpreter) at the project root and return it once it exits.

    The child gets this process's environment without the variables named in ``unset``, plus
    ``env``. Output is captured as text; fails the test (``TimeoutExpired``) after 60 s.
    """
    child_env = {name: value for name, value in os.environ.items() if name not in set(unset)}
    child_env.update(env or {})
    return subprocess.run(  # noqa: S603 - this interpreter, the test's own arguments
        [sys.executable, *args],
        cwd=PROJECT_ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- Usage -------------------------------------------------------------------------------------


async def usage_records(**filters: Any) -> list[UsageRecord]:
    """Return the usage records matching ``filters``, oldest first, once every record this process
    has queued is written (``accounts.usage.usage_flush``; eager Celery writes them in the sender)."""
    assert await asyncio.to_thread(usage_flush, 10), "the usage queue did not drain within 10 s"
    # run_sync, not the async ORM: it hands the thread's connection back (a connection left open
    # in asgiref's executor thread keeps PostgreSQL from dropping the test database).
    return await run_sync(lambda: list(UsageRecord.objects.filter(**filters).order_by("pk")))
