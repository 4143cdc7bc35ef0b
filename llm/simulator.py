"""An LLM simulator: a separate process that speaks OpenAI's chat-completions wire format.

It is the fake upstream for tests and the benchmark's direct-path upstream, so it follows the
wire format exactly and stays cheap per token (thousands of concurrent streams per process).
Specs: https://platform.openai.com/docs/api-reference/chat/streaming (chunk objects and SSE
framing), https://platform.openai.com/docs/api-reference/chat/create, and the OpenAPI file
/work/shared/specs/openai-openapi.yaml (``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``ListModelsResponse``, ``ErrorResponse``).

Endpoints:

- ``POST /v1/chat/completions``: ``stream: true`` answers ``text/event-stream`` frames
  ``data: {chat.completion.chunk}\\n\\n``, one word per chunk (role on the first, finish_reason
  ``stop`` or ``length`` on the last), then with ``stream_options.include_usage`` a usage chunk
  (``choices: []``; earlier chunks carry ``"usage": null``), then ``data: [DONE]``.
  ``stream: false`` answers one ``chat.completion`` object.
- ``GET /v1/models``: the OpenAI model list.
- ``GET /_simulator/stats``: ``requests_started``, ``requests_completed``, ``requests_failed``,
  ``requests_disconnected`` (client left before the end), ``active_streams``.

Replies are deterministic: word ``i`` of the reply is picked from a fixed word list by a CRC32 of
the last user message (see ``reply_text``). ``prompt_tokens`` is the number of words in all
messages plus 3 per message; ``completion_tokens`` the number of content chunks.

Failures on demand, chosen by the request's ``model``:

- ``sim-error-NNN`` (NNN in 400..599): status NNN with an OpenAI error body.
- ``sim-fail-midstream``: three chunks, then the TCP connection is closed mid-body.
- ``sim-malformed-chunk``: one chunk, then a ``data:`` line that is not JSON, then ``[DONE]``.

With ``api_key`` set, ``/v1`` requests need ``Authorization: Bearer <api_key>``; a wrong key is
echoed back *unmasked* in the 401 message (OpenAI masks it), so tests prove that clients redact it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import re
import resource
import signal
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] installs it
    uvloop = None  # type: ignore[assignment]

# A fixed vocabulary; 64 entries so that any odd stride visits every word (see _word_indexes).
_WORDS = (
    "the quick brown fox jumps over lazy dog while seven bright stars watch quiet river "
    "flow past old stone bridges under silver moonlight and gentle winds carry soft songs "
    "from distant hills where green fields meet tall pine forests near small wooden houses "
    "with warm fires glowing through open windows on long winter nights as calm blue "
    "waves touch golden sand beneath clear skies"
).split()
assert len(_WORDS) == 64  # noqa: S101 - a module invariant, checked once at import
# JSON string literals, encoded once: the first token has no leading space, later ones do.
_FIRST_TOKEN_JSON = tuple(json.dumps(word).encode() for word in _WORDS)
_NEXT_TOKEN_JSON = tuple(json.dumps(" " + word).encode() for word in _WORDS)

_SIM_ERROR = re.compile(r"sim-error-([45]\d\d)")
MIDSTREAM_FAILURE_CHUNKS = 3
_SYSTEM_FINGERPRINT = "fp_llm_simulator"
_MODEL_CREATED = 1_700_000_000
# Process-unique id prefix plus a counter: cheaper than random ids per request, still unique.
_ID_PREFIX = f"chatcmpl-sim{os.getpid():x}{int(time.time()):x}"
_ids = itertools.count(1)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_DETAILS = {  # the usage breakdowns OpenAI sends, all zero here
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator answers: ``ttft_ms`` before the first token, ``token_delay_ms`` between
    tokens (milliseconds), ``reply_tokens`` per reply, the ``api_key`` to require (empty: none)
    and the ``models`` listed by ``GET /v1/models`` (any model id is accepted)."""

    ttft_ms: float = 50.0
    token_delay_ms: float = 10.0
    reply_tokens: int = 64
    api_key: str = ""
    models: tuple[str, ...] = ("sim-1",)


@dataclass(slots=True)
class SimulatorStats:
    """Request counters served by ``GET /_simulator/stats``."""

    requests_started: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    requests_disconnected: int = 0
    active_streams: int = 0


def _text_of(content: Any) -> str:
    """Return the text of a message ``content`` (a string, or a list of ``{"type": "text"}`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _word_indexes(prompt: str, tokens: int) -> list[int]:
    """Return ``tokens`` indexes into the word list, a pure function of ``prompt``."""
    seed = zlib.crc32(prompt.encode())
    start, stride = seed % 64, 2 * ((seed >> 6) % 32) + 1  # odd stride: a full cycle over 64 words
    return [(start + i * stride) % 64 for i in range(tokens)]


def reply_text(messages: Sequence[Mapping[str, Any]], tokens: int) -> str:
    """Return the simulator's reply (``tokens`` words) to ``messages`` (OpenAI message objects)."""
    return " ".join(_WORDS[i] for i in _word_indexes(_last_user_text(messages), tokens))


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Return the simulator's ``prompt_tokens``: words in all messages plus 3 per message."""
    return sum(len(_text_of(m.get("content")).split()) + 3 for m in messages)


