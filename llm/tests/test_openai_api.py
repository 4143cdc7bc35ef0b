"""The OpenAI-compatible API (``/v1``, ``/dashboard/billing``) as clients see it.

Replies come from the LLM simulator process over real HTTP; a few tests use a scripted upstream
(a tiny aiohttp server, also over real HTTP) for what the simulator does not send: tool calls,
reasoning, and a record of the request body it received. Every response body is checked against
OpenAI's published schemas (``llm.tests.openai_schema``).
Fixtures: the root conftest (simulators, ``sim_model``, ``slow_model``, ``scripted_upstream``) and
``llm/tests/conftest.py`` (the other models, ``bad_credentials``, ``spending``).
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import openai
import pytest
from django.conf import settings
from django.test import AsyncClient, override_settings
from django.utils import timezone
from openai.types.chat import ChatCompletionMessageParam

from accounts.metering.budgets import budget_usage
from accounts.models import Budget, Organization, Team, TeamMembership, UsageRecord
from accounts.selectors import usage_current_month
from accounts.services import api_key_create
from chatbackend.asyncdb import run_sync
from llm.models import LLMModel, Provider
from llm.simulator import reply_text
from llm.simulator.replies import reply_word_indexes
from llm.simulator.wire import logprob_entry
from llm.tests.openai_schema import validate_against
from llm.tokens import tokenizer_for
from tests.factories import UPSTREAM_API_KEY, simulator_fault_model, usage_record_at
from tests.kit import (
    CHAT_URL,
    FAST_REPLY_TOKENS,
    SILENT_REPLY_TOKENS,
    SLOW_REPLY_TOKENS,
    access_token,
    asgi_request,
    assert_error,
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

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]


# --- POST /v1/chat/completions: streamed ------------------------------------------------------


async def test_stream_sends_openai_chunks_then_done_and_records_usage(api_key_secret, sim_model):
    client = AsyncClient()
    body = chat_body("sim-model", "Tell me about rivers", stream=True)
    response = await post_chat(client, body, bearer(api_key_secret))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    assert not response.has_header("Content-Encoding")
    chunks = chunk_objects(sse_data(await streamed_content(response)))

    assert len({chunk["id"] for chunk in chunks}) == 1
    request_id = chunks[0]["id"]
    assert request_id.startswith("chatcmpl-")
    assert {chunk["model"] for chunk in chunks} == {"sim-model"}  # the public name, not "sim-1"
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert all("usage" not in chunk for chunk in chunks)  # no include_usage: no usage at all
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])
    text = chunk_text(chunks)
    assert text == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "stop"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])

    [record] = await usage_records()
    assert record.request_id == request_id
    assert record.source == UsageRecord.Source.OPENAI_API
    assert record.api_key_id is not None
    assert record.model_name == "sim-model"
    assert record.completion_tokens == FAST_REPLY_TOKENS
    assert record.prompt_tokens > 0
    assert record.token_source == "provider"
    assert record.finish_status == "completed"
    assert record.message_id is None


async def test_stream_usage_chunk_only_with_include_usage(api_key_secret, sim_model):
    client = AsyncClient()
    body = chat_body("sim-model", stream=True, stream_options={"include_usage": True})
    response = await post_chat(client, body, bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(response)))

    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    [record] = await usage_records()
    assert usage_chunk["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
        # The provider reported usage: its breakdown goes along (none of it cached or reasoning here).
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert usage_chunk["usage"]["completion_tokens"] == FAST_REPLY_TOKENS
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in content_chunks)


async def test_a_provider_without_stream_usage_gets_no_stream_options_and_its_replies_are_counted(
    api_key_secret, scripted_upstream, simulator
):
    client = AsyncClient()
    scripted = await run_sync(
        Provider.objects.create, name="rejects-stream-options", base_url=scripted_upstream.base_url, stream_usage=False
    )
    await run_sync(LLMModel.objects.create, name="quiet", provider=scripted, upstream_model="plain")
    response = await post_chat(client, chat_body("quiet", stream=True), bearer(api_key_secret))
    assert response.status_code == 200
    await streamed_content(response)
    assert "stream_options" not in scripted_upstream.requests[-1]

    # The simulator sends usage only when asked, as OpenAI does: none comes, the reply is counted.
    sim = await run_sync(Provider.objects.create, name="sim-no-usage", base_url=simulator.base_url, stream_usage=False)
    await run_sync(LLMModel.objects.create, name="quiet-4o", provider=sim, upstream_model="gpt-4o-mini")
    body = chat_body("quiet-4o", stream=True, stream_options={"include_usage": True})
    response = await post_chat(client, body, bearer(api_key_secret))
    *content_chunks, usage_chunk = chunk_objects(sse_data(await streamed_content(response)))

    text = chunk_text(content_chunks)
    tokenizer = tokenizer_for(setting="o200k_base", model_name="")
    assert usage_chunk["usage"]["completion_tokens"] == tokenizer.count_text(text)
    assert usage_chunk["usage"]["prompt_tokens"] == tokenizer.count_prompt(body["messages"])
    # Counted by us, not reported: the breakdown is unknown and left out.
    assert "prompt_tokens_details" not in usage_chunk["usage"]
    assert "completion_tokens_details" not in usage_chunk["usage"]
    records = {record.model_name: record for record in await usage_records()}
    assert records["quiet-4o"].token_source == "counted"
    assert records["quiet-4o"].completion_tokens == tokenizer.count_text(text)
    assert records["quiet"].token_source == "provider"  # the scripted upstream reports usage unasked


async def test_stream_false_options_and_accept_headers_never_406(api_key_secret, sim_model):
    client = AsyncClient()
    for accept in ("application/json, text/event-stream", "*/*", "application/json", "text/event-stream"):
        headers = {**bearer(api_key_secret), "Accept": accept}
        response = await post_chat(client, chat_body("sim-model", stream=True), headers)
        assert response.status_code == 200, accept
        assert sse_data(await streamed_content(response))[-1] == "[DONE]"
        response = await post_chat(client, chat_body("sim-model"), headers)
        assert response.status_code == 200, accept
        validate_against("CreateChatCompletionResponse", json.loads(response.content))


async def test_cached_and_reasoning_tokens_reach_the_client_the_record_and_the_budget(user, api_key_secret, simulator):
    """The upstream reports 4 cached prompt tokens and 7 reasoning tokens (the simulator's usage knob,
    sent as the provider's extra header): the client's ``usage`` shows them in OpenAI's shape, the
    record stores them, its cost prices the cached part at the cached-input price, and the user's
    budget settles to exactly that cost."""
    provider = await run_sync(
        Provider.objects.create,
        name="sim-cache",
        base_url=simulator.base_url,
        extra_headers={"X-Simulator-Fault": "cached-tokens=4, reasoning-tokens=7"},
    )
    await run_sync(
        LLMModel.objects.create,
        name="cache-model",
        provider=provider,
        upstream_model="sim-1",
        input_price_per_million=Decimal(3),
        output_price_per_million=Decimal(15),
        cached_input_price_per_million=Decimal("0.3"),
    )
    budget = await run_sync(
        Budget.objects.create,
        name="monthly",
        subject_kind=Budget.SubjectKind.USER,
        subject_id=user.pk,
        period=Budget.Period.MONTHLY,
        limit_usd=Decimal(10),
    )
    client = AsyncClient()
    body = chat_body("cache-model", stream=True, stream_options={"include_usage": True})
    response = await post_chat(client, body, bearer(api_key_secret))
    *_, usage_chunk = chunk_objects(sse_data(await streamed_content(response)))
    validate_against("CreateChatCompletionStreamResponse", usage_chunk)
    whole = await post_chat(client, chat_body("cache-model"), bearer(api_key_secret))
    completion = json.loads(whole.content)
    validate_against("CreateChatCompletionResponse", completion)

    streamed, answered = await usage_records(model_name="cache-model")
    prompt = streamed.prompt_tokens
    for record, usage in ((streamed, usage_chunk["usage"]), (answered, completion["usage"])):
        validate_against("CompletionUsage", usage)
        assert usage == {
            "prompt_tokens": prompt,
            "completion_tokens": FAST_REPLY_TOKENS + 7,
            "total_tokens": prompt + FAST_REPLY_TOKENS + 7,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 7},
        }
        assert (record.prompt_tokens, record.completion_tokens) == (prompt, FAST_REPLY_TOKENS + 7)
        assert (record.cached_tokens, record.cache_creation_tokens, record.reasoning_tokens) == (4, 0, 7)
        assert record.token_source == "provider"
        # (fresh prompt * 3 + 4 cached * 0.3 + completion, reasoning included, * 15) / 1e6, exactly.
        expected = (
            Decimal(prompt - 4) * 3 + Decimal(4) * Decimal("0.3") + Decimal(FAST_REPLY_TOKENS + 7) * 15
        ) / Decimal(1_000_000)
        assert record.cost == expected
    assert prompt > 4

    settled = await poll_until(
        lambda: run_sync(budget_usage, budget), lambda usage: usage.reserved_usd == 0, what="the budget settled"
    )
    assert settled.spent_usd == streamed.cost + answered.cost


# --- POST /v1/chat/completions: whole ---------------------------------------------------------


async def test_non_stream_answers_one_chat_completion(api_key_secret, sim_model):
    client = AsyncClient()
    body = chat_body("sim-model", "What is a bridge?", stream=False)
    response = await post_chat(client, body, bearer(api_key_secret))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    completion = json.loads(response.content)
    validate_against("CreateChatCompletionResponse", completion)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "sim-model"
    [choice] = completion["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_text(body["messages"], FAST_REPLY_TOKENS)
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    [record] = await usage_records()
    assert record.request_id == completion["id"]
    assert completion["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": FAST_REPLY_TOKENS,
        "total_tokens": record.prompt_tokens + FAST_REPLY_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_model_default_parameters_apply_unless_the_client_sends_them(api_key_secret, simulator):
    provider = await run_sync(Provider.objects.create, name="sim-defaults", base_url=simulator.base_url)
    await run_sync(
        LLMModel.objects.create,
        name="short-model",
        provider=provider,
        upstream_model="sim-1",
        default_parameters={"max_tokens": 3},
    )
    client = AsyncClient()
    response = await post_chat(client, chat_body("short-model"), bearer(api_key_secret))
    completion = json.loads(response.content)
    assert completion["choices"][0]["finish_reason"] == "length"
    assert len(completion["choices"][0]["message"]["content"].split()) == 3

    response = await post_chat(client, chat_body("short-model", max_tokens=5), bearer(api_key_secret))
    assert len(json.loads(response.content)["choices"][0]["message"]["content"].split()) == 5


async def test_parameters_pass_through_and_adapter_owned_fields_do_not(api_key_secret, scripted_upstream):
    provider = await run_sync(Provider.objects.create, name="scripted", base_url=scripted_upstream.base_url)
    await run_sync(
        LLMModel.objects.create,
        name="scripted",
        provider=provider,
        upstream_model="plain",
        default_parameters={"temperature": 0.2, "seed": 7, "stream": False},
    )
    body = chat_body(
        "scripted",
        temperature=0.9,
        top_p=0.5,
        n=1,
        stop=["\n\n"],
        presence_penalty=0,
        user="u-1",
        top_k=40,  # not OpenAI's: passed through for providers that have it
        max_completion_tokens=None,
        stream_options={"include_usage": False},
    )
    response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
    assert response.status_code == 200
    sent = scripted_upstream.requests[-1]
    assert sent["model"] == "plain"
    assert sent["messages"] == body["messages"]
    assert sent["temperature"] == 0.9  # the client's value wins over the model's default
    assert sent["seed"] == 7  # the model's default fills in
    assert sent["top_p"] == 0.5 and sent["stop"] == ["\n\n"] and sent["user"] == "u-1" and sent["top_k"] == 40
    assert "n" not in sent and "max_completion_tokens" not in sent
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}  # the adapter's own


# --- Tool calls and reasoning (scripted upstream) ---------------------------------------------


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


async def test_stream_relays_tool_call_deltas_and_reasoning(api_key_secret, tool_model):
    client = AsyncClient()
    response = await post_chat(client, chat_body("tool-model", stream=True, tools=TOOLS), bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(response)))

    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "The user wants weather."}
    calls = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(call["function"]["arguments"] for call in calls) == '{"city":"Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_non_stream_merges_tool_calls(api_key_secret, tool_model):
    client = AsyncClient()
    response = await post_chat(client, chat_body("tool-model", tools=TOOLS, tool_choice="auto"), bearer(api_key_secret))
    completion = json.loads(response.content)
    validate_against("CreateChatCompletionResponse", completion)
    message = completion["choices"][0]["message"]
    assert message["content"] is None
    assert message["reasoning_content"] == "The user wants weather."
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert completion["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@pytest.mark.parametrize("upstream", ["tool-calls-repeating", "tool-calls-at-index-0"])
async def test_tool_calls_of_any_openai_compatible_server_reach_the_sdk_as_openai_streams_them(
    api_key_secret, scripted_upstream, asgi_server, upstream
):
    """The openai SDK's stream helper appends every string of a call's deltas, ``id`` and name too, and
    the whole answer merged by ``index``: a server that repeats them, or numbers every call 0, must
    still give two calls, the same streamed or whole, each with its id, ``type`` and name once."""
    provider = await run_sync(Provider.objects.create, name="scripted", base_url=scripted_upstream.base_url)
    await run_sync(LLMModel.objects.create, name="scripted", provider=provider, upstream_model=upstream)
    request: Any = {"model": "scripted", "messages": [{"role": "user", "content": "Weather and time?"}]}
    tools: Any = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        whole = await sdk.chat.completions.create(**request, tools=tools)
        async with sdk.chat.completions.stream(**request, tools=tools) as events:
            streamed = await events.get_final_completion()

    expected = [
        ("call_w", "function", "get_weather", '{"city":"Paris"}'),
        ("call_t", "function", "get_time", '{"tz":"CET"}'),
    ]
    for completion in (whole, streamed):
        assert completion.choices[0].finish_reason == "tool_calls"
        calls = completion.choices[0].message.tool_calls or []
        assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == expected


# --- Authentication ---------------------------------------------------------------------------


async def test_jwt_access_token_and_api_key_headers_authenticate(user, sim_model, api_key_secret):
    client = AsyncClient()
    token = access_token(user)
    for headers in (bearer(token), {"X-Api-Key": api_key_secret}, {"Api-Key": api_key_secret}):
        response = await post_chat(client, chat_body("sim-model"), headers)
        assert response.status_code == 200, headers
    records = await usage_records()
    assert len(records) == 3
    assert records[0].api_key_id is None  # a JWT has no key
    assert records[1].api_key_id is not None


async def test_bad_credentials_are_401_openai_errors_before_anything_else(bad_credentials, sim_model):
    client = AsyncClient()
    for case, (headers, code) in bad_credentials.items():
        # Even a malformed body is judged only after the credentials.
        for body in (chat_body("sim-model", stream=True), "{not json"):
            response = await post_chat(client, body, headers)
            try:
                assert_error(response, 401, code=code, type="authentication_error")
            except AssertionError as exc:
                raise AssertionError(f"case {case!r}: {exc}") from exc
            assert response["WWW-Authenticate"].startswith("Bearer"), case
    assert await usage_records() == []


# --- Bad requests: 4xx OpenAI errors, never 500 -----------------------------------------------


BAD_BODIES = [
    ("{not json", 400, "invalid_json", None),
    ("", 400, "invalid_json", None),
    ('["a list"]', 400, "invalid", None),
    (chat_body("sim-model", temperature="0.5"), 400, "invalid", "temperature"),
    (chat_body("sim-model", temperature=3), 400, "invalid", "temperature"),
    (chat_body("sim-model", max_tokens=1.5), 400, "invalid", "max_tokens"),
    (chat_body("sim-model", stream="yes"), 400, "invalid", "stream"),
    (chat_body("sim-model", stream_options={"include_usage": "yes"}, stream=True), 400, "invalid", None),
    (chat_body("sim-model", n=2), 400, "invalid", "n"),
    (chat_body("sim-model", top_logprobs=3), 400, "invalid", "top_logprobs"),  # needs logprobs: true
    (chat_body("sim-model", top_logprobs=3, logprobs=False), 400, "invalid", "top_logprobs"),
    (chat_body("sim-model", stop=["a", "b", "c", "d", "e"]), 400, "invalid", "stop"),
    (chat_body("sim-model", tools=[{"type": "function"}]), 400, "invalid", None),
    (chat_body("sim-model", tool_choice="sometimes"), 400, "invalid", "tool_choice"),
    (chat_body("sim-model", logit_bias={"50256": 500}), 400, "invalid", None),
    (chat_body("sim-model", response_format={"type": "json_schema"}), 400, "invalid", "response_format.json_schema"),
    (
        chat_body("sim-model", response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        400,
        "invalid",
        "response_format.json_schema.name",
    ),
    (
        chat_body("sim-model", response_format={"type": "json_schema", "json_schema": {"name": "a b"}}),
        400,
        "invalid",
        "response_format.json_schema.name",
    ),
    (
        chat_body("sim-model", response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": "{}"}}),
        400,
        "invalid",
        "response_format.json_schema.schema",
    ),
    ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid", "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid", "model"),
    ({"model": "sim-model"}, 400, "invalid", "messages"),
    ({"model": "sim-model", "messages": []}, 400, "invalid", "messages"),
    ({"model": "sim-model", "messages": "hi"}, 400, "invalid", "messages"),
    ({"model": "sim-model", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid", None),
    ({"model": "sim-model", "messages": [{"role": "user", "content": 42}]}, 400, "invalid", None),
    ({"model": "sim-model", "messages": [{"role": "user"}]}, 400, "invalid", None),
    ({"model": "sim-model", "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, 400, "invalid", None),
    ({"model": "sim-model", "messages": [{"role": "tool", "content": "42"}]}, 400, "invalid", None),
    (chat_body("no-such-model"), 404, "model_not_found", "model"),
    (chat_body("off-model"), 400, "model_disabled", "model"),
    (chat_body("off-provider-model"), 400, "model_disabled", "model"),
]


async def test_bad_requests_are_openai_errors(api_key_secret, disabled_models):
    # One test for the whole table: each transactional test costs a database flush.
    client = AsyncClient()
    for body, status, code, param in BAD_BODIES:
        for stream in (True, False):
            sent = {"stream": stream, **body} if isinstance(body, dict) else body
            response = await post_chat(client, sent, bearer(api_key_secret))
            try:
                error = assert_error(response, status, code=code, param=param)
            except AssertionError as exc:
                raise AssertionError(f"request {sent!r}: {exc}") from exc
            if code == "invalid" and isinstance(body, dict):
                assert error["param"], (sent, error)  # a field error always names its field
    assert await usage_records() == []


async def test_field_errors_name_the_nested_field(api_key_secret, sim_model):
    client = AsyncClient()
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 1}]}
    error = assert_error(await post_chat(client, body, bearer(api_key_secret)), 400, code="invalid")
    assert error["param"] == "messages.1.content"
    assert "fields" in error


async def test_oversized_body_is_413(api_key_secret, sim_model):
    client = AsyncClient()
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000):
        response = await post_chat(client, chat_body("sim-model", "x" * 2000), bearer(api_key_secret))
    assert_error(response, 413, code="request_too_large")


# --- Upstream failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("m-error-500", 502, "upstream_error"),
        ("m-error-503", 502, "upstream_error"),
        ("m-error-429", 429, "upstream_rate_limited"),
        ("m-error-400", 400, "upstream_error"),
        ("m-unreachable", 502, "upstream_unreachable"),
    ],
)
async def test_upstream_failure_before_output_is_a_plain_error_status(
    api_key_secret, failing_models, model, status, code
):
    client = AsyncClient()
    for stream in (True, False):
        response = await post_chat(client, chat_body(model, stream=stream), bearer(api_key_secret))
        assert not response.streaming
        assert_error(response, status, code=code)
    records = await usage_records()  # one record per request; nothing generated, nothing billed
    assert [(r.finish_status, r.total_tokens, r.cost) for r in records] == [("failed", 0, 0)] * 2


async def test_midstream_failure_sends_an_error_frame_and_ends(api_key_secret, failing_models):
    client = AsyncClient()
    response = await post_chat(client, chat_body("m-fail-midstream", stream=True), bearer(api_key_secret))
    assert response.status_code == 200
    payloads = sse_data(await streamed_content(response))

    assert "[DONE]" not in payloads
    *chunks, last = [json.loads(payload) for payload in payloads]
    for chunk in chunks:
        validate_against("CreateChatCompletionStreamResponse", chunk)
    assert len(chunks) == 3
    validate_against("ErrorResponse", last)
    assert last["error"]["code"] == "upstream_disconnected"

    [record] = await usage_records()  # tokens were generated: billed, as estimated
    assert record.finish_status == "failed"
    assert record.token_source == "estimated"
    assert record.completion_tokens >= 3


async def test_midstream_failure_without_stream_is_502(api_key_secret, failing_models):
    response = await post_chat(AsyncClient(), chat_body("m-fail-midstream"), bearer(api_key_secret))
    assert_error(response, 502, code="upstream_disconnected")
    [record] = await usage_records()
    assert record.finish_status == "failed"


async def test_a_providers_extra_headers_reach_the_upstream(api_key_secret, simulator):
    # The simulator fails as the header asks: the header went out with the request.
    await run_sync(simulator_fault_model, base_url=simulator.base_url, name="limited", fault="status=429")
    for stream in (True, False):
        response = await post_chat(AsyncClient(), chat_body("limited", stream=stream), bearer(api_key_secret))
        assert_error(response, 429, code="upstream_rate_limited")
        # The simulator asks for 1 s (retry-after-ms 1000, Retry-After 1): the client is told to wait as long.
        assert response["Retry-After"] == "1"


# --- logprobs pass through ---------------------------------------------------------------------


def expected_logprobs(messages: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """Return the simulator's ``logprobs.content`` for its reply to ``messages`` (``top`` alternatives)."""
    indexes = reply_word_indexes(messages, FAST_REPLY_TOKENS)
    return [logprob_entry(index, first=i == 0, top=top) for i, index in enumerate(indexes)]


async def test_logprobs_pass_through_streamed_and_whole(api_key_secret, sim_model):
    client = AsyncClient()
    body = chat_body("sim-model", "Tell me about rivers", logprobs=True, top_logprobs=2)
    expected = expected_logprobs(body["messages"], 2)

    response = await post_chat(client, {**body, "stream": True}, bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(response)))  # schema-validated
    streamed = []
    for chunk in chunks:
        [choice] = chunk["choices"]
        if choice["delta"].get("content"):
            assert choice["logprobs"]["refusal"] is None
            [entry] = choice["logprobs"]["content"]
            assert entry["token"] == choice["delta"]["content"]
            streamed.append(entry)
        else:  # the finish chunk
            assert choice["logprobs"] is None
    assert streamed == expected

    response = await post_chat(client, body, bearer(api_key_secret))
    completion = json.loads(response.content)
    validate_against("CreateChatCompletionResponse", completion)
    assert completion["choices"][0]["logprobs"] == {"content": expected, "refusal": None}
    assert "".join(entry["token"] for entry in expected) == completion["choices"][0]["message"]["content"]


