"""The OpenAI-compatible adapter against the real simulator process over HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from llm.providers import ChatChunk, ChatProvider, ChatRequest, ProviderConfig, UpstreamError, Usage, get_provider, http
from llm.providers.base import UPSTREAM_MESSAGES
from llm.providers.openai_compatible import OpenAICompatibleProvider, aclose_clients
from llm.simulator import MIDSTREAM_FAILURE_CHUNKS, count_prompt_tokens, reply_text
from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, SIMULATOR_API_KEY, local_http_server, poll_until

pytestmark = pytest.mark.usefixtures("provider_clients")

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Name three rivers."}]
# Sent to simulators that accept any key, so every error path is checked for leaking it.
PROVIDER_KEY = "sk-provider-secret-key-0123456789"


def provider(base_url: str, api_key: str = PROVIDER_KEY, **timeouts: float) -> OpenAICompatibleProvider:
    adapter = get_provider(ProviderConfig(kind="openai", base_url=base_url, api_key=api_key, **timeouts))
    assert isinstance(adapter, OpenAICompatibleProvider)
    return adapter


async def collect(adapter: ChatProvider, request: ChatRequest, into: list[ChatChunk] | None = None) -> list[ChatChunk]:
    """Return every chunk of the stream, in order (into ``into`` as they arrive, if given).

    Checks the contract on the way: each batch is a non-empty list of ``ChatChunk``.
    """
    chunks = [] if into is None else into
    async for batch in adapter.stream(request):
        assert isinstance(batch, list) and batch, f"a batch must be a non-empty list, got {batch!r}"
        assert all(isinstance(chunk, ChatChunk) for chunk in batch)
        chunks.extend(batch)
    return chunks


def assert_key_hidden(error: UpstreamError, key: str = PROVIDER_KEY) -> None:
    assert key not in error.message and key not in str(error) and key not in str(error.as_dict())
    assert key not in (error.detail or "")  # the server log's detail is redacted too


def assert_client_message(error: UpstreamError, message: str) -> None:
    """The client sees ``message``: no host, port or library text, which only the log's detail has."""
    assert error.message == message, error.message
    for internal in ("127.0.0.1", "localhost", "aiohttp", "Error(", "ssl", "http://"):
        assert internal not in error.message


async def test_streams_content_chunks_then_usage(simulator: SimulatorProcess) -> None:
    chunks = await collect(provider(simulator.base_url), ChatRequest(model="sim-1", messages=MESSAGES))

    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert sum(1 for c in chunks if c.content) == FAST_REPLY_TOKENS
    # The role-only first chunk carries nothing and is skipped; the finish chunk has only finish_reason.
    assert [c.finish_reason for c in chunks] == [None] * FAST_REPLY_TOKENS + ["stop", None]
    assert chunks[-2] == ChatChunk(finish_reason="stop")
    assert chunks[-1] == ChatChunk(
        usage=Usage(prompt_tokens=count_prompt_tokens(MESSAGES), completion_tokens=FAST_REPLY_TOKENS)
    )
    assert all(c.usage is None for c in chunks[:-1])


async def test_parameters_reach_the_upstream(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"max_tokens": 2, "temperature": 0.2})
    chunks = await collect(provider(simulator.base_url), request)
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, 2)
    assert chunks[-2] == ChatChunk(finish_reason="length") and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


async def test_sends_bearer_key_only_when_configured(keyed_simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    chunks = await collect(provider(keyed_simulator.base_url, api_key=SIMULATOR_API_KEY), request)
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)

    with pytest.raises(UpstreamError) as caught:
        await collect(provider(keyed_simulator.base_url, api_key=""), request)
    # The simulator's "no key" message proves no Authorization header was sent at all.
    assert caught.value.upstream_status == 401 and "didn't provide an API key" in (caught.value.detail or "")


async def test_wrong_key_is_a_502_that_never_shows_the_key(keyed_simulator: SimulatorProcess) -> None:
    # The simulator echoes a wrong key unmasked in its 401 message; the adapter must redact it.
    wrong_key = "sk-provider-wrong-key-abcdef0123456789"
    with pytest.raises(UpstreamError) as caught:
        await collect(
            provider(keyed_simulator.base_url, api_key=wrong_key), ChatRequest(model="sim-1", messages=MESSAGES)
        )
    assert (caught.value.status, caught.value.upstream_status, caught.value.code) == (502, 401, "upstream_auth_failed")
    assert_client_message(caught.value, "The model provider rejected this server's credentials.")
    assert "Incorrect API key provided" in (caught.value.detail or "")
    assert_key_hidden(caught.value, wrong_key)


