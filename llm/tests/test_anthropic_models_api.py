"""``/v1/models`` as the official ``anthropic`` SDK sees it, and Anthropic's ``request-id`` on every answer.

Both SDKs call ``GET /v1/models``; a request with ``anthropic-version`` (the ``anthropic`` SDK's)
is answered in Anthropic's shape (``ModelInfo`` pages, Anthropic's errors), any other in OpenAI's
(``llm.anthropic.wire``). The SDK talks to this server over real HTTP (``asgi_server``), unmodified.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest
from anthropic.types import ModelInfo

from llm.models import ModelAlias
from tests.factories import LLMModelFactory
from tests.kit import bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]


@pytest.fixture
async def sdk(asgi_server: str, api_key_secret: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as client:
        yield client


@pytest.fixture
def listed(db, sim_model) -> list[str]:
    """Four names: ``sim-model``, ``b-model``, ``c-model`` and the alias ``a-alias`` (to ``sim-model``), by id."""
    LLMModelFactory(name="b-model", provider=sim_model.provider)
    LLMModelFactory(name="c-model", provider=sim_model.provider)
    LLMModelFactory(name="off-model", provider=sim_model.provider, enabled=False)
    ModelAlias.objects.create(name="a-alias", model=sim_model)
    return ["a-alias", "b-model", "c-model", "sim-model"]


async def test_list_answers_model_info_pages(sdk, listed, sim_model):
    page = await sdk.models.list()

    assert [model.id for model in page.data] == listed
    windows = {"a-alias": sim_model.context_window, "sim-model": sim_model.context_window}
    for model in page.data:
        assert model.type == "model"
        assert model.display_name == model.id
        assert model.lifecycle == "active"
        assert model.max_input_tokens == windows.get(model.id, model.max_input_tokens) > 0
        # The SDK builds its objects without validating them: validate each as its ModelInfo does,
        # so that a field the SDK requires cannot be missing.
        ModelInfo.model_validate(model.model_dump())
        assert isinstance(model.created_at, dt.datetime)
        assert model.created_at.tzinfo is not None
        assert abs(dt.datetime.now(dt.UTC) - model.created_at) < dt.timedelta(minutes=5)
    assert (page.has_more, page.first_id, page.last_id) == (False, "a-alias", "sim-model")
    assert page._request_id


async def test_list_pages_by_limit_and_cursor(sdk, listed):
    first = await sdk.models.list(limit=2)
    assert [model.id for model in first.data] == ["a-alias", "b-model"]
    assert (first.has_more, first.first_id, first.last_id) == (True, "a-alias", "b-model")

    second = await sdk.models.list(limit=2, after_id=first.last_id)
    assert [model.id for model in second.data] == ["c-model", "sim-model"]
    assert (second.has_more, second.first_id, second.last_id) == (False, "c-model", "sim-model")

    back = await sdk.models.list(limit=1, before_id="c-model")
    assert [model.id for model in back.data] == ["b-model"]
    assert back.has_more is True  # a-alias is before it

    # The SDK's auto-pagination follows last_id until has_more is false.
    assert [model.id async for model in sdk.models.list(limit=1)] == listed

    # Both cursors (the schema allows it): the ids between them.
    between = await sdk.models.list(after_id="a-alias", before_id="sim-model")
    assert [model.id for model in between.data] == ["b-model", "c-model"]
    assert between.has_more is False

    empty = await sdk.models.list(after_id="zzz")
    assert (empty.data, empty.has_more, empty.first_id, empty.last_id) == ([], False, None, None)


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 1001}, {"before_id": ""}, {"after_id": ""}])
async def test_a_bad_page_query_is_a_bad_request(sdk, listed, query):
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.models.list(**query)
    body = caught.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert caught.value.request_id


async def test_retrieve_answers_one_model_info_and_not_found_for_an_unknown_model(sdk, listed):
    model = await sdk.models.retrieve("a-alias")
    assert (model.type, model.id, model.display_name) == ("model", "a-alias", "a-alias")
    assert isinstance(model.created_at, dt.datetime)
    assert model._request_id

    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk.models.retrieve("no-such-model")
    body = caught.value.response.json()
    assert body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'no-such-model' does not exist."},
    }
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]
    # A disabled model is Anthropic's 400.
    with pytest.raises(anthropic.BadRequestError):
        await sdk.models.retrieve("off-model")


async def test_a_bad_key_is_anthropics_authentication_error(asgi_server, listed):
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key="sk-" + "x" * 48, max_retries=0) as bad:
        for call in (bad.models.list(), bad.models.retrieve("sim-model")):
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await call
            body = caught.value.response.json()
            assert body["type"] == "error"
            assert body["error"]["type"] == "authentication_error"
            assert caught.value.request_id == caught.value.response.headers["x-request-id"]


async def test_an_openai_client_still_gets_openais_shape(asgi_server, api_key_secret, sim_model, listed):
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        models = [model async for model in sdk.models.list()]
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.models.retrieve("no-such-model")
    assert [model.id for model in models] == listed
    assert {(model.object, model.owned_by) for model in models} == {("model", sim_model.provider.name)}
    assert caught.value.code == "model_not_found"
    async with httpx.AsyncClient(base_url=asgi_server) as http:
        response = await http.get("/v1/models", headers=bearer(api_key_secret))
    assert set(response.json()) == {"object", "data"}
    assert "request-id" not in response.headers  # Anthropic's header, for Anthropic's clients only
    assert response.headers["x-request-id"]


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
