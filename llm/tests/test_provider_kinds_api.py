"""``/v1/chat/completions`` through the whole engine to models whose provider kind is not ``openai``.

The engine (``llm.streaming``) is the same for every kind; these prove that a Gemini or Azure
OpenAI provider, picked by ``Provider.kind``, streams through it to an OpenAI client, with usage
recorded from the provider's own report.
"""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from llm.models import Provider
from llm.simulator import count_prompt_tokens, reply_text
from llm.simulator.gemini_wire import THOUGHT_TOKENS
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import (
    FAST_REPLY_TOKENS,
    bearer,
    chat_body,
    chunk_objects,
    chunk_text,
    post_chat,
    sse_data,
    streamed_content,
    usage_records,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def gemini_models(db, simulator):
    """``gem-model`` (upstream ``sim-1``) and ``gem-think`` (a thinking model) on a Gemini provider."""
    provider = ProviderFactory(name="gemini", kind=Provider.Kind.GEMINI, base_url=simulator.root_url, api_key="g-key")
    LLMModelFactory(name="gem-model", provider=provider, upstream_model="sim-1")
    LLMModelFactory(name="gem-think", provider=provider, upstream_model="sim-think")


@pytest.fixture
def azure_model(db, simulator):
    """``azure-model``: deployment ``sim-1`` on an Azure OpenAI provider."""
    provider = ProviderFactory(name="azure", kind=Provider.Kind.AZURE_OPENAI, base_url=simulator.root_url)
    return LLMModelFactory(name="azure-model", provider=provider, upstream_model="sim-1")


async def test_a_gemini_model_streams_through_the_engine(api_key_secret, gemini_models):
    body = chat_body("gem-model", "Tell me about rivers", stream=True, stream_options={"include_usage": True})
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))

    assert response.status_code == 200
    chunks = chunk_objects(sse_data(await streamed_content(response)))
    assert chunk_text(chunks) == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert {chunk["model"] for chunk in chunks} == {"gem-model"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == count_prompt_tokens(body["messages"])
    assert usage["completion_tokens"] == FAST_REPLY_TOKENS

    [record] = await usage_records()
    assert record.model_name == "gem-model" and record.token_source == "provider"
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], FAST_REPLY_TOKENS)
    assert record.finish_status == "completed"


async def test_gemini_thoughts_and_function_calls_reach_an_openai_client(api_key_secret, gemini_models):
    client = AsyncClient()
    body = chat_body("gem-think", "Weather?", stream=True, reasoning_effort="high")
    chunks = chunk_objects(sse_data(await streamed_content(await post_chat(client, body, bearer(api_key_secret)))))
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    reasoning = [delta["reasoning_content"] for delta in deltas if delta.get("reasoning_content")]
    assert len(reasoning) == THOUGHT_TOKENS
    assert chunk_text(chunks) == reply_text(body["messages"], FAST_REPLY_TOKENS)

    body = chat_body("gem-model", "Weather in Paris?", stream=True, tools=TOOLS)
    chunks = chunk_objects(sse_data(await streamed_content(await post_chat(client, body, bearer(api_key_secret)))))
    calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or []]
    [call] = calls
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "city value"}'}
    assert call["id"].startswith("call_") and call["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_an_azure_model_streams_through_the_engine(api_key_secret, azure_model):
    body = chat_body("azure-model", "Tell me about rivers", stream=True)
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    chunks = chunk_objects(sse_data(await streamed_content(response)))
    assert chunk_text(chunks) == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