@pytest.mark.parametrize(
    ("model", "status", "code", "quoted"),
    [
        ("sim-error-500", 502, "upstream_error", "The model provider failed to answer. (status 500)"),
        ("sim-error-503", 502, "upstream_error", "The model provider failed to answer. (status 503)"),
        ("sim-error-429", 429, "upstream_rate_limited", "Rate limit reached"),
        ("sim-error-400", 400, "upstream_error", "Simulated error 400"),
        ("sim-error-404", 404, "upstream_error", "does not exist"),
    ],
)
async def test_upstream_error_status_maps_to_upstream_error(
    simulator: SimulatorProcess, model: str, status: int, code: str, quoted: str
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(simulator.base_url), ChatRequest(model=model, messages=MESSAGES))
    assert caught.value.status == status
    assert caught.value.upstream_status == int(model.rsplit("-", 1)[1])
    assert caught.value.code == code and quoted in caught.value.message
    assert f"answered {caught.value.upstream_status}" in (caught.value.detail or "")  # the log has the body
    assert_key_hidden(caught.value)


async def test_unreachable_upstream_is_502(closed_port_url: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(closed_port_url, connect_timeout=2), ChatRequest(model="sim-1", messages=MESSAGES))
    assert (caught.value.status, caught.value.upstream_status, caught.value.code) == (502, None, "upstream_unreachable")
    assert_client_message(caught.value, "The model provider could not be reached.")
    assert f"upstream {closed_port_url}/chat/completions unreachable" in (caught.value.detail or "")
    assert_key_hidden(caught.value)


async def test_the_logged_detail_drops_a_base_urls_credentials(closed_port_url: str) -> None:
    with_credentials = closed_port_url.replace("http://", "http://someone:hunter2-secret@")
    with pytest.raises(UpstreamError) as caught:
        adapter = provider(with_credentials, api_key="", connect_timeout=2)  # Basic auth from the URL
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))
    detail = caught.value.detail or ""
    assert f"upstream {closed_port_url}/chat/completions unreachable: ClientConnectorError" in detail
    assert "hunter2-secret" not in detail and "someone" not in detail


async def test_silent_upstream_times_out_with_504() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamError) as caught:
            adapter = provider(f"http://127.0.0.1:{port}/v1", read_timeout=0.2)
            await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))
    finally:
        server.close()
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")
    assert_key_hidden(caught.value)


async def test_chunks_received_with_the_connection_drop_are_kept() -> None:
    """aiohttp raises a dropped connection before handing over what it had received: not lost here."""

    def event(text: str) -> bytes:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip
        data = f"data: {json.dumps(chunk)}\n\n".encode()
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"  # one chunk of a chunked body

    first_read, dropped = asyncio.Event(), asyncio.Event()

    async def answer_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + event("one "))
        await first_read.wait()
        writer.write(event("two ") + event("three"))  # then closed with the body unfinished
        await writer.drain()
        writer.close()
        dropped.set()

    server = await asyncio.start_server(answer_then_drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    received: list[str] = []
    try:
        with pytest.raises(UpstreamError) as caught:
            async for batch in provider(f"http://127.0.0.1:{port}/v1").stream(
                ChatRequest(model="m", messages=MESSAGES)
            ):
                received.extend(chunk.content for chunk in batch)
                if not first_read.is_set():
                    first_read.set()
                    await dropped.wait()  # the rest and the drop arrive before the next read
                    await asyncio.sleep(0.1)
    finally:
        server.close()
    assert "".join(received) == "one two three"
    assert caught.value.code == "upstream_disconnected"


@pytest.mark.parametrize(
    ("model", "chunks", "code", "quoted"),
    [
        ("sim-fail-midstream", MIDSTREAM_FAILURE_CHUNKS, "upstream_disconnected", "mid-stream"),  # connection dropped
        ("sim-malformed-chunk", 1, "upstream_bad_response", "malformed chunk"),
    ],
)
async def test_a_stream_broken_midway_is_502_after_the_chunks_received(
    simulator: SimulatorProcess, model: str, chunks: int, code: str, quoted: str
) -> None:
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(simulator.base_url), ChatRequest(model=model, messages=MESSAGES), received)
    assert len(received) == chunks and all(c.content for c in received)
    assert (caught.value.status, caught.value.code) == (502, code)
    assert_client_message(caught.value, UPSTREAM_MESSAGES[code])
    assert quoted in (caught.value.detail or "")
    assert_key_hidden(caught.value)


