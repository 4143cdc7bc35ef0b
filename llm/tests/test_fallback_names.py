"""A reply that a fallback model served names that model: on ``/v1/chat/completions``, ``/v1/messages``
and ``/v1/responses``, streamed and whole, as its usage row does.

``primary``'s one deployment is an upstream model id of its own (fresh per test) that the simulator
fails (``PUT /_simulator/faults/{model}``), so every reply goes on to its fallback ``backup``. Two
ways to fail: ``at-once`` (a 500 before the first chunk: the fallback answers before any byte is
sent) and ``late`` (no first chunk within the provider's ``first_token_timeout``, with no first-chunk
wait: the response's headers and keep-alives have gone out before the fallback is tried, so the
name can only come from the first chunks). The official SDKs talk to this server over real HTTP
(``asgi_server``: uvicorn in the test's loop).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from llm.selectors import enabled_model_cache
from llm.tests.simulator_process import SimulatorProcess
from llm.tokens import tokenizer_for
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import bearer, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

MESSAGES: Any = [{"role": "user", "content": "Tell me about rivers"}]


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    # Other tests name models "primary" and "backup" too: never reuse their snapshots.
    enabled_model_cache.clear()
    yield
    enabled_model_cache.clear()


@pytest.fixture(params=["at-once", "late"])
def failure(request: pytest.FixtureRequest, db: Any, simulator: SimulatorProcess, settings: Any) -> Iterator[str]:
    """``primary`` (its upstream failing as the param says) falling back to ``backup``; yield the param."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    provider = ProviderFactory(name="sim-backup", base_url=simulator.base_url, api_key="")
    LLMModelFactory(name="backup", provider=provider, upstream_model="sim-1")
    if request.param == "late":
        simulator.fault_set(failing, "ttft=30")
        settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS = 0
        settings.SSE_KEEPALIVE_SECONDS = 0.05
        provider = ProviderFactory(name="sim-primary", base_url=simulator.base_url, api_key="", first_token_timeout=0.3)
    else:
        simulator.fault_set(failing, "status=500")
    LLMModelFactory(name="primary", provider=provider, upstream_model=failing, fallbacks=["backup"])
    yield request.param
    simulator.fault_clear(failing)


@pytest.fixture
async def http(asgi_server: str, api_key_secret: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=asgi_server, headers=bearer(api_key_secret), timeout=10) as client:
        yield client


async def _raw_stream(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    response = await http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return response.text


async def _assert_records_name_backup(count: int) -> None:
    records = await usage_records()
    assert [record.model_name for record in records] == ["backup"] * count


async def test_chat_completion_chunks_and_whole_reply_name_the_fallback(failure, asgi_server, api_key_secret, http):
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="primary", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        completion = await sdk.chat.completions.create(model="primary", messages=MESSAGES)

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices).strip()
    assert chunks[-1].usage is not None  # the usage chunk too
    assert {chunk.model for chunk in chunks} == {"backup"}
    assert completion.model == "backup"
    assert completion.choices[0].message.content
    await _assert_records_name_backup(2)
    if failure == "late":  # bytes went out before the fallback answered
        raw = await _raw_stream(http, "/v1/chat/completions", {"model": "primary", "messages": MESSAGES})
        assert raw.startswith(": keep-alive\n\n")
        assert '"model":"backup"' in raw and '"model":"primary"' not in raw


