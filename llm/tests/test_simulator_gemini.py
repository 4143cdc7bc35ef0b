"""The simulator speaks Gemini's and Azure OpenAI's wire formats: parsed by the official SDKs over real HTTP.

Gemini with ``google-genai`` (``generate_content`` / ``generate_content_stream``, sync and
``client.aio``), Azure with the ``openai`` SDK's ``AzureOpenAI`` clients.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import errors, types

from llm.simulator import count_prompt_tokens, reply_text
from llm.simulator.gemini_wire import CACHE_MIN_WORDS, THOUGHT_SIGNATURE, THOUGHT_TOKENS
from llm.simulator.replies import reply_word_indexes
from llm.simulator.wire import logprob_entry
from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, SIMULATOR_API_KEY

SYSTEM = "You are terse."
PROMPT = "Tell me about rivers."
# The same conversation as OpenAI messages: the simulator's words and prompt tokens are theirs.
MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            description="The weather in a city.",
            parameters=types.Schema(
                type=types.Type.OBJECT,
                properties={
                    "city": types.Schema(type=types.Type.STRING),
                    "days": types.Schema(type=types.Type.INTEGER),
                },
            ),
        )
    ]
)
# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def client(sim: SimulatorProcess, api_key: str = "gemini-key", **headers: str) -> genai.Client:
    """Return a google-genai client for the simulator (no retries: a retried error would hide its status)."""
    # v1beta, as the adapter calls it (the SDK's default is v1, which the simulator serves too).
    options = types.HttpOptions(base_url=sim.root_url, api_version="v1beta", headers=headers or None, timeout=10_000)
    return genai.Client(api_key=api_key, http_options=options)


def config(**fields: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(system_instruction=SYSTEM, **fields)


def test_stream_and_whole_reply_carry_the_same_text_finish_and_usage(simulator: SimulatorProcess) -> None:
    with client(simulator) as gemini:
        chunks = list(gemini.models.generate_content_stream(model="sim-1", contents=PROMPT, config=config()))
    api_v1 = genai.Client(api_key="gemini-key", http_options=types.HttpOptions(base_url=simulator.root_url))
    with api_v1:
        whole = api_v1.models.generate_content(model="sim-1", contents=PROMPT, config=config())

    assert len(chunks) == FAST_REPLY_TOKENS
    streamed = "".join(chunk.text or "" for chunk in chunks)
    assert streamed == whole.text == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert len({chunk.response_id for chunk in chunks}) == 1 and chunks[0].model_version == "sim-1"
    for chunk in chunks[:-1]:
        [candidate] = chunk.candidates or []
        assert candidate.finish_reason is None
        assert candidate.content is not None and candidate.content.role == "model"
    last = chunks[-1]
    assert last.candidates is not None and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert whole.candidates is not None and whole.candidates[0].finish_reason == types.FinishReason.STOP
    for usage in (last.usage_metadata, whole.usage_metadata):
        assert usage is not None
        assert usage.prompt_token_count == count_prompt_tokens(MESSAGES)
        assert usage.candidates_token_count == FAST_REPLY_TOKENS
        assert usage.total_token_count == usage.prompt_token_count + FAST_REPLY_TOKENS
        assert usage.thoughts_token_count is None and usage.cached_content_token_count is None
    # Before the last chunk, Gemini reports the prompt only.
    assert chunks[0].usage_metadata is not None and chunks[0].usage_metadata.candidates_token_count is None


async def test_the_async_client_streams_the_same_reply(simulator: SimulatorProcess) -> None:
    gemini = client(simulator)
    try:
        stream = await gemini.aio.models.generate_content_stream(model="sim-1", contents=PROMPT, config=config())
        chunks = [chunk async for chunk in stream]
        whole = await gemini.aio.models.generate_content(model="sim-1", contents=PROMPT, config=config())
    finally:
        await gemini.aio.aclose()
    assert "".join(chunk.text or "" for chunk in chunks) == whole.text == reply_text(MESSAGES, FAST_REPLY_TOKENS)


def test_a_thinking_model_sends_thought_parts_when_asked_and_counts_them_always(simulator: SimulatorProcess) -> None:
    thinking = types.ThinkingConfig(include_thoughts=True, thinking_budget=1024)
    with client(simulator) as gemini:
        chunks = list(
            gemini.models.generate_content_stream(
                model="sim-think", contents=PROMPT, config=config(thinking_config=thinking)
            )
        )
        whole = gemini.models.generate_content(
            model="sim-think", contents=PROMPT, config=config(thinking_config=thinking)
        )
        silent = gemini.models.generate_content(model="sim-think", contents=PROMPT, config=config())

    parts = [part for chunk in chunks for part in (chunk.candidates or [])[0].content.parts or []]  # type: ignore[union-attr]
    thoughts = [part.text for part in parts if part.thought]
    assert len(thoughts) == THOUGHT_TOKENS and parts[:THOUGHT_TOKENS] == [p for p in parts if p.thought]
    answer = "".join(part.text or "" for part in parts if not part.thought)
    assert answer == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    # The SDK's .text leaves thoughts out; the whole reply has one thought part, then the answer.
    assert whole.text == answer
    whole_parts = whole.candidates[0].content.parts  # type: ignore[index,union-attr]
    assert whole_parts is not None and whole_parts[0].thought and whole_parts[0].text == "".join(thoughts)
    for usage in (chunks[-1].usage_metadata, whole.usage_metadata, silent.usage_metadata):
        assert usage is not None and usage.thoughts_token_count == THOUGHT_TOKENS
        assert usage.total_token_count == count_prompt_tokens(MESSAGES) + FAST_REPLY_TOKENS + THOUGHT_TOKENS
    silent_parts = silent.candidates[0].content.parts  # type: ignore[index,union-attr]
    assert silent_parts is not None and not any(part.thought for part in silent_parts)  # not asked for


def test_declared_functions_are_called_then_answered(simulator: SimulatorProcess) -> None:
    tools_config = config(
        tools=[WEATHER], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)
    )
    with client(simulator) as gemini:
        chunks = list(gemini.models.generate_content_stream(model="sim-1", contents=PROMPT, config=tools_config))
        whole = gemini.models.generate_content(model="sim-1", contents=PROMPT, config=tools_config)
        assert whole.candidates is not None and whole.candidates[0].content is not None
        turn = [
            types.Content(role="user", parts=[types.Part(text=PROMPT)]),
            whole.candidates[0].content,
            types.Content(
                role="user",
                parts=[types.Part.from_function_response(name="get_weather", response={"forecast": "rain"})],
            ),
        ]
        answered = gemini.models.generate_content(model="sim-1", contents=turn, config=tools_config)
        unused = gemini.models.generate_content(
            model="sim-1",
            contents=PROMPT,
            config=config(
                tools=[WEATHER],
                tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="NONE")),
            ),
        )

    [chunk] = chunks
    for response in (chunk, whole):
        [call] = response.function_calls or []
        assert call.name == "get_weather" and call.args == {"city": "city value", "days": 1}
        assert response.candidates is not None and response.candidates[0].finish_reason == types.FinishReason.STOP
        [part] = response.candidates[0].content.parts  # type: ignore[union-attr,misc]
        assert part.thought_signature == base64.b64decode(THOUGHT_SIGNATURE)
    assert answered.function_calls is None and answered.text
    assert unused.function_calls is None and unused.text == reply_text(MESSAGES, FAST_REPLY_TOKENS)


def test_max_output_tokens_cuts_the_reply(simulator: SimulatorProcess) -> None:
    with client(simulator) as gemini:
        response = gemini.models.generate_content(model="sim-1", contents=PROMPT, config=config(max_output_tokens=3))
    assert response.text == reply_text(MESSAGES, 3)
    assert response.candidates is not None and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata is not None and response.usage_metadata.candidates_token_count == 3


def test_a_long_system_instruction_is_reported_as_cached(simulator: SimulatorProcess) -> None:
    system = " ".join(["rule"] * CACHE_MIN_WORDS)
    with client(simulator) as gemini:
        response = gemini.models.generate_content(
            model="sim-1", contents=PROMPT, config=types.GenerateContentConfig(system_instruction=system)
        )
    usage = response.usage_metadata
    assert usage is not None and usage.cached_content_token_count == CACHE_MIN_WORDS + 3
    assert usage.prompt_token_count == CACHE_MIN_WORDS + 3 + len(PROMPT.split()) + 3  # cached tokens included


def test_images_are_accepted_as_inline_data(simulator: SimulatorProcess) -> None:
    contents = [types.Part.from_bytes(data=PNG, mime_type="image/png"), PROMPT]
    with client(simulator) as gemini:
        response = gemini.models.generate_content(model="sim-1", contents=contents)
    assert response.text == reply_text([{"role": "user", "content": PROMPT}], FAST_REPLY_TOKENS)


@pytest.mark.parametrize(
    ("model", "error", "code", "status", "quoted"),
    [
        ("sim-error-429", errors.ClientError, 429, "RESOURCE_EXHAUSTED", "exceeded your current quota"),
        ("sim-error-400", errors.ClientError, 400, "INVALID_ARGUMENT", "Simulated error 400"),
        ("sim-error-404", errors.ClientError, 404, "NOT_FOUND", "is not found"),
        ("sim-error-500", errors.ServerError, 500, "INTERNAL", "internal error"),
        ("sim-error-503", errors.ServerError, 503, "UNAVAILABLE", "overloaded"),
    ],
)
def test_errors_are_googles_shape(
    simulator: SimulatorProcess, model: str, error: type[errors.APIError], code: int, status: str, quoted: str
) -> None:
    before = simulator.stats()
    with client(simulator) as gemini, pytest.raises(error) as caught:
        list(gemini.models.generate_content_stream(model=model, contents=PROMPT))
    assert (caught.value.code, caught.value.status) == (code, status)
    assert quoted in (caught.value.message or "")
    if code == 429:
        assert caught.value.details["error"]["details"] == [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
        ]
    after = simulator.stats()
    assert after["requests_failed"] == before["requests_failed"] + 1


def test_the_fault_header_works_on_gemini_routes(simulator: SimulatorProcess) -> None:
    with client(simulator, **{"X-Simulator-Fault": "status=429, retry-after=7"}) as gemini:
        with pytest.raises(errors.ClientError) as caught:
            gemini.models.generate_content(model="sim-1", contents=PROMPT)
    assert caught.value.code == 429 and "retry in 7s" in (caught.value.message or "")

    with client(simulator, **{"X-Simulator-Fault": "bogus"}) as gemini:
        with pytest.raises(errors.ClientError) as caught:
            gemini.models.generate_content(model="sim-1", contents=PROMPT)
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert "unknown directive 'bogus'" in (caught.value.message or "")


def test_the_key_is_required_in_x_goog_api_key(keyed_simulator: SimulatorProcess) -> None:
    with client(keyed_simulator, api_key=SIMULATOR_API_KEY) as gemini:
        assert gemini.models.generate_content(model="sim-1", contents=PROMPT).text
    with client(keyed_simulator, api_key="wrong-key") as gemini, pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model="sim-1", contents=PROMPT)
    # Google answers a wrong key with 400, not 401.
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


# --- Azure OpenAI: the deployment route, parsed by the openai SDK's AzureOpenAI clients --------

AZURE_API_VERSION = "2024-10-21"


def azure(sim: SimulatorProcess, api_key: str = "azure-key") -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=sim.root_url, api_key=api_key, api_version=AZURE_API_VERSION, max_retries=0
    )


def test_azure_deployment_route_streams_openai_chunks(simulator: SimulatorProcess) -> None:
    with azure(simulator) as client_:
        stream = client_.chat.completions.create(
            model="sim-1",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        chunks = list(stream)
        whole = client_.chat.completions.create(model="sim-1", messages=MESSAGES)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == FAST_REPLY_TOKENS
    assert whole.model == "sim-1"


async def test_azure_deployment_names_the_model_and_async_client_works(simulator: SimulatorProcess) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=simulator.root_url, api_key="k", api_version=AZURE_API_VERSION, max_retries=0
    ) as client_:
        with pytest.raises(openai.RateLimitError) as caught:
            await client_.chat.completions.create(model="sim-error-429", messages=MESSAGES)  # type: ignore[arg-type]
        whole = await client_.chat.completions.create(model="sim-1", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 429 and caught.value.response.headers["Retry-After"] == "1"
    assert whole.choices[0].message.content == reply_text(MESSAGES, FAST_REPLY_TOKENS)


def test_azure_requires_the_api_key_header_and_an_api_version(keyed_simulator: SimulatorProcess) -> None:
    with azure(keyed_simulator, api_key=SIMULATOR_API_KEY) as client_:
        assert client_.chat.completions.create(model="sim-1", messages=MESSAGES).choices  # type: ignore[arg-type]
    with azure(keyed_simulator, api_key="wrong") as client_, pytest.raises(openai.AuthenticationError) as caught:
        client_.chat.completions.create(model="sim-1", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 401 and "invalid subscription key" in caught.value.message
    # The Bearer header of plain OpenAI is not Azure's key header.
    url = f"{keyed_simulator.root_url}/openai/deployments/sim-1"
    with openai.OpenAI(base_url=url, api_key=SIMULATOR_API_KEY, max_retries=0) as plain:
        with pytest.raises(openai.AuthenticationError):
            plain.chat.completions.create(
                model="sim-1",
                messages=MESSAGES,
                extra_query={"api-version": AZURE_API_VERSION},  # type: ignore[arg-type]
            )
        with pytest.raises(openai.NotFoundError):  # no api-version: Azure's 404
            plain.chat.completions.create(model="sim-1", messages=MESSAGES)  # type: ignore[arg-type]


def test_json_mode_answers_json_shaped_by_the_schema(simulator: SimulatorProcess) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
    config = types.GenerateContentConfig(response_mime_type="application/json", response_json_schema=schema)
    sdk = client(simulator)  # kept: a client that is garbage-collected closes its connections
    whole = sdk.models.generate_content(model="sim-1", contents=PROMPT, config=config)
    assert json.loads(whole.text or "") == {"city": "city value", "days": 1}
    streamed = sdk.models.generate_content_stream(model="sim-1", contents=PROMPT, config=config)
    assert json.loads("".join(chunk.text or "" for chunk in streamed)) == {"city": "city value", "days": 1}
    plain = types.GenerateContentConfig(response_mime_type="application/json")
    reply = sdk.models.generate_content(model="sim-1", contents=PROMPT, config=plain)
    assert json.loads(reply.text or "") == {
        "reply": reply_text([{"role": "user", "content": PROMPT}], FAST_REPLY_TOKENS)
    }


@pytest.mark.parametrize(
    ("generation_config", "problem"),
    [
        ({"maxTokens": 5}, 'Unknown name "maxTokens"'),
        ({"stopSequences": ["a", "b", "c", "d", "e", "f"]}, "at most 5"),
        ({"stopSequences": [1]}, "list of strings"),
        ({"responseMimeType": "application/xml"}, "allowed mimetypes"),
        ({"responseMimeType": "application/json", "responseSchema": {}, "responseJsonSchema": {}}, "cannot both"),
        ({"responseJsonSchema": {"type": "object"}}, "needs response_mime_type"),
    ],
)
def test_a_generation_config_google_refuses_is_a_400(
    simulator: SimulatorProcess, generation_config: dict[str, Any], problem: str
) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": generation_config}
    response = httpx.post(f"{simulator.root_url}/v1beta/models/sim-1:generateContent", json=body, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and problem in error["message"]


def test_logprobs_are_a_logprobs_result_per_word_streamed_and_whole(simulator: SimulatorProcess) -> None:
    # What the adapter reads: chosenCandidates and topCandidates per decoding step, as the SDK parses them.
    sdk = client(simulator)
    asked = config(response_logprobs=True, logprobs=2)
    chunks = list(sdk.models.generate_content_stream(model="sim-1", contents=PROMPT, config=asked))
    whole = sdk.models.generate_content(model="sim-1", contents=PROMPT, config=asked)

    indexes = reply_word_indexes(MESSAGES, FAST_REPLY_TOKENS)
    expected = [logprob_entry(index, first=n == 0, top=2) for n, index in enumerate(indexes)]

    def steps(result: types.LogprobsResult | None) -> list[dict[str, Any]]:
        assert result is not None and result.chosen_candidates is not None and result.top_candidates is not None
        return [
            {
                "token": chosen.token,
                "logprob": chosen.log_probability,
                "top": [(alt.token, alt.log_probability) for alt in top.candidates or ()],
            }
            for chosen, top in zip(result.chosen_candidates, result.top_candidates, strict=True)
        ]

    wanted = [
        {"token": e["token"], "logprob": e["logprob"], "top": [(a["token"], a["logprob"]) for a in e["top_logprobs"]]}
        for e in expected
    ]
    streamed = [step for chunk in chunks for step in steps((chunk.candidates or [])[0].logprobs_result)]
    assert streamed == wanted
    [candidate] = whole.candidates or []
    assert steps(candidate.logprobs_result) == wanted
    assert candidate.avg_logprobs == pytest.approx(sum(e["logprob"] for e in expected) / len(expected))
    assert candidate.logprobs_result is not None and candidate.logprobs_result.chosen_candidates is not None
    assert [c.token_id for c in candidate.logprobs_result.chosen_candidates] == indexes

    plain = sdk.models.generate_content(model="sim-1", contents=PROMPT, config=config())
    assert (plain.candidates or [])[0].logprobs_result is None


@pytest.mark.parametrize(
    ("generation_config", "problem"),
    [
        ({"logprobs": 2}, "only valid if response_logprobs is true"),
        ({"responseLogprobs": True, "logprobs": 21}, "range of [0, 20]"),
    ],
)
def test_logprobs_google_refuses_are_a_400(
    simulator: SimulatorProcess, generation_config: dict[str, Any], problem: str
) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": generation_config}
    response = httpx.post(f"{simulator.root_url}/v1beta/models/sim-1:generateContent", json=body, timeout=10)
    assert response.status_code == 400 and problem in response.json()["error"]["message"]