async def test_logprobs_parse_with_the_openai_sdk(api_key_secret, sim_model, asgi_server):
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a river"}]
    expected = expected_logprobs([dict(m) for m in messages], 3)
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(
            model="sim-model", messages=messages, logprobs=True, top_logprobs=3
        )
        stream = await sdk.chat.completions.create(
            model="sim-model", messages=messages, logprobs=True, top_logprobs=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        plain = await sdk.chat.completions.create(model="sim-model", messages=messages)

    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [entry.model_dump() for entry in logprobs.content] == expected
    streamed = [
        entry.model_dump()
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert streamed == expected
    assert plain.choices[0].logprobs is None  # not asked for: none


# --- Client disconnect (through Django's real ASGI handler) -----------------------------------


async def test_client_disconnect_cancels_upstream_and_bills_what_was_streamed(
    api_key_secret, slow_model, slow_simulator
):
    before = await slow_simulator.astats()
    body = json.dumps(chat_body("slow-model", stream=True)).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    result = await asgi_request("POST", CHAT_URL, headers=headers, body=body, disconnect_after_frames=3)

    assert result.status_code == 200
    assert len(result.frames) == 3
    [record] = await usage_records()  # persisted before the handler returned
    assert record.finish_status == "cancelled"
    assert record.token_source == "estimated"
    assert 3 <= record.completion_tokens < SLOW_REPLY_TOKENS
    stats = await poll_until(slow_simulator.astats, lambda stats: stats["active_streams"] == 0)
    # The upstream request was closed, not finished.
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1
    assert stats["requests_completed"] == before["requests_completed"]


async def test_client_leaving_while_headers_are_sent_still_ends_the_reply(api_key_secret, slow_model, slow_simulator):
    # Django's ASGI handler then never iterates the body; it only calls response.close().
    before = await slow_simulator.astats()
    body = json.dumps(chat_body("slow-model", stream=True)).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    result = await asgi_request("POST", CHAT_URL, headers=headers, body=body, disconnect_on_start=True)

    assert result.status_code == 200 and result.content == b""
    [record] = await usage_records()  # persisted before the handler returned
    assert record.finish_status == "cancelled"
    stats = await poll_until(slow_simulator.astats, lambda stats: stats["active_streams"] == 0)
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1


async def test_a_stream_never_read_is_persisted_cancelled_when_the_response_closes(
    api_key_secret, slow_model, slow_simulator
):
    # What Django's ASGI handler does when the client leaves while the headers are being sent:
    # the body is never iterated, and only ``response.close()`` runs.
    before = await slow_simulator.astats()
    response = await post_chat(AsyncClient(), chat_body("slow-model", stream=True), bearer(api_key_secret))
    assert response.status_code == 200
    response.close()

    [record] = await poll_until(lambda: usage_records(finish_status="cancelled"))
    assert record.completion_tokens < SLOW_REPLY_TOKENS
    stats = await poll_until(slow_simulator.astats, lambda stats: stats["active_streams"] == 0)
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1


# --- A silent upstream: keep-alive comments until the first chunk -----------------------------


async def test_headers_go_out_and_comments_keep_a_silent_stream_alive(api_key_secret, silent_model):
    body = chat_body("silent-model", stream=True)
    with override_settings(OPENAI_FIRST_CHUNK_WAIT_SECONDS=0.2, SSE_KEEPALIVE_SECONDS=0.3):
        response = await post_chat(AsyncClient(), body, bearer(api_key_secret))
        assert response.status_code == 200  # after 0.2 s, long before the first token
        raw = await streamed_content(response)

    assert raw.startswith(b": keep-alive\n\n: keep-alive\n\n")
    chunks = chunk_objects(sse_data(raw))
    assert chunk_text(chunks) == reply_text(body["messages"], SILENT_REPLY_TOKENS)
    [record] = await usage_records()
    assert record.finish_status == "completed"


async def test_client_leaving_a_silent_stream_cancels_it(api_key_secret, silent_model, silent_simulator):
    before = await silent_simulator.astats()
    body = json.dumps(chat_body("silent-model", stream=True)).encode()
    headers = {"Content-Type": "application/json", **bearer(api_key_secret)}
    with override_settings(OPENAI_FIRST_CHUNK_WAIT_SECONDS=0.1, SSE_KEEPALIVE_SECONDS=0.1):
        result = await asgi_request("POST", CHAT_URL, headers=headers, body=body, disconnect_after_frames=1)

    assert result.status_code == 200
    assert result.content == b": keep-alive\n\n"
    [record] = await usage_records()
    assert record.finish_status == "cancelled"
    assert record.completion_tokens == 0
    stats = await poll_until(silent_simulator.astats, lambda stats: stats["active_streams"] == 0)
    assert stats["requests_disconnected"] == before["requests_disconnected"] + 1
    assert stats["requests_completed"] == before["requests_completed"]


# --- GET /v1/models ---------------------------------------------------------------------------


async def test_model_list_and_retrieve(api_key_secret, sim_model, disabled_models):
    client = AsyncClient()
    response = await client.get("/v1/models", headers=bearer(api_key_secret))
    assert response.status_code == 200
    listing = json.loads(response.content)
    validate_against("ListModelsResponse", listing)
    assert [model["id"] for model in listing["data"]] == ["sim-model"]
    assert listing["data"][0]["owned_by"] == sim_model.provider.name

    response = await client.get("/v1/models/sim-model", headers=bearer(api_key_secret))
    model = json.loads(response.content)
    validate_against("Model", model)
    assert model == listing["data"][0]

    assert_error(await client.get("/v1/models/nope", headers=bearer(api_key_secret)), 404, code="model_not_found")
    assert_error(await client.get("/v1/models/off-model", headers=bearer(api_key_secret)), 400, code="model_disabled")
    assert_error(await client.get("/v1/models"), 401, code="missing_api_key")
    assert_error(await client.get("/v1/models/sim-model"), 401, code="missing_api_key")


async def test_model_ids_with_slashes_resolve(api_key_secret, sim_model):
    await run_sync(
        LLMModel.objects.create, name="meta-llama/Llama-3-8B", provider=sim_model.provider, upstream_model="sim-1"
    )
    response = await AsyncClient().get("/v1/models/meta-llama/Llama-3-8B", headers=bearer(api_key_secret))
    assert response.status_code == 200
    model = json.loads(response.content)
    validate_against("Model", model)
    assert model["id"] == "meta-llama/Llama-3-8B"


# --- Unknown URLs and methods -----------------------------------------------------------------


async def test_unknown_urls_and_methods_are_openai_json(api_key_secret):
    client = AsyncClient()
    for method, path in [
        ("get", "/v1/nope"),
        ("post", "/v1/embeddings"),
        ("get", "/v1"),
        ("get", "/v1/models/"),
        ("post", "/dashboard/billing/credit_grants"),
    ]:
        response = await getattr(client, method)(path, headers=bearer(api_key_secret))
        error = assert_error(response, 404, code="unknown_url")
        assert path in error["message"]
    for method, path, allow in [
        ("put", CHAT_URL, "GET, POST, HEAD, OPTIONS"),  # GET lists stored completions
        ("patch", CHAT_URL, "GET, POST, HEAD, OPTIONS"),
        ("delete", "/v1/models", "GET, HEAD, OPTIONS"),
        ("post", "/v1/models/sim-model", "GET, HEAD, OPTIONS"),
        ("post", "/dashboard/billing/usage", "GET, HEAD, OPTIONS"),
        ("head", "/v1/responses", "POST, OPTIONS"),  # no GET: no HEAD either
    ]:
        response = await getattr(client, method)(path, headers=bearer(api_key_secret))
        assert response.status_code == 405, path
        if method != "head":  # a HEAD answer has no body
            assert_error(response, 405, code="method_not_allowed")
        assert response["Allow"] == allow, path
    response = await client.options(CHAT_URL)  # not a CORS preflight: no Origin
    assert response.status_code == 200
    assert response["Allow"] == "GET, POST, HEAD, OPTIONS"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/models", {}),
        ("/v1/models/sim-model", {}),
        ("/v1/models", {"anthropic-version": "2023-06-01"}),
        (CHAT_URL, {}),
        ("/dashboard/billing/usage", {}),
        ("/dashboard/billing/subscription", {}),
    ],
)
async def test_head_answers_as_get_without_a_body(api_key_secret, sim_model, path, headers):
    """HTTP's rule (RFC 9110, 9.3.2), which the DRF views and the health probes follow: the /v1
    GET endpoints answered HEAD with a 405 that named only GET in ``Allow``."""
    client = AsyncClient()
    got = await client.get(path, headers={**bearer(api_key_secret), **headers})
    head = await client.head(path, headers={**bearer(api_key_secret), **headers})
    assert got.status_code == head.status_code == 200
    assert head["Content-Type"] == got["Content-Type"]
    assert head.content == b""


