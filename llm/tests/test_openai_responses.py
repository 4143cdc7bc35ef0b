"""``POST /v1/responses`` (OpenAI's Responses API, stateless core) as the official ``openai`` SDK sees it.

The SDK talks to the project's ASGI app served by uvicorn (``asgi_server``) over real HTTP; replies
come from the simulator process, or from the scripted upstream for what the simulator does not
send (reasoning, tool calls) and to see the chat request the translation produced. Raw bodies are
checked against OpenAI's published schemas (``Response``, ``ResponseStreamEvent``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from accounts.models import UsageRecord
from chatbackend.asyncdb import run_sync
from llm.models import LLMModel, Provider
from llm.simulator import reply_text
from llm.tests.openai_schema import validate_against
from tests.kit import (
    FAST_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    asgi_request,
    assert_error,
    bearer,
    poll_until,
    usage_records,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]

RESPONSES_URL = "/v1/responses"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def sdk_for(server: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Parse a Responses SSE body: each event's ``event:`` line must name its data's ``type``."""
    events = []
    for block in raw.decode().strip().split("\n\n"):
        if block.startswith(":"):
            continue
        name_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {event['type']}"
        events.append(event)
    return events


@pytest.fixture
async def scripted_models(db, scripted_upstream) -> None:
    """``tool-model`` (reasoning, then a get_weather call) and ``plain-model`` (says ``ok``), scripted."""
    provider = await run_sync(Provider.objects.create, name="scripted", base_url=scripted_upstream.base_url)
    await run_sync(LLMModel.objects.create, name="tool-model", provider=provider, upstream_model="tool-call")
    await run_sync(LLMModel.objects.create, name="plain-model", provider=provider, upstream_model="plain")


# --- Whole and streamed replies -----------------------------------------------------------------


async def test_create_whole_reply_parses_with_the_sdk_and_records_usage(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        raw = await sdk.responses.with_raw_response.create(
            model="sim-model", input="Tell me about rivers", instructions="Answer briefly.", metadata={"k": "v"}
        )
        response = raw.parse()

    validate_against("Response", raw.http_response.json())
    expected = reply_text([{"role": "user", "content": "Tell me about rivers"}], FAST_REPLY_TOKENS)
    assert response.output_text == expected
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.model == "sim-model"
    assert response.instructions == "Answer briefly."
    assert response.metadata == {"k": "v"}
    [message] = response.output
    assert message.type == "message" and message.status == "completed"
    assert response.usage is not None
    assert response.usage.output_tokens == FAST_REPLY_TOKENS
    assert response.usage.total_tokens == response.usage.input_tokens + FAST_REPLY_TOKENS

    [record] = await usage_records()
    assert record.request_id == response.id
    assert record.source == UsageRecord.Source.OPENAI_RESPONSES
    assert record.model_name == "sim-model"
    assert record.finish_status == "completed"
    assert (record.prompt_tokens, record.completion_tokens) == (response.usage.input_tokens, FAST_REPLY_TOKENS)


async def test_stream_events_parse_with_the_sdk_and_match_the_schema(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        async with sdk.responses.stream(model="sim-model", input="Tell me about rivers") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        raw_stream = await sdk.responses.create(model="sim-model", input="Tell me about rivers", stream=True)
        raw_types = [event.type async for event in raw_stream]

    expected = reply_text([{"role": "user", "content": "Tell me about rivers"}], FAST_REPLY_TOKENS)
    types = [event.type for event in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert raw_types == types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == expected
    assert final.output_text == expected
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == FAST_REPLY_TOKENS
    records = await usage_records()
    assert [record.request_id for record in records][0] == final.id
    assert {record.source for record in records} == {UsageRecord.Source.OPENAI_RESPONSES}

    async with httpx.AsyncClient(base_url=asgi_server) as http:
        body = {"model": "sim-model", "input": "Tell me about rivers", "stream": True}
        answer = await http.post(RESPONSES_URL, json=body, headers=bearer(api_key_secret))
    assert answer.headers["content-type"] == "text/event-stream"
    for event in sse_events(answer.content):
        validate_against("ResponseStreamEvent", event)


async def test_max_output_tokens_ends_incomplete(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        whole = await sdk.responses.create(model="sim-model", input="Hi", max_output_tokens=3)
        stream = await sdk.responses.create(model="sim-model", input="Hi", max_output_tokens=3, stream=True)
        events = [event async for event in stream]

    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None and whole.incomplete_details.reason == "max_output_tokens"
    assert len(whole.output_text.split()) == 3
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == whole.output_text


# --- Input items, tools, reasoning ------------------------------------------------------------


async def test_tool_call_and_reasoning_stream_then_function_call_output_round_trip(
    api_key_secret, scripted_models, scripted_upstream, asgi_server
):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        async with sdk.responses.stream(
            model="tool-model", input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="auto"
        ) as stream:
            events = [event async for event in stream]
            first = await stream.get_final_response()
        sent = scripted_upstream.requests[-1]
        assert sent["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": WEATHER_TOOL["parameters"],
                    "strict": True,
                },
            }
        ]
        assert sent["tool_choice"] == "auto"

        types = [event.type for event in events]
        assert "response.reasoning_text.delta" in types
        assert types.count("response.function_call_arguments.delta") == 2
        assert "response.function_call_arguments.done" in types
        reasoning, call = first.output
        assert reasoning.type == "reasoning"
        assert reasoning.content is not None and reasoning.content[0].text == "The user wants weather."
        assert call.type == "function_call"
        assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city":"Paris"}')
        assert first.status == "completed"

        # The client runs the tool and sends the whole context back, as a stateless client does.
        second = await sdk.responses.create(
            model="plain-model",
            instructions="Use the tools.",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                *[item.model_dump(exclude_none=True) for item in first.output],
                {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius": 21}'},
            ],
        )
    assert second.output_text == "ok"
    sent = scripted_upstream.requests[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris?"},
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
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


async def test_images_and_parameters_reach_the_upstream_in_chat_shape(
    api_key_secret, scripted_models, scripted_upstream, asgi_server
):
    image = "data:image/png;base64,iVBORw0KGgo="
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        response = await sdk.responses.create(
            model="plain-model",
            input=[
                {"role": "developer", "content": "Be terse."},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": image, "detail": "low"},
                    ],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A pixel."}]},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot tell."}]},
                {"role": "user", "content": "Try."},
            ],
            parallel_tool_calls=True,
            tool_choice="auto",
            max_output_tokens=50,
            temperature=0.5,
            top_p=0.9,
            reasoning={"effort": "low"},
            text={
                "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True},
                "verbosity": "low",
            },
            store=False,
            include=["reasoning.encrypted_content"],
        )
    assert response.output_text == "ok"
    sent = scripted_upstream.requests[-1]
    assert sent["messages"] == [
        {"role": "developer", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "A pixel."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "I cannot tell."},
        {"role": "user", "content": "Try."},
    ]
    assert sent["max_completion_tokens"] == 50
    assert sent["verbosity"] == "low"
    assert "parallel_tool_calls" not in sent  # OpenAI's chat API refuses both without tools
    assert "tool_choice" not in sent
    assert (sent["temperature"], sent["top_p"], sent["reasoning_effort"]) == (0.5, 0.9, "low")
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    assert "store" not in sent and "metadata" not in sent


