"""Every inbound API to every provider kind: the one engine in between, each side in its own wire format.

Inbound, each parsed by its official SDK over real HTTP (``asgi_server``): OpenAI's chat
completions and Responses (``openai``), Anthropic's Messages (``anthropic``). Upstream, the
simulator over real HTTP in each provider kind's format: OpenAI-compatible, Azure OpenAI,
Anthropic, Gemini. Each pair, streamed and whole, must give the simulator's reply text unchanged
and one usage row with the provider's token counts, recorded under the inbound API's source.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from accounts.models import UsageRecord
from llm.models import Provider
from llm.simulator import reply_text
from llm.simulator.gemini_wire import THOUGHT_SIGNATURE
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import FAST_REPLY_TOKENS, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

QUESTION = "Tell me about rivers"
KINDS = [Provider.Kind.OPENAI, Provider.Kind.AZURE_OPENAI, Provider.Kind.ANTHROPIC, Provider.Kind.GEMINI]
SOURCES = {
    "chat": UsageRecord.Source.OPENAI_API,
    "responses": UsageRecord.Source.OPENAI_RESPONSES,
    "messages": UsageRecord.Source.ANTHROPIC_API,
}


@pytest.fixture
def kind_models(db, simulator) -> None:
    """A model ``<kind>-model`` (upstream ``sim-1``) on a provider of every kind, all on the simulator."""
    for kind in KINDS:
        base_url = simulator.base_url if kind == Provider.Kind.OPENAI else simulator.root_url
        provider = ProviderFactory(name=f"sim-{kind}", kind=kind, base_url=base_url)
        LLMModelFactory(name=f"{kind}-model", provider=provider, upstream_model="sim-1")


async def _chat(server: str, key: str, model: str, stream: bool) -> str:
    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0) as sdk:
        messages: Any = [{"role": "user", "content": QUESTION}]
        if not stream:
            completion = await sdk.chat.completions.create(model=model, messages=messages)
            assert completion.choices[0].finish_reason == "stop"
            return completion.choices[0].message.content or ""
        parts = []
        chunks = await sdk.chat.completions.create(model=model, messages=messages, stream=True)
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)


async def _responses(server: str, key: str, model: str, stream: bool) -> str:
    async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0) as sdk:
        if not stream:
            response = await sdk.responses.create(model=model, input=QUESTION)
            assert response.status == "completed"
            return response.output_text
        async with sdk.responses.stream(model=model, input=QUESTION) as events:
            async for _ in events:
                pass
            final = await events.get_final_response()
        assert final.status == "completed"
        return final.output_text


async def _messages(server: str, key: str, model: str, stream: bool) -> str:
    async with anthropic.AsyncAnthropic(base_url=server, api_key=key, max_retries=0) as sdk:
        messages: Any = [{"role": "user", "content": QUESTION}]
        if not stream:
            message = await sdk.messages.create(model=model, max_tokens=256, messages=messages)
        else:
            async with sdk.messages.stream(model=model, max_tokens=256, messages=messages) as events:
                async for _ in events:
                    pass
                message = await events.get_final_message()
        assert message.stop_reason == "end_turn"
        return "".join(block.text for block in message.content if block.type == "text")


CLIENTS = {"chat": _chat, "responses": _responses, "messages": _messages}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("inbound", list(CLIENTS))
@pytest.mark.parametrize("kind", KINDS)
async def test_every_inbound_api_reaches_every_provider_kind(
    asgi_server: str, api_key_secret: str, kind_models: None, kind: str, inbound: str, stream: bool
) -> None:
    text = await CLIENTS[inbound](asgi_server, api_key_secret, f"{kind}-model", stream)

    assert text == reply_text([{"role": "user", "content": QUESTION}], FAST_REPLY_TOKENS)
    [record] = await usage_records()
    assert (record.model_name, record.source, record.finish_status) == (f"{kind}-model", SOURCES[inbound], "completed")
    assert (record.token_source, record.completion_tokens) == ("provider", FAST_REPLY_TOKENS)
    assert record.prompt_tokens > 0


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("kind", [Provider.Kind.ANTHROPIC, Provider.Kind.GEMINI])
async def test_a_whole_chat_completion_has_the_tool_calls_the_stream_helper_accumulates(
    asgi_server: str, api_key_secret: str, kind_models: None, kind: str
) -> None:
    """Gemini's thought signature (``extra_content.google.thought_signature``) rides on its tool call
    whether the client streams or not: a client that sends the call back without it loses the model's
    reasoning (the adapter then sends Google's skip placeholder)."""
    request: Any = {"model": f"{kind}-model", "messages": [{"role": "user", "content": QUESTION}]}
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        whole = await sdk.chat.completions.create(**request, tools=[WEATHER_TOOL])
        async with sdk.chat.completions.stream(**request, tools=[WEATHER_TOOL]) as events:
            async for _ in events:
                pass
            streamed = await events.get_final_completion()

    def calls(completion: Any) -> list[dict[str, Any]]:
        dumped = [call.model_dump(exclude={"id", "index"}) for call in completion.choices[0].message.tool_calls]
        for call in dumped:
            call["function"].pop("parsed_arguments", None)
        return dumped

    assert whole.choices[0].finish_reason == streamed.choices[0].finish_reason == "tool_calls"
    assert calls(whole) == calls(streamed)
    assert calls(whole)[0]["function"]["name"] == "get_weather"
    if kind == Provider.Kind.GEMINI:
        assert calls(whole)[0]["extra_content"] == {"google": {"thought_signature": THOUGHT_SIGNATURE}}
