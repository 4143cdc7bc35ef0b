"""The simulator's aiohttp application: configuration, request handlers, stats and the server loop."""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import resource
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from . import anthropic_wire
from .azure_wire import azure_denied
from .gemini_handlers import GeminiApi
from .replies import count_prompt_tokens, reply_word_indexes, words_text
from .wire import (
    DONE,
    FAULT_HEADER,
    MALFORMED_CHUNK,
    NO_FAULT,
    REFUSAL_WORDS,
    SSE_HEADERS,
    ChunkFrames,
    Completion,
    Fault,
    citation,
    completion_body,
    error_response,
    model_list_body,
    new_completion_id,
    parse_completion,
    parse_fault,
    simulated_error,
    usage_object,
)

_SIM_ERROR = re.compile(r"sim-error-([45]\d\d)")
MIDSTREAM_FAILURE_CHUNKS = 3
# The failures chosen by model name (older than the header, and still used by tests).
_MODEL_FAULTS = {
    "sim-fail-midstream": Fault(drop_after=MIDSTREAM_FAILURE_CHUNKS),
    "sim-malformed-chunk": Fault(malformed_after=1),
    "sim-refusal": Fault(refusal=True),
}


def model_fault(model: str) -> Fault:
    """Return the failure the model name asks for (``sim-error-NNN``, ``sim-fail-midstream``, ...), if any."""
    match = _SIM_ERROR.fullmatch(model)
    if match:
        return Fault(status=int(match.group(1)))
    return _MODEL_FAULTS.get(model, NO_FAULT)


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
    # OpenAI chat completions received per requested model id (Azure's: per deployment).
    requests_by_model: dict[str, int] = field(default_factory=dict)