def faulty_provider(base_url: str, fault: str, **timeouts: float) -> OpenAICompatibleProvider:
    """Return an adapter whose provider sends the simulator's fault header with every request."""
    config = ProviderConfig(
        kind="openai",
        base_url=base_url,
        api_key=PROVIDER_KEY,
        extra_headers=(("X-Simulator-Fault", fault), ("X-Title", "chatbackend tests")),
        **timeouts,
    )
    adapter = get_provider(config)
    assert isinstance(adapter, OpenAICompatibleProvider)
    return adapter


@pytest.mark.parametrize(
    ("fault", "chunks", "status", "code"),
    [
        ("status=503", 0, 502, "upstream_error"),
        ("status=429", 0, 429, "upstream_rate_limited"),
        ("drop-after=2", 2, 502, "upstream_disconnected"),
        ("malformed-line=3", 3, 502, "upstream_bad_response"),
        # A stall (or a first token) later than the read timeout is a timeout, not a hang.
        ("stall=5, stall-after=2", 2, 504, "upstream_timeout"),
        ("ttft=5", 0, 504, "upstream_timeout"),
    ],
)
async def test_the_providers_extra_headers_reach_the_upstream(
    simulator: SimulatorProcess, fault: str, chunks: int, status: int, code: str
) -> None:
    received: list[ChatChunk] = []
    adapter = faulty_provider(simulator.base_url, fault, read_timeout=0.5)
    with pytest.raises(UpstreamError) as caught:
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES), received)
    assert len(received) == chunks and all(c.content for c in received)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert_key_hidden(caught.value)


async def test_usage_details_are_read_from_the_upstream(simulator: SimulatorProcess) -> None:
    adapter = faulty_provider(simulator.base_url, "cached-tokens=4, reasoning-tokens=7")
    chunks = await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))

    assert chunks[-1] == ChatChunk(
        usage=Usage(
            prompt_tokens=count_prompt_tokens(MESSAGES),
            completion_tokens=FAST_REPLY_TOKENS + 7,  # reasoning counts in the completion, as OpenAI's does
            cached_tokens=4,
            reasoning_tokens=7,
        )
    )


