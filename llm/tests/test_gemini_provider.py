"""The Gemini and Azure OpenAI adapters against the real simulator process over HTTP.

A recording upstream (a local aiohttp server) shows the request bodies the adapters send and
answers the shapes the simulator never sends (a blocked prompt, an error mid-stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from aiohttp import web
from django.test import AsyncClient, override_settings

from chatbackend.errors import ApplicationError
from llm.providers import ChatChunk, ChatProvider, ChatRequest, ProviderConfig, UpstreamError, Usage, get_provider
from llm.providers.azure_openai import AzureOpenAIProvider
from llm.providers.base import UPSTREAM_MESSAGES
from llm.providers.gemini import GeminiProvider
from llm.providers.gemini_request import SKIP_THOUGHT_SIGNATURE
from llm.simulator import count_prompt_tokens, reply_text
from llm.simulator.gemini_wire import CACHE_MIN_WORDS, THOUGHT_SIGNATURE, THOUGHT_TOKENS
from llm.simulator.replies import reply_word_indexes
from llm.simulator.wire import logprob_entry
from llm.tests.openai_schema import validate_against
from llm.tests.simulator_process import SimulatorProcess
from llm.tokens import ESTIMATE_TOKENIZER
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import (
    FAST_REPLY_TOKENS,
    SIMULATOR_API_KEY,
    assert_refused_before_upstream,
    assert_unsupported_parameter,
    bearer,
    chat_body,
    chunk_objects,
    chunk_text,
    local_http_server,
    poll_until,
    post_chat,
    run_python,
    sse_data,
    streamed_content,
    usage_records,
)

pytestmark = pytest.mark.usefixtures("provider_clients")

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
]
PROVIDER_KEY = "sk-provider-secret-key-0123456789"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
PNG_DATA_URL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def gemini(base_url: str, api_key: str = PROVIDER_KEY, *, fault: str = "", **timeouts: float) -> GeminiProvider:
    headers = (("X-Simulator-Fault", fault),) if fault else ()
    config = ProviderConfig(kind="gemini", base_url=base_url, api_key=api_key, extra_headers=headers, **timeouts)
    adapter = get_provider(config)
    assert isinstance(adapter, GeminiProvider)
    return adapter


def azure(base_url: str, api_key: str = PROVIDER_KEY, **timeouts: float) -> AzureOpenAIProvider:
    adapter = get_provider(ProviderConfig(kind="azure_openai", base_url=base_url, api_key=api_key, **timeouts))
    assert isinstance(adapter, AzureOpenAIProvider)
    return adapter


async def collect(adapter: ChatProvider, request: ChatRequest, into: list[ChatChunk] | None = None) -> list[ChatChunk]:
    """Return every chunk of the stream; each batch must be a non-empty list of ``ChatChunk``."""
    chunks = [] if into is None else into
    async for batch in adapter.stream(request):
        assert isinstance(batch, list) and batch and all(isinstance(chunk, ChatChunk) for chunk in batch)
        chunks.extend(batch)
    return chunks


def assert_key_hidden(error: UpstreamError, key: str = PROVIDER_KEY) -> None:
    assert key not in error.message and key not in str(error.as_dict()) and key not in (error.detail or "")


# --- Gemini: replies --------------------------------------------------------------------------


def prompt_reported(tokens: int) -> ChatChunk:
    """Return the chunk of a prompt's count as a response's ``usageMetadata`` reported it before the end."""
    return ChatChunk(usage=Usage(prompt_tokens=tokens, completion_tokens=0, prompt_only=True))


async def test_streams_text_then_finish_and_usage(simulator: SimulatorProcess) -> None:
    chunks = await collect(gemini(simulator.root_url), ChatRequest(model="sim-1", messages=MESSAGES))

    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert sum(1 for c in chunks if c.content) == FAST_REPLY_TOKENS
    assert [c.finish_reason for c in chunks] == [None] * FAST_REPLY_TOKENS + ["stop", None]
    # The prompt's count the responses repeat comes first, once, with the first text; the full usage last.
    assert chunks[0] == prompt_reported(count_prompt_tokens(MESSAGES))
    usage = Usage(prompt_tokens=count_prompt_tokens(MESSAGES), completion_tokens=FAST_REPLY_TOKENS)
    assert chunks[-1] == ChatChunk(usage=usage)
    assert all(c.usage is None and not c.reasoning_content and c.tool_calls is None for c in chunks[1:-1])


async def test_reasoning_effort_streams_thoughts_as_reasoning_content(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-think", messages=MESSAGES, parameters={"reasoning_effort": "low"})
    chunks = await collect(gemini(simulator.root_url), request)

    reasoning = [c for c in chunks if c.reasoning_content]
    assert chunks[0] == prompt_reported(count_prompt_tokens(MESSAGES))
    assert len(reasoning) == THOUGHT_TOKENS and chunks[1 : THOUGHT_TOKENS + 1] == reasoning  # thoughts come first
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert chunks[-1].usage == Usage(
        prompt_tokens=count_prompt_tokens(MESSAGES),
        completion_tokens=FAST_REPLY_TOKENS + THOUGHT_TOKENS,  # candidates + thoughts
        reasoning_tokens=THOUGHT_TOKENS,
    )

    # Without reasoning_effort the thoughts are not sent, yet still counted.
    quiet = await collect(gemini(simulator.root_url), ChatRequest(model="sim-think", messages=MESSAGES))
    assert not any(c.reasoning_content for c in quiet)
    assert quiet[-1].usage is not None and quiet[-1].usage.reasoning_tokens == THOUGHT_TOKENS


async def test_a_function_call_becomes_a_whole_openai_tool_call(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"tools": TOOLS})
    chunks = await collect(gemini(simulator.root_url), request)

    call_chunk, usage_chunk = chunks
    assert call_chunk.finish_reason == "tool_calls" and not call_chunk.content
    [call] = call_chunk.tool_calls or []
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "city value"})}
    assert call["extra_content"] == {"google": {"thought_signature": THOUGHT_SIGNATURE}}
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 2

    # The call and its result go back as functionCall / functionResponse: the simulator answers in text.
    follow_up = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"forecast": "rain"}'},
    ]
    answer = await collect(
        gemini(simulator.root_url), ChatRequest(model="sim-1", messages=follow_up, parameters={"tools": TOOLS})
    )
    assert "".join(c.content for c in answer) and answer[-2].finish_reason == "stop"


async def test_max_tokens_is_finish_reason_length(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"max_tokens": 2})
    chunks = await collect(gemini(simulator.root_url), request)
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, 2)
    assert chunks[-2].finish_reason == "length" and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


async def test_logprobs_come_back_in_openais_shape(simulator: SimulatorProcess) -> None:
    # Gemini's logprobsResult (chosenCandidates / topCandidates per decoding step) is OpenAI's
    # logprobs.content on the chunk of each word: the simulator's numbers are the OpenAI route's.
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"logprobs": True, "top_logprobs": 2})
    chunks = await collect(gemini(simulator.root_url), request)

    words = [c for c in chunks if c.content]
    indexes = reply_word_indexes(MESSAGES, FAST_REPLY_TOKENS)
    assert [c.logprobs for c in words] == [
        {"content": [logprob_entry(index, first=n == 0, top=2)], "refusal": None} for n, index in enumerate(indexes)
    ]
    assert all(c.logprobs["content"][0]["token"] == c.content for c in words if c.logprobs)
    assert all(c.logprobs is None for c in chunks if not c.content)  # the finish and usage chunks

    plain = await collect(gemini(simulator.root_url), ChatRequest(model="sim-1", messages=MESSAGES))
    assert all(c.logprobs is None for c in plain)  # not asked for: none
    only_tokens = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"logprobs": True})
    entries = [
        e for c in await collect(gemini(simulator.root_url), only_tokens) for e in (c.logprobs or {}).get("content", ())
    ]
    assert entries == [logprob_entry(index, first=n == 0, top=0) for n, index in enumerate(indexes)]


async def test_images_as_data_urls_are_accepted_and_links_are_a_clear_400(simulator: SimulatorProcess) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PNG_DATA_URL}}]
    messages = [{"role": "user", "content": content}]
    chunks = await collect(gemini(simulator.root_url), ChatRequest(model="sim-1", messages=messages))
    assert "".join(c.content for c in chunks) == reply_text([{"role": "user", "content": "What is this?"}], 12)

    before = await simulator.astats()
    linked = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(ApplicationError) as caught:
        await collect(gemini(simulator.root_url), ChatRequest(model="sim-1", messages=linked))
    assert (caught.value.status, caught.value.code) == (400, "unsupported_image_url")
    assert "data: URLs" in caught.value.message
    assert (await simulator.astats())["requests_started"] == before["requests_started"]  # nothing was sent


async def test_cached_tokens_are_reported(simulator: SimulatorProcess) -> None:
    system = " ".join(["rule"] * CACHE_MIN_WORDS)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
    chunks = await collect(gemini(simulator.root_url), ChatRequest(model="sim-1", messages=messages))
    assert chunks[-1].usage == Usage(
        prompt_tokens=count_prompt_tokens(messages),
        completion_tokens=FAST_REPLY_TOKENS,
        cached_tokens=CACHE_MIN_WORDS + 3,
    )


async def test_the_key_goes_in_x_goog_api_key_and_a_wrong_one_is_502(keyed_simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    chunks = await collect(gemini(keyed_simulator.root_url, api_key=SIMULATOR_API_KEY), request)
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)

    # Google answers a wrong key with 400 API_KEY_INVALID: our configuration's fault, not the client's.
    with pytest.raises(UpstreamError) as caught:
        await collect(gemini(keyed_simulator.root_url), request)
    assert (caught.value.status, caught.value.upstream_status, caught.value.code) == (502, 400, "upstream_auth_failed")
    assert caught.value.message == UPSTREAM_MESSAGES["upstream_auth_failed"]
    assert_key_hidden(caught.value)
    with pytest.raises(UpstreamError) as caught:
        await collect(gemini(keyed_simulator.root_url, api_key=""), request)
    assert (caught.value.status, caught.value.upstream_status) == (502, 403)


# --- Gemini: failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "code", "quoted"),
    [
        ("sim-error-500", 502, "upstream_error", "The model provider failed to answer. (status 500)"),
        ("sim-error-503", 502, "upstream_error", "The model provider failed to answer. (status 503)"),
        ("sim-error-429", 429, "upstream_rate_limited", "exceeded your current quota"),
        ("sim-error-400", 400, "upstream_error", "Simulated error 400"),
        ("sim-error-404", 404, "upstream_error", "is not found"),
    ],
)
async def test_upstream_error_status_maps_to_upstream_error(
    simulator: SimulatorProcess, model: str, status: int, code: str, quoted: str
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(gemini(simulator.root_url), ChatRequest(model=model, messages=MESSAGES))
    assert caught.value.status == status and caught.value.upstream_status == int(model.rsplit("-", 1)[1])
    assert caught.value.code == code and quoted in caught.value.message
    assert f"answered {caught.value.upstream_status}" in (caught.value.detail or "")
    assert caught.value.retry_after == (1.0 if status == 429 else None)  # Google's RetryInfo.retryDelay
    assert_key_hidden(caught.value)


@pytest.mark.parametrize(
    ("fault", "chunks", "status", "code"),
    [
        ("status=429, retry-after=7", 0, 429, "upstream_rate_limited"),
        ("drop-after=2", 2, 502, "upstream_disconnected"),
        ("malformed-line=3", 3, 502, "upstream_bad_response"),
        ("stall=5, stall-after=2", 2, 504, "upstream_timeout"),
        ("ttft=5", 0, 504, "upstream_timeout"),
    ],
)
async def test_faults_mid_stream_keep_the_chunks_received(
    simulator: SimulatorProcess, fault: str, chunks: int, status: int, code: str
) -> None:
    received: list[ChatChunk] = []
    adapter = gemini(simulator.root_url, fault=fault, read_timeout=0.5)
    with pytest.raises(UpstreamError) as caught:
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES), received)
    if chunks:  # the prompt's count as reported, first: what a cut stream is billed for its prompt
        assert received.pop(0) == prompt_reported(count_prompt_tokens(MESSAGES))
    assert len(received) == chunks and all(c.content for c in received)
    assert (caught.value.status, caught.value.code) == (status, code)
    if status == 429:
        assert caught.value.retry_after == 7.0
    assert_key_hidden(caught.value)


async def test_unreachable_upstream_is_502(closed_port_url: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(gemini(closed_port_url, connect_timeout=2), ChatRequest(model="sim-1", messages=MESSAGES))
    assert (caught.value.status, caught.value.code) == (502, "upstream_unreachable")
    assert caught.value.message == UPSTREAM_MESSAGES["upstream_unreachable"]


@pytest.mark.parametrize("kind", ["gemini", "azure_openai"])
async def test_cancelling_the_consumer_closes_the_upstream_request(slow_simulator: SimulatorProcess, kind: str) -> None:
    adapter = gemini(slow_simulator.root_url) if kind == "gemini" else azure(slow_simulator.root_url)
    before = await slow_simulator.astats()
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in adapter.stream(ChatRequest(model="sim-1", messages=MESSAGES)):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), timeout=5)
    assert (await slow_simulator.astats())["active_streams"] == before["active_streams"] + 1
    task.cancel()
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


# --- What the adapters send, and shapes the simulator never sends -----------------------------


class RecordingUpstream:
    """A local HTTP server that records each request and answers ``body`` (SSE unless told)."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: list[tuple[web.Request, dict[str, Any]]] = []
        self.body = b""
        self.content_type = "text/event-stream"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request, await request.json()))
        return web.Response(body=self.body, headers={"Content-Type": self.content_type})


