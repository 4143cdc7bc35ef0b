"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) as the official SDK sees it.

The ``anthropic`` SDK talks to this server over real HTTP (``asgi_server``: uvicorn in the test's
loop), unmodified: ``AsyncAnthropic(base_url=<server>, api_key="sk-...")``. Replies come from the
simulator (OpenAI wire format) over real HTTP; tool calls and reasoning from the scripted
upstream (root conftest), whose ``requests`` also show what our translation sent upstream.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest

from accounts.models import UsageRecord
from chatbackend.asyncdb import run_sync
from llm.models import LLMModel
from llm.selectors import enabled_model_get
from llm.simulator import count_prompt_tokens, reply_text
from tests.factories import ProviderFactory
from tests.kit import FAST_REPLY_TOKENS, SLOW_REPLY_TOKENS, asgi_request, poll_until, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

MESSAGES_URL = "/v1/messages"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
# A 1x1 transparent PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()


@pytest.fixture
async def sdk(asgi_server: str, api_key_secret: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official SDK pointed at this server with an ``sk-`` API key (sent as ``x-api-key``)."""
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as client:
        yield client


@pytest.fixture
def scripted_model(db, scripted_upstream):
    """``scripted``: the scripted upstream's plain reply (``"ok"``); ``tool-model``: its reasoning and tool call;
    ``interleaved-model``: two tool calls whose argument fragments alternate; ``cut-tool-model``: a call
    cut off by the output limit."""
    provider = ProviderFactory(name="scripted", base_url=scripted_upstream.base_url)
    LLMModel.objects.create(name="tool-model", provider=provider, upstream_model="tool-call")
    LLMModel.objects.create(name="interleaved-model", provider=provider, upstream_model="tool-calls-interleaved")
    LLMModel.objects.create(name="cut-tool-model", provider=provider, upstream_model="tool-call-cut")
    return LLMModel.objects.create(name="scripted", provider=provider, upstream_model="plain")


# --- Whole and streamed text ------------------------------------------------------------------


async def test_create_answers_a_message_and_records_its_usage(sdk, sim_model):
    message = await sdk.messages.create(
        model="sim-model",
        max_tokens=100,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "Tell me about rivers"}],
    )

    upstream_messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Tell me about rivers"},
    ]
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "sim-model"
    [block] = message.content
    assert block.type == "text"
    assert block.text == reply_text(upstream_messages, FAST_REPLY_TOKENS)
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    # The simulator counts every message's words: the system prompt went upstream.
    assert message.usage.input_tokens == count_prompt_tokens(upstream_messages)
    assert message.usage.output_tokens == FAST_REPLY_TOKENS

    [record] = await usage_records()
    assert record.request_id == message.id
    assert record.source == UsageRecord.Source.ANTHROPIC_API
    assert record.api_key_id is not None
    assert record.model_name == "sim-model"
    assert (record.prompt_tokens, record.completion_tokens) == (message.usage.input_tokens, FAST_REPLY_TOKENS)
    assert record.token_source == "provider"
    assert record.finish_status == "completed"


async def test_stream_sends_anthropics_events_and_the_sdk_assembles_them(sdk, sim_model):
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Tell me about bridges"}]}]
    async with sdk.messages.stream(model="sim-model", max_tokens=100, messages=messages) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()

    assert text == reply_text([{"role": "user", "content": "Tell me about bridges"}], FAST_REPLY_TOKENS)
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == FAST_REPLY_TOKENS
    [record] = await usage_records()
    assert record.request_id == final.id
    assert record.source == UsageRecord.Source.ANTHROPIC_API
    assert record.prompt_tokens == final.usage.input_tokens > 0
    assert record.completion_tokens == FAST_REPLY_TOKENS

    # The raw events, in Anthropic's order.
    raw = await sdk.messages.create(model="sim-model", max_tokens=100, messages=messages, stream=True)
    kinds = [event.type async for event in raw]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_max_tokens_cuts_the_reply_with_stop_reason_max_tokens(sdk, sim_model):
    message = await sdk.messages.create(
        model="sim-model", max_tokens=3, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


async def test_a_stop_sequence_an_anthropic_upstream_matched_is_stop_reason_stop_sequence(sdk, simulator):
    # An Anthropic upstream says which stop sequence ended the reply; Anthropic's client reads it
    # back (an OpenAI upstream does not say: end_turn, stop_sequence null).
    provider = await run_sync(
        ProviderFactory, name="sim-anthropic", kind="anthropic", base_url=simulator.root_url, api_key=""
    )
    await run_sync(LLMModel.objects.create, name="claude-sim", provider=provider, upstream_model="sim-1")
    messages: Any = [{"role": "user", "content": "Tell me about rivers"}]
    word = reply_text(messages, FAST_REPLY_TOKENS).split()[3]

    whole = await sdk.messages.create(model="claude-sim", max_tokens=50, messages=messages, stop_sequences=[word])
    async with sdk.messages.stream(
        model="claude-sim", max_tokens=50, messages=messages, stop_sequences=[word]
    ) as stream:
        streamed = await stream.get_final_message()
    natural = await sdk.messages.create(model="claude-sim", max_tokens=50, messages=messages, stop_sequences=["zzz"])

    for message in (whole, streamed):
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", word)
        block = message.content[0]
        assert isinstance(block, anthropic.types.TextBlock) and word not in block.text
    assert (natural.stop_reason, natural.stop_sequence) == ("end_turn", None)


async def test_bearer_credentials_and_no_version_header_work_too(asgi_server, api_key_secret, sim_model):
    async with anthropic.AsyncAnthropic(base_url=asgi_server, auth_token=api_key_secret, max_retries=0) as client:
        message = await client.messages.create(
            model="sim-model", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
    assert message.content[0].type == "text"
    async with httpx.AsyncClient(base_url=asgi_server) as http:  # curl-like: no anthropic-version
        response = await http.post(
            MESSAGES_URL,
            json={"model": "sim-model", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"x-api-key": api_key_secret},
        )
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"


# --- Tools, thinking, images: what goes upstream and what comes back ---------------------------


async def test_tool_use_round_trip_with_thinking(sdk, scripted_model, scripted_upstream):
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    message = await sdk.messages.create(
        model="tool-model",
        max_tokens=1000,
        messages=[question],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048},
        stop_sequences=["END"],
        metadata={"user_id": "user-42"},
        cache_control={"type": "ephemeral"},  # accepted, ignored
        extra_body={"temperature": 0.5, "top_k": 5},  # SDK 2.x dropped them; older clients send them
    )

    sent = scripted_upstream.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert sent["reasoning_effort"] == "low"
    assert sent["max_tokens"] == 1000 and sent["stop"] == ["END"] and sent["temperature"] == 0.5
    assert sent["user"] == "user-42"
    assert not {"top_k", "thinking", "metadata", "cache_control"} & set(sent)

    thinking, tool_use = message.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants weather."
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
    [record] = await usage_records()
    assert (record.prompt_tokens, record.completion_tokens) == (7, 5)  # the upstream's report
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 5)

    # The client answers the call: the assistant's turn and the tool result go upstream in OpenAI's shape.
    answer: Any = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "Sunny, 24 C"}]},
            {"type": "text", "text": "And tomorrow?"},
        ],
    }
    assistant: Any = {"role": "assistant", "content": [block.model_dump() for block in message.content]}
    await sdk.messages.create(
        model="tool-model", max_tokens=1000, messages=[question, assistant, answer], tools=[WEATHER_TOOL]
    )
    assert scripted_upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]


async def test_streamed_tool_use_and_thinking_blocks(sdk, scripted_model):
    async with sdk.messages.stream(
        model="tool-model",
        max_tokens=1000,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        deltas = [event.delta.type async for event in stream if event.type == "content_block_delta"]
        final = await stream.get_final_message()

    assert deltas == ["thinking_delta", "input_json_delta", "input_json_delta"]
    thinking, tool_use = final.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants weather."
    assert tool_use.type == "tool_use" and tool_use.input == {"city": "Paris"} and tool_use.name == "get_weather"
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 5


async def test_interleaved_tool_call_fragments_reach_their_blocks_whole(sdk, scripted_model):
    """An upstream that alternates the argument fragments of two calls (the first call's end comes
    after the second call opened): each ``tool_use`` block gets its whole input, streamed or not,
    and the stream still sends each block from its start to its stop before the next one starts."""
    request: Any = {
        "model": "interleaved-model",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
        "tools": [WEATHER_TOOL, {**WEATHER_TOOL, "name": "get_time"}],
    }
    async with sdk.messages.stream(**request) as stream:
        events = [(event.type, getattr(event, "index", None)) async for event in stream]
        final = await stream.get_final_message()
    whole = await sdk.messages.create(**request)

    expected = [("call_w", "get_weather", {"city": "Paris"}), ("call_t", "get_time", {"tz": "CET"})]
    for message in (final, whole):
        assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == expected
        assert len(message.content) == 2 and message.stop_reason == "tool_use"
    opened: list[int] = []
    for kind, index in events:
        if kind == "content_block_start":
            opened.append(index)
        elif kind in ("content_block_delta", "content_block_stop"):
            assert index == opened[-1], events  # only the last block opened is extended or closed
    assert opened == [0, 1] and events.count(("content_block_stop", 0)) == 1


async def test_a_tool_call_cut_off_by_the_output_limit_reads_as_anthropic_answers_one(sdk, scripted_model):
    """The output limit cuts a call's arguments (``{"city":"Pa``): as Anthropic answers such a call,
    the stream sends the fragments that came (the SDK folds the unfinished JSON as it can) and the
    whole message an empty ``input``, both with ``stop_reason`` ``max_tokens``, never an ``input``
    holding arguments that the tool does not take."""
    request: Any = {
        "model": "cut-tool-model",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
    }
    async with sdk.messages.stream(**request) as stream:
        fragments = [
            event.delta.partial_json
            async for event in stream
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
        ]
        final = await stream.get_final_message()
    whole = await sdk.messages.create(**request)

    assert "".join(fragments) == '{"city":"Pa'
    for message in (final, whole):
        [tool_use] = message.content
        assert tool_use.type == "tool_use" and (tool_use.id, tool_use.name) == ("call_1", "get_weather")
        assert tool_use.input == {}
        assert message.stop_reason == "max_tokens"


async def test_images_system_blocks_and_output_config_are_translated(sdk, scripted_model, scripted_upstream):
    schema = {"type": "object", "properties": {"animal": {"type": "string"}}}
    message = await sdk.messages.create(
        model="scripted",
        max_tokens=100,
        output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}},
        system=[{"type": "text", "text": "You see images."}, {"type": "text", "text": "Be brief."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "What is in these images?"},
                ],
            }
        ],
    )
    assert message.content[0].type == "text" and message.content[0].text == "ok"
    sent = scripted_upstream.requests[-1]
    assert sent["reasoning_effort"] == "max"  # OpenAI's ReasoningEffort has max too: not lowered to high
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    assert sent["messages"] == [
        {"role": "system", "content": "You see images.\n\nBe brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "text", "text": "What is in these images?"},
            ],
        },
    ]


# --- count_tokens ------------------------------------------------------------------------------


async def test_count_tokens_uses_the_models_tokenizer(sdk, sim_model):
    counted = await sdk.messages.count_tokens(
        model="sim-model",
        system="Answer briefly.",
        messages=[{"role": "user", "content": "How long is the Danube?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    model = await run_sync(enabled_model_get, name="sim-model")
    function = {
        "name": "get_weather",
        "parameters": WEATHER_TOOL["input_schema"],
        "description": WEATHER_TOOL["description"],
    }
    tools = [{"type": "function", "function": function}]
    expected = model.tokenizer.count_prompt(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How long is the Danube?"}]
    ) + model.tokenizer.count_text(json.dumps(tools, separators=(",", ":")))
    assert counted.input_tokens == expected
    assert await usage_records() == []  # counting is free


# --- Errors, as the SDK's typed exceptions ------------------------------------------------------


async def test_errors_are_anthropics_shape_and_the_sdks_exceptions(asgi_server, sdk, sim_model):
    hello: Any = [{"role": "user", "content": "Hi"}]
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key="sk-" + "x" * 48, max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await stranger.messages.create(model="sim-model", max_tokens=10, messages=hello)
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    with pytest.raises(anthropic.BadRequestError) as bad:  # the SDK cannot omit max_tokens: a raw post
        await sdk.post(MESSAGES_URL, body={"model": "sim-model", "messages": hello}, cast_to=httpx.Response)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.body["error"]["message"].startswith("max_tokens:")  # type: ignore[index]

    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.create(model="no-such-model", max_tokens=10, messages=hello)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

    refused = {
        "unsupported block": (
            [{"role": "user", "content": [{"type": "document", "source": {}}]}],
            "messages.0.content.0.type",
        ),
        "bad image": (
            [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "x/y"}}]}],
            "messages.0.content.0.source.media_type",
        ),
        "media type not a string": (
            [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": {}}}]}],
            "messages.0.content.0.source.media_type",
        ),
        "is_error not a boolean": (
            [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": {}}]}],
            "messages.0.content.0.is_error",
        ),
        "tool_use without input": (
            [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f"}]}],
            "messages.0.content.0.input",
        ),
        "server tool": (
            [{"role": "user", "content": "Hi"}],
            "tools.0.type",
        ),
    }
    server_tool: Any = [{"type": "web_search_20250305", "name": "web_search"}]
    for case, (messages, param) in refused.items():
        tools = server_tool if case == "server tool" else []
        with pytest.raises(anthropic.BadRequestError) as invalid:
            await sdk.messages.create(model="sim-model", max_tokens=10, messages=messages, tools=tools)
        assert invalid.value.body["error"]["message"].startswith(f"{param}:"), case  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError) as invalid:  # the same checks when counting
            await sdk.messages.count_tokens(model="sim-model", messages=messages, tools=tools)
        assert invalid.value.body["error"]["message"].startswith(f"{param}:"), case  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as extra:
        await sdk.messages.create(model="sim-model", max_tokens=10, messages=hello, extra_body={"container": "c1"})
    assert extra.value.body["error"]["message"].startswith("container: Not supported")  # type: ignore[index]
    assert await usage_records() == []

    async with httpx.AsyncClient(base_url=asgi_server) as http:
        response = await http.get(MESSAGES_URL, headers={"x-api-key": "sk-anything"})
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"

    # An Anthropic API not served here (Message Batches): a 404 in Anthropic's shape, for the SDK.
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await sdk.messages.batches.list()
    assert unknown.value.body["type"] == "error"  # type: ignore[index]
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "/v1/messages/batches" in unknown.value.body["error"]["message"]  # type: ignore[index]


async def test_a_rate_limit_is_the_sdks_rate_limit_error(sdk, user, sim_model):
    user.requests_per_minute = 1
    await run_sync(user.save)
    hello: Any = [{"role": "user", "content": "Hi"}]
    await sdk.messages.create(model="sim-model", max_tokens=10, messages=hello)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk.messages.create(model="sim-model", max_tokens=10, messages=hello, stream=True)

    assert caught.value.status_code == 429
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert float(caught.value.response.headers["retry-after"]) > 0
    records = await usage_records()
    assert [record.finish_status for record in records] == ["completed", "refused"]
    assert {record.source for record in records} == {UsageRecord.Source.ANTHROPIC_API}


async def test_an_upstream_failure_mid_stream_is_an_error_event(sdk, failing_models):
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with sdk.messages.stream(
            model="m-fail-midstream", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            async for _ in stream:
                pass
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    [record] = await usage_records()
    assert record.finish_status == "failed" and record.source == UsageRecord.Source.ANTHROPIC_API


# --- Client disconnect --------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream_and_bills_what_was_streamed(
    api_key_secret, slow_model, slow_simulator
):
    before = await slow_simulator.astats()
    body = {"model": "slow-model", "max_tokens": 1000, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"content-type": "application/json", "x-api-key": api_key_secret, "anthropic-version": "2023-06-01"}
    result = await asgi_request(
        "POST", MESSAGES_URL, headers=headers, body=json.dumps(body).encode(), disconnect_after_frames=4
    )

    assert result.status_code == 200
    events = [line.removeprefix(b"event: ") for line in result.content.split(b"\n") if line.startswith(b"event: ")]
    assert events[:2] == [b"message_start", b"content_block_start"]
    [record] = await usage_records()  # persisted before the handler returned
    assert record.finish_status == "cancelled"
    assert record.source == UsageRecord.Source.ANTHROPIC_API
    assert 1 <= record.completion_tokens < SLOW_REPLY_TOKENS
    stats = await poll_until(slow_simulator.astats, lambda stats: stats["active_streams"] == 0)
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1
    assert stats["requests_completed"] == before["requests_completed"]