async def test_logprobs_pass_through_when_the_upstream_sends_them(simulator: SimulatorProcess) -> None:
    parameters = {"logprobs": True, "top_logprobs": 2}
    chunks = await collect(
        provider(simulator.base_url), ChatRequest(model="sim-1", messages=MESSAGES, parameters=parameters)
    )
    content_chunks = [c for c in chunks if c.content]
    assert "".join(c.content for c in content_chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    for chunk in content_chunks:
        assert chunk.logprobs is not None and chunk.logprobs["refusal"] is None
        [entry] = chunk.logprobs["content"]
        assert entry["token"] == chunk.content and len(entry["top_logprobs"]) == 2
    assert all(c.logprobs is None for c in chunks if not c.content)  # the finish and usage chunks

    plain = await collect(provider(simulator.base_url), ChatRequest(model="sim-1", messages=MESSAGES))
    assert all(c.logprobs is None for c in plain)


async def test_cancelling_the_consumer_closes_the_upstream_stream(slow_simulator: SimulatorProcess) -> None:
    before = await slow_simulator.astats()
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in provider(slow_simulator.base_url).stream(ChatRequest(model="sim-1", messages=MESSAGES)):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), timeout=5)
    assert (await slow_simulator.astats())["active_streams"] == before["active_streams"] + 1
    task.cancel()
    # Poll before awaiting the task: the upstream must close because of the cancel alone.
    after = await poll_until(
        slow_simulator.astats,
        lambda s: (
            s["requests_disconnected"] == before["requests_disconnected"] + 1
            and s["active_streams"] == before["active_streams"]
        ),
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after["requests_completed"] == before["requests_completed"]


async def test_aclose_of_the_stream_closes_the_upstream_stream(slow_simulator: SimulatorProcess) -> None:
    before = await slow_simulator.astats()
    stream = provider(slow_simulator.base_url).stream(ChatRequest(model="sim-1", messages=MESSAGES))
    first = await anext(stream)
    assert first and all(chunk.content for chunk in first)
    closing = asyncio.create_task(stream.aclose())
    await poll_until(
        slow_simulator.astats,
        lambda s: (
            s["requests_disconnected"] == before["requests_disconnected"] + 1
            and s["active_streams"] == before["active_streams"]
        ),
    )
    await closing


async def test_streams_share_one_client_and_survive_aclose_clients(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    results = await asyncio.gather(*(collect(provider(simulator.base_url), request) for _ in range(20)))
    assert {"".join(c.content for c in chunks) for chunks in results} == {reply_text(MESSAGES, FAST_REPLY_TOKENS)}
    await aclose_clients()
    chunks = await collect(provider(simulator.base_url), request)
    assert chunks[-1].usage is not None


# --- Shapes the simulator never sends (reasoning, tool calls, late errors), over real HTTP ---


@pytest.fixture
async def canned_upstream() -> AsyncIterator[Callable[..., str]]:
    """Yield ``serve(body, content_type=..., status=...) -> base_url``: a local HTTP server whose
    ``POST /v1/chat/completions`` answers that fixed body."""
    answer: dict[str, Any] = {}

    async def chat_completions(request: web.Request) -> web.Response:
        return web.Response(body=answer["body"], status=answer["status"], headers={"Content-Type": answer["type"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    async with local_http_server(app) as url:

        def serve(body: bytes, content_type: str = "text/event-stream", status: int = 200) -> str:
            answer.update(body=body, type=content_type, status=status)
            return f"{url}/v1"

        yield serve


def sse(*payloads: dict[str, Any] | str) -> bytes:
    """Return SSE ``data:`` events for ``payloads`` (dicts as JSON), preceded by a keep-alive comment."""
    frames = [p if isinstance(p, str) else json.dumps(p) for p in payloads]
    return (": keep-alive\n\n" + "".join(f"data: {frame}\n\n" for frame in frames)).encode()


def delta_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


async def test_reasoning_and_tool_calls_pass_through(canned_upstream: Callable[..., str]) -> None:
    call_start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    call_args = {"index": 0, "function": {"arguments": '{"q": 1}'}}
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    base_url = canned_upstream(
        sse(
            delta_chunk({"role": "assistant", "content": ""}),  # carries nothing: skipped
            delta_chunk({"reasoning_content": "Thinking."}),
            delta_chunk({"content": "Let me check."}),
            delta_chunk({"tool_calls": [call_start]}),
            delta_chunk({"tool_calls": [call_args]}),
            delta_chunk({}, finish_reason="tool_calls"),
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [],
                "usage": usage,
            },
            "[DONE]",
        )
    )
    chunks = await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert chunks == [
        ChatChunk(reasoning_content="Thinking."),
        ChatChunk(content="Let me check."),
        ChatChunk(tool_calls=[call_start]),
        ChatChunk(tool_calls=[call_args]),
        ChatChunk(finish_reason="tool_calls"),
        ChatChunk(usage=Usage(prompt_tokens=7, completion_tokens=5)),
    ]


async def test_error_object_mid_stream_is_502_without_the_key(canned_upstream: Callable[..., str]) -> None:
    error = {"error": {"message": f"Engine overloaded for key {PROVIDER_KEY}", "type": "server_error"}}
    base_url = canned_upstream(sse(delta_chunk({"content": "Hi"}), error))
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES), received)
    assert received == [ChatChunk(content="Hi")]
    assert caught.value.status == 502 and "Engine overloaded" in (caught.value.detail or "")
    assert_client_message(caught.value, UPSTREAM_MESSAGES["upstream_error"])
    assert_key_hidden(caught.value)


async def test_stream_that_ends_unfinished_is_502(canned_upstream: Callable[..., str]) -> None:
    base_url = canned_upstream(sse(delta_chunk({"content": "Hi"})))  # no finish_reason, no [DONE]
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert (caught.value.status, caught.value.code) == (502, "upstream_disconnected")


async def test_json_instead_of_a_stream_is_502(canned_upstream: Callable[..., str]) -> None:
    base_url = canned_upstream(b'{"id": "chatcmpl-1", "choices": []}', content_type="application/json")
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert (caught.value.status, caught.value.code) == (502, "upstream_bad_response")


async def test_non_json_error_body_is_quoted_in_the_log_only(canned_upstream: Callable[..., str]) -> None:
    base_url = canned_upstream(b"<html>Bad Gateway</html>", content_type="text/html", status=502)
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert (caught.value.status, caught.value.upstream_status) == (502, 502)
    assert_client_message(caught.value, "The model provider failed to answer. (status 502)")
    assert "<html>Bad Gateway</html>" in (caught.value.detail or "")


async def test_crlf_line_endings_and_multiline_data(canned_upstream: Callable[..., str]) -> None:
    # SSE allows "\r\n" and "\r" line endings; a data field may span lines (joined with "\n").
    body = (
        b": keep-alive\r\n\r\n"
        b'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}\r\n\r\n'
        b'data: {"choices": [{"delta": {"content": " there"},\r'
        b'data:  "finish_reason": "stop"}]}\r\r'
        b"data: [DONE]\r\n\r\n"
    )
    chunks = await collect(provider(canned_upstream(body)), ChatRequest(model="m", messages=MESSAGES))
    assert chunks == [ChatChunk(content="Hi"), ChatChunk(content=" there", finish_reason="stop")]


async def test_chunk_longer_than_aiohttps_default_line_limit(canned_upstream: Callable[..., str]) -> None:
    arguments = "x" * 300_000  # aiohttp's line reader stops at 128 KiB unless told otherwise
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    base_url = canned_upstream(sse(delta_chunk({"tool_calls": [call]}, finish_reason="tool_calls"), "[DONE]"))
    chunks = await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert chunks == [ChatChunk(tool_calls=[call], finish_reason="tool_calls")]


async def test_line_unfinished_past_16_mib_is_502(canned_upstream: Callable[..., str]) -> None:
    # readany() has no line limit of its own: an endless line must not grow in memory for ever.
    base_url = canned_upstream(sse(delta_chunk({"content": "Hi"})) + b"data: " + b"x" * (16 * 1024 * 1024 + 1))
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES), received)
    assert received == [ChatChunk(content="Hi")]
    assert (caught.value.status, caught.value.code) == (502, "upstream_bad_response")
    assert "longer than 16777216 bytes" in (caught.value.detail or "")
    assert_client_message(caught.value, UPSTREAM_MESSAGES["upstream_bad_response"])