@pytest.fixture
async def recording_upstream() -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream.handle)
    async with local_http_server(app) as url:
        upstream.base_url = url
        yield upstream


def gemini_events(*responses: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(r).encode() + b"\r\n\r\n" for r in responses)


def candidate(parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        entry["finishReason"] = finish
    return {"candidates": [entry]}


DONE_EVENT = {**candidate([{"text": "."}], "STOP"), "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}}


async def test_the_request_body_is_gemini_generate_content(recording_upstream: RecordingUpstream) -> None:
    recording_upstream.body = gemini_events(DONE_EVENT)
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": PNG_DATA_URL}}],
        },
        {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
    ]
    parameters = {
        "max_completion_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "reasoning_effort": "medium",
    }
    await collect(
        gemini(recording_upstream.base_url),
        ChatRequest(model="gemini-2.5-flash", messages=messages, parameters=parameters),
    )

    [(request, body)] = recording_upstream.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert request.query_string == "alt=sse"
    assert request.headers["x-goog-api-key"] == PROVIDER_KEY and "Authorization" not in request.headers
    image = {"inlineData": {"mimeType": "image/png", "data": PNG_DATA_URL.split(",")[1]}}
    function_call = {"name": "get_weather", "args": {"city": "Paris"}}
    declaration = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parametersJsonSchema": TOOLS[0]["function"]["parameters"],
    }
    assert body == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use metric units."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}, image]},
            {
                "role": "model",
                "parts": [
                    {"text": "Checking."},
                    {"functionCall": function_call, "thoughtSignature": SKIP_THOUGHT_SIGNATURE},
                ],
            },
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}]},
        ],
        "tools": [{"functionDeclarations": [declaration]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {
            "maxOutputTokens": 50,
            "temperature": 0.3,
            "topP": 0.9,
            "stopSequences": ["END"],
            "thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True},
        },
    }


async def test_logprobs_and_top_logprobs_are_sent_as_response_logprobs_and_logprobs(
    recording_upstream: RecordingUpstream,
) -> None:
    recording_upstream.body = gemini_events(DONE_EVENT)
    for parameters, expected in (
        ({"logprobs": True, "top_logprobs": 4}, {"responseLogprobs": True, "logprobs": 4}),
        ({"logprobs": True}, {"responseLogprobs": True}),
        ({"logprobs": True, "top_logprobs": 0}, {"responseLogprobs": True}),
        ({"logprobs": False}, None),
    ):
        await collect(
            gemini(recording_upstream.base_url), ChatRequest(model="m", messages=MESSAGES, parameters=parameters)
        )
        assert recording_upstream.requests[-1][1].get("generationConfig") == expected


@pytest.mark.parametrize(("parallel", "calls"), [(None, 2), (True, 2), (False, 1)])
async def test_parallel_tool_calls_false_hands_on_the_first_call_only(
    recording_upstream: RecordingUpstream, parallel: bool | None, calls: int
) -> None:
    # Gemini has no switch for parallel calls (functionCallingConfig: mode, allowedFunctionNames):
    # a client that can take one call per turn gets one, the first, which carries the signature.
    parts = [
        {"functionCall": {"name": "a", "args": {}}, "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "b", "args": {"x": 1}}},
    ]
    recording_upstream.body = gemini_events(
        candidate(parts[:1]),
        {**candidate(parts[1:], "STOP"), "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 6}},
    )
    parameters = {"tools": TOOLS} if parallel is None else {"tools": TOOLS, "parallel_tool_calls": parallel}
    chunks = await collect(
        gemini(recording_upstream.base_url), ChatRequest(model="m", messages=MESSAGES, parameters=parameters)
    )

    tool_calls = [call for c in chunks for call in c.tool_calls or ()]
    assert [call["function"]["name"] for call in tool_calls] == ["a", "b"][:calls]
    assert tool_calls[0]["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert chunks[-2].finish_reason == "tool_calls"
    assert chunks[-1].usage == Usage(prompt_tokens=3, completion_tokens=6)  # what Gemini generated, as it bills it
    body = recording_upstream.requests[-1][1]
    assert "parallel_tool_calls" not in json.dumps(body) and "toolConfig" not in body  # nothing Gemini would refuse


async def test_a_tool_message_that_answers_no_call_is_a_400(recording_upstream: RecordingUpstream) -> None:
    messages = [*MESSAGES, {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}]
    with pytest.raises(ApplicationError) as caught:
        await collect(gemini(recording_upstream.base_url), ChatRequest(model="m", messages=messages))
    assert caught.value.status == 400 and "call_unknown" in caught.value.message
    assert recording_upstream.requests == []


TWO_CALLS = candidate(
    [{"functionCall": {"name": "a", "args": {}, "id": "g1"}}, {"functionCall": {"name": "b"}}], "STOP"
)
BLOCKED = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 4}}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # Gemini's content filters end the reply as content_filter.
        (
            [candidate([{"text": "Hm"}]), candidate([], "SAFETY")],
            [ChatChunk(content="Hm"), ChatChunk(finish_reason="content_filter")],
        ),
        (
            [BLOCKED],
            [ChatChunk(finish_reason="content_filter"), ChatChunk(usage=Usage(prompt_tokens=4, completion_tokens=0))],
        ),
        ([TWO_CALLS], "two calls"),  # two calls in one response: indexes 0 and 1
        # A finishing response without usageMetadata: the last one sent is the usage.
        (
            [{**candidate([{"text": "Hi"}]), "usageMetadata": {"promptTokenCount": 2}}, candidate([], "MAX_TOKENS")],
            [
                prompt_reported(2),
                ChatChunk(content="Hi"),
                ChatChunk(finish_reason="length"),
                ChatChunk(usage=Usage(2, 0)),
            ],
        ),
        # The prompt's count is passed on with output only, and again only when it changes.
        (
            [
                {"usageMetadata": {"promptTokenCount": 2}},
                candidate([{"text": "A"}]),
                {**candidate([{"text": "B"}]), "usageMetadata": {"promptTokenCount": 2}},
                {**candidate([{"text": "C"}]), "usageMetadata": {"promptTokenCount": 5, "cachedContentTokenCount": 3}},
                {**candidate([], "STOP"), "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3}},
            ],
            [
                prompt_reported(2),
                ChatChunk(content="A"),
                ChatChunk(content="B"),
                ChatChunk(usage=Usage(prompt_tokens=5, completion_tokens=0, cached_tokens=3, prompt_only=True)),
                ChatChunk(content="C"),
                ChatChunk(finish_reason="stop"),
                ChatChunk(usage=Usage(5, 3)),
            ],
        ),
    ],
)
async def test_shapes_the_simulator_never_sends(
    recording_upstream: RecordingUpstream, events: list[dict[str, Any]], expected: Any
) -> None:
    recording_upstream.body = gemini_events(*events)
    chunks = await collect(gemini(recording_upstream.base_url), ChatRequest(model="m", messages=MESSAGES))
    if expected == "two calls":
        [chunk] = chunks
        assert chunk.finish_reason == "tool_calls" and chunk.tool_calls is not None
        first, second = chunk.tool_calls
        assert (first["index"], first["id"], first["function"]) == (0, "g1", {"name": "a", "arguments": "{}"})
        assert second["index"] == 1 and second["id"].startswith("call_") and second["function"]["name"] == "b"
    else:
        assert chunks == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (gemini_events(candidate([{"text": "Hi"}])), "upstream_disconnected"),  # ends without a finishReason
        (gemini_events(candidate([{"text": "Hi"}]), {"error": {"code": 500, "message": "Internal"}}), "upstream_error"),
    ],
)
async def test_a_stream_that_ends_unfinished_or_with_an_error_is_502(
    recording_upstream: RecordingUpstream, body: bytes, code: str
) -> None:
    recording_upstream.body = body
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(gemini(recording_upstream.base_url), ChatRequest(model="m", messages=MESSAGES), received)
    assert received == [ChatChunk(content="Hi")]
    assert (caught.value.status, caught.value.code) == (502, code)