async def test_anthropic_message_start_and_whole_message_name_the_fallback(failure, asgi_server, api_key_secret, http):
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as sdk:
        raw = await sdk.messages.create(model="primary", max_tokens=100, messages=MESSAGES, stream=True)
        events = [event async for event in raw]
        async with sdk.messages.stream(model="primary", max_tokens=100, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        message = await sdk.messages.create(model="primary", max_tokens=100, messages=MESSAGES)

    assert [event.type for event in events][:2] == ["message_start", "content_block_start"]
    assert events[0].type == "message_start" and events[0].message.model == "backup"
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.model == "backup"
    assert message.model == "backup"
    await _assert_records_name_backup(3)
    if failure == "late":  # pings went out before the fallback answered, then message_start named it
        body = await _raw_stream(http, "/v1/messages", {"model": "primary", "max_tokens": 100, "messages": MESSAGES})
        assert body.startswith('event: ping\ndata: {"type":"ping"}\n\n')
        start = body.index("event: message_start\n")
        assert '"model":"backup"' in body[start:] and "message_start" not in body[:start]


async def test_responses_events_and_whole_response_name_the_fallback(failure, asgi_server, api_key_secret, http):
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        async with sdk.responses.stream(model="primary", input="Tell me about rivers") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        whole = await sdk.responses.create(model="primary", input="Tell me about rivers")

    with_response = [event for event in events if hasattr(event, "response")]
    assert [event.type for event in with_response] == ["response.created", "response.in_progress", "response.completed"]
    assert {event.response.model for event in with_response} == {"backup"}
    assert final.output_text and final.model == "backup"
    assert whole.output_text == final.output_text and whole.model == "backup"
    await _assert_records_name_backup(2)
    if failure == "late":  # keep-alive comments went out before the fallback answered
        raw = await _raw_stream(http, "/v1/responses", {"model": "primary", "input": "Tell me about rivers"})
        assert raw.startswith(": keep-alive\n\n")
        assert '"model":"backup"' in raw and '"model":"primary"' not in raw


@pytest.fixture
def both_failing(db: Any, simulator: SimulatorProcess, settings: Any) -> Iterator[None]:
    """``primary`` falling back to ``backup``, both of whose upstreams answer 500."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    failing, also_failing = (f"sim-fallback-{secrets.token_hex(4)}" for _ in "12")
    provider = ProviderFactory(name="sim-both", base_url=simulator.base_url, api_key="")
    LLMModelFactory(name="backup", provider=provider, upstream_model=also_failing)
    LLMModelFactory(name="primary", provider=provider, upstream_model=failing, fallbacks=["backup"])
    for upstream in (failing, also_failing):
        simulator.fault_set(upstream, "status=500")
    yield
    for upstream in (failing, also_failing):
        simulator.fault_clear(upstream)


async def test_a_reply_no_model_answered_names_the_requested_model(both_failing, asgi_server, api_key_secret):
    """When the fallback fails too, nothing served: the usage row names the model asked for."""
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as failed:
            await sdk.chat.completions.create(model="primary", messages=MESSAGES)

    assert failed.value.status_code >= 500
    records = await usage_records()
    assert [(record.model_name, record.finish_status) for record in records] == [("primary", "failed")]


@pytest.mark.parametrize("failure", ["at-once"], indirect=True)
async def test_a_key_limited_to_the_model_is_never_served_by_a_fallback_outside_its_allowlist(
    failure, asgi_server, user
) -> None:
    from asgiref.sync import sync_to_async

    from accounts.services import api_key_create

    limited = await sync_to_async(api_key_create)(user=user, name="only-primary", allowed_models=["primary"])
    widened = await sync_to_async(api_key_create)(user=user, name="both", allowed_models=["primary", "backup"])
    body = {"model": "primary", "messages": MESSAGES}

    async with httpx.AsyncClient(base_url=asgi_server, timeout=10) as client:
        refused = await client.post("/v1/chat/completions", json=body, headers=bearer(limited.secret))
        served = await client.post("/v1/chat/completions", json=body, headers=bearer(widened.secret))

    assert refused.status_code >= 500 and refused.json()["error"]["message"], refused.text  # primary's failure
    assert served.status_code == 200 and served.json()["model"] == "backup", served.text
    # The refused reply is accounted to the model that failed it; only the widened key's went to backup.
    records = await usage_records()
    assert [(record.api_key_id, record.model_name) for record in records] == [
        (limited.api_key.pk, "primary"),
        (widened.api_key.pk, "backup"),
    ]


@pytest.fixture
def fallback_without_usage_report(db: Any, simulator: SimulatorProcess, settings: Any) -> Iterator[None]:
    """``primary`` (a 500 before any chunk; no known tokenizer: an estimate) falling back to ``backup``,
    counted by ``o200k_base``, whose provider reports no usage in streams (``stream_usage`` off)."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    simulator.fault_set(failing, "status=500")
    quiet = ProviderFactory(name="sim-quiet", base_url=simulator.base_url, api_key="", stream_usage=False)
    LLMModelFactory(name="backup", provider=quiet, upstream_model="sim-1", tokenizer="o200k_base")
    provider = ProviderFactory(name="sim-primary", base_url=simulator.base_url, api_key="")
    LLMModelFactory(name="primary", provider=provider, upstream_model=failing, fallbacks=["backup"])
    yield
    simulator.fault_clear(failing)


async def test_a_fallbacks_reply_without_a_usage_report_is_counted_by_the_fallbacks_tokenizer(
    fallback_without_usage_report, http
):
    """The tokens of a reply the provider reported none for (a stream without ``include_usage``, or
    one stopped or cut) are counted by the tokenizer of the model that generated them: the fallback's,
    not the estimate of the model asked for, and the row says ``counted``."""
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "primary", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200, response.text
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for line in response.text.splitlines()
        if line.startswith("data: {") and (chunk := json.loads(line[6:]))["choices"]
    )

    tokenizer = tokenizer_for(setting="o200k_base", model_name="sim-1")
    (record,) = await usage_records()
    assert (record.model_name, record.finish_status, record.token_source) == ("backup", "completed", "counted")
    assert record.prompt_tokens == tokenizer.count_prompt(MESSAGES)
    assert record.completion_tokens == tokenizer.count_text(text)
    assert record.cost == (record.prompt_tokens * 1 + record.completion_tokens * 2) / Decimal(1_000_000)