# --- Batches: what the upstream sent by the time the adapter reads, over real HTTP ------------


class SteppedUpstream:
    """A local HTTP upstream whose ``POST /v1/chat/completions`` streams the pieces of body the
    test hands it with ``write(piece)``, each in one write, until ``end()``."""

    def __init__(self) -> None:
        self.base_url = ""
        self._pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    def write(self, piece: bytes) -> None:
        self._pieces.put_nowait(piece)

    def end(self) -> None:
        self._pieces.put_nowait(None)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while (piece := await self._pieces.get()) is not None:
            await response.write(piece)
        await response.write_eof()
        return response


@pytest.fixture
async def stepped_upstream() -> AsyncIterator[SteppedUpstream]:
    upstream = SteppedUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    async with local_http_server(app) as url:
        upstream.base_url = f"{url}/v1"
        yield upstream
        upstream.end()  # a test that failed half-way leaves the handler waiting for its next piece


def openai_frames(*contents: str, finish_reason: str | None = None) -> list[bytes]:
    """Return OpenAI's frames of a reply: the role-only chunk, one per content, the finish chunk, usage, [DONE]."""
    frames = [delta_chunk({"role": "assistant", "content": "", "refusal": None})]
    frames += [delta_chunk({"content": content}) for content in contents]
    encoded = [f"data: {json.dumps(frame, ensure_ascii=False)}\n\n".encode() for frame in frames]
    if finish_reason is not None:
        usage = {"prompt_tokens": 4, "completion_tokens": len(contents), "total_tokens": 4 + len(contents)}
        usage_chunk = {**delta_chunk({}), "choices": [], "usage": usage}
        encoded.append(f"data: {json.dumps(delta_chunk({}, finish_reason))}\n\n".encode())
        encoded.append(f"data: {json.dumps(usage_chunk)}\n\n".encode())
        encoded.append(b"data: [DONE]\n\n")
    return encoded


async def test_events_sent_in_one_write_arrive_as_one_batch(stepped_upstream: SteppedUpstream) -> None:
    role, one, two, three, finish, usage, done = openai_frames("One", " two", " three", finish_reason="stop")
    stream = provider(stepped_upstream.base_url).stream(ChatRequest(model="m", messages=MESSAGES))
    stepped_upstream.write(role + one)  # the role-only chunk carries nothing: skipped
    assert await anext(stream) == [ChatChunk(content="One")]
    stepped_upstream.write(two + three)
    assert await anext(stream) == [ChatChunk(content=" two"), ChatChunk(content=" three")]
    stepped_upstream.write(finish + usage + done)
    assert await anext(stream) == [
        ChatChunk(finish_reason="stop"),
        ChatChunk(usage=Usage(prompt_tokens=4, completion_tokens=3)),
    ]
    with pytest.raises(StopAsyncIteration):  # [DONE] ends the stream before the body does
        await anext(stream)


