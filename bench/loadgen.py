"""The load generator: a child process that runs rounds of concurrent streaming requests.

``bench.run`` starts one (or ``--client-procs``) of these as ``python -m bench.loadgen`` and
talks to it over stdin/stdout with length-prefixed pickles: it sends a round spec (a dict, see
``run_round``) and gets back the raw measurements. Its own CPU time is measured here, around
the round only, so the report can show that the client is not the bottleneck.

Requests are shaped like real clients': on ``direct`` and ``v1`` the body is what the OpenAI
SDK and NextChat send (https://platform.openai.com/docs/api-reference/chat/create and
/work/shared/nextchat.md): a system message then the user message, ``stream: true``,
``stream_options: {"include_usage": true}``, ``max_tokens`` (``spec["max_tokens"]``, large
enough not to cut the reply) and NextChat's ``temperature``, ``top_p``, ``presence_penalty``
and ``frequency_penalty``. ``v1msg`` sends the same conversation as Anthropic's Messages request
(https://docs.anthropic.com/en/api/messages: ``system``, one user message, ``max_tokens``,
``stream: true``, ``temperature`` and ``top_p``) with ``x-api-key`` and ``anthropic-version:
2023-06-01`` (the API reference's headers, which NextChat's Claude provider sends); ``v1resp`` as
OpenAI's Responses request (https://platform.openai.com/docs/api-reference/responses/create:
``instructions``, ``input`` as text, ``max_output_tokens``, ``stream: true``, ``temperature`` and
``top_p``) with the bearer key.

The client is aiohttp on uvloop and parses the minimum: it splits the body into lines, finds
the ``event:`` and ``data:`` lines, and timestamps each content frame as it is read
(``time.perf_counter``); several frames arriving in one read share that read's time. A token is
a frame with non-empty text (found with a byte regex, no ``json.loads``), so the framing around
the tokens does not count. Per inbound API (``SseTokenReader``):

- ``direct`` and ``v1`` (OpenAI chat completions,
  https://platform.openai.com/docs/api-reference/chat/streaming): a token is a ``data:`` frame
  with a non-empty ``"content"`` string, so a role-only first chunk (``"delta":{"role":
  "assistant","content":"","refusal":null}``), an empty-delta chunk with the ``finish_reason`` and
  the usage chunk (``"choices":[]``) do not count, and the older framing whose first chunk
  carries the role and the first token together is read alike; ``data: [DONE]`` ends the stream,
  ``data: {"error"...`` fails it.
- ``sse`` (conversation SSE): ``data:`` lines after ``event: reply.delta``; ``reply.done``
  ends it, ``event: error`` fails it.
- ``v1msg`` (Anthropic Messages, https://docs.anthropic.com/en/docs/build-with-claude/streaming):
  a token is a ``content_block_delta`` event whose delta has a non-empty ``"text"`` (a
  ``text_delta``; ``thinking_delta``, ``signature_delta`` and ``input_json_delta`` have no
  ``"text"`` key); ``message_stop`` ends the stream, an ``error`` event fails it.
- ``v1resp`` (OpenAI Responses, https://platform.openai.com/docs/api-reference/responses-streaming):
  a token is a ``response.output_text.delta`` event with a non-empty ``"delta"``;
  ``response.completed`` ends the stream, ``error``, ``response.failed`` and
  ``response.incomplete`` fail it.
- ``ws``: text frames whose ``"type"`` is ``reply.delta``; ``reply.done`` ends the reply,
  ``error`` fails it. One socket per stream; its replies are sent one after another.

On ``v1``, ``v1msg`` and ``v1resp`` the server writes one frame (event) per upstream chunk, so a
frame is a token as on ``direct``. On ``sse`` and ``ws`` one ``reply.delta`` may join several
tokens (those that arrived together), so a reply's token count there is its ``reply.done``
message's ``completion_tokens``.

Time to first token (TTFT) runs from just before the request is sent (for ``ws``: the
``message.send`` frame) to the first content frame, so HTTP paths include the TCP connect of a
stream's first request (as a browser's would); the WebSocket handshake is reported on its own
(``ws_connect_ms``). Inter-token latency (ITL) is the gap between consecutive content frames of
one reply. A request is an error when it gets a non-200 status, an error event or frame, a
transport error or timeout, ends without its end marker, or brings a token count other than
``expected_tokens``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import pickle
import re
import resource
import struct
import sys
import time
from array import array
from typing import Any, BinaryIO

import aiohttp

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] installs it
    uvloop = None  # type: ignore[assignment]

# A non-empty JSON string value of a "content" key; "reasoning_content" does not match (the
# quote before "content" is required), nor does the role-only chunk's ``"content":""``.
_CONTENT = re.compile(rb'"content":\s*"(?!")')
_WS_CONTENT = re.compile(r'"content":\s*"(?!")')
# A non-empty "text" of an Anthropic ``text_delta`` (the other deltas have no "text" key; a quoted
# key inside a JSON string is escaped, \"text\", so it does not match).
_TEXT = re.compile(rb'"text":\s*"(?!")')
# A non-empty "delta" of a Responses ``response.output_text.delta`` event.
_DELTA = re.compile(rb'"delta":\s*"(?!")')
_WS_TYPE = re.compile(r'\{\s*"type":\s*"([^"]+)"')
# The reply's token count in the ``reply.done`` message of the conversation endpoints.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_WS_COMPLETION_TOKENS = re.compile(r'"completion_tokens":\s*(\d+)')
# NextChat's default system prompt (DEFAULT_SYSTEM_TEMPLATE in its app/constant.ts), filled in
# with fixed values so every run sends the same bytes.
SYSTEM_PROMPT = (
    "\nYou are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2023-10\n"
    "Current model: gpt-4o-mini\nCurrent time: Sat Nov 21 2026 10:00:00 GMT+0000\n"
    "Latex inline: \\(x^2\\) \nLatex block: $$e=mc^2$$\n"
)
# NextChat's default sampling parameters (app/store/config.ts), sent on every chat request.
NEXTCHAT_PARAMETERS = {"temperature": 0.5, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
_HEADER = struct.Struct("!I")
# Error messages name URLs: hide the API key of a WebSocket URL and fold per-stream ids, so
# kinds group and no secret reaches the report.
_SECRET = re.compile(r"(token=|Bearer\s+|\bsk-)[A-Za-z0-9_\-.]+")
_IDS = re.compile(r"/\d+/")
MAX_ERROR_KINDS = 20


# --- framing between the parent and this process -------------------------------------------


def send_message(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def recv_message(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)  # noqa: S301 - the parent process, over a private pipe


def _error_kind(message: str) -> str:
    """Return ``message`` without secrets or per-stream ids, at most 160 characters."""
    return _IDS.sub("/{id}/", _SECRET.sub(lambda m: m.group(1) + "***", message))[:160]


def raise_open_file_limit() -> None:
    """Raise the soft open-files limit to the hard one: each stream holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- one round -----------------------------------------------------------------------------


