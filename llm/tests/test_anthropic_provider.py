"""The Anthropic Messages adapter against the real simulator process over HTTP, and through the engine."""

from __future__ import annotations

import asyncio
import base64
import json
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
from django.test import AsyncClient

from accounts.models import UsageRecord
from chatbackend.errors import ApplicationError
from llm.providers import ChatChunk, ChatRequest, ProviderConfig, UpstreamError, Usage, get_provider
from llm.providers.anthropic import AnthropicProvider, messages_body
from llm.providers.anthropic_format import JSON_TOOL_NAME, output_schema
from llm.simulator import count_prompt_tokens, reply_text
from llm.simulator.anthropic_output import schema_value
from llm.simulator.replies import reply_word_indexes
from llm.tests.openai_schema import validate_against
from llm.tests.simulator_process import SimulatorProcess
from llm.tokens import tokenizer_for
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
    poll_until,
    post_chat,
    sse_data,
    streamed_content,
    usage_records,
)

pytestmark = pytest.mark.usefixtures("provider_clients")

SYSTEM = "Be terse."
MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name rivers."}]
PROVIDER_KEY = "sk-ant-provider-secret-key-0123456789"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 8).decode()


def provider(sim: SimulatorProcess, api_key: str = PROVIDER_KEY, **options: Any) -> AnthropicProvider:
    # The provider's base URL is Anthropic's root (https://api.anthropic.com): the adapter appends /v1/messages.
    config = ProviderConfig(kind="anthropic", base_url=sim.root_url, api_key=api_key, **options)
    adapter = get_provider(config)
    assert isinstance(adapter, AnthropicProvider)
    return adapter


async def collect(
    adapter: AnthropicProvider, request: ChatRequest, into: list[ChatChunk] | None = None
) -> list[ChatChunk]:
    """Return every chunk in order (into ``into`` as they arrive), checking each batch is a non-empty list."""
    chunks = [] if into is None else into
    async for batch in adapter.stream(request):
        assert isinstance(batch, list) and batch and all(isinstance(c, ChatChunk) for c in batch)
        chunks.extend(batch)
    return chunks


def input_tokens(user_turns: list[dict[str, Any]], system: str = SYSTEM) -> int:
    """The simulator's input count for the translated request: its turns, plus the system prompt."""
    return count_prompt_tokens(user_turns) + (len(system.split()) + 3 if system else 0)


def assert_key_hidden(error: UpstreamError, key: str = PROVIDER_KEY) -> None:
    assert key not in error.message and key not in str(error.as_dict()) and key not in (error.detail or "")


async def test_streams_text_then_finish_then_usage(simulator: SimulatorProcess) -> None:
    chunks = await collect(provider(simulator), ChatRequest(model="sim-1", messages=MESSAGES))

    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert [c.finish_reason for c in chunks] == [None] * (1 + FAST_REPLY_TOKENS) + ["stop", None]
    # message_start's usage (the prompt's) comes first, with the first text; message_delta's last.
    assert chunks[0] == ChatChunk(
        usage=Usage(prompt_tokens=input_tokens(MESSAGES[1:]), completion_tokens=0, prompt_only=True)
    )
    assert chunks[-1] == ChatChunk(
        usage=Usage(prompt_tokens=input_tokens(MESSAGES[1:]), completion_tokens=FAST_REPLY_TOKENS)
    )


async def test_a_base_url_ending_in_v1_works_too(simulator: SimulatorProcess) -> None:
    adapter = get_provider(ProviderConfig(kind="anthropic", base_url=simulator.base_url))
    chunks = await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))  # type: ignore[arg-type]
    assert chunks[-2].finish_reason == "stop"


async def test_reasoning_effort_streams_thinking_as_reasoning_content(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"reasoning_effort": "low", "temperature": 0.5})
    chunks = await collect(provider(simulator), request)

    thinking = [c for c in chunks if c.reasoning_content]
    assert len(thinking) == FAST_REPLY_TOKENS // 2
    first_content = next(i for i, c in enumerate(chunks) if c.content)
    assert all(i < first_content for i, c in enumerate(chunks) if c.reasoning_content)  # thinking comes first
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == FAST_REPLY_TOKENS + FAST_REPLY_TOKENS // 2