@pytest.mark.parametrize(
    ("word", "split_at"),
    [
        ("rivers", 'data: {"id": "chatcmpl-1", "obj'),  # in the middle of the data line
        ("rivers", "data: "),  # right after the field name
        ("café", "caf\xc3"),  # inside "é" (2 bytes): the first byte only
        ("🌊 waves", "\xf0\x9f\x8c"),  # inside "🌊" (4 bytes): three of them
        ("rivers", '"finish_reason": null}]}\r'),  # between the "\r" and "\n" of a line ending
    ],
)
async def test_event_split_across_writes_is_parsed_whole(
    stepped_upstream: SteppedUpstream, word: str, split_at: str
) -> None:
    role, first, second, finish, usage, done = openai_frames("Name", f" {word}", finish_reason="stop")
    second = second.replace(b"\n", b"\r\n")  # CRLF line endings, as SSE allows
    cut = second.index(split_at.encode("latin-1")) + len(split_at.encode("latin-1"))
    stream = provider(stepped_upstream.base_url).stream(ChatRequest(model="m", messages=MESSAGES))
    # The first token completes a batch, so the adapter has read the start of the split event too.
    stepped_upstream.write(role + first + second[:cut])
    assert await anext(stream) == [ChatChunk(content="Name")]
    stepped_upstream.write(second[cut:] + finish)
    assert await anext(stream) == [ChatChunk(content=f" {word}"), ChatChunk(finish_reason="stop")]
    stepped_upstream.write(usage + done)
    assert await anext(stream) == [ChatChunk(usage=Usage(prompt_tokens=4, completion_tokens=2))]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_batches_from_the_simulator_hold_every_chunk_once(simulator: SimulatorProcess) -> None:
    adapter = provider(simulator.base_url)
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    batches = [batch async for batch in adapter.stream(request)]
    assert all(batches)
    chunks = [chunk for batch in batches for chunk in batch]
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert [bool(c.content) for c in chunks] == [True] * FAST_REPLY_TOKENS + [False, False]
    # The simulator writes the last token, the finish and usage chunks and [DONE] at once.
    assert batches[-1][-2:] == [
        ChatChunk(finish_reason="stop"),
        ChatChunk(usage=Usage(prompt_tokens=count_prompt_tokens(MESSAGES), completion_tokens=FAST_REPLY_TOKENS)),
    ]
    assert batches[-1][-3].content


def test_httpx_sse_decoder_api() -> None:
    """The adapter uses httpx-sse's private decoders (pinned 0.4.3): fail loudly if they change."""
    from httpx_sse import ServerSentEvent
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    decoder = SSEDecoder()
    results = [decoder.decode(line) for line in [": comment", "event: e", "data: a", "data:b", "id: 7", ""]]
    assert results[:5] == [None] * 5
    event = results[5]
    assert isinstance(event, ServerSentEvent)
    assert (event.event, event.data, event.id, event.retry) == ("e", "a\nb", "7", None)
    assert SSEDecoder().decode("") is None  # a blank line with nothing pending dispatches nothing

    # SSELineDecoder: text in any pieces -> the lines they complete, without their endings.
    lines = SSELineDecoder()
    assert lines.decode("data: a") == []  # unfinished: kept
    assert lines.decode("bc\r") == []  # a trailing "\r" waits: it may be half of "\r\n"
    assert lines.decode("\n\ndata: x\rdata: y\n") == ["data: abc", "", "data: x", "data: y"]
    assert lines.decode("\r") == []
    assert lines.flush() == [""]  # the held "\r" ended an empty line
    assert lines.decode("data: z") == [] and lines.flush() == ["data: z"]
    assert lines.flush() == []


# --- The content-only fast path: the same chunk as a full parse, or no answer ---------------

_HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
_TAIL = ',"usage":null}'


def _choice(delta: str, *, logprobs: str = "null", finish: str = "null") -> str:
    return f'[{{"index":0,"delta":{delta},"logprobs":{logprobs},"finish_reason":{finish}}}]'


_LOGPROBS = '{"content":[{"token":"x","logprob":-0.1,"bytes":[120],"top_logprobs":[]}],"refusal":null}'