def _error(status: int, message: str, *, type_: str, code: str | None = None, param: str | None = None) -> web.Response:
    """Return OpenAI's error response ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _simulated_error(status: int, model: str) -> web.Response:
    """Return the error OpenAI would send with ``status`` (messages modelled on OpenAI's own)."""
    if status == 429:
        message = f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1."
        return _error(429, message, type_="requests", code="rate_limit_exceeded")
    if status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, message, type_="invalid_request_error", code="model_not_found")
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return _error(status, message, type_="server_error")
    return _error(status, f"Simulated error {status} for model {model}.", type_="invalid_request_error")


@dataclass(frozen=True, slots=True)
class _Completion:
    """A validated chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _parse(body: bytes) -> _Completion | web.Response:
    """Return the request, or the 400 error OpenAI would answer for it."""
    try:
        data = json.loads(body)
    except ValueError:
        message = (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
        return _error(400, message, type_="invalid_request_error")
    if not isinstance(data, dict):
        return _error(400, "The request body must be a JSON object.", type_="invalid_request_error")
    model, messages = data.get("model"), data.get("messages")
    if not isinstance(model, str) or not model:
        return _error(400, "you must provide a model parameter", type_="invalid_request_error")
    if messages is None:
        message, code = "Missing required parameter: 'messages'.", "missing_required_parameter"
        return _error(400, message, type_="invalid_request_error", code=code, param="messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        message = "Invalid 'messages': expected a non-empty array of message objects."
        return _error(400, message, type_="invalid_request_error", code="invalid_type", param="messages")
    stream = data.get("stream") is True
    stream_options = data.get("stream_options")
    if stream_options is not None and not stream:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        return _error(400, message, type_="invalid_request_error", param="stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            message = f"Invalid '{name}': expected an integer of at least 1, got {value!r}."
            return _error(400, message, type_="invalid_request_error", code="invalid_value", param=name)
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    return _Completion(model, messages, stream, include_usage, max_tokens)


class _Simulator:
    """The request handlers, sharing one config and one stats object."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._ttft = config.ttft_ms / 1000
        self._delay = config.token_delay_ms / 1000
        self._auth = f"Bearer {config.api_key}".encode()

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """Return OpenAI's 401 when an API key is required and the request lacks it."""
        if not self.config.api_key:
            return None
        header = request.headers.get("Authorization", "")
        if hmac.compare_digest(header.encode(), self._auth):
            return None
        if not header.startswith("Bearer ") or not header[7:]:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return _error(401, message, type_="invalid_request_error")
        # Unmasked on purpose (OpenAI masks all but 4 characters): tests prove clients redact it.
        message = f"Incorrect API key provided: {header[7:]}. You can find your API key in your dashboard."
        return _error(401, message, type_="invalid_request_error", code="invalid_api_key")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Answer ``POST /v1/chat/completions`` (OpenAI's chat completion, streamed or not)."""
        self.stats.requests_started += 1
        # Not ``denied or ...``: an aiohttp response is an empty MutableMapping, hence falsy.
        denied = self._unauthorized(request)
        parsed = denied if denied is not None else _parse(await request.read())
        if isinstance(parsed, web.Response):
            self.stats.requests_failed += 1
            return parsed
        match = _SIM_ERROR.fullmatch(parsed.model)
        if match:
            self.stats.requests_failed += 1
            return _simulated_error(int(match.group(1)), parsed.model)
        if parsed.stream:
            return await self._stream(request, parsed)
        return await self._complete(parsed)

    def _reply_plan(self, completion: _Completion) -> tuple[list[int], str]:
        """Return the reply's word indexes and its ``finish_reason``."""
        tokens, finish_reason = self.config.reply_tokens, "stop"
        if completion.max_tokens is not None and completion.max_tokens < tokens:
            tokens, finish_reason = completion.max_tokens, "length"
        return _word_indexes(_last_user_text(completion.messages), tokens), finish_reason

    async def _complete(self, completion: _Completion) -> web.Response:
        """Return a ``chat.completion`` object after the time the stream would have taken."""
        indexes, finish_reason = self._reply_plan(completion)
        try:
            await asyncio.sleep(self._ttft + self._delay * max(len(indexes) - 1, 0))
        except asyncio.CancelledError:  # the client left (handler_cancellation=True)
            self.stats.requests_disconnected += 1
            raise
        content = " ".join(_WORDS[i] for i in indexes)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        usage = _usage(count_prompt_tokens(completion.messages), len(indexes))
        body = {
            "id": f"{_ID_PREFIX}{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": completion.model,
            "choices": [choice],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": _SYSTEM_FINGERPRINT,
        }
        self.stats.requests_completed += 1
        return web.json_response(body)

    async def _stream(self, request: web.Request, completion: _Completion) -> web.StreamResponse:
        """Stream ``chat.completion.chunk`` frames at the configured pace (OpenAI's SSE framing)."""
        indexes, finish_reason = self._reply_plan(completion)
        chunk_id = f"{_ID_PREFIX}{next(_ids)}"
        created = int(time.time())
        head = (
            f'data: {{"id":"{chunk_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(completion.model)},"service_tier":"default",'
            f'"system_fingerprint":"{_SYSTEM_FINGERPRINT}","choices":[{{"index":0,"delta":{{'
        ).encode()
        # Everything but the word is fixed per request, so a frame is one bytes join.
        tail = b'},"logprobs":null,"finish_reason":null}]' + (
            b',"usage":null}\n\n' if completion.include_usage else b"}\n\n"
        )
        last_tail = tail.replace(b'"finish_reason":null', f'"finish_reason":"{finish_reason}"'.encode())
        failure = completion.model in ("sim-fail-midstream", "sim-malformed-chunk")
        if completion.model == "sim-fail-midstream":
            indexes = indexes[:MIDSTREAM_FAILURE_CHUNKS]
        elif completion.model == "sim-malformed-chunk":
            indexes = indexes[:1]

        loop = asyncio.get_running_loop()
        response = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": chunk_id})
        self.stats.active_streams += 1
        try:
            await response.prepare(request)
            due = loop.time() + self._ttft
            last = len(indexes) - 1
            for position, index in enumerate(indexes):
                # Pace against absolute deadlines so sleep overhead does not stretch long replies.
                await asyncio.sleep(max(due - loop.time(), 0))
                due += self._delay
                if position == 0:
                    delta = b'"role":"assistant","content":' + _FIRST_TOKEN_JSON[index] + b',"refusal":null'
                else:
                    delta = b'"content":' + _NEXT_TOKEN_JSON[index]
                await response.write(head + delta + (last_tail if position == last and not failure else tail))
            if completion.model == "sim-fail-midstream":
                # Close the socket without the chunked body's terminator: the client sees a dropped stream.
                self.stats.requests_failed += 1
                if request.transport is not None:
                    request.transport.close()
                return response
            if completion.model == "sim-malformed-chunk":
                await response.write(b'data: {"id": "broken", "choices": [\n\n')
                self.stats.requests_failed += 1
            elif completion.include_usage:
                usage = _usage(count_prompt_tokens(completion.messages), len(indexes))
                await response.write(
                    head[: head.index(b'"choices"')] + b'"choices":[],"usage":' + _dumps(usage) + b"}\n\n"
                )
            await response.write(_DONE)
            await response.write_eof()
            if not failure:
                self.stats.requests_completed += 1
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects (handler_cancellation=True).
            self.stats.requests_disconnected += 1
            raise
        except ConnectionResetError:
            # The same, noticed on write instead; nothing left to send, so end quietly.
            self.stats.requests_disconnected += 1
        finally:
            self.stats.active_streams -= 1
        return response

    async def models(self, request: web.Request) -> web.Response:
        """Answer ``GET /v1/models`` (OpenAI's model list)."""
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": _MODEL_CREATED, "owned_by": "llm-simulator"}
            for m in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def stats_view(self, request: web.Request) -> web.Response:
        """Answer ``GET /_simulator/stats`` with the request counters."""
        return web.json_response(asdict(self.stats))

    async def not_found(self, request: web.Request) -> web.Response:
        """Answer any other URL the way OpenAI does."""
        return _error(404, f"Invalid URL ({request.method} {request.path})", type_="invalid_request_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Return OpenAI's ``usage`` object (``CompletionUsage``)."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total, **_DETAILS}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def create_app(config: SimulatorConfig) -> web.Application:
    """Return the simulator's aiohttp application for ``config``."""
    simulator = _Simulator(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # long prompts are legitimate
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_get("/v1/models", simulator.models)
    app.router.add_get("/_simulator/stats", simulator.stats_view)
    app.router.add_route("*", "/{tail:.*}", simulator.not_found)
    return app


async def serve(
    config: SimulatorConfig,
    *,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the simulator on ``host:port`` until ``stop`` is set (or SIGINT/SIGTERM arrives).

    ``port`` 0 picks a free port; ``on_ready`` gets the real base URL (``http://host:port``).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # handler_cancellation: a client that disconnects cancels its handler at once, so the stats
    # show it within a token interval; no access log: it would cost more than the stream itself.
    runner = web.AppRunner(create_app(config), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        on_ready(f"http://{shown}:{bound_port}")
        await stop.wait()
    finally:
        await runner.cleanup()


def run_simulator(config: SimulatorConfig, *, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Run ``serve`` on uvloop when installed (else asyncio) until SIGINT/SIGTERM."""
    _raise_open_file_limit()
    main = serve(config, host=host, port=port, on_ready=on_ready)
    if uvloop is not None:
        uvloop.run(main)
    else:
        asyncio.run(main)


def _raise_open_file_limit() -> None:
    """Raise the soft open-files limit to the hard one: each stream holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
