"""The simulator speaks Anthropic's Messages API: its output parsed by the official ``anthropic`` SDK over HTTP.

Spec: https://docs.anthropic.com/en/api/messages and
https://docs.anthropic.com/en/docs/build-with-claude/streaming.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import anthropic
import httpx
import pydantic
import pytest
from anthropic.types import MessageParam, ToolParam

from llm.simulator import count_prompt_tokens, reply_text
from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, SIMULATOR_API_KEY, poll_until

MESSAGES: list[MessageParam] = [{"role": "user", "content": "Tell me about rivers."}]
TOOLS: list[ToolParam] = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    }
]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def sdk(sim: SimulatorProcess, api_key: str = "sk-anything") -> anthropic.AsyncAnthropic:
    # No retries: a retried 429/5xx would hide the status under test. The SDK appends /v1/messages.
    return anthropic.AsyncAnthropic(base_url=sim.root_url, api_key=api_key, max_retries=0)


def input_tokens(messages: list[Any], system: str = "") -> int:
    return count_prompt_tokens(messages) + (len(system.split()) + 3 if system else 0)


async def test_stream_matches_whole_message(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        whole = await client.messages.create(model="sim-1", max_tokens=100, messages=MESSAGES, system="Be terse.")
        raw = await client.messages.create(
            model="sim-1", max_tokens=100, messages=MESSAGES, system="Be terse.", stream=True
        )
        events = [event async for event in raw]

    expected = reply_text(MESSAGES, FAST_REPLY_TOKENS)
    [block] = whole.content
    assert block.type == "text" and block.text == expected
    assert whole.stop_reason == "end_turn" and whole.stop_sequence is None and whole.id.startswith("msg_")
    assert whole.usage.input_tokens == input_tokens(MESSAGES, "Be terse.")
    assert whole.usage.output_tokens == FAST_REPLY_TOKENS
    assert (whole.usage.cache_read_input_tokens, whole.usage.cache_creation_input_tokens) == (0, 0)

    # Anthropic's order (the SDK drops ``ping``): start, one block, its deltas, stop, message_delta, message_stop.
    types = [event.type for event in events]
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * FAST_REPLY_TOKENS,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]
    assert start.type == "message_start" and start.message.content == [] and start.message.stop_reason is None
    assert start.message.usage.input_tokens == whole.usage.input_tokens
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas)
    assert "".join(d.text for d in deltas if d.type == "text_delta") == expected
    delta = events[-2]
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == FAST_REPLY_TOKENS


async def test_stream_helper_accumulates_the_message(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        async with client.messages.stream(model="sim-1", max_tokens=100, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == final.content[0].text == reply_text(MESSAGES, FAST_REPLY_TOKENS)  # type: ignore[union-attr]


async def test_ping_follows_message_start_on_the_wire(simulator: SimulatorProcess) -> None:
    body = {"model": "sim-1", "max_tokens": 5, "messages": MESSAGES, "stream": True}
    headers = {"anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{simulator.root_url}/v1/messages", json=body, headers=headers, timeout=10)
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-1] == "message_stop"


async def test_thinking_comes_first_with_a_signature(simulator: SimulatorProcess) -> None:
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    async with sdk(simulator) as client:
        whole = await client.messages.create(model="sim-1", max_tokens=2000, messages=MESSAGES, thinking=thinking)
        async with client.messages.stream(model="sim-think", max_tokens=2000, messages=MESSAGES) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()

    for message in (whole, final):
        thought, text = message.content
        assert thought.type == "thinking" and thought.thinking and thought.signature
        assert text.type == "text" and text.text == reply_text(MESSAGES, FAST_REPLY_TOKENS)
        assert message.usage.output_tokens == FAST_REPLY_TOKENS + FAST_REPLY_TOKENS // 2
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[: FAST_REPLY_TOKENS // 2 + 1] == ["thinking_delta"] * (FAST_REPLY_TOKENS // 2) + ["signature_delta"]
    assert whole.content[0].thinking == final.content[0].thinking  # type: ignore[union-attr]


async def test_thinking_budget_is_validated_as_anthropic_does(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model="sim-1", max_tokens=1000, messages=MESSAGES, thinking={"type": "enabled", "budget_tokens": 1024}
            )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "budget_tokens" in caught.value.message


async def test_tool_use_round_trip(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        async with client.messages.stream(model="sim-1", max_tokens=200, messages=MESSAGES, tools=TOOLS) as stream:
            events = [event async for event in stream]
            call = await stream.get_final_message()
        whole = await client.messages.create(model="sim-1", max_tokens=200, messages=MESSAGES, tools=TOOLS)

        text, tool_use = call.content
        assert text.type == "text" and text.text == reply_text(MESSAGES, FAST_REPLY_TOKENS)
        assert tool_use.type == "tool_use" and tool_use.name == "get_weather" and tool_use.id.startswith("toolu_")
        assert set(tool_use.input) == {"city", "days"}  # type: ignore[arg-type]
        assert call.stop_reason == whole.stop_reason == "tool_use"
        assert whole.content[1].input == tool_use.input  # type: ignore[union-attr]
        fragments = [
            e.delta.partial_json
            for e in events
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        assert len(fragments) > 2 and fragments[0] == ""

        answered: list[MessageParam] = [
            *MESSAGES,
            {"role": "assistant", "content": call.content},  # type: ignore[typeddict-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "Sunny"}]},
        ]
        reply = await client.messages.create(model="sim-1", max_tokens=200, messages=answered, tools=TOOLS)
        assert reply.stop_reason == "end_turn" and [b.type for b in reply.content] == ["text"]

        forced = await client.messages.create(
            model="sim-1", max_tokens=200, messages=answered, tools=TOOLS, tool_choice={"type": "any"}
        )
        assert forced.stop_reason == "tool_use"
        none = await client.messages.create(
            model="sim-1", max_tokens=200, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "none"}
        )
        assert none.stop_reason == "end_turn"

        unanswered = answered[:2] + [{"role": "user", "content": "and?"}]
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model="sim-1", max_tokens=200, messages=unanswered, tools=TOOLS)
        assert "tool_result" in caught.value.message


async def test_cache_tokens_add_up_to_the_input(simulator: SimulatorProcess) -> None:
    marked: list[MessageParam] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Long context here.", "cache_control": {"type": "ephemeral"}}],
        }
    ]
    async with sdk(simulator) as client:
        whole = await client.messages.create(model="sim-1", max_tokens=50, messages=marked)
        async with client.messages.stream(model="sim-cache", max_tokens=50, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    for message, messages in ((whole, marked), (final, MESSAGES)):
        usage = message.usage
        total = input_tokens(messages)  # type: ignore[arg-type]
        assert usage.cache_read_input_tokens == total // 2 and usage.cache_creation_input_tokens == total // 4
        assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == total


async def test_max_tokens_and_stop_sequences_end_the_reply(simulator: SimulatorProcess) -> None:
    words = reply_text(MESSAGES, FAST_REPLY_TOKENS).split()
    async with sdk(simulator) as client:
        short = await client.messages.create(model="sim-1", max_tokens=3, messages=MESSAGES, tools=TOOLS)
        stopped = await client.messages.create(
            model="sim-1", max_tokens=100, messages=MESSAGES, stop_sequences=["zzz", words[4]]
        )
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    assert [b.type for b in short.content] == ["text"] and short.content[0].text == " ".join(words[:3])  # type: ignore[union-attr]
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", words[4])
    assert stopped.content[0].text == " ".join(words[: words.index(words[4])])  # type: ignore[union-attr]


async def test_images_are_accepted_and_checked(simulator: SimulatorProcess) -> None:
    def with_image(source: dict[str, str]) -> list[MessageParam]:
        image: Any = {"type": "image", "source": source}
        return [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]

    async with sdk(simulator) as client:
        for source in (
            {"type": "base64", "media_type": "image/png", "data": PNG},
            {"type": "url", "url": "https://example.com/cat.png"},
        ):
            reply = await client.messages.create(model="sim-1", max_tokens=10, messages=with_image(source))
            assert reply.stop_reason == "max_tokens"
        with pytest.raises(anthropic.BadRequestError) as caught:
            bad = {"type": "base64", "media_type": "image/png", "data": "not base64!"}
            await client.messages.create(model="sim-1", max_tokens=10, messages=with_image(bad))
    assert "base64" in caught.value.message


@pytest.mark.parametrize(
    ("fault", "error", "error_type"),
    [
        ("status=429, retry-after=7", anthropic.RateLimitError, "rate_limit_error"),
        ("status=500", anthropic.InternalServerError, "api_error"),
        ("status=529", anthropic.OverloadedError, "overloaded_error"),
        ("status=404", anthropic.NotFoundError, "not_found_error"),
        ("status=400", anthropic.BadRequestError, "invalid_request_error"),
        ("bogus", anthropic.BadRequestError, "invalid_request_error"),
    ],
)
async def test_errors_have_anthropics_shape(
    simulator: SimulatorProcess, fault: str, error: type[anthropic.APIStatusError], error_type: str
) -> None:
    before = await simulator.astats()
    async with sdk(simulator) as client:
        with pytest.raises(error) as caught:
            await client.messages.create(
                model="sim-1", max_tokens=10, messages=MESSAGES, extra_headers={"X-Simulator-Fault": fault}
            )
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == error_type and body["error"]["message"]
    assert caught.value.response.headers.get("request-id", "").startswith("req_")
    if error is anthropic.RateLimitError:
        assert caught.value.response.headers["retry-after"] == "7"
    after = await simulator.astats()
    assert after["requests_failed"] == before["requests_failed"] + 1


async def test_model_names_pick_failures_too(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="sim-error-429", max_tokens=10, messages=MESSAGES)


async def test_api_key_and_version_headers_are_required(keyed_simulator: SimulatorProcess) -> None:
    async with sdk(keyed_simulator, api_key=SIMULATOR_API_KEY) as client:
        reply = await client.messages.create(model="sim-1", max_tokens=100, messages=MESSAGES)
    assert reply.content[0].text == reply_text(MESSAGES, FAST_REPLY_TOKENS)  # type: ignore[union-attr]
    async with sdk(keyed_simulator, api_key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model="sim-1", max_tokens=10, messages=MESSAGES)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with httpx.AsyncClient() as raw:
        body = {"model": "sim-1", "max_tokens": 5, "messages": MESSAGES}
        missing = await raw.post(
            f"{keyed_simulator.root_url}/v1/messages", json=body, headers={"x-api-key": SIMULATOR_API_KEY}
        )
    assert missing.status_code == 400 and "anthropic-version" in missing.json()["error"]["message"]


async def test_mid_stream_drop_and_malformed_line_break_the_sdk_stream(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        received: list[str] = []
        # The SDK's HTTP client (httpx2) raises its RemoteProtocolError for the unterminated body.
        with pytest.raises(Exception, match="incomplete chunked read"):
            async with client.messages.stream(model="sim-fail-midstream", max_tokens=100, messages=MESSAGES) as stream:
                async for piece in stream.text_stream:
                    received.append(piece)
        assert "".join(received) == reply_text(MESSAGES, 3)
        with pytest.raises(ValueError):  # the SDK's json.loads of the malformed data line
            async with client.messages.stream(
                model="sim-1",
                max_tokens=100,
                messages=MESSAGES,
                extra_headers={"X-Simulator-Fault": "malformed-line=2"},
            ) as stream:
                async for _ in stream:
                    pass


async def test_a_client_that_leaves_is_counted_as_a_disconnect(slow_simulator: SimulatorProcess) -> None:
    before = await slow_simulator.astats()
    async with sdk(slow_simulator) as client:
        async with client.messages.stream(model="sim-1", max_tokens=1000, messages=MESSAGES) as stream:
            async for _ in stream.text_stream:
                break
    await poll_until(
        slow_simulator.astats,
        lambda s: (
            s["requests_disconnected"] == before["requests_disconnected"] + 1
            and s["active_streams"] == before["active_streams"]
        ),
    )
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"metadata": {"tenant": "a"}}, "metadata.tenant"),
    ],
)
async def test_fields_the_messages_api_lacks_are_refused_as_anthropic_does(
    simulator: SimulatorProcess, extra: dict[str, Any], field: str
) -> None:
    # So a translation that forwards an OpenAI field fails in tests as it would against Anthropic.
    async with sdk(simulator) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model="sim-1", max_tokens=10, messages=MESSAGES, extra_body=extra)
    assert caught.value.body["error"]["message"] == f"{field}: Extra inputs are not permitted"  # type: ignore[index]


class Place(pydantic.BaseModel):
    city: str
    population: int = pydantic.Field(ge=0)  # the SDK moves the bound into the description


async def test_structured_output_follows_the_schema_the_sdk_sends(simulator: SimulatorProcess) -> None:
    # messages.parse sends output_config.format with the SDK's transform_schema of the model: what
    # the simulator takes is what Anthropic takes from its own SDK; the text parses back.
    async with sdk(simulator) as client:
        parsed = await client.messages.parse(model="sim-1", max_tokens=200, messages=MESSAGES, output_format=Place)
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["city", "tags"],
            "additionalProperties": False,
        }
        output_config: Any = {"format": {"type": "json_schema", "schema": schema}, "effort": "max"}
        async with client.messages.stream(
            model="sim-1", max_tokens=200, messages=MESSAGES, output_config=output_config
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()

    word = reply_text(MESSAGES, FAST_REPLY_TOKENS).split()[0]
    assert parsed.parsed_output == Place(city=word, population=1)
    assert parsed.stop_reason == "end_turn" and [block.type for block in parsed.content] == ["text"]
    assert json.loads("".join(texts)) == {"city": word, "tags": []} and len(texts) > 1
    assert final.usage.output_tokens == len(texts)  # one token per text_delta


@pytest.mark.parametrize(
    ("output_config", "problem"),
    [
        ({"format": {"type": "json_schema", "schema": {"type": "object"}}}, "must be explicitly set to false"),
        ({"format": {"type": "json"}}, "output_config.format.type"),
        ({"effort": "extreme"}, "output_config.effort"),
        ({"verbosity": "low"}, "output_config.verbosity: Extra inputs are not permitted"),
    ],
)
async def test_an_output_config_anthropic_refuses_is_a_400(
    simulator: SimulatorProcess, output_config: dict[str, Any], problem: str
) -> None:
    async with sdk(simulator) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model="sim-1",
                max_tokens=50,
                messages=MESSAGES,
                output_config=output_config,  # type: ignore[arg-type]
            )
    assert problem in caught.value.message


async def test_a_forced_tool_call_comes_without_text_and_refuses_thinking(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        forced = await client.messages.create(
            model="sim-1",
            max_tokens=200,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model="sim-1",
                max_tokens=2000,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice={"type": "any"},
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
    assert [block.type for block in forced.content] == ["tool_use"] and forced.stop_reason == "tool_use"
    assert "Thinking may not be enabled when tool_choice forces tool use." in caught.value.message