FAST_PATH_CASES = [
    # The shape of nearly every token (OpenAI, vLLM, the simulator): read fast.
    (_HEAD + _choice('{"content":" river"}') + _TAIL, True),
    (_HEAD + _choice('{"content":"say \\"usage\\":{ and \\"error\\": here"}') + _TAIL, True),
    (_HEAD + _choice('{"content":"back\\\\slash, new\\nline, \\u00e9, \\ud83c\\udf0a, 🌊"}') + _TAIL, True),
    (_HEAD + _choice('{"content":"x"}') + "}", True),  # no usage field at all
    # Anything else is parsed in full.
    (_HEAD + _choice('{"content":""}') + _TAIL, False),
    (_HEAD + _choice('{"role":"assistant","content":"Hi"}') + _TAIL, False),
    (_HEAD + _choice('{"content":"Hi","reasoning_content":"hm"}') + _TAIL, False),
    (_HEAD + _choice("{}", finish='"stop"') + _TAIL, False),
    (_HEAD + _choice('{"content":"end"}', finish='"length"') + _TAIL, False),
    (_HEAD + _choice('{"content":"x"}', logprobs='{"content":[]}') + _TAIL, False),
    (_HEAD + _choice('{"content":"x"}', logprobs=_LOGPROBS) + _TAIL, False),
    (_HEAD + _choice('{"content":"x"}') + ',"usage":{"prompt_tokens":1,"completion_tokens":2}}', False),
    (_HEAD + _choice('{"content":"x"}') + ',"error":{"message":"boom"}}', False),
    (_HEAD.replace(',"', ', "') + _choice('{"content":"x"}') + _TAIL, True),  # spacing outside the choices
    (_HEAD + _choice('{"content": "x"}') + _TAIL, False),  # spacing inside it
]


@pytest.mark.parametrize(("data", "fast"), FAST_PATH_CASES)
def test_content_only_chunks_are_read_fast_and_as_a_full_parse_reads_them(data: str, fast: bool) -> None:
    from llm.providers.openai_compatible import _content_chunk, _parse_chunk

    try:
        full = _parse_chunk(json.loads(data), str)
    except UpstreamError:
        full = None
    quick = _content_chunk(data)

    assert (quick is not None) is fast
    if quick is not None:
        assert quick == full


def test_an_invalid_escape_in_a_content_only_chunk_is_a_malformed_chunk() -> None:
    from llm.providers.openai_compatible import _content_chunk

    with pytest.raises(ValueError):
        _content_chunk(_HEAD + _choice('{"content":"bad \\x escape"}') + _TAIL)


def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": usage,
    }


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # vLLM and Ollama send no details; some servers send them as null, or with null counts.
        ({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}, Usage(9, 3)),
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 3,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            Usage(9, 3),
        ),
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": None},
                "completion_tokens_details": {"reasoning_tokens": None},
            },
            Usage(9, 3),
        ),
        # DeepSeek: cache hits as prompt_cache_hit_tokens, reasoning in completion_tokens_details.
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 3,
                "prompt_cache_hit_tokens": 8,
                "prompt_cache_miss_tokens": 1,
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
            Usage(9, 3, cached_tokens=8, reasoning_tokens=2),
        ),
    ],
)
async def test_usage_details_absent_or_null_count_zero(
    canned_upstream: Callable[..., str], usage: dict[str, Any], expected: Usage
) -> None:
    base_url = canned_upstream(sse(delta_chunk({"content": "Hi"}, finish_reason="stop"), usage_chunk(usage), "[DONE]"))
    chunks = await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert chunks == [ChatChunk(content="Hi", finish_reason="stop"), ChatChunk(usage=expected)]


# --- The environment's proxy (HTTP_PROXY / NO_PROXY), read once per upstream host ---