async def test_tool_calls_round_trip(simulator: SimulatorProcess) -> None:
    adapter = provider(simulator)
    first = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"tools": [WEATHER_TOOL]})
    chunks = await collect(adapter, first)

    calls = [call for c in chunks for call in c.tool_calls or ()]
    head, *fragments = calls
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("toolu_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert fragments and all(set(f) == {"index", "function"} and f["index"] == 0 for f in fragments)
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert set(json.loads(arguments)) == {"city"}
    assert chunks[-2].finish_reason == "tool_calls"
    text = "".join(c.content for c in chunks)

    # OpenAI-shaped history: the assistant's tool call, then the tool's answer.
    answered = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": text,
            "tool_calls": [
                {"id": head["id"], "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": head["id"], "content": "Sunny, 21 C"},
    ]
    second = await collect(adapter, ChatRequest(model="sim-1", messages=answered, parameters={"tools": [WEATHER_TOOL]}))
    assert not any(c.tool_calls for c in second) and second[-2].finish_reason == "stop"
    assert "".join(c.content for c in second)

    forced = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"tools": [WEATHER_TOOL], "tool_choice": "none"})
    assert not any(c.tool_calls for c in await collect(adapter, forced))


async def test_images_are_accepted_as_data_and_https_urls(simulator: SimulatorProcess) -> None:
    content = [
        {"type": "text", "text": "What are these?"},
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]
    chunks = await collect(
        provider(simulator), ChatRequest(model="sim-1", messages=[{"role": "user", "content": content}])
    )
    assert chunks[-2].finish_reason == "stop" and "".join(c.content for c in chunks)


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}, "not image/bmp"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "data: URL or an http(s) URL"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'input_audio' content parts"),
    ],
)
async def test_what_the_messages_api_cannot_take_is_a_400_before_any_request(
    simulator: SimulatorProcess, part: dict[str, Any], problem: str
) -> None:
    before = await simulator.astats()
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(simulator), ChatRequest(model="sim-1", messages=[{"role": "user", "content": [part]}]))
    assert caught.value.status == 400 and caught.value.upstream_status is None and problem in caught.value.message
    assert (await simulator.astats())["requests_started"] == before["requests_started"]


async def test_usage_counts_cache_tokens_in_the_prompt(simulator: SimulatorProcess) -> None:
    chunks = await collect(provider(simulator), ChatRequest(model="sim-cache", messages=MESSAGES))
    total = input_tokens(MESSAGES[1:])
    assert chunks[-1].usage == Usage(
        prompt_tokens=total,
        completion_tokens=FAST_REPLY_TOKENS,
        cached_tokens=total // 2,
        cache_creation_tokens=total // 4,
    )


async def test_an_openai_temperature_past_anthropics_range_is_capped(simulator: SimulatorProcess) -> None:
    # OpenAI takes 0 to 2 (NextChat's slider too); Anthropic 0 to 1, and its 400 would fail every request.
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"temperature": 1.7})
    assert messages_body(request, default_max_tokens=10)["temperature"] == 1.0
    chunks = await collect(provider(simulator), request)  # the simulator refuses Anthropic's out-of-range values
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert (
        messages_body(ChatRequest(model="m", messages=MESSAGES, parameters={"temperature": 0.4}), default_max_tokens=1)[
            "temperature"
        ]
        == 0.4
    )


async def test_whitespace_only_text_and_a_prefills_trailing_whitespace_are_not_sent(
    simulator: SimulatorProcess,
) -> None:
    # OpenAI takes both; Anthropic refuses a text block without non-whitespace text and "final assistant
    # content" ending in whitespace, so every such request to a Claude model failed with its 400.
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "  "},
        {"role": "user", "content": [{"type": "text", "text": "Name rivers."}, {"type": "text", "text": " \n"}]},
        {"role": "assistant", "content": "\t"},
        {"role": "user", "content": "Three, please."},
        {"role": "assistant", "content": "Sure: "},
    ]
    body = messages_body(ChatRequest(model="sim-1", messages=messages), default_max_tokens=10)
    assert "system" not in body
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name rivers."}, {"type": "text", "text": "Three, please."}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Sure:"}]},
    ]
    chunks = await collect(provider(simulator), ChatRequest(model="sim-1", messages=messages))
    assert chunks[-2].finish_reason == "stop" and "".join(c.content for c in chunks)

    # The simulator refuses both, as Anthropic does (so the translation above is what made it pass).
    for turns, refusal in (
        ([{"role": "user", "content": [{"type": "text", "text": " "}]}], "must contain non-whitespace text"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure: "}],
            "final assistant content cannot end with trailing whitespace",
        ),
    ):
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{simulator.root_url}/v1/messages",
                json={"model": "sim-1", "max_tokens": 5, "messages": turns},
                headers={"x-api-key": SIMULATOR_API_KEY, "anthropic-version": "2023-06-01"},
            )
        assert response.status_code == 400 and refusal in response.json()["error"]["message"]