# --- CORS -------------------------------------------------------------------------------------


async def test_cors_preflight_needs_no_key_and_responses_allow_the_origin(api_key_secret, sim_model):
    client = AsyncClient()
    response = await client.options(
        CHAT_URL,
        headers={
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] in ("*", "https://chat.example.com")
    allowed = {name.strip() for name in response["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "accept", "x-api-key"} <= allowed
    assert int(response["Access-Control-Max-Age"]) > 0

    headers = {**bearer(api_key_secret), "Origin": "https://chat.example.com"}
    response = await post_chat(client, chat_body("sim-model", stream=True), headers)
    assert response["Access-Control-Allow-Origin"] in ("*", "https://chat.example.com")
    # A web client may read the request id, Retry-After and OpenAI's rate-limit headers.
    exposed = {name.strip().lower() for name in response["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens"} <= exposed
    await streamed_content(response)


# The headers openai-node (``getPlatformHeaders``, the retry and timeout headers) and Anthropic's
# TypeScript SDK (the same, and its browser opt-in) put on every request they send from a browser.
BROWSER_SDK_HEADERS = {
    CHAT_URL: (
        "authorization,content-type,accept,x-stainless-arch,x-stainless-lang,x-stainless-os,"
        "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,"
        "x-stainless-timeout,x-stainless-helper-method"
    ),
    "/v1/messages": (
        "x-api-key,anthropic-version,anthropic-dangerous-direct-browser-access,anthropic-beta,content-type,"
        "accept,x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,"
        "x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout,"
        "x-stainless-helper-method,x-stainless-stream-helper"
    ),
}


@pytest.mark.parametrize(("path", "requested"), BROWSER_SDK_HEADERS.items())
async def test_cors_preflight_allows_every_header_the_official_sdks_send_from_a_browser(path, requested):
    """A browser refuses the request when one header its preflight names is not allowed: the official
    SDKs in a web page (``dangerouslyAllowBrowser``) failed here before sending anything."""
    response = await AsyncClient().options(
        path,
        headers={
            "Origin": "https://chat.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": requested,
        },
    )
    assert response.status_code == 200
    allowed = {name.strip() for name in response["Access-Control-Allow-Headers"].split(",")}
    assert set(requested.split(",")) - allowed == set()


# --- NextChat's billing endpoints -------------------------------------------------------------


async def test_billing_usage_is_the_callers_cents_in_the_range(api_key_secret, spending):
    client = AsyncClient()

    async def usage(query: str) -> Any:
        return await client.get(f"/dashboard/billing/usage?{query}", headers=bearer(api_key_secret))

    response = await usage("start_date=2026-03-01&end_date=2026-04-01")  # end exclusive
    assert response.status_code == 200
    assert json.loads(response.content) == {"object": "list", "total_usage": 75.0}
    assert json.loads((await usage("start_date=2026-03-02&end_date=2026-04-02")).content)["total_usage"] == 125.0
    assert json.loads((await usage("start_date=2025-01-01&end_date=2025-02-01")).content)["total_usage"] == 0

    for query, param in [
        ("start_date=2026-03-01&end_date=", "end_date"),
        ("end_date=2026-03-01", "end_date"),  # before the default start, this month's first day
        ("start_date=03/01/2026&end_date=2026-04-01", "start_date"),
        ("start_date=2026-03-01&end_date=2026-02-30", "end_date"),
        ("start_date=2026-04-01&end_date=2026-03-01", "end_date"),
    ]:
        assert_error(await usage(query), 400, param=param, code="invalid")
    assert_error(
        await client.get("/dashboard/billing/usage?start_date=2026-03-01&end_date=2026-04-01"),
        401,
        code="missing_api_key",
    )


@pytest.fixture
def spending_around_this_month(user, other_user) -> dict[str, dt.date]:
    """``user``'s records: 0.25 + 0.5 USD this month, 2 USD last month, 4 USD next; 9 USD of ``other_user``.

    Returns the month's bounds in ``TIME_ZONE``: ``{"start": first day, "end": next month's first day,
    "previous": last month's first day}``.
    """
    tz = timezone.get_default_timezone()
    start, end = usage_current_month()
    previous = (start - dt.timedelta(days=1)).replace(day=1)
    month_start = dt.datetime.combine(start, dt.time.min, tzinfo=tz)
    usage_record_at(month_start, user=user, cost=Decimal("0.25"))  # the month's first instant: in
    usage_record_at(timezone.now(), user=user, cost=Decimal("0.5"))
    usage_record_at(month_start - dt.timedelta(microseconds=1), user=user, cost=Decimal("2"))  # last month
    usage_record_at(dt.datetime.combine(end, dt.time.min, tzinfo=tz), user=user, cost=Decimal("4"))  # next month
    usage_record_at(timezone.now(), user=other_user, cost=Decimal("9"))
    return {"start": start, "end": end, "previous": previous}


async def test_billing_usage_without_dates_is_this_months(api_key_secret, spending_around_this_month):
    """NextChat's server mode drops the query string: the answer is this calendar month's usage."""
    client = AsyncClient()
    month = spending_around_this_month

    async def total_usage(query: str) -> Any:
        response = await client.get(f"/dashboard/billing/usage{query}", headers=bearer(api_key_secret))
        assert response.status_code == 200, response.content
        return json.loads(response.content)["total_usage"]

    # Only this month's rows of the caller: 0.25 + 0.5 USD; not last month's, next month's, nor other_user's.
    assert await total_usage("") == 75.0
    assert await total_usage("?") == 75.0
    # Either date alone: the other is this month's bound.
    assert await total_usage(f"?start_date={month['start']}") == 75.0
    assert await total_usage(f"?end_date={month['end']}") == 75.0
    assert await total_usage(f"?start_date={month['previous']}") == 275.0
    assert await total_usage(f"?start_date={month['previous']}&end_date={month['start']}") == 200.0


async def test_billing_subscription_reports_the_configured_limit(api_key_secret):
    client = AsyncClient()
    response = await client.get("/dashboard/billing/subscription", headers=bearer(api_key_secret))
    assert response.status_code == 200
    body = json.loads(response.content)
    assert body["object"] == "billing_subscription"
    assert body["has_payment_method"] is False
    assert body["hard_limit_usd"] == float(settings.OPENAI_BILLING_HARD_LIMIT_USD)
    with override_settings(OPENAI_BILLING_HARD_LIMIT_USD=25):
        response = await client.get("/dashboard/billing/subscription", headers=bearer(api_key_secret))
    assert json.loads(response.content)["hard_limit_usd"] == 25.0
    assert_error(await client.get("/dashboard/billing/subscription"), 401, code="missing_api_key")


async def test_billing_subscription_reports_the_tightest_monthly_budget(user, other_user, api_key_secret):
    key = await run_sync(lambda: user.api_keys.get())
    user_kind, key_kind = Budget.SubjectKind.USER, Budget.SubjectKind.API_KEY
    monthly, daily = Budget.Period.MONTHLY, Budget.Period.DAILY

    def budget(kind: str, subject_id: int, period: str, limit: str, *, enabled: bool = True) -> Any:
        return Budget.objects.create(
            name=f"{kind} {period} {limit}",
            subject_kind=kind,
            subject_id=subject_id,
            period=period,
            limit_usd=Decimal(limit),
            enabled=enabled,
        )

    async def hard_limit() -> float:
        response = await AsyncClient().get("/dashboard/billing/subscription", headers=bearer(api_key_secret))
        assert response.status_code == 200, response.content
        body = json.loads(response.content)
        assert body["hard_limit_usd"] == body["soft_limit_usd"] == body["system_hard_limit_usd"]
        return float(body["hard_limit_usd"])

    await run_sync(budget, user_kind, user.pk, monthly, "50")
    await run_sync(budget, user_kind, user.pk, daily, "1")  # not monthly: not the month's limit
    await run_sync(budget, user_kind, user.pk, monthly, "5", enabled=False)
    await run_sync(budget, user_kind, other_user.pk, monthly, "2")  # someone else's
    assert await hard_limit() == 50.0
    key_budget = await run_sync(budget, key_kind, key.pk, monthly, "20")  # the key's, tighter
    assert await hard_limit() == 20.0
    key_budget.enabled = False
    await run_sync(key_budget.save)
    assert await hard_limit() == 50.0


async def test_billing_subscription_counts_the_keys_team_and_the_organizations_monthly_budgets(user):
    """What a request counts against (``llm.metering.reply_metering``): also the key's team and the
    organization the request acts in; another team's or organization's budget is not the caller's."""

    def setup() -> tuple[str, Team, Team, Organization, Organization]:
        default = Organization.objects.default()
        acme = Organization.objects.create(name="Acme", slug="acme")
        team = Team.objects.create(organization=default, name="Research", slug="research")
        other_team = Team.objects.create(organization=default, name="Sales", slug="sales")
        TeamMembership.objects.create(team=team, user=user)
        secret = api_key_create(user=user, name="team key", team="research").secret
        return secret, team, other_team, default, acme

    secret, team, other_team, default, acme = await run_sync(setup)

    def budget(kind: str, subject_id: int, limit: str, organization: Organization) -> Any:
        return Budget.objects.create(
            name=f"{kind} {limit}",
            organization=organization,
            subject_kind=kind,
            subject_id=subject_id,
            limit_usd=Decimal(limit),
        )

    async def hard_limit(credential: str) -> float:
        response = await AsyncClient().get("/dashboard/billing/subscription", headers=bearer(credential))
        assert response.status_code == 200, response.content
        return float(json.loads(response.content)["hard_limit_usd"])

    Kind = Budget.SubjectKind
    await run_sync(budget, Kind.USER, user.pk, "50", default)
    await run_sync(budget, Kind.TEAM, other_team.pk, "3", default)  # a team the key is not assigned to
    await run_sync(budget, Kind.ORGANIZATION, acme.pk, "2", acme)  # an organization the request does not act in
    assert await hard_limit(secret) == 50.0
    await run_sync(budget, Kind.ORGANIZATION, default.pk, "40", default)
    assert await hard_limit(secret) == 40.0
    assert await hard_limit(access_token(user)) == 40.0  # a JWT acts in the organization too
    await run_sync(budget, Kind.TEAM, team.pk, "30", default)
    assert await hard_limit(secret) == 30.0
    # Without the key (a JWT), its team's budget does not limit the request.
    assert await hard_limit(access_token(user)) == 40.0


# --- Secrets never leave ----------------------------------------------------------------------


async def test_no_response_contains_the_provider_key_or_the_api_key(
    api_key_secret, simulator, failing_models, keyed_model
):
    provider = await run_sync(
        Provider.objects.create, name="sim-with-key", base_url=simulator.base_url, api_key=UPSTREAM_API_KEY
    )
    await run_sync(LLMModel.objects.create, name="secret-model", provider=provider, upstream_model="sim-1")
    client = AsyncClient()
    seen: list[bytes] = []
    for model in ("secret-model", "keyed-model", "m-error-500", "m-unreachable", "m-fail-midstream", "nope"):
        for stream in (True, False):
            response = await post_chat(client, chat_body(model, stream=stream), bearer(api_key_secret))
            body = await streamed_content(response) if response.streaming else response.content
            seen.append(body + str(response.items()).encode())
    for path in ("/v1/models", "/v1/models/secret-model", "/dashboard/billing/subscription"):
        response = await client.get(path, headers=bearer(api_key_secret))
        seen.append(response.content + str(response.items()).encode())

    keyed_error = b"".join(seen)
    assert b"The model provider rejected this server's credentials." in keyed_error  # the echoing 401 was exercised
    for blob in seen:
        assert UPSTREAM_API_KEY.encode() not in blob
        assert api_key_secret.encode() not in blob
