"""A model that declines (OpenAI's ``refusal``), cites sources (``annotations``) and names its backend
(``system_fingerprint``), as the official SDKs see it on every inbound API.

The upstream is the simulator over real HTTP, told by the provider's extra header
(``X-Simulator-Fault: refusal`` / ``annotations``) to answer a refusal or a cited reply; it sends
``system_fingerprint`` on every chunk, as OpenAI does. The SDKs talk to the ASGI app served by
uvicorn (``asgi_server``); raw bodies are checked against OpenAI's published schemas.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
from django.test import AsyncClient

from chatbackend.asyncdb import run_sync
from conversations.payloads import delta_payload
from llm.providers import ChatChunk
from llm.simulator import reply_text
from llm.simulator.wire import CITATION_URL, REFUSAL_TEXT, SYSTEM_FINGERPRINT, Fault, read_fault
from llm.streaming import ReplyDelta
from llm.tests.openai_schema import validate_against
from llm.tests.test_openai_responses import sse_events as responses_sse_events
from tests.factories import simulator_fault_model
from tests.kit import FAST_REPLY_TOKENS, bearer, chat_body, chunk_objects, post_chat, sse_data, streamed_content

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]


class Answer(pydantic.BaseModel):
    city: str


@pytest.fixture
async def refusing_model(simulator) -> str:
    model = await run_sync(simulator_fault_model, base_url=simulator.base_url, name="refusing-model", fault="refusal")
    return model.name


@pytest.fixture
async def citing_model(simulator) -> str:
    model = await run_sync(simulator_fault_model, base_url=simulator.base_url, name="citing-model", fault="annotations")
    return model.name


def sdk_for(server: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


# --- /v1/chat/completions -----------------------------------------------------------------------


async def test_a_refusal_reaches_the_sdks_parse_and_stream_helper(api_key_secret, refusing_model, asgi_server):
    messages: list[Any] = [{"role": "user", "content": "Where do rivers start?"}]
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model=refusing_model, messages=messages)
        parsed = await sdk.chat.completions.parse(model=refusing_model, messages=messages, response_format=Answer)
        async with sdk.chat.completions.stream(
            model=refusing_model, messages=messages, response_format=Answer
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_completion()

    body = raw.http_response.json()
    validate_against("CreateChatCompletionResponse", body)
    [choice] = body["choices"]
    assert choice["message"]["refusal"] == REFUSAL_TEXT
    assert choice["message"]["content"] is None  # as OpenAI answers a refusal
    assert choice["finish_reason"] == "stop"
    assert body["system_fingerprint"] == SYSTEM_FINGERPRINT

    message = parsed.choices[0].message
    assert message.refusal == REFUSAL_TEXT
    assert message.parsed is None

    deltas = [event.delta for event in events if event.type == "refusal.delta"]
    assert "".join(deltas) == REFUSAL_TEXT
    assert len(deltas) > 1  # streamed as it came, not in one piece
    [done] = [event for event in events if event.type == "refusal.done"]
    assert done.refusal == REFUSAL_TEXT
    assert not [event for event in events if event.type == "content.delta"]
    assert final.choices[0].message.refusal == REFUSAL_TEXT
    assert final.system_fingerprint == SYSTEM_FINGERPRINT  # the helper keeps the last chunk's


async def test_streamed_refusal_chunks_match_openais_schema_and_carry_the_fingerprint(api_key_secret, refusing_model):
    body = chat_body(refusing_model, stream=True, stream_options={"include_usage": True})
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(response)))  # each one schema-validated

    assert {chunk.get("system_fingerprint") for chunk in chunks} == {SYSTEM_FINGERPRINT}
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("refusal") or "" for delta in deltas) == REFUSAL_TEXT
    assert not any(delta.get("content") for delta in deltas)
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == len(REFUSAL_TEXT.split())  # the provider's report


async def test_annotations_and_the_fingerprint_pass_through_whole_and_streamed(
    api_key_secret, citing_model, asgi_server
):
    messages: list[Any] = [{"role": "user", "content": "Cite a source"}]
    text = reply_text(messages, FAST_REPLY_TOKENS)
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model=citing_model, messages=messages)
        stream = await sdk.chat.completions.create(model=citing_model, messages=messages, stream=True)
        chunks = [chunk async for chunk in stream]

    body = raw.http_response.json()
    validate_against("CreateChatCompletionResponse", body)
    message = body["choices"][0]["message"]
    assert message["content"] == text
    assert message["refusal"] is None
    citation = {"start_index": 0, "end_index": len(text), "url": CITATION_URL, "title": "Simulated source"}
    assert message["annotations"] == [{"type": "url_citation", "url_citation": citation}]
    assert raw.parse().choices[0].message.annotations[0].url_citation.url == CITATION_URL
    assert body["system_fingerprint"] == SYSTEM_FINGERPRINT

    assert {chunk.system_fingerprint for chunk in chunks} == {SYSTEM_FINGERPRINT}
    streamed = [
        annotation
        for chunk in chunks
        for choice in chunk.choices
        for annotation in (choice.delta.model_extra or {}).get("annotations") or ()
    ]
    assert streamed == [{"type": "url_citation", "url_citation": citation}]
    assert "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices) == text


# --- /v1/responses ------------------------------------------------------------------------------


async def test_a_refusal_is_a_refusal_part_on_the_responses_api(api_key_secret, refusing_model, asgi_server):
    async with sdk_for(asgi_server, api_key_secret) as sdk:
        raw = await sdk.responses.with_raw_response.create(model=refusing_model, input="Where do rivers start?")
        async with sdk.responses.stream(model=refusing_model, input="Where do rivers start?") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()

    validate_against("Response", raw.http_response.json())
    response = raw.parse()
    [item] = response.output
    assert item.type == "message"
    [part] = item.content
    assert part.type == "refusal"
    assert part.refusal == REFUSAL_TEXT
    assert response.output_text == ""

    async with httpx.AsyncClient(base_url=asgi_server) as http:
        body = {"model": refusing_model, "input": "Where do rivers start?", "stream": True}
        answer = await http.post("/v1/responses", json=body, headers=bearer(api_key_secret))
    raw_events = responses_sse_events(answer.content)
    for event in raw_events:
        validate_against("ResponseStreamEvent", event)
    assert [event["part"]["type"] for event in raw_events if event["type"] == "response.content_part.added"] == [
        "refusal"
    ]
    deltas = [event.delta for event in events if event.type == "response.refusal.delta"]
    assert "".join(deltas) == REFUSAL_TEXT
    [done] = [event for event in events if event.type == "response.refusal.done"]
    assert done.refusal == REFUSAL_TEXT
    [final_item] = final.output
    assert final_item.type == "message" and final_item.content[0].type == "refusal"
    assert final_item.content[0].refusal == REFUSAL_TEXT


# --- /v1/messages -------------------------------------------------------------------------------


async def test_a_refusal_is_text_and_a_refusal_stop_on_the_messages_api(api_key_secret, refusing_model, asgi_server):
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as client:
        params: dict[str, Any] = {
            "model": refusing_model,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Where do rivers start?"}],
        }
        message = await client.messages.create(**params)
        async with client.messages.stream(**params) as stream:
            texts = [text async for text in stream.text_stream]
            streamed = await stream.get_final_message()

    assert message.stop_reason == "refusal"
    [block] = message.content
    assert block.type == "text" and block.text == REFUSAL_TEXT
    assert "".join(texts) == REFUSAL_TEXT
    assert streamed.stop_reason == "refusal"
    assert [block.model_dump() for block in streamed.content] == [block.model_dump()]


# --- Conversations ------------------------------------------------------------------------------


def test_a_conversation_delta_shows_a_refusal_as_its_text():
    assert delta_payload(ReplyDelta([ChatChunk(refusal="I can't")])) == ("reply.delta", {"content": "I can't"})
    chunks = [ChatChunk(refusal="I can't"), ChatChunk(refusal=" help"), ChatChunk(finish_reason="stop")]
    assert delta_payload(ReplyDelta(chunks)) == ("reply.delta", {"content": "I can't help"})


# --- The simulator's knobs ----------------------------------------------------------------------


def test_the_simulators_refusal_and_annotations_directives_parse():
    assert read_fault("refusal") == Fault(refusal=True)
    assert read_fault("annotations, refusal=0") == Fault(annotations=True)
    assert read_fault("refusal=x") == "refusal='x' is not a number"