async def test_max_tokens_and_stop_map_to_length_and_stop(simulator: SimulatorProcess) -> None:
    adapter = provider(simulator)
    short = await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES, parameters={"max_tokens": 3}))
    assert "".join(c.content for c in short) == reply_text(MESSAGES, 3) and short[-2].finish_reason == "length"

    words = reply_text(MESSAGES, FAST_REPLY_TOKENS).split()
    stopped = await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES, parameters={"stop": words[3]}))
    assert stopped[-2].finish_reason == "stop"
    assert "".join(c.content for c in stopped) == " ".join(words[: words.index(words[3])])


async def test_sends_x_api_key_only_when_configured_and_hides_a_wrong_one(keyed_simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES)
    chunks = await collect(provider(keyed_simulator, api_key=SIMULATOR_API_KEY), request)
    assert chunks[-2].finish_reason == "stop"

    with pytest.raises(UpstreamError) as missing:
        await collect(provider(keyed_simulator, api_key=""), request)
    assert "x-api-key header is required" in (missing.value.detail or "")

    wrong = "sk-ant-wrong-key-abcdef0123456789"
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(keyed_simulator, api_key=wrong), request)
    assert (caught.value.status, caught.value.upstream_status, caught.value.code) == (502, 401, "upstream_auth_failed")
    assert caught.value.message == "The model provider rejected this server's credentials."
    assert_key_hidden(caught.value, wrong)


@pytest.mark.parametrize(
    ("fault", "status", "code", "quoted"),
    [
        ("status=500", 502, "upstream_error", "The model provider failed to answer. (status 500)"),
        ("status=529", 502, "upstream_error", "The model provider failed to answer. (status 529)"),
        ("status=429, retry-after=7", 429, "upstream_rate_limited", "rate limit"),
        ("status=400", 400, "upstream_error", "Simulated error 400"),
        ("status=404", 404, "upstream_error", "model: sim-1"),
    ],
)
async def test_upstream_error_statuses_map_as_for_openai_upstreams(
    simulator: SimulatorProcess, fault: str, status: int, code: str, quoted: str
) -> None:
    adapter = provider(simulator, extra_headers=(("X-Simulator-Fault", fault),))
    with pytest.raises(UpstreamError) as caught:
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))
    error = caught.value
    assert (error.status, error.code) == (status, code) and quoted in error.message
    assert error.upstream_status == int(fault.split(",")[0].removeprefix("status="))
    assert error.retry_after == (7.0 if status == 429 else None)
    assert f"answered {error.upstream_status}" in (error.detail or "")
    assert "127.0.0.1" not in error.message
    assert_key_hidden(error)


async def test_unreachable_upstream_is_502(closed_port_url: str) -> None:
    adapter = get_provider(ProviderConfig(kind="anthropic", base_url=closed_port_url.removesuffix("/v1")))
    with pytest.raises(UpstreamError) as caught:
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES))  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.code) == (502, "upstream_unreachable")


async def test_a_stream_dropped_midway_is_502_after_the_chunks_received(simulator: SimulatorProcess) -> None:
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(provider(simulator), ChatRequest(model="sim-fail-midstream", messages=MESSAGES), received)
    assert (caught.value.status, caught.value.code) == (502, "upstream_disconnected")
    assert "".join(c.content for c in received) == reply_text(MESSAGES, 3)


async def test_a_malformed_event_is_502(simulator: SimulatorProcess) -> None:
    adapter = provider(simulator, extra_headers=(("X-Simulator-Fault", "malformed-line=2"),))
    received: list[ChatChunk] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(adapter, ChatRequest(model="sim-1", messages=MESSAGES), received)
    assert (caught.value.status, caught.value.code) == (502, "upstream_bad_response")
    assert "".join(c.content for c in received) == reply_text(MESSAGES, 2)


async def test_cancelling_the_consumer_closes_the_upstream_stream(slow_simulator: SimulatorProcess) -> None:
    before = await slow_simulator.astats()
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in provider(slow_simulator).stream(ChatRequest(model="sim-1", messages=MESSAGES)):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), timeout=5)
    task.cancel()
    # Polled before awaiting the task: the upstream must close because of the cancel alone.
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
    stream = provider(slow_simulator).stream(ChatRequest(model="sim-1", messages=MESSAGES))
    first = await anext(stream)
    assert first and first[-1].content
    closing = asyncio.create_task(stream.aclose())
    await poll_until(
        slow_simulator.astats,
        lambda s: s["requests_disconnected"] == before["requests_disconnected"] + 1,
    )
    await closing


