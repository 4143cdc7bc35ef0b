"""The simulator speaks OpenAI's wire format: checked with the official SDK and OpenAI's OpenAPI schemas."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from llm.simulator import count_prompt_tokens, reply_text
from llm.tests.openai_schema import validate_against
from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, SIMULATOR_API_KEY, sse_data

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about rivers."},
]


def sdk(sim: SimulatorProcess, api_key: str = "sk-anything") -> openai.AsyncOpenAI:
    # No retries: a retried 429/500 would hide the status under test and slow the test down.
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=api_key, max_retries=0)


async def raw_stream(sim: SimulatorProcess, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    """POST a streamed chat completion; return the response and each SSE ``data`` payload in order."""
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", f"{sim.base_url}/chat/completions", json=body, timeout=10) as response:
            raw = await response.aread()
    return response, sse_data(raw)


async def test_sdk_stream_matches_non_stream_reply(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="sim-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    # OpenAI's order: a role-only chunk, one chunk per token, an empty-delta finish chunk, usage.
    role_chunk, *token_chunks, finish_chunk, usage_chunk = chunks
    assert len(token_chunks) == FAST_REPLY_TOKENS > 1
    [role_choice] = role_chunk.choices
    assert role_choice.delta.model_dump(exclude_unset=True) == {"role": "assistant", "content": "", "refusal": None}
    assert role_choice.finish_reason is None and role_chunk.usage is None
    for chunk in token_chunks:
        [choice] = chunk.choices
        assert list(choice.delta.model_dump(exclude_unset=True)) == ["content"] and choice.delta.content
        assert choice.finish_reason is None and chunk.usage is None
    [finish_choice] = finish_chunk.choices
    assert finish_choice.delta.model_dump(exclude_unset=True) == {}
    assert finish_choice.finish_reason == "stop" and finish_chunk.usage is None
    streamed_text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert streamed_text == completion.choices[0].message.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == FAST_REPLY_TOKENS
    assert usage_chunk.usage.prompt_tokens == count_prompt_tokens(MESSAGES) == (3 + 3) + (4 + 3)
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + FAST_REPLY_TOKENS
    assert completion.usage is not None and completion.usage.model_dump() == usage_chunk.usage.model_dump()
    assert completion.choices[0].finish_reason == "stop"


async def test_reply_is_a_deterministic_function_of_the_last_user_message(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        first = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
        again = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
        other = await client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "Hello"}])
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    assert other.choices[0].message.content is not None
    assert len(other.choices[0].message.content.split()) == FAST_REPLY_TOKENS


async def test_stream_frames_match_openai_schema_and_framing(simulator: SimulatorProcess) -> None:
    body = {"model": "sim-1", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    response, payloads = await raw_stream(simulator, body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate_against("CreateChatCompletionStreamResponse", chunk)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    # include_usage: every chunk but the last carries "usage": null, the last has choices [].
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == FAST_REPLY_TOKENS
    choices = [c["choices"] for c in chunks[:-1]]
    assert all(len(choice) == 1 and choice[0]["index"] == 0 and choice[0]["logprobs"] is None for choice in choices)
    role, *tokens, finish = [choice[0] for choice in choices]
    assert role == {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }
    assert len(tokens) == FAST_REPLY_TOKENS
    assert all(list(t["delta"]) == ["content"] and t["finish_reason"] is None for t in tokens)
    contents = [t["delta"]["content"] for t in tokens]
    assert not contents[0].startswith(" ") and all(word.startswith(" ") for word in contents[1:])
    assert "".join(contents) == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert finish == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_stream_without_include_usage_has_no_usage_field(simulator: SimulatorProcess) -> None:
    _, payloads = await raw_stream(simulator, {"model": "sim-1", "messages": MESSAGES, "stream": True})
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and len(chunks) == 1 + FAST_REPLY_TOKENS + 1  # role, tokens, finish
    for chunk in chunks:
        validate_against("CreateChatCompletionStreamResponse", chunk)
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("limit_name", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_cuts_reply_with_finish_reason_length(simulator: SimulatorProcess, limit_name: str) -> None:
    async with sdk(simulator) as client:
        stream = await client.chat.completions.create(
            model="sim-1",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={limit_name: 3},
        )
        chunks = [chunk async for chunk in stream]
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES, extra_body={limit_name: 3})
    # The role chunk, three tokens, then the empty-delta finish chunk says why the reply ended.
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, None, None, "length"]
    assert chunks[-2].choices[0].delta.model_dump(exclude_unset=True) == {}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(MESSAGES, 3)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == reply_text(MESSAGES, 3)


async def test_non_stream_response_and_model_list_match_openai_schema(simulator: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=10) as client:
        completion = await client.post("/chat/completions", json={"model": "sim-1", "messages": MESSAGES})
        models = await client.get("/models")
    assert completion.status_code == 200 and models.status_code == 200
    validate_against("CreateChatCompletionResponse", completion.json())
    assert completion.json()["object"] == "chat.completion"
    assert completion.json()["choices"][0]["message"]["role"] == "assistant"
    validate_against("ListModelsResponse", models.json())
    assert [m["id"] for m in models.json()["data"]] == ["sim-1"]


@pytest.mark.parametrize(
    ("model", "error_class", "status"),
    [
        ("sim-error-500", openai.InternalServerError, 500),
        ("sim-error-429", openai.RateLimitError, 429),
        ("sim-error-400", openai.BadRequestError, 400),
        ("sim-error-404", openai.NotFoundError, 404),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_simulated_errors_surface_as_sdk_status_errors(
    simulator: SimulatorProcess, model: str, error_class: type[openai.APIStatusError], status: int, stream: bool
) -> None:
    async with sdk(simulator) as client:
        with pytest.raises(error_class) as caught:
            await client.chat.completions.create(model=model, messages=MESSAGES, stream=stream)
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["message"]
    validate_against("ErrorResponse", caught.value.response.json())
    if status == 429:
        assert caught.value.code == "rate_limit_exceeded"


async def test_wrong_or_missing_api_key_is_rejected_with_401(keyed_simulator: SimulatorProcess) -> None:
    async with sdk(keyed_simulator, api_key="sk-wrong-key-123456") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in caught.value.message
    async with httpx.AsyncClient(base_url=keyed_simulator.base_url, timeout=10) as client:
        missing = await client.get("/models")
    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    validate_against("ErrorResponse", missing.json())

    async with sdk(keyed_simulator, api_key=SIMULATOR_API_KEY) as client:
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
    assert completion.choices[0].message.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (json.dumps({"messages": MESSAGES}).encode(), None),
        (json.dumps({"model": "sim-1"}).encode(), "messages"),
        (json.dumps({"model": "sim-1", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "sim-1", "messages": MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "sim-1", "messages": MESSAGES, "stream_options": {}}).encode(), "stream_options"),
    ],
)
async def test_malformed_requests_get_openai_400(
    simulator: SimulatorProcess, content: bytes, param: str | None
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{simulator.base_url}/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400
    validate_against("ErrorResponse", response.json())
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param


async def test_fail_midstream_drops_the_connection_after_a_few_chunks(simulator: SimulatorProcess) -> None:
    body = {"model": "sim-fail-midstream", "messages": MESSAGES, "stream": True}
    received: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", f"{simulator.base_url}/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    received.append(line)
    assert response.status_code == 200
    chunks = [json.loads(line.removeprefix("data: ")) for line in received if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4  # role + 3 tokens, never finished
    assert "data: [DONE]" not in received


async def test_malformed_chunk_follows_one_token(simulator: SimulatorProcess) -> None:
    body = {"model": "sim-malformed-chunk", "messages": MESSAGES, "stream": True}
    response, payloads = await raw_stream(simulator, body)
    assert response.status_code == 200
    role, token = (json.loads(p) for p in payloads[:2])
    validate_against("CreateChatCompletionStreamResponse", role)
    validate_against("CreateChatCompletionStreamResponse", token)
    assert role["choices"][0]["delta"]["role"] == "assistant" and token["choices"][0]["delta"]["content"]
    with pytest.raises(ValueError):
        json.loads(payloads[2])
    assert payloads[3:] == ["[DONE]"]


async def test_stats_count_completed_requests(simulator: SimulatorProcess) -> None:
    before = await simulator.astats()
    await raw_stream(simulator, {"model": "sim-1", "messages": MESSAGES, "stream": True})
    after = await simulator.astats()
    assert after["requests_started"] == before["requests_started"] + 1
    assert after["requests_completed"] == before["requests_completed"] + 1
    assert after["requests_disconnected"] == before["requests_disconnected"]
    assert after["active_streams"] == 0


async def test_unknown_url_gets_openai_404(simulator: SimulatorProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{simulator.base_url}/chat/completions")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (GET /v1/chat/completions)"


# --- Faults on demand: the X-Simulator-Fault header ------------------------------------------------


def faulty(sim: SimulatorProcess, fault: str) -> openai.AsyncOpenAI:
    """Return an SDK client whose every request asks the simulator for ``fault``."""
    return openai.AsyncOpenAI(
        base_url=sim.base_url, api_key="sk-anything", max_retries=0, default_headers={"X-Simulator-Fault": fault}
    )


async def read_stream(
    sim: SimulatorProcess, fault: str, *, read_timeout: float = 10, body: dict[str, Any] | None = None
) -> tuple[httpx.Response, list[str], BaseException | None]:
    """POST a streamed completion with ``fault``; return the response, the ``data`` lines read and the
    error that ended the read (None when the body ended cleanly)."""
    body = body or {"model": "sim-1", "messages": MESSAGES, "stream": True}
    lines: list[str] = []
    timeout = httpx.Timeout(10, read=read_timeout)
    async with httpx.AsyncClient(timeout=timeout) as client:
        async with client.stream(
            "POST", f"{sim.base_url}/chat/completions", json=body, headers={"X-Simulator-Fault": fault}
        ) as response:
            try:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line.removeprefix("data: "))
            except httpx.HTTPError as exc:
                return response, lines, exc
    return response, lines, None


def content_tokens(lines: list[str]) -> list[str]:
    """Return the content of each content chunk among the ``data`` lines (the role chunk excluded)."""
    tokens = []
    for line in lines:
        if line.startswith("{") and line.endswith("}"):
            chunk = json.loads(line)
            validate_against("CreateChatCompletionStreamResponse", chunk)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens.append(chunk["choices"][0]["delta"]["content"])
    return tokens


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_fault_status_answers_openai_error_before_streaming(
    simulator: SimulatorProcess, status: int, error_class: type[openai.APIStatusError], stream: bool
) -> None:
    before = await simulator.astats()
    async with faulty(simulator, f"status={status}") as client:
        with pytest.raises(error_class) as caught:
            await client.chat.completions.create(model="sim-1", messages=MESSAGES, stream=stream)
    response = caught.value.response
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    validate_against("ErrorResponse", response.json())
    if status == 429:  # OpenAI's rate limit: its code, and when to retry
        assert caught.value.code == "rate_limit_exceeded"
        assert response.headers["Retry-After"] == "1" and response.headers["retry-after-ms"] == "1000"
    else:
        assert response.json()["error"]["type"] == "server_error" and "Retry-After" not in response.headers
    after = await simulator.astats()
    assert after["requests_failed"] == before["requests_failed"] + 1


async def test_fault_retry_after_sets_the_429_header(simulator: SimulatorProcess) -> None:
    async with faulty(simulator, "status=429; retry-after=7") as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="sim-1", messages=MESSAGES)
    assert caught.value.response.headers["Retry-After"] == "7"
    assert "try again in 7s" in caught.value.message


async def test_fault_drop_after_closes_the_connection_after_k_tokens(simulator: SimulatorProcess) -> None:
    response, lines, error = await read_stream(simulator, "drop-after=5")
    assert response.status_code == 200
    assert isinstance(error, httpx.RemoteProtocolError)  # the chunked body was never terminated
    tokens = content_tokens(lines)
    assert len(tokens) == 5 and "".join(tokens) == reply_text(MESSAGES, 5)
    assert "[DONE]" not in lines


async def test_fault_drop_after_zero_sends_only_the_role_chunk(simulator: SimulatorProcess) -> None:
    _, lines, error = await read_stream(simulator, "drop-after=0")
    assert isinstance(error, httpx.RemoteProtocolError)
    assert len(lines) == 1 and content_tokens(lines) == []


async def test_fault_malformed_line_follows_k_tokens_then_done(simulator: SimulatorProcess) -> None:
    _, default_lines, error = await read_stream(simulator, "malformed-line")
    assert error is None
    assert len(content_tokens(default_lines)) == 1  # after one token by default
    _, lines, error = await read_stream(simulator, "malformed-line=4")
    assert error is None
    assert len(content_tokens(lines)) == 4
    assert lines[-1] == "[DONE]"
    with pytest.raises(ValueError):
        json.loads(lines[-2])


async def test_fault_stall_longer_than_the_read_timeout_times_out_after_k_tokens(simulator: SimulatorProcess) -> None:
    _, lines, error = await read_stream(simulator, "stall=5, stall-after=3", read_timeout=0.5)
    assert isinstance(error, httpx.ReadTimeout)
    assert len(content_tokens(lines)) == 3


async def test_fault_stall_shorter_than_the_read_timeout_completes_the_reply(simulator: SimulatorProcess) -> None:
    _, lines, error = await read_stream(simulator, "stall=0.2")
    assert error is None and lines[-1] == "[DONE]"
    assert "".join(content_tokens(lines)) == reply_text(MESSAGES, FAST_REPLY_TOKENS)


async def test_fault_ttft_delays_the_first_token(simulator: SimulatorProcess) -> None:
    response, lines, error = await read_stream(simulator, "ttft=5", read_timeout=0.5)
    assert response.status_code == 200  # the headers come at once, the first token does not
    assert isinstance(error, httpx.ReadTimeout) and lines == []
    async with faulty(simulator, "ttft=0.2") as client:
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
    assert completion.choices[0].message.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)


async def test_faults_combine(simulator: SimulatorProcess) -> None:
    _, lines, error = await read_stream(simulator, "ttft=0.1, stall=0.1, stall-after=2; drop-after=4")
    assert isinstance(error, httpx.RemoteProtocolError)
    assert len(content_tokens(lines)) == 4
    # Whichever break comes first ends the stream.
    _, lines, error = await read_stream(simulator, "drop-after=6, malformed-line=2")
    assert error is None and len(content_tokens(lines)) == 2 and lines[-1] == "[DONE]"


async def test_faults_without_stream(simulator: SimulatorProcess) -> None:
    body = {"model": "sim-1", "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/chat/completions", json=body, headers={"X-Simulator-Fault": "drop-after=3"})
        malformed = await client.post("/chat/completions", json=body, headers={"X-Simulator-Fault": "malformed-line"})
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        malformed.json()


@pytest.mark.parametrize(
    "fault",
    ["explode", "status", "status=200", "status=abc", "drop-after=-1", "stall=nan", "ttft=inf", "cached-tokens=-1"],
)
async def test_bad_fault_header_is_an_openai_400(simulator: SimulatorProcess, fault: str) -> None:
    async with faulty(simulator, fault) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="sim-1", messages=MESSAGES, stream=True)
    validate_against("ErrorResponse", caught.value.response.json())
    assert "X-Simulator-Fault" in caught.value.message


async def test_usage_details_on_demand_parse_with_the_sdk(simulator: SimulatorProcess) -> None:
    """``cached-tokens`` / ``reasoning-tokens`` report a usage breakdown, streamed and whole, in OpenAI's shape."""
    prompt = count_prompt_tokens(MESSAGES)
    async with faulty(simulator, "cached-tokens=5, reasoning-tokens=7") as client:
        stream = await client.chat.completions.create(
            model="sim-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
    for usage in (chunks[-1].usage, whole.usage):
        assert usage is not None
        validate_against("CompletionUsage", usage.model_dump(exclude_none=True))
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, FAST_REPLY_TOKENS + 7)
        assert usage.total_tokens == prompt + FAST_REPLY_TOKENS + 7
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 5
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 7
    # Reasoning is reported, not streamed (as OpenAI's reasoning models do): the text is unchanged.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(
        MESSAGES, FAST_REPLY_TOKENS
    )

    async with faulty(simulator, "cached-tokens=100000") as client:
        capped = await client.chat.completions.create(model="sim-1", messages=MESSAGES)
    assert capped.usage is not None and capped.usage.prompt_tokens_details is not None
    assert capped.usage.prompt_tokens_details.cached_tokens == prompt  # never more than the prompt