@pytest.mark.parametrize("effort", ["xhigh", "max"])
async def test_the_highest_reasoning_efforts_reach_the_upstream(
    api_key_secret, scripted_models, scripted_upstream, asgi_server, effort
):
    # OpenAI's ReasoningEffort, which Reasoning.effort takes, goes up to max, which was a 400 here.
    async with httpx.AsyncClient(base_url=asgi_server) as http:
        body = {"model": "plain-model", "input": "Think hard.", "reasoning": {"effort": effort}}
        answer = await http.post("/v1/responses", json=body, headers=bearer(api_key_secret))
    assert answer.status_code == 200, answer.content
    validate_against("Response", answer.json())
    assert answer.json()["reasoning"]["effort"] == effort
    assert scripted_upstream.requests[-1]["reasoning_effort"] == effort


# --- Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]}, "include[1]"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"temperature": "hot"}, "temperature"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"reasoning": {"effort": "low", "mode": "deep"}}, "reasoning.mode"),
        ({"reasoning": {"effort": ["high"]}}, "reasoning.effort"),
        ({"text": {"format": {"type": "text"}, "tone": "warm"}}, "text.tone"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "function_call_output", "output": "21"}]}, "input[0].call_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        ({"made_up": 1}, "made_up"),
        # Checked here, not by the upstream (whose 400 would name its own 'messages'):
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"max_tool_calls": "x"}, "max_tool_calls"),
        ({"max_tool_calls": -1}, "max_tool_calls"),
        # Echoed in the response, whose schema allows only OpenAI's values (and sent upstream):
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
        ({"reasoning": {"summary": "everything"}}, "reasoning.summary"),
        ({"reasoning": {"generate_summary": 1}}, "reasoning.generate_summary"),
        # The same limits as /v1/chat/completions' metadata (OpenAI's Metadata):
        ({"metadata": {str(n): "v" for n in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ],
)
async def test_unsupported_fields_are_a_400_naming_the_param(api_key_secret, sim_model, asgi_server, fields, param):
    body: dict[str, Any] = {"model": "sim-model", "input": "Hi", **fields}
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.post("/responses", body=body, cast_to=httpx.Response)
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value.body
    assert await usage_records() == []


async def test_max_output_tokens_over_the_context_window_names_the_field(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.responses.create(model="sim-model", input="Hi", max_output_tokens=10_000_000)
    assert (caught.value.code, caught.value.param) == ("max_tokens_too_large", "max_output_tokens")
    assert "'max_output_tokens'" in caught.value.message


async def test_sdk_typed_call_with_previous_response_id_is_refused(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.responses.create(model="sim-model", input="Hi", previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id"
    assert "store" in caught.value.message


async def test_bad_key_is_401_and_unknown_model_is_404(api_key_secret, sim_model, asgi_server):
    async with sdk_for(asgi_server, "sk-" + "x" * 48) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.responses.create(model="sim-model", input="Hi")
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.responses.create(model="no-such-model", input="Hi", stream=True)
    assert caught.value.code == "model_not_found"


async def test_rate_limit_refusal_is_a_rate_limit_error(user, api_key_secret, sim_model, asgi_server):
    def limit() -> None:
        user.requests_per_minute = 1
        user.save()  # a save clears the cached principal

    await run_sync(limit)
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        first = await sdk.responses.with_raw_response.create(model="sim-model", input="Hi")
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.responses.create(model="sim-model", input="Again", stream=True)
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["Retry-After"]
    records = await usage_records()
    assert [record.finish_status for record in records] == ["completed", "refused"]


async def test_upstream_failure_mid_stream_is_an_error_event_then_response_failed(
    api_key_secret, failing_models, asgi_server
):
    async with httpx.AsyncClient(base_url=asgi_server) as http:
        body = {"model": "m-fail-midstream", "input": "Hi", "stream": True}
        answer = await http.post(RESPONSES_URL, json=body, headers=bearer(api_key_secret))
    events = sse_events(answer.content)
    for event in events:
        validate_against("ResponseStreamEvent", event)
    error, failed = events[-2:]
    assert error["type"] == "error" and error["code"] == "upstream_disconnected"
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    [record] = await usage_records()
    assert record.finish_status == "failed"
    assert record.source == UsageRecord.Source.OPENAI_RESPONSES


async def test_whole_reply_upstream_error_is_openai_error_json(api_key_secret, failing_models):
    body = json.dumps({"model": "m-error-500", "input": "Hi"}).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    result = await asgi_request("POST", RESPONSES_URL, headers=headers, body=body)
    assert_error(result, 502)


# --- Client disconnect -----------------------------------------------------------------------------


async def test_client_disconnect_cancels_upstream_and_bills_what_was_streamed(
    api_key_secret, slow_model, slow_simulator
):
    before = await slow_simulator.astats()
    body = json.dumps({"model": "slow-model", "input": "Tell me a story", "stream": True}).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    result = await asgi_request("POST", RESPONSES_URL, headers=headers, body=body, disconnect_after_frames=4)

    assert result.status_code == 200
    assert len(result.frames) == 4
    [record] = await usage_records()
    assert record.finish_status == "cancelled"
    assert record.source == UsageRecord.Source.OPENAI_RESPONSES
    assert 2 <= record.completion_tokens < SLOW_REPLY_TOKENS
    stats = await poll_until(slow_simulator.astats, lambda stats: stats["active_streams"] == 0)
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1


async def test_reasoning_and_tool_call_bodies_match_the_schema_whole_and_streamed(
    api_key_secret, scripted_models, asgi_server
):
    body = {"model": "tool-model", "input": "Weather in Paris?", "tools": [WEATHER_TOOL]}
    async with httpx.AsyncClient(base_url=asgi_server) as http:
        whole = await http.post(RESPONSES_URL, json=body, headers=bearer(api_key_secret))
        streamed = await http.post(RESPONSES_URL, json={**body, "stream": True}, headers=bearer(api_key_secret))

    response = whole.json()
    validate_against("Response", response)
    reasoning, call = response["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "The user wants weather."}]
    assert (call["call_id"], call["arguments"], call["status"]) == ("call_1", '{"city":"Paris"}', "completed")
    assert response["tools"] == [{**WEATHER_TOOL}]
    assert response["usage"]["input_tokens"] == 7 and response["usage"]["output_tokens"] == 5
    events = sse_events(streamed.content)
    for event in events:
        validate_against("ResponseStreamEvent", event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    completed = events[-1]["response"]
    assert [item["type"] for item in completed["output"]] == ["reasoning", "function_call"]
    assert completed["output"][1]["arguments"] == '{"city":"Paris"}'