def test_translation_merges_turns_and_maps_parameters() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "system", "content": "Rule one."},
        {
            "role": "developer",
            "content": [{"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": "Weather?"},
        {"role": "user", "content": ""},  # empty text is dropped, not sent as an empty block
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]
    parameters = {
        "max_completion_tokens": 5000,
        "temperature": 0.3,
        "top_p": 0.5,
        "stop": ["END"],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "u-42",
        "frequency_penalty": 0.5,
        "seed": 7,
        "reasoning_effort": "medium",
    }
    body = messages_body(ChatRequest(model="claude-x", messages=messages, parameters=parameters), default_max_tokens=10)

    assert body["system"] == [
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}},
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "Sunny"}]},
                {"type": "text", "text": "Thanks. And tomorrow?"},
            ],
        },
    ]
    # The last turn answers a tool call: no thinking (its signed thinking cannot be sent back).
    assert body["max_tokens"] == 5000 and "thinking" not in body
    assert (body["temperature"], body["top_p"]) == (0.3, 0.5)
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-42"}
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert "frequency_penalty" not in body and "seed" not in body and body["stream"] is True


def test_max_tokens_defaults_and_grows_by_the_thinking_budget() -> None:
    plain = messages_body(ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]), default_max_tokens=4096)
    assert plain["max_tokens"] == 4096 and "thinking" not in plain
    thinking = messages_body(
        ChatRequest(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            parameters={"reasoning_effort": "high", "temperature": 0.3, "top_p": 0.97, "top_k": 5},
        ),
        default_max_tokens=4096,
    )
    assert thinking["max_tokens"] == 4096 + 16384 and thinking["thinking"]["budget_tokens"] == 16384
    # Anthropic refuses temperature and top_k with thinking on, and top_p under 0.95.
    assert "temperature" not in thinking and "top_k" not in thinking and thinking["top_p"] == 0.97
    capped = messages_body(
        ChatRequest(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            parameters={"reasoning_effort": "high", "max_tokens": 5000},
        ),
        default_max_tokens=4096,
    )
    assert capped["max_tokens"] == 5000 and capped["thinking"]["budget_tokens"] == 4999
    no_room = messages_body(
        ChatRequest(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            parameters={"reasoning_effort": "low", "max_tokens": 500},
        ),
        default_max_tokens=4096,
    )
    assert no_room["max_tokens"] == 500 and "thinking" not in no_room
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool_loop = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    answering = messages_body(
        ChatRequest(model="m", messages=tool_loop, parameters={"reasoning_effort": "low"}), default_max_tokens=4096
    )
    assert answering["max_tokens"] == 4096 and "thinking" not in answering  # no signed thinking to send back


# --- Through the engine: /v1/chat/completions to a model on an Anthropic provider -------------


@pytest.fixture
def anthropic_model(db, simulator: SimulatorProcess) -> Any:
    """``claude-sim``: a model on an ``anthropic`` provider at the simulator (upstream ``sim-cache``)."""
    upstream = ProviderFactory(name="sim-anthropic", kind="anthropic", base_url=simulator.root_url, api_key="")
    return LLMModelFactory(name="claude-sim", provider=upstream, upstream_model="sim-cache")


@pytest.mark.django_db(transaction=True)
async def test_chat_completions_stream_through_an_anthropic_provider(api_key_secret, anthropic_model) -> None:
    body = chat_body("claude-sim", "Tell me about rivers", stream=True, stream_options={"include_usage": True})
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    chunks = chunk_objects(sse_data(await streamed_content(response)))
    *content_chunks, usage_chunk = chunks
    assert chunk_text(content_chunks) == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    [record] = await usage_records()
    total = count_prompt_tokens(body["messages"])
    assert (record.model_name, record.token_source, record.finish_status) == ("claude-sim", "provider", "completed")
    assert record.source == UsageRecord.Source.OPENAI_API
    assert (record.prompt_tokens, record.completion_tokens) == (total, FAST_REPLY_TOKENS)
    assert usage_chunk["usage"]["prompt_tokens"] == total


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
async def test_what_anthropic_cannot_honour_is_a_400_naming_the_parameter(
    api_key_secret, anthropic_model, simulator: SimulatorProcess, fields: dict[str, Any], param: str
) -> None:
    # Dropped, these would answer no logprobs to a client that asked for them, or text to one that asked for audio.
    await assert_unsupported_parameter(simulator, "claude-sim", fields, param, "Anthropic", bearer(api_key_secret))


