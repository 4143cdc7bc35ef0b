"""Anthropic's ``request-id`` on every answer to an Anthropic request, as the official ``anthropic`` SDK reads it.

The SDK talks to this server over real HTTP (``asgi_server``), unmodified (``llm.anthropic.wire``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx
import pytest

from tests.kit import bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]


@pytest.fixture
async def sdk(asgi_server: str, api_key_secret: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as client:
        yield client


# --- request-id on /v1/messages --------------------------------------------------------------


async def test_every_messages_answer_carries_request_id_as_x_request_id(sdk, asgi_server, api_key_secret, sim_model):
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]
    raw = await sdk.messages.with_raw_response.create(model="sim-model", max_tokens=20, messages=messages)
    message = await raw.parse()
    assert raw.request_id and raw.request_id == raw.headers["x-request-id"]
    assert message._request_id == raw.request_id
    assert (await sdk.messages.create(model="sim-model", max_tokens=20, messages=messages))._request_id

    async with sdk.messages.with_streaming_response.create(
        model="sim-model", max_tokens=20, messages=messages, stream=True
    ) as streamed:
        assert streamed.request_id == streamed.headers["x-request-id"]

    counted = await sdk.messages.with_raw_response.count_tokens(model="sim-model", messages=messages)
    assert counted.request_id == counted.headers["x-request-id"]

    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk.messages.create(model="no-such-model", max_tokens=20, messages=messages)
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]

    # Without anthropic-version (curl): /v1/messages is Anthropic's all the same.
    async with httpx.AsyncClient(base_url=asgi_server) as http:
        response = await http.post("/v1/messages", json={}, headers=bearer(api_key_secret))
    assert response.status_code == 400
    assert response.headers["request-id"] == response.headers["x-request-id"]
