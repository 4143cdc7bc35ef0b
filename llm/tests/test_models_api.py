"""GET /api/models/: the enabled models, for any authenticated user."""

from __future__ import annotations

import pytest

from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import assert_error, bearer

MODELS = "/api/models/"

pytestmark = pytest.mark.django_db


def test_lists_enabled_models_by_name_with_prices(auth_client):
    LLMModelFactory(
        name="b-model",
        context_window=128000,
        input_price_per_million="0.150000",
        output_price_per_million="0.600000",
        cached_input_price_per_million="0.075000",
        default_parameters={"temperature": 0.7},
    )
    LLMModelFactory(name="a-model")
    LLMModelFactory(name="disabled-model", enabled=False)
    LLMModelFactory(name="off-provider-model", provider=ProviderFactory(enabled=False))

    response = auth_client.get(MODELS)

    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 2
    assert [row["name"] for row in page["results"]] == ["a-model", "b-model"]
    assert page["results"][1] == {
        "name": "b-model",
        "context_window": 128000,
        "input_price_per_million": "0.150000",
        "output_price_per_million": "0.600000",
        "cached_input_price_per_million": "0.075000",
        "cache_write_price_per_million": None,  # none set: the input price applies
        "default_parameters": {"temperature": 0.7},
    }
    assert "sk-upstream" not in response.content.decode()


def test_an_api_key_may_list_models(api_client, api_key_secret):
    LLMModelFactory(name="m")
    response = api_client.get(MODELS, headers=bearer(api_key_secret))

    assert response.status_code == 200
    assert response.json()["count"] == 1


def test_models_need_authentication(api_client):
    assert_error(api_client.get(MODELS), 401, code="not_authenticated")