# --- Azure OpenAI ------------------------------------------------------------------------------


async def test_azure_streams_from_the_deployment_url(simulator: SimulatorProcess) -> None:
    chunks = await collect(azure(simulator.root_url), ChatRequest(model="sim-1", messages=MESSAGES))
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert chunks[-2:] == [
        ChatChunk(finish_reason="stop"),
        ChatChunk(usage=Usage(prompt_tokens=count_prompt_tokens(MESSAGES), completion_tokens=FAST_REPLY_TOKENS)),
    ]


async def test_azure_sends_api_key_and_api_version(recording_upstream: RecordingUpstream) -> None:
    recording_upstream.body = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    with override_settings(LLM_AZURE_OPENAI_API_VERSION="2025-04-01-preview"):
        await collect(azure(recording_upstream.base_url + "/"), ChatRequest(model="my deployment", messages=MESSAGES))
    [(request, body)] = recording_upstream.requests
    assert request.path == "/openai/deployments/my deployment/chat/completions"
    assert request.query["api-version"] == "2025-04-01-preview"
    assert request.headers["api-key"] == PROVIDER_KEY and "Authorization" not in request.headers
    assert body["messages"] == MESSAGES and body["stream"] is True


async def test_azure_key_and_errors(keyed_simulator: SimulatorProcess, simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    assert (await collect(azure(keyed_simulator.root_url, api_key=SIMULATOR_API_KEY), request))[-1].usage
    with pytest.raises(UpstreamError) as caught:
        await collect(azure(keyed_simulator.root_url), request)
    assert (caught.value.status, caught.value.upstream_status, caught.value.code) == (502, 401, "upstream_auth_failed")
    assert "invalid subscription key" in (caught.value.detail or "")
    assert_key_hidden(caught.value)

    with pytest.raises(UpstreamError) as caught:
        await collect(azure(simulator.root_url), ChatRequest(model="sim-error-429", messages=MESSAGES))
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (429, "upstream_rate_limited", 1.0)


def test_a_bad_azure_api_version_stops_start_up() -> None:
    result = run_python("manage.py", "check", env={"LLM_AZURE_OPENAI_API_VERSION": "latest"})
    assert result.returncode == 1 and "ImproperlyConfigured" in result.stderr, result.stderr
    assert "LLM_AZURE_OPENAI_API_VERSION" in result.stderr


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": "not an object"},
        {"type": "input_audio", "input_audio": {"data": 5, "format": "wav"}},
        {"type": "image_url", "image_url": ["not", "an", "object"]},
    ],
)
async def test_a_content_part_of_an_unexpected_shape_is_a_400_not_a_crash(part: dict) -> None:
    request = ChatRequest(model="gemini-x", messages=[{"role": "user", "content": [part]}])
    provider = GeminiProvider(ProviderConfig(kind="gemini", base_url="http://127.0.0.1:9"))
    with pytest.raises(ApplicationError) as caught:
        await anext(provider.stream(request))
    assert (caught.value.status, caught.value.param) == (400, "messages")