class _Round:
    """The measurements of one round, filled in by the streams."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.path: str = spec["path"]
        self.expected_tokens: int = spec["expected_tokens"]
        self.ttft_ms = array("d")
        self.itl_ms = array("f")
        self.ws_connect_ms = array("d")
        self.tokens = 0
        self.ok = 0
        self.errors = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.peak_open = 0
        self.t0 = 0.0
        self.last_end = 0.0

    def fail(self, kind: str) -> None:
        self.errors += 1
        kind = _error_kind(kind)
        if kind in self.error_kinds or len(self.error_kinds) < MAX_ERROR_KINDS:
            self.error_kinds[kind] += 1
        else:
            self.error_kinds["(other)"] += 1

    def opened(self) -> None:
        self.open += 1
        if self.open > self.peak_open:
            self.peak_open = self.open

    def closed(self) -> None:
        self.open -= 1
        self.last_end = time.perf_counter()

    def finish_reply(
        self, start: float, token_times: list[float], done: bool, error: str | None, tokens: int | None = None
    ) -> None:
        """Record one reply from its content-frame arrival times.

        ``tokens``: the reply's token count when the server reports it (the conversation
        endpoints' ``reply.done`` message), which may join several tokens in one ``reply.delta``
        frame; otherwise every content frame is one token (OpenAI's chunk frames).
        """
        count = len(token_times) if tokens is None else tokens
        self.tokens += count
        if token_times:
            self.ttft_ms.append((token_times[0] - start) * 1000)
            previous = token_times[0]
            itl = self.itl_ms
            for moment in token_times[1:]:
                itl.append((moment - previous) * 1000)
                previous = moment
        if error is not None:
            self.fail(error)
        elif not done:
            self.fail("stream ended before its end marker")
        elif count != self.expected_tokens:
            self.fail(f"{count} tokens, expected {self.expected_tokens}")
        else:
            self.ok += 1


class _Events:
    """How an evented SSE body (``event:`` + ``data:`` lines) marks tokens, its end and its errors."""

    __slots__ = ("done", "error", "token", "token_text")

    def __init__(self, *, token: bytes, token_text: re.Pattern[bytes], done: bytes, error: frozenset[bytes]) -> None:
        self.token = token  # the event whose data may carry a token
        self.token_text = token_text  # found in that data when the token is not empty
        self.done = done  # the event that ends the reply
        self.error = error  # events that fail it


# Per inbound API (the module docstring): ``chat_completions`` is not evented (``data:`` lines only).
EVENTS = {
    "conversation": _Events(token=b"reply.delta", token_text=_CONTENT, done=b"reply.done", error=frozenset([b"error"])),
    "messages": _Events(
        token=b"content_block_delta", token_text=_TEXT, done=b"message_stop", error=frozenset([b"error"])
    ),
    "responses": _Events(
        token=b"response.output_text.delta",
        token_text=_DELTA,
        done=b"response.completed",
        error=frozenset([b"error", b"response.failed", b"response.incomplete"]),
    ),
}
APIS = ("chat_completions", *EVENTS)


class SseTokenReader:
    """Find the tokens and the end of one streamed reply in the bytes of an SSE response body.

    ``api``: the inbound API whose body it is — ``chat_completions`` (OpenAI's
    ``chat.completion.chunk`` frames ending with ``data: [DONE]``), ``conversation`` (the
    conversation endpoint's ``reply.delta`` / ``reply.done`` / ``error`` events), ``messages``
    (Anthropic's ``content_block_delta`` ... ``message_stop``) or ``responses`` (OpenAI Responses'
    ``response.output_text.delta`` ... ``response.completed``); the module docstring says what
    counts as a token, an end and an error in each. ``feed`` takes the body as it arrives, in
    reads of any size: a frame split over reads, or several frames in one read (their tokens share
    the read's time). After the body, ``token_times`` holds the arrival time of each token frame,
    ``done`` whether the end marker came, ``error`` the first error frame or event, if any, and
    ``tokens`` the ``completion_tokens`` of the conversation's ``reply.done`` (None otherwise).
    Raises ``ValueError`` for an unknown ``api``.
    Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
    (a blank line ends an event and resets its type).
    """

    __slots__ = ("_buffer", "_event", "_events", "done", "error", "token_times", "tokens")

    def __init__(self, *, api: str) -> None:
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; known: {', '.join(APIS)}")
        self._events = EVENTS.get(api)
        self._buffer = b""
        self._event = b""
        self.token_times: list[float] = []
        self.done = False
        self.error: str | None = None
        self.tokens: int | None = None  # ``completion_tokens`` of the conversation's ``reply.done``

    def feed(self, data: bytes, now: float) -> None:
        """Consume the next bytes of the body, read at ``now``; complete lines are parsed at once."""
        buffer = self._buffer + data
        if b"\n" not in data:
            self._buffer = buffer
            return
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        append = self.token_times.append
        events = self._events
        if events is not None:
            token, token_text, done = events.token, events.token_text, events.done
            for line in lines:
                if line.startswith(b"event:"):
                    self._event = line[6:].strip()
                elif line.startswith(b"data:"):
                    event = self._event
                    if event == token:
                        if token_text.search(line):
                            append(now)
                    elif event == done:
                        self.done = True
                        match = _COMPLETION_TOKENS.search(line)
                        self.tokens = int(match.group(1)) if match and event == b"reply.done" else None
                    elif event in events.error and self.error is None:
                        name = event.decode("utf-8", "replace")
                        self.error = f"{name} event: " + line[5:120].decode("utf-8", "replace").strip()
                elif not line.strip():
                    self._event = b""
            return
        for line in lines:
            if line.startswith(b"data:"):
                if _CONTENT.search(line):
                    append(now)
                elif line.startswith(b"data: [DONE]"):
                    self.done = True
                elif line.startswith(b'data: {"error"') and self.error is None:
                    self.error = "error frame: " + line[6:120].decode("utf-8", "replace")


async def _http_reply(session: aiohttp.ClientSession, state: _Round, url: str, body: bytes, headers: dict) -> None:
    reader = SseTokenReader(api=PATH_APIS[state.path])
    error: str | None = None
    state.opened()
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read())[:120].decode("utf-8", "replace")
                error = f"HTTP {response.status}: {text}"
            else:
                feed = reader.feed
                async for data in response.content.iter_any():
                    feed(data, time.perf_counter())
                error = reader.error
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:160]
    finally:
        state.closed()
    state.finish_reply(start, reader.token_times, reader.done, error, reader.tokens)


def chat_completion_body(*, model: str, prompt: str, max_tokens: int) -> bytes:
    """Return a streamed chat completion request as real clients send it (see the module docstring)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        **NEXTCHAT_PARAMETERS,
    }
    return json.dumps(body).encode()


def messages_body(*, model: str, prompt: str, max_tokens: int) -> bytes:
    """Return a streamed Anthropic Messages request: ``chat_completion_body``'s conversation and sampling.

    Spec: https://docs.anthropic.com/en/api/messages (``system`` as a string, ``max_tokens``
    required; ``temperature`` and ``top_p`` within 0..1).
    """
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "system": SYSTEM_PROMPT,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": NEXTCHAT_PARAMETERS["temperature"],
        "top_p": NEXTCHAT_PARAMETERS["top_p"],
    }
    return json.dumps(body).encode()


def responses_body(*, model: str, prompt: str, max_tokens: int) -> bytes:
    """Return a streamed OpenAI Responses request: ``chat_completion_body``'s conversation and sampling.

    Spec: https://platform.openai.com/docs/api-reference/responses/create (``instructions`` as
    the system message, ``input`` as text, ``max_output_tokens``).
    """
    body = {
        "model": model,
        "instructions": SYSTEM_PROMPT,
        "input": prompt,
        "stream": True,
        "max_output_tokens": max_tokens,
        "temperature": NEXTCHAT_PARAMETERS["temperature"],
        "top_p": NEXTCHAT_PARAMETERS["top_p"],
    }
    return json.dumps(body).encode()


# The HTTP paths' inbound API: how the reply is read (``SseTokenReader``), and the request's URL
# path and body (``_http_user``; ``sse``'s URL names the stream's conversation).
PATH_APIS = {
    "direct": "chat_completions",
    "v1": "chat_completions",
    "sse": "conversation",
    "v1msg": "messages",
    "v1resp": "responses",
}
_URL_PATHS = {
    "direct": "/v1/chat/completions",
    "v1": "/v1/chat/completions",
    "v1msg": "/v1/messages",
    "v1resp": "/v1/responses",
}
_BODIES = {
    "direct": chat_completion_body,
    "v1": chat_completion_body,
    "v1msg": messages_body,
    "v1resp": responses_body,
}
# What the Messages API reference sends and NextChat's Claude provider does (the anthropic SDK 2.x
# sends the key as a bearer token instead; the server takes both).
ANTHROPIC_VERSION = "2023-06-01"


async def _http_user(session: aiohttp.ClientSession, state: _Round, index: int) -> None:
    spec = state.spec
    await asyncio.sleep(spec["ramp_s"] * index / max(spec["concurrency"], 1))
    if state.path == "v1msg":
        url = spec["base_url"] + _URL_PATHS["v1msg"]
        headers = {
            "x-api-key": spec["api_key"],
            "anthropic-version": ANTHROPIC_VERSION,
            "Content-Type": "application/json",
        }
    elif state.path != "sse":
        url = spec["base_url"] + _URL_PATHS[state.path]
        headers = {"Authorization": f"Bearer {spec['api_key']}", "Content-Type": "application/json"}
    else:
        url = f"{spec['base_url']}/api/conversations/{spec['conversations'][index]}/messages/"
        headers = {
            "Authorization": f"Bearer {spec['api_key']}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
    for reply in range(spec["replies"]):
        prompt = f"{spec['prompt']} {index}-{reply}"
        if state.path == "sse":
            body = json.dumps({"content": prompt}).encode()
        else:
            body = _BODIES[state.path](model=spec["model"], prompt=prompt, max_tokens=spec["max_tokens"])
        await _http_reply(session, state, url, body, headers)


async def _ws_user(session: aiohttp.ClientSession, state: _Round, index: int) -> None:
    spec = state.spec
    await asyncio.sleep(spec["ramp_s"] * index / max(spec["concurrency"], 1))
    ws_base = "ws" + spec["base_url"].removeprefix("http")
    url = f"{ws_base}/ws/conversations/{spec['conversations'][index]}/?token={spec['api_key']}"
    replies = spec["replies"]
    state.opened()
    sent = 0
    try:
        start = time.perf_counter()
        async with session.ws_connect(url, autoping=True, max_msg_size=0, heartbeat=None) as ws:
            state.ws_connect_ms.append((time.perf_counter() - start) * 1000)
            for reply in range(replies):
                token_times: list[float] = []
                done = False
                error: str | None = None
                tokens: int | None = None
                start = time.perf_counter()
                await ws.send_str(json.dumps({"type": "message.send", "content": f"{spec['prompt']} {index}-{reply}"}))
                sent += 1
                while True:
                    message = await ws.receive()
                    now = time.perf_counter()
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        error = f"socket closed ({message.type.name}, code {ws.close_code})"
                        break
                    data = message.data
                    match = _WS_TYPE.match(data)
                    kind = match.group(1) if match else json.loads(data).get("type")
                    if kind == "reply.delta":
                        if _WS_CONTENT.search(data):
                            token_times.append(now)
                    elif kind == "reply.done":
                        done = True
                        found = _WS_COMPLETION_TOKENS.search(data)
                        tokens = int(found.group(1)) if found else None
                        break
                    elif kind == "error":
                        error = "error frame: " + data[:120]
                        break
                state.finish_reply(start, token_times, done, error, tokens)
                if error is not None and ws.closed:
                    break
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        kind = f"{type(exc).__name__}: {exc}"[:160]
        for _ in range(replies - sent):
            state.fail(kind)
    finally:
        state.closed()


async def run_round(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one round and return its raw measurements.

    ``spec``: ``path`` (direct|v1|v1msg|v1resp|sse|ws), ``base_url``, ``api_key``, ``model``,
    ``conversations`` (one id per stream, for sse/ws), ``concurrency`` (streams), ``replies``
    (sequential replies per stream), ``ramp_s`` (stream ``i`` starts at ``i/concurrency*ramp_s``),
    ``max_tokens`` (sent on direct, v1, v1msg and v1resp), ``expected_tokens``, ``timeout_s`` (connect and
    per-read), ``deadline_s`` (the whole round; unfinished requests are errors), ``prompt``.
    """
    state = _Round(spec)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, use_dns_cache=False, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec["timeout_s"], sock_read=spec["timeout_s"])
    user = _ws_user if spec["path"] == "ws" else _http_user
    cpu0 = _cpu_seconds()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        state.t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(user(session, state, i)) for i in range(spec["concurrency"])]
        _done, pending = await asyncio.wait(tasks, timeout=spec["deadline_s"])
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        wall = (state.last_end or time.perf_counter()) - state.t0
    cpu = _cpu_seconds() - cpu0
    expected_requests = spec["concurrency"] * spec["replies"]
    missing = expected_requests - state.ok - state.errors
    if missing > 0:
        state.errors += missing
        state.error_kinds["unfinished at the round deadline"] += missing
    # An exception escaping a stream is a bug in this module: show it rather than hide it.
    bugs = sorted({repr(t.exception())[:200] for t in tasks if not t.cancelled() and t.exception() is not None})
    return {
        "requests": expected_requests,
        "ok": state.ok,
        "errors": state.errors,
        "error_kinds": dict(state.error_kinds),
        "tokens": state.tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_open": state.peak_open,
        "ttft_ms": state.ttft_ms.tobytes(),
        "itl_ms": state.itl_ms.tobytes(),
        "ws_connect_ms": state.ws_connect_ms.tobytes(),
        "client_bugs": bugs,
    }


def main() -> None:
    """Serve round specs from stdin until it closes; answer each with its measurements."""
    raise_open_file_limit()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the protocol stream
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    send_message(stdout, {"ready": True, "uvloop": uvloop is not None})
    while True:
        try:
            spec = recv_message(stdin)
        except EOFError:
            break
        try:
            result = loop.run_until_complete(run_round(spec))
        except Exception as exc:  # report, do not die: the parent decides
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        send_message(stdout, result)
    loop.close()


if __name__ == "__main__":
    main()
