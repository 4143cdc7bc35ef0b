"""The load generator: a child process that runs rounds of concurrent streaming requests.

``bench.run`` starts one (or ``--client-procs``) of these as ``python -m bench.loadgen`` and
talks to it over stdin/stdout with length-prefixed pickles: it sends a round spec (a dict, see
``run_round``) and gets back the raw measurements. Its own CPU time is measured here, around
the round only, so the report can show that the client is not the bottleneck.

The client is aiohttp on uvloop and parses the minimum: it splits the body into lines, finds
the ``data:`` lines, and timestamps each content frame as it is read (``time.perf_counter``).
A content frame is one token:

- ``direct`` and ``v1`` (OpenAI SSE): a ``data:`` line whose JSON has a non-empty ``"content"``
  string (found with a byte regex, no ``json.loads``); ``data: [DONE]`` ends the stream.
- ``sse`` (conversation SSE): a ``data:`` line after ``event: reply.delta``; ``reply.done``
  ends it, ``event: error`` fails it.
- ``ws``: a text frame whose ``"type"`` is ``reply.delta``; ``reply.done`` ends the reply,
  ``error`` fails it. One socket per stream; its replies are sent one after another.

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
# quote before "content" is required). Frames of both the simulator and /v1 are compact JSON.
_CONTENT = re.compile(rb'"content":\s*"(?!")')
_WS_TYPE = re.compile(r'\{\s*"type":\s*"([^"]+)"')
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

    def finish_reply(self, start: float, token_times: list[float], done: bool, error: str | None) -> None:
        """Record one reply from its content-frame arrival times."""
        count = len(token_times)
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


async def _http_reply(session: aiohttp.ClientSession, state: _Round, url: str, body: bytes, headers: dict) -> None:
    sse = state.path == "sse"
    token_times: list[float] = []
    done = False
    error: str | None = None
    state.opened()
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read())[:120].decode("utf-8", "replace")
                error = f"HTTP {response.status}: {text}"
            else:
                buffer = b""
                event = b""
                append = token_times.append
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    buffer += data
                    if b"\n" not in data:
                        continue
                    lines = buffer.split(b"\n")
                    buffer = lines.pop()
                    for line in lines:
                        if sse:
                            if line.startswith(b"event:"):
                                event = line[6:].strip()
                            elif line.startswith(b"data:"):
                                if event == b"reply.delta":
                                    append(now)
                                elif event == b"reply.done":
                                    done = True
                                elif event == b"error":
                                    error = "error event: " + line[5:120].decode("utf-8", "replace").strip()
                        elif line.startswith(b"data:"):
                            if _CONTENT.search(line):
                                append(now)
                            elif line.startswith(b"data: [DONE]"):
                                done = True
                            elif line.startswith(b'data: {"error"'):
                                error = "error frame: " + line[6:120].decode("utf-8", "replace")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:160]
    finally:
        state.closed()
    state.finish_reply(start, token_times, done, error)


async def _http_user(session: aiohttp.ClientSession, state: _Round, index: int) -> None:
    spec = state.spec
    await asyncio.sleep(spec["ramp_s"] * index / max(spec["concurrency"], 1))
    if state.path in ("direct", "v1"):
        url = spec["base_url"] + "/v1/chat/completions"
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
            messages = [{"role": "user", "content": prompt}]
            body = json.dumps({"model": spec["model"], "stream": True, "messages": messages}).encode()
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
                        token_times.append(now)
                    elif kind == "reply.done":
                        done = True
                        break
                    elif kind == "error":
                        error = "error frame: " + data[:120]
                        break
                state.finish_reply(start, token_times, done, error)
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

    ``spec``: ``path`` (direct|v1|sse|ws), ``base_url``, ``api_key``, ``model``,
    ``conversations`` (one id per stream, for sse/ws), ``concurrency`` (streams), ``replies``
    (sequential replies per stream), ``ramp_s`` (stream ``i`` starts at ``i/concurrency*ramp_s``),
    ``expected_tokens``, ``timeout_s`` (connect and per-read), ``deadline_s`` (the whole round;
    unfinished requests are errors), ``prompt``.
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