@pytest.mark.django_db(transaction=True)
async def test_parameters_that_ask_for_nothing_anthropic_lacks_still_answer(api_key_secret, anthropic_model) -> None:
    fields = {"response_format": {"type": "text"}, "logprobs": False, "modalities": ["text"], "seed": 7}
    response = await post_chat(AsyncClient(), chat_body("claude-sim", **fields), bearer(api_key_secret))
    assert response.status_code == 200, response.content
    assert response.json()["choices"][0]["message"]["content"] == reply_text(
        chat_body("claude-sim")["messages"], FAST_REPLY_TOKENS
    )


# --- response_format: structured outputs for a schema, a forced tool for any JSON object ----------

PLACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "population": {"type": "integer", "minimum": 0, "description": "People."},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
    },
    "required": ["city", "population", "location", "tags"],
}
JSON_TOOL = {
    "name": JSON_TOOL_NAME,
    "description": "Give your whole reply to the user as this tool's input: one JSON object.",
    "input_schema": {"type": "object"},
}


def json_schema_format(schema: dict[str, Any] = PLACE_SCHEMA, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, **extra}}


def test_a_json_schema_is_sent_as_structured_output_in_anthropics_subset() -> None:
    body = messages_body(
        ChatRequest(model="m", messages=MESSAGES, parameters={"response_format": json_schema_format(strict=True)}),
        default_max_tokens=100,
    )
    # Anthropic requires every object closed and refuses these constraints: they move into the
    # description, as Anthropic's SDK moves them (transform_schema), and the model still reads them.
    assert body["output_config"] == {
        "format": {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "{minLength: 2}"},
                    "population": {"type": "integer", "description": "People.\n\n{minimum: 0}"},
                    "location": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                        "additionalProperties": False,
                    },
                    "tags": {"type": "array", "items": {"type": "string"}, "description": "{minItems: 3}"},
                },
                "required": ["city", "population", "location", "tags"],
                "additionalProperties": False,
            },
        }
    }
    assert "tools" not in body and "tool_choice" not in body
    # An open map stays open: Anthropic's 400 says so, where closing it would answer {} silently.
    open_map = {"type": "object", "additionalProperties": {"type": "integer"}, "$defs": {"x": {"properties": {}}}}
    assert output_schema(open_map) == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "$defs": {"x": {"properties": {}, "additionalProperties": False}},
    }
    thinking = messages_body(
        ChatRequest(
            model="m",
            messages=MESSAGES,
            parameters={"response_format": json_schema_format(), "reasoning_effort": "low", "tools": [WEATHER_TOOL]},
        ),
        default_max_tokens=100,
    )
    assert thinking["thinking"]["type"] == "enabled" and "tool_choice" not in thinking  # both work with it


async def test_a_json_schema_reply_streams_as_text_that_fits_it(simulator: SimulatorProcess) -> None:
    request = ChatRequest(
        model="sim-1",
        messages=MESSAGES,
        parameters={"response_format": json_schema_format(), "reasoning_effort": "low"},
    )
    chunks = await collect(provider(simulator), request)

    closed = output_schema(PLACE_SCHEMA)
    expected = schema_value(closed, reply_word_indexes(MESSAGES[1:], FAST_REPLY_TOKENS))
    assert json.loads("".join(c.content for c in chunks)) == expected
    assert set(expected) == {"city", "population", "location", "tags"}
    assert len([c for c in chunks if c.content]) > 1  # streamed in pieces, as they came
    assert any(c.reasoning_content for c in chunks)  # thinking still works with structured outputs
    assert chunks[-2].finish_reason == "stop"
    pieces = -(-len(json.dumps(expected)) // 8)  # the simulator's 8-character text_delta fragments
    assert chunks[-1].usage == Usage(
        prompt_tokens=input_tokens(MESSAGES[1:]), completion_tokens=pieces + FAST_REPLY_TOKENS // 2
    )


async def test_the_simulator_refuses_a_schema_anthropic_refuses(simulator: SimulatorProcess) -> None:
    # What the translation above avoids, refused as Anthropic refuses it.
    for schema, problem in (
        ({"type": "object", "properties": {}}, "'additionalProperties' must be explicitly set to false"),
        ({"type": "object", "additionalProperties": True}, "'additionalProperties: true' is not supported"),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "additionalProperties": False},
            "'minimum'",
        ),
    ):
        body = {
            "model": "sim-1",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "Hi"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        }
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{simulator.root_url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
            )
        assert response.status_code == 400 and problem in response.json()["error"]["message"]