# --- Through the engine: /v1/chat/completions to a model on a Gemini provider -----------------


@pytest.fixture
def gemini_model(db, simulator: SimulatorProcess) -> Any:
    """``gemini-sim``: a model on a ``gemini`` provider at the simulator (upstream ``sim-1``)."""
    upstream = ProviderFactory(name="sim-gemini", kind="gemini", base_url=simulator.root_url, api_key="")
    return LLMModelFactory(name="gemini-sim", provider=upstream, upstream_model="sim-1")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    ],
)
async def test_what_the_gemini_translation_cannot_honour_is_a_400_naming_the_parameter(
    api_key_secret, gemini_model, simulator: SimulatorProcess, fields: dict[str, Any], param: str
) -> None:
    # Dropped, these would answer a client that asked for biases or audio without them, and a 200.
    await assert_unsupported_parameter(simulator, "gemini-sim", fields, param, "Gemini", bearer(api_key_secret))


@pytest.mark.django_db(transaction=True)
async def test_response_format_json_gets_json_back_streamed_and_whole(api_key_secret, gemini_model) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    formats = {
        "json_schema": {"type": "json_schema", "json_schema": {"name": "place", "strict": True, "schema": schema}},
        "json_object": {"type": "json_object"},
    }
    question = chat_body("gemini-sim")["messages"]
    expected = {
        "json_schema": {"city": "city value"},
        "json_object": {"reply": reply_text(question, FAST_REPLY_TOKENS)},
    }
    for name, response_format in formats.items():
        body = chat_body("gemini-sim", response_format=response_format)
        whole = await post_chat(AsyncClient(), body, bearer(api_key_secret))
        assert whole.status_code == 200, whole.content
        assert json.loads(whole.json()["choices"][0]["message"]["content"]) == expected[name]
        streamed = await post_chat(AsyncClient(), {**body, "stream": True}, bearer(api_key_secret))
        assert json.loads(chunk_text(chunk_objects(sse_data(await streamed_content(streamed))))) == expected[name]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"tool_choice": "required"}, "only allowed when 'tools'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "'get_time'"),
    ],
)
async def test_a_tool_choice_no_tool_could_answer_is_a_400_on_tool_choice(
    api_key_secret, gemini_model, simulator: SimulatorProcess, fields: dict[str, Any], problem: str
) -> None:
    # Before: sent as functionCallingConfig ANY, which the model cannot obey without the function.
    body = chat_body("gemini-sim", **fields)
    await assert_refused_before_upstream(
        simulator, body, bearer(api_key_secret), code="invalid_value", param="tool_choice", says=problem
    )