# --- logprobs --------------------------------------------------------------------------------------


def assert_token_logprobs(entries: list[Any], text: str, top: int) -> None:
    """Check ``ChatCompletionTokenLogprob`` entries (SDK objects): one per word of ``text``, ``top`` alternatives."""
    assert "".join(entry.token for entry in entries) == text
    assert len(entries) == len(text.split())
    for entry in entries:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob < 0
        assert len(entry.top_logprobs) == top
        if top:
            assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
            alternatives = [alt.logprob for alt in entry.top_logprobs]
            assert alternatives == sorted(alternatives, reverse=True)
            assert len({alt.token for alt in entry.top_logprobs}) == top


@pytest.mark.parametrize("top", [0, 3])
async def test_logprobs_stream_and_whole_in_openai_format(simulator: SimulatorProcess, top: int) -> None:
    options: dict[str, Any] = {"logprobs": True, "top_logprobs": top}
    async with sdk(simulator) as client:
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES, **options)
        stream = await client.chat.completions.create(
            model="sim-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **options
        )
        chunks = [chunk async for chunk in stream]
    text = reply_text(MESSAGES, FAST_REPLY_TOKENS)
    [choice] = completion.choices
    assert choice.message.content == text
    assert choice.logprobs is not None and choice.logprobs.refusal is None and choice.logprobs.content is not None
    assert_token_logprobs(choice.logprobs.content, text, top)

    role_chunk, *token_chunks, finish_chunk, _ = chunks
    assert role_chunk.choices[0].logprobs is None and finish_chunk.choices[0].logprobs is None
    streamed = []
    for chunk in token_chunks:
        logprobs = chunk.choices[0].logprobs
        assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 1
        assert logprobs.content[0].token == chunk.choices[0].delta.content
        streamed.extend(logprobs.content)
    # The same tokens and numbers either way.
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in choice.logprobs.content]

    # And the raw JSON matches OpenAI's schemas.
    body = {"model": "sim-1", "messages": MESSAGES, **options}
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=10) as http:
        whole = (await http.post("/chat/completions", json=body)).json()
    validate_against("CreateChatCompletionResponse", whole)
    _, payloads = await raw_stream(simulator, {**body, "stream": True})
    for payload in payloads[:-1]:
        validate_against("CreateChatCompletionStreamResponse", json.loads(payload))


async def test_no_logprobs_unless_asked(simulator: SimulatorProcess) -> None:
    async with sdk(simulator) as client:
        completion = await client.chat.completions.create(model="sim-1", messages=MESSAGES, logprobs=False)
    assert completion.choices[0].logprobs is None
    _, payloads = await raw_stream(simulator, {"model": "sim-1", "messages": MESSAGES, "stream": True})
    assert all(json.loads(p)["choices"][0]["logprobs"] is None for p in payloads[:-1])


@pytest.mark.parametrize("fields", [{"top_logprobs": 2}, {"logprobs": "yes"}, {"logprobs": True, "top_logprobs": 21}])
async def test_bad_logprobs_parameters_are_openai_400(simulator: SimulatorProcess, fields: dict[str, Any]) -> None:
    body = {"model": "sim-1", "messages": MESSAGES, **fields}
    async with httpx.AsyncClient(base_url=simulator.base_url, timeout=10) as http:
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == 400
    validate_against("ErrorResponse", response.json())
    assert response.json()["error"]["param"] in {"logprobs", "top_logprobs"}