def test_json_object_is_one_forced_tool_and_leaves_a_clients_forced_tool_alone() -> None:
    def body_for(**parameters: Any) -> dict[str, Any]:
        request = ChatRequest(
            model="m", messages=MESSAGES, parameters={"response_format": {"type": "json_object"}, **parameters}
        )
        return messages_body(request, default_max_tokens=100)

    plain = ChatRequest(model="m", messages=MESSAGES, parameters={"tools": [WEATHER_TOOL]})
    [weather] = messages_body(plain, default_max_tokens=1)["tools"]
    alone = body_for(reasoning_effort="high")
    assert alone["tools"] == [JSON_TOOL] and alone["tool_choice"] == {"type": "tool", "name": JSON_TOOL_NAME}
    assert "thinking" not in alone and alone["max_tokens"] == 100  # Anthropic refuses thinking with a forced tool
    assert "output_config" not in alone
    # The client's tools may still be called: any tool, theirs (a tool call) or the JSON one (the reply).
    assert body_for(tools=[WEATHER_TOOL])["tools"] == [weather, JSON_TOOL]
    assert body_for(tools=[WEATHER_TOOL])["tool_choice"] == {"type": "any"}
    assert body_for(tools=[WEATHER_TOOL], parallel_tool_calls=False)["tool_choice"] == {
        "type": "any",
        "disable_parallel_tool_use": True,
    }
    assert body_for(tools=[WEATHER_TOOL], tool_choice="none")["tool_choice"] == {"type": "tool", "name": JSON_TOOL_NAME}
    # A call the client forces needs no JSON tool (its reply is the call).
    assert body_for(tools=[WEATHER_TOOL], tool_choice="required")["tools"] == [weather]
    # A json_schema without a schema asks for any JSON object too; a client tool of the same name is not shadowed.
    same_name = {"type": "function", "function": {"name": JSON_TOOL_NAME, "parameters": {"type": "object"}}}
    named = messages_body(
        ChatRequest(
            model="m",
            messages=MESSAGES,
            parameters={"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}, "tools": [same_name]},
        ),
        default_max_tokens=100,
    )
    assert [tool["name"] for tool in named["tools"]] == [JSON_TOOL_NAME, JSON_TOOL_NAME + "_"]


async def test_json_object_streams_the_tools_input_as_content(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"response_format": {"type": "json_object"}})
    chunks = await collect(provider(simulator), request)

    # The simulator fills an open object as a model asked for "any JSON object" would.
    assert json.loads("".join(c.content for c in chunks)) == {"reply": reply_text(MESSAGES, FAST_REPLY_TOKENS)}
    assert not any(c.tool_calls for c in chunks) and chunks[-2].finish_reason == "stop"
    arguments = json.dumps({"reply": reply_text(MESSAGES, FAST_REPLY_TOKENS)})
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1 + -(-len(arguments) // 8)

    # With the client's tools the model may call one of them: that is a tool call, as on OpenAI.
    with_tools = ChatRequest(
        model="sim-1",
        messages=MESSAGES,
        parameters={"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
    )
    called = await collect(provider(simulator), with_tools)
    [head, *_] = [call for c in called for call in c.tool_calls or ()]
    assert head["function"]["name"] == "get_weather" and called[-2].finish_reason == "tool_calls"
    assert not "".join(c.content for c in called)  # a forced call comes without text


async def test_a_forced_tool_asks_for_no_thinking(simulator: SimulatorProcess) -> None:
    # Anthropic refuses thinking with tool_choice any or tool (the simulator too, below): the client's
    # required call is answered without thinking rather than with Anthropic's 400.
    request = ChatRequest(
        model="sim-1",
        messages=MESSAGES,
        parameters={"tools": [WEATHER_TOOL], "tool_choice": "required", "reasoning_effort": "high"},
    )
    assert "thinking" not in messages_body(request, default_max_tokens=100)
    chunks = await collect(provider(simulator), request)
    assert chunks[-2].finish_reason == "tool_calls" and not any(c.reasoning_content for c in chunks)

    body = {
        "model": "sim-1",
        "max_tokens": 2000,
        "messages": [{"role": "user", "content": "Hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
    }
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{simulator.root_url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Thinking may not be enabled when tool_choice forces tool use."


class Place(pydantic.BaseModel):
    city: str
    population: int


@pytest.mark.django_db(transaction=True)
async def test_openai_clients_get_json_from_claude_whole_streamed_and_parsed(
    api_key_secret, anthropic_model, asgi_server
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Pick a city."}]
    words = reply_word_indexes(messages, FAST_REPLY_TOKENS)
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.parse(
            model="claude-sim", messages=messages, response_format=Place
        )
        async with sdk.chat.completions.stream(model="claude-sim", messages=messages, response_format=Place) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_completion()
        json_object = await sdk.chat.completions.with_raw_response.create(
            model="claude-sim", messages=messages, response_format={"type": "json_object"}
        )
        streamed_object = await sdk.chat.completions.create(
            model="claude-sim", messages=messages, response_format={"type": "json_object"}, stream=True
        )
        object_chunks = [chunk async for chunk in streamed_object]

    body = raw.http_response.json()
    validate_against("CreateChatCompletionResponse", body)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls")
    expected = schema_value(output_schema(Place.model_json_schema()), words)
    assert json.loads(choice["message"]["content"]) == expected
    parsed = raw.parse().choices[0].message.parsed
    assert parsed == Place(**expected)
    assert final.choices[0].message.parsed == parsed
    assert len([event for event in events if event.type == "content.delta"]) > 1  # streamed as it came
    assert body["usage"]["completion_tokens"] == -(-len(json.dumps(expected)) // 8)  # Anthropic's count

    whole_object = json_object.http_response.json()
    validate_against("CreateChatCompletionResponse", whole_object)
    assert json.loads(whole_object["choices"][0]["message"]["content"]) == {
        "reply": reply_text(messages, FAST_REPLY_TOKENS)
    }
    assert whole_object["choices"][0]["finish_reason"] == "stop"
    assert (
        "".join(c.choices[0].delta.content or "" for c in object_chunks if c.choices)
        == whole_object["choices"][0]["message"]["content"]
    )
    assert not any(c.choices[0].delta.tool_calls for c in object_chunks if c.choices)
    records = await usage_records()
    assert [r.finish_status for r in records] == ["completed"] * 4 and all(
        r.token_source == "provider" for r in records
    )


@pytest.mark.django_db(transaction=True)
async def test_anthropic_clients_get_structured_output_from_claude_through_the_engine(
    api_key_secret, anthropic_model, asgi_server
) -> None:
    # output_config.format in, response_format json_schema in the engine, output_config.format out.
    messages: list[Any] = [{"role": "user", "content": "Pick a city."}]
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as client:
        parsed = await client.messages.parse(model="claude-sim", max_tokens=200, messages=messages, output_format=Place)
    assert parsed.parsed_output == Place(city=reply_text(messages, FAST_REPLY_TOKENS).split()[0], population=1)
    assert parsed.stop_reason == "end_turn"


@pytest.fixture
def cut_anthropic_model(db, simulator: SimulatorProcess) -> Any:
    """``claude-cut``: upstream ``sim-cache`` (cache reads and writes reported) on an ``anthropic`` provider
    whose every stream the simulator drops after 3 tokens, with cache prices of its own."""
    upstream = ProviderFactory(
        name="sim-anthropic-cut",
        kind="anthropic",
        base_url=simulator.root_url,
        api_key="",
        extra_headers={"X-Simulator-Fault": "drop-after=3"},
    )
    return LLMModelFactory(
        name="claude-cut",
        provider=upstream,
        upstream_model="sim-cache",
        input_price_per_million="1.000000",
        output_price_per_million="2.000000",
        cached_input_price_per_million="0.100000",
        cache_write_price_per_million="1.250000",
    )


@pytest.mark.django_db(transaction=True)
async def test_the_responses_api_text_format_gets_structured_output_from_anthropic(
    api_key_secret, anthropic_model
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    text = {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}}
    question = [{"role": "user", "content": "Where?"}]
    expected = {"city": reply_text(question, FAST_REPLY_TOKENS).split()[0]}
    body = {"model": "claude-sim", "input": "Where?", "text": text}
    response = await AsyncClient().post(
        "/v1/responses", data=json.dumps(body), content_type="application/json", headers=bearer(api_key_secret)
    )
    assert response.status_code == 200, response.content
    validate_against("Response", response.json())
    [item] = response.json()["output"]
    assert json.loads(item["content"][0]["text"]) == expected


TOOL_CHOICES_ANTHROPIC_CANNOT_NAME = [
    ({"tool_choice": "required"}, "only allowed when 'tools'"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "'get_time'"),
    (
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": []}},
        },
        "takes 'none', 'auto', 'required'",
    ),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("fields", "problem"), TOOL_CHOICES_ANTHROPIC_CANNOT_NAME)
async def test_a_tool_choice_anthropic_cannot_name_is_our_400_on_tool_choice(
    api_key_secret, anthropic_model, simulator: SimulatorProcess, fields: dict[str, Any], problem: str
) -> None:
    # Before: dropped ("required" without tools: prose instead of a call) or Anthropic's own 400 about 'None'.
    body = chat_body("claude-sim", **fields)
    await assert_refused_before_upstream(
        simulator, body, bearer(api_key_secret), code="invalid_value", param="tool_choice", says=problem
    )


@pytest.mark.parametrize("stop", ["", [""], ["", ""]])
async def test_an_empty_stop_sequence_stops_nothing_as_on_openai(simulator: SimulatorProcess, stop: Any) -> None:
    # OpenAI takes stop: "" (a string) and ends nothing early; Anthropic refuses empty stop_sequences.
    chunks = await collect(
        provider(simulator), ChatRequest(model="sim-1", messages=MESSAGES, parameters={"stop": stop})
    )
    assert "".join(c.content for c in chunks) == reply_text(MESSAGES, FAST_REPLY_TOKENS)


@pytest.mark.parametrize("effort", ["xhigh", "max"])
async def test_the_newest_reasoning_efforts_think_too(simulator: SimulatorProcess, effort: str) -> None:
    # OpenAI's xhigh and max had no budget: a client asking for the most reasoning got none.
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"reasoning_effort": effort})
    chunks = await collect(provider(simulator), request)
    assert len([c for c in chunks if c.reasoning_content]) == FAST_REPLY_TOKENS // 2


async def test_a_reasoning_effort_openai_does_not_have_is_a_400(simulator: SimulatorProcess) -> None:
    request = ChatRequest(model="sim-1", messages=MESSAGES, parameters={"reasoning_effort": "extreme"})
    with pytest.raises(ApplicationError) as caught:
        await collect(provider(simulator), request)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", "reasoning_effort")


@pytest.mark.django_db(transaction=True)
async def test_a_stream_cut_before_message_delta_bills_the_prompt_as_message_start_reported_it(
    api_key_secret, cut_anthropic_model
) -> None:
    """Anthropic reports the prompt's tokens and their cache split in ``message_start``; a stream cut
    before ``message_delta`` (which repeats them with the output count) is billed that prompt, each
    part at its own price, and only the completion is counted here — not the whole prompt estimated
    at the input price."""
    body = chat_body("claude-cut", "Tell me about rivers", stream=True)
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    await streamed_content(response)

    [record] = await usage_records()
    total = count_prompt_tokens(body["messages"])
    assert (record.finish_status, record.token_source) == ("failed", "estimated")
    assert (record.prompt_tokens, record.cached_tokens, record.cache_creation_tokens) == (total, total // 2, total // 4)
    assert record.completion_tokens >= 3
    fresh = total - total // 2 - total // 4
    prompt_cost = fresh * Decimal("1") + (total // 2) * Decimal("0.1") + (total // 4) * Decimal("1.25")
    assert record.cost == (prompt_cost + record.completion_tokens * Decimal("2")) / 1_000_000


@pytest.fixture
def cut_tool_model(db, simulator: SimulatorProcess) -> Any:
    """``claude-cut-tools``: an ``anthropic`` provider whose streams the simulator drops 2 pieces after
    the text (a tool call's start and first fragment delivered), counted by ``o200k_base``."""
    upstream = ProviderFactory(
        name="sim-anthropic-cut-tools",
        kind="anthropic",
        base_url=simulator.root_url,
        api_key="",
        extra_headers={"X-Simulator-Fault": f"drop-after={FAST_REPLY_TOKENS + 2}"},
    )
    return LLMModelFactory(name="claude-cut-tools", provider=upstream, upstream_model="sim-1", tokenizer="o200k_base")


@pytest.mark.django_db(transaction=True)
async def test_a_stream_cut_in_a_tool_call_counts_the_calls_name_and_arguments(api_key_secret, cut_tool_model) -> None:
    """The completion of a reply cut mid-way is counted from what it generated: its text and the
    tool calls' names and arguments received, not the text alone."""
    body = chat_body("claude-cut-tools", "What is the weather in Paris?", stream=True, tools=[WEATHER_TOOL])
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    *payloads, error = sse_data(await streamed_content(response))  # the chunks, then the cut's error
    assert json.loads(error)["error"]["code"] == "upstream_disconnected"
    chunks = [json.loads(payload) for payload in payloads]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    calls = [call for delta in deltas for call in delta.get("tool_calls") or []]
    name = "".join(call["function"].get("name") or "" for call in calls)
    arguments = "".join(call["function"].get("arguments") or "" for call in calls)
    assert name == "get_weather" and arguments  # the cut came inside the call
    tokenizer = tokenizer_for(setting="o200k_base", model_name="sim-1")
    [record] = await usage_records()
    assert (record.finish_status, record.token_source) == ("failed", "counted")
    assert record.completion_tokens == tokenizer.count_text(chunk_text(chunks) + name + arguments)