@pytest.mark.parametrize("effort", ["xhigh", "max"])
async def test_the_newest_reasoning_efforts_think_too(simulator: SimulatorProcess, effort: str) -> None:
    # OpenAI's xhigh and max are newer than Google's mapping: they asked for no thinking config at all.
    request = ChatRequest(model="sim-think", messages=MESSAGES, parameters={"reasoning_effort": effort})
    chunks = await collect(gemini(simulator.root_url), request)
    assert (
        "".join(c.reasoning_content for c in chunks)
        and len([c for c in chunks if c.reasoning_content]) == THOUGHT_TOKENS
    )


async def test_a_reasoning_effort_openai_does_not_have_is_a_400(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-think", messages=MESSAGES, parameters={"reasoning_effort": "extreme"})
    with pytest.raises(ApplicationError) as caught:
        await collect(gemini(simulator.root_url), request)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", "reasoning_effort")


@pytest.fixture
def cut_gemini_model(db, simulator: SimulatorProcess) -> Any:
    """``gemini-cut``: a model on a ``gemini`` provider whose every stream the simulator drops after 3
    words (an estimate tokenizer: the provider's prompt count is not the estimate's)."""
    upstream = ProviderFactory(
        name="sim-gemini-cut",
        kind="gemini",
        base_url=simulator.root_url,
        api_key="",
        extra_headers={"X-Simulator-Fault": "drop-after=3"},
    )
    return LLMModelFactory(name="gemini-cut", provider=upstream, upstream_model="sim-1")


@pytest.mark.django_db(transaction=True)
async def test_a_cut_stream_bills_the_prompt_as_the_usage_metadata_of_its_chunks_reported_it(
    api_key_secret, cut_gemini_model
) -> None:
    """Gemini repeats ``usageMetadata`` (the prompt's count so far) on every response of a stream, the
    full one only with the finishing response. A stream cut before that is billed the prompt the
    provider reported, and only the completion is counted here, as Anthropic's ``message_start``."""
    body = chat_body("gemini-cut", "Tell me about rivers", stream=True)
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    *payloads, last = sse_data(await streamed_content(response))
    assert json.loads(last)["error"]["code"] == "upstream_disconnected"
    received = chunk_text(json.loads(payload) for payload in payloads)

    [record] = await usage_records()
    assert (record.finish_status, record.token_source) == ("failed", "estimated")
    assert record.prompt_tokens == count_prompt_tokens(body["messages"])  # the provider's, not the estimate's
    assert record.completion_tokens == ESTIMATE_TOKENIZER.count_text(received)
    assert record.cost == (record.prompt_tokens * Decimal("1") + record.completion_tokens * Decimal("2")) / 1_000_000


@pytest.mark.django_db(transaction=True)
async def test_logprobs_reach_openai_clients_streamed_and_whole(api_key_secret, gemini_model, asgi_server) -> None:
    body = chat_body("gemini-sim", "Tell me about rivers", logprobs=True, top_logprobs=3)
    indexes = reply_word_indexes(body["messages"], FAST_REPLY_TOKENS)
    expected = [logprob_entry(index, first=n == 0, top=3) for n, index in enumerate(indexes)]

    streamed = await post_chat(AsyncClient(), {**body, "stream": True}, bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(streamed)))  # each one schema-validated
    entries = []
    for chunk in chunks:
        [choice] = chunk["choices"]
        if choice["delta"].get("content"):
            [entry] = choice["logprobs"]["content"]
            assert entry["token"] == choice["delta"]["content"] and choice["logprobs"]["refusal"] is None
            entries.append(entry)
        else:
            assert choice["logprobs"] is None
    assert entries == expected

    whole = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    completion = whole.json()
    validate_against("CreateChatCompletionResponse", completion)
    assert completion["choices"][0]["logprobs"] == {"content": expected, "refusal": None}
    assert completion["choices"][0]["message"]["content"] == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert completion["usage"]["completion_tokens"] == FAST_REPLY_TOKENS

    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        parsed = await sdk.chat.completions.create(
            model="gemini-sim", messages=body["messages"], logprobs=True, top_logprobs=3
        )
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and [entry.model_dump() for entry in logprobs.content or ()] == expected