@pytest.fixture
async def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[tuple[str, str | None]]]:
    """Run a local HTTP forward proxy that answers every request itself with a two-token reply, and
    point ``HTTP_PROXY`` at it (with credentials); yield the (URL, Proxy-Authorization) it received."""
    seen: list[tuple[str, str | None]] = []

    async def relay(request: web.Request) -> web.Response:
        seen.append((str(request.url), request.headers.get("Proxy-Authorization")))
        body = sse(delta_chunk({"content": "Via"}), delta_chunk({"content": " proxy"}, "stop"), "[DONE]")
        return web.Response(body=body, headers={"Content-Type": "text/event-stream"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    async with local_http_server(app) as url:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", url.replace("http://", "http://relay:s3cret@"))
        http.upstream_proxy_reset()
        yield seen
        http.upstream_proxy_reset()


async def test_upstream_requests_go_through_the_environments_proxy(forward_proxy: list[tuple[str, str | None]]) -> None:
    # A host no resolver knows: only the proxy can reach it.
    adapter = provider("http://llm.upstream.invalid:8080/v1")
    for _ in range(2):
        chunks = await collect(adapter, ChatRequest(model="m", messages=MESSAGES))
        assert "".join(c.content for c in chunks) == "Via proxy"
    # Absolute-form requests to the proxy, with its credentials (Basic relay:s3cret), both times.
    assert forward_proxy == [("http://llm.upstream.invalid:8080/v1/chat/completions", "Basic cmVsYXk6czNjcmV0")] * 2


async def test_no_proxy_hosts_are_reached_directly(
    forward_proxy: list[tuple[str, str | None]], monkeypatch: pytest.MonkeyPatch, canned_upstream: Callable[..., str]
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    base_url = canned_upstream(sse(delta_chunk({"content": "Direct"}, "stop"), "[DONE]"))
    chunks = await collect(provider(base_url), ChatRequest(model="m", messages=MESSAGES))
    assert "".join(c.content for c in chunks) == "Direct"
    assert forward_proxy == []
    assert await http.upstream_proxy(base_url) == (None, None)


@pytest.fixture
async def echoing_upstream() -> AsyncIterator[str]:
    """Yield the root URL of a local HTTP server that refuses every POST with a 400 whose error
    message quotes the request's headers, as some gateways and proxies do in their error bodies."""

    async def refuse(request: web.Request) -> web.Response:
        error = {"error": {"message": f"bad request, headers: {dict(request.headers)}", "type": "invalid_request"}}
        return web.json_response(error, status=400)

    app = web.Application()
    app.router.add_post("/{path:.*}", refuse)
    async with local_http_server(app) as url:
        yield url


@pytest.mark.parametrize(("kind", "path"), [("openai", "/v1"), ("anthropic", ""), ("gemini", ""), ("azure_openai", "")])
async def test_an_upstream_echoing_the_base_urls_credentials_never_shows_them(
    echoing_upstream: str, kind: str, path: str
) -> None:
    # A base URL's user info is sent as HTTP Basic; an upstream 400's message reaches the client,
    # so its password must be redacted in every form the upstream may quote: as HTTP Basic sends
    # it (base64 of user:password), and as written in the URL or percent-decoded.
    base_url = echoing_upstream.replace("http://", "http://someone:hunter2%2Fsecret@") + path
    config = ProviderConfig(kind=kind, base_url=base_url, api_key="" if kind == "openai" else PROVIDER_KEY)
    with pytest.raises(UpstreamError) as caught:
        await collect(get_provider(config), ChatRequest(model="m", messages=MESSAGES))
    assert caught.value.status == 400 and "bad request, headers" in caught.value.message
    for secret in ("c29tZW9uZTpodW50ZXIyL3NlY3JldA==", "hunter2%2Fsecret", "hunter2/secret", PROVIDER_KEY):
        assert_key_hidden(caught.value, secret)


async def test_an_upstream_echoing_a_token_given_as_the_base_urls_user_name_never_shows_it(
    echoing_upstream: str,
) -> None:
    # https://<token>@host/v1: a user name without a password is a token (HTTP Basic "<token>:").
    config = ProviderConfig(kind="openai", base_url=echoing_upstream.replace("http://", "http://tok3n-secret@") + "/v1")
    with pytest.raises(UpstreamError) as caught:
        await collect(get_provider(config), ChatRequest(model="m", messages=MESSAGES))
    assert caught.value.status == 400 and "bad request, headers" in caught.value.message
    for secret in ("dG9rM24tc2VjcmV0Og==", "tok3n-secret"):
        assert_key_hidden(caught.value, secret)


async def test_a_provider_with_both_a_key_and_url_credentials_is_a_502_not_a_500(simulator: SimulatorProcess) -> None:
    # The admin refuses the pair (both need the Authorization header), but a row saved before that
    # check, or from a script, still holds it: aiohttp's ValueError was a 500 on every request.
    base_url = simulator.base_url.replace("http://", "http://someone:hunter2@")
    config = ProviderConfig(kind="openai", base_url=base_url, api_key=PROVIDER_KEY)
    with pytest.raises(UpstreamError) as caught:
        await collect(get_provider(config), ChatRequest(model="m", messages=MESSAGES))
    assert (caught.value.status, caught.value.code) == (502, "upstream_error")
    assert "Cannot combine AUTHORIZATION header" in (caught.value.detail or "")
    for secret in ("hunter2", PROVIDER_KEY):
        assert_key_hidden(caught.value, secret)