class _Simulator:
    """The request handlers, sharing one config and one stats object."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self._ttft = config.ttft_ms / 1000
        self._delay = config.token_delay_ms / 1000
        self._auth = f"Bearer {config.api_key}".encode()
        # Faults set per model id through ``PUT /_simulator/faults/{model}``.
        self.model_faults: dict[str, Fault] = {}

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
            return error_response(401, message, type_="invalid_request_error")
        # Unmasked on purpose (OpenAI masks all but 4 characters): tests prove clients redact it.
        message = f"Incorrect API key provided: {header[7:]}. You can find your API key in your dashboard."
        return error_response(401, message, type_="invalid_request_error", code="invalid_api_key")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Answer ``POST /v1/chat/completions`` (OpenAI's chat completion, streamed or not)."""
        return await self._chat_completion(request, self._unauthorized(request))

    async def azure_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Answer Azure OpenAI's ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``.

        ``azure_wire.azure_denied`` checks ``api-version`` and the ``api-key`` header; then it is
        OpenAI's chat completion of the model named by the deployment.
        """
        denied = azure_denied(request, self.config.api_key)
        return await self._chat_completion(request, denied, model=request.match_info["deployment"])

    async def _chat_completion(
        self, request: web.Request, denied: web.Response | None, model: str | None = None
    ) -> web.StreamResponse:
        self.stats.requests_started += 1
        # Not ``denied or ...``: an aiohttp response is an empty MutableMapping, hence falsy.
        parsed = denied if denied is not None else parse_completion(await request.read(), model=model)
        if isinstance(parsed, web.Response):
            self.stats.requests_failed += 1
            return parsed
        by_model = self.stats.requests_by_model
        by_model[parsed.model] = by_model.get(parsed.model, 0) + 1
        fault = self._fault(request, parsed.model)
        if isinstance(fault, web.Response):
            self.stats.requests_failed += 1
            return fault
        if fault.status is not None:
            self.stats.requests_failed += 1
            return simulated_error(fault.status, parsed.model, retry_after=fault.retry_after)
        if parsed.stream:
            return await self._stream(request, parsed, fault)
        return await self._complete(request, parsed, fault)

    def _fault(self, request: web.Request, model: str) -> Fault | web.Response:
        """Return the failures asked for: the ``X-Simulator-Fault`` header's, else those set for the model
        (``PUT /_simulator/faults/{model}``), else the model name's."""
        header = request.headers.get(FAULT_HEADER)
        if header is not None:
            return parse_fault(header)
        return self._model_fault(model)

    def _model_fault(self, model: str) -> Fault:
        """Return the failures set for ``model`` (``PUT /_simulator/faults/{model}``), else its name's."""
        fault = self.model_faults.get(model)
        return fault if fault is not None else model_fault(model)

    async def fault_set(self, request: web.Request) -> web.Response:
        """Answer ``PUT /_simulator/faults/{model}``: the body (``X-Simulator-Fault`` syntax) applies to that model.

        400 for a body that does not parse; 204 once set.
        """
        fault = parse_fault((await request.read()).decode("utf-8", "replace"))
        if isinstance(fault, web.Response):
            return fault
        self.model_faults[request.match_info["model"]] = fault
        return web.Response(status=204)

    async def fault_clear(self, request: web.Request) -> web.Response:
        """Answer ``DELETE /_simulator/faults/{model}``: the model answers normally again (204)."""
        self.model_faults.pop(request.match_info["model"], None)
        return web.Response(status=204)

    def _reply_plan(self, completion: Completion, fault: Fault) -> tuple[list[int], str]:
        """Return the reply's word indexes and its ``finish_reason``.

        A refusal (``fault.refusal``) is the words of ``REFUSAL_WORDS``, by index into it.
        """
        tokens, finish_reason = len(REFUSAL_WORDS) if fault.refusal else self.config.reply_tokens, "stop"
        if completion.max_tokens is not None and completion.max_tokens < tokens:
            tokens, finish_reason = completion.max_tokens, "length"
        if fault.refusal:
            return list(range(tokens)), finish_reason
        return reply_word_indexes(completion.messages, tokens), finish_reason

    async def _complete(self, request: web.Request, completion: Completion, fault: Fault) -> web.Response:
        """Return a ``chat.completion`` object after the time the stream would have taken.

        ``fault``: ``ttft`` and ``stall`` add to the wait; a drop closes the connection instead
        of answering; a malformed line answers a 200 body that is not JSON.
        """
        indexes, finish_reason = self._reply_plan(completion, fault)
        ttft = self._ttft if fault.ttft is None else fault.ttft
        try:
            await asyncio.sleep(ttft + fault.stall + self._delay * max(len(indexes) - 1, 0))
        except asyncio.CancelledError:  # the client left (handler_cancellation=True)
            self.stats.requests_disconnected += 1
            raise
        if fault.cut_after is not None:
            self.stats.requests_failed += 1
            if fault.drops:
                if request.transport is not None:
                    request.transport.close()
                raise asyncio.CancelledError  # nothing to answer on a closed connection
            return web.Response(body=MALFORMED_CHUNK.removeprefix(b"data: "), content_type="application/json")
        usage = usage_object(
            count_prompt_tokens(completion.messages),
            len(indexes),
            cached_tokens=fault.cached_tokens,
            reasoning_tokens=fault.reasoning_tokens,
        )
        body = completion_body(
            model=completion.model,
            indexes=indexes,
            finish_reason=finish_reason,
            usage=usage,
            top_logprobs=completion.top_logprobs if completion.logprobs else None,
            refusal=fault.refusal,
            annotations=fault.annotations,
        )
        self.stats.requests_completed += 1
        return web.json_response(body)

    async def _stream(self, request: web.Request, completion: Completion, fault: Fault) -> web.StreamResponse:
        """Stream ``chat.completion.chunk`` frames at the configured pace (OpenAI's SSE framing).

        Word ``i`` goes out ``ttft_ms + i * token_delay_ms`` after the headers. The role-only
        chunk shares the first word's write, so it arrives with the first token: a real server
        sends it once the prompt is processed (vLLM yields it right before the first token's
        chunk), and the time to first token that clients measure (to the first *content*) is the
        same either way. The finish chunk, the usage chunk and ``[DONE]`` share the last word's
        write, so a reply lasts as long as before and as long as ``_complete`` waits. One write
        per token keeps the simulator's own cost per token at one send.

        ``fault`` (``wire.Fault``): ``ttft`` replaces the time to the first token; ``stall``
        pauses before word ``stall_after`` (the pace resumes after it); the stream breaks after
        ``cut_after`` words, with a malformed line and ``[DONE]`` or a dropped connection.
        """
        indexes, finish_reason = self._reply_plan(completion, fault)
        chunk_id = new_completion_id()
        frames = ChunkFrames.for_reply(
            completion_id=chunk_id,
            created=int(time.time()),
            model=completion.model,
            include_usage=completion.include_usage,
            finish_reason=finish_reason,
        )
        drops = fault.drops
        if fault.cut_after is not None:
            indexes = indexes[: fault.cut_after]
            ending = b"" if drops else MALFORMED_CHUNK + DONE  # a drop closes the connection (below)
        else:
            ending = frames.finish
            if fault.annotations and not fault.refusal:
                ending = frames.annotations([citation(words_text(indexes))]) + ending
            if completion.include_usage:
                ending += frames.usage(
                    usage_object(
                        count_prompt_tokens(completion.messages),
                        len(indexes),
                        cached_tokens=fault.cached_tokens,
                        reasoning_tokens=fault.reasoning_tokens,
                    )
                )
            ending += DONE
        token: Callable[..., bytes]
        if fault.refusal:
            token = frames.refusal_token
        elif completion.logprobs:
            token = functools.partial(frames.token_with_logprobs, top=completion.top_logprobs)
        else:
            token = frames.token
        # The position before which the stream stalls (-1: never): one int compare per token.
        stall_at = fault.stall_after if fault.stall > 0 and fault.stall_after < len(indexes) else -1

        loop = asyncio.get_running_loop()
        response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": chunk_id})
        self.stats.active_streams += 1
        try:
            await response.prepare(request)
            due = loop.time() + (self._ttft if fault.ttft is None else fault.ttft)
            last = len(indexes) - 1
            for position, index in enumerate(indexes):
                if position == stall_at:
                    await asyncio.sleep(fault.stall)
                    due = loop.time()
                # Pace against absolute deadlines so sleep overhead does not stretch long replies.
                await asyncio.sleep(max(due - loop.time(), 0))
                due += self._delay
                frame = token(index, first=position == 0)
                if position == 0:
                    frame = frames.role + frame
                if position == last:
                    frame += ending
                await response.write(frame)
            if not indexes:  # drop-after=0, or reply_tokens=0 (in-process configs): role and ending alone
                await asyncio.sleep(max(due - loop.time(), 0))
                await response.write(frames.role + ending)
            if drops:
                # Close the socket without the chunked body's terminator: the client sees a dropped stream.
                self.stats.requests_failed += 1
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            if fault.cut_after is not None:
                self.stats.requests_failed += 1
            else:
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

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Answer ``POST /v1/messages`` (Anthropic's Messages API, streamed or not; see ``anthropic_wire``)."""
        return await anthropic_wire.answer(request, config=self.config, stats=self.stats, model_fault=self._model_fault)

    async def models(self, request: web.Request) -> web.Response:
        """Answer ``GET /v1/models`` (OpenAI's model list)."""
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return web.json_response(model_list_body(self.config.models))

    async def stats_view(self, request: web.Request) -> web.Response:
        """Answer ``GET /_simulator/stats`` with the request counters."""
        return web.json_response(asdict(self.stats))

    async def not_found(self, request: web.Request) -> web.Response:
        """Answer any other URL the way OpenAI does."""
        return error_response(404, f"Invalid URL ({request.method} {request.path})", type_="invalid_request_error")


def create_app(config: SimulatorConfig) -> web.Application:
    """Return the simulator's aiohttp application for ``config``."""
    simulator = _Simulator(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # long prompts are legitimate
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", simulator.azure_chat_completions)
    app.router.add_post("/v1/messages", simulator.messages)
    gemini = GeminiApi(simulator.config, simulator.stats, simulator._fault)
    for version in ("v1beta", "v1"):  # {model}:generateContent and :streamGenerateContent
        app.router.add_post(f"/{version}/models/{{target}}", gemini.generate)
    app.router.add_get("/v1/models", simulator.models)
    app.router.add_get("/_simulator/stats", simulator.stats_view)
    app.router.add_put("/_simulator/faults/{model}", simulator.fault_set)
    app.router.add_delete("/_simulator/faults/{model}", simulator.fault_clear)
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
    run_event_loop(serve(config, host=host, port=port, on_ready=on_ready))


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop when installed (uvicorn[standard] installs it), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)


def _raise_open_file_limit() -> None:
    """Raise the soft open-files limit to the hard one: each stream holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


__all__ = [
    "MIDSTREAM_FAILURE_CHUNKS",
    "SimulatorConfig",
    "SimulatorStats",
    "create_app",
    "run_simulator",
    "serve",
]
