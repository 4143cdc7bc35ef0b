"""Model aliases (``llm.models.ModelAlias``): another name for a model, wherever a request names one.

Resolution and the shared name space as the selectors and the admin see them; then, over real HTTP
(the ASGI app under uvicorn, the simulator upstream), the official ``openai`` and ``anthropic`` SDKs
sending an alias, ``/v1/models`` listing it, and every process's cache following an alias's edits.
"""

from __future__ import annotations

import anthropic
import openai
import pytest
from django.core.exceptions import ValidationError
from django.test import AsyncClient

from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from llm.models import LLMModel, ModelAlias
from llm.selectors import llm_model_get_enabled
from llm.simulator import reply_text
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import FAST_REPLY_TOKENS, assert_error, bearer, chat_body, post_chat, usage_records

# --- Resolution and the one name space --------------------------------------------------------


@pytest.mark.django_db
def test_an_alias_resolves_to_its_target_model():
    target = LLMModelFactory(name="sim-model")
    ModelAlias.objects.create(name="gpt-4o-mini", model=target)

    assert llm_model_get_enabled(name="gpt-4o-mini") == target
    assert llm_model_get_enabled(name="sim-model") == target


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no such name", 404, "model_not_found"),
        ("alias disabled", 400, "model_disabled"),
        ("target disabled", 400, "model_disabled"),
        ("target's provider disabled", 400, "model_disabled"),
    ],
)
def test_an_alias_that_cannot_serve_is_refused_as_a_model_would_be(case, status, code):
    provider = ProviderFactory(enabled=case != "target's provider disabled")
    target = LLMModelFactory(name="sim-model", provider=provider, enabled=case != "target disabled")
    if case != "no such name":
        ModelAlias.objects.create(name="gpt-4o-mini", model=target, enabled=case != "alias disabled")

    with pytest.raises(ApplicationError) as caught:
        llm_model_get_enabled(name="gpt-4o-mini")

    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, "model")
    assert "'gpt-4o-mini'" in caught.value.message


@pytest.mark.django_db
def test_a_name_with_a_nul_is_no_models_and_never_a_database_error():
    """PostgreSQL cannot compare text with a NUL: the lookup refuses it before querying."""
    LLMModelFactory(name="gpt-x")
    with pytest.raises(ApplicationError) as raised:
        llm_model_get_enabled(name="gpt-x\x00")
    assert raised.value.status == 404 and raised.value.code == "model_not_found"


@pytest.mark.django_db
def test_a_model_and_an_alias_may_not_share_a_name():
    model = LLMModelFactory(name="gpt-4o-mini")
    other = LLMModelFactory(name="sim-model")

    with pytest.raises(ValidationError) as caught:
        ModelAlias(name="gpt-4o-mini", model=other).full_clean()
    assert "already the name of a model" in str(caught.value.message_dict["name"])

    ModelAlias.objects.create(name="fast", model=model)
    with pytest.raises(ValidationError) as caught:
        LLMModel(name="fast", provider=model.provider, upstream_model="sim-1").full_clean()
    assert "already the name of a model alias" in str(caught.value.message_dict["name"])
    model.full_clean()  # a model's own save is not refused by its aliases


@pytest.mark.django_db
def test_a_model_wins_over_an_alias_that_bypassed_validation():
    model = LLMModelFactory(name="twin")
    ModelAlias.objects.create(name="twin", model=LLMModelFactory(name="elsewhere"))  # no full_clean

    assert llm_model_get_enabled(name="twin") == model


# --- The admin ------------------------------------------------------------------------------


def alias_form(name: str, model: LLMModel, **overrides: str) -> dict[str, str]:
    return {"name": name, "model": str(model.pk), "enabled": "on", **overrides}


@pytest.mark.django_db
def test_an_operator_adds_lists_and_finds_an_alias(admin_site):
    target = LLMModelFactory(name="sim-model")

    response = admin_site.post("/admin/llm/modelalias/add/", alias_form("gpt-4o-mini", target))

    assert response.status_code == 302, response.content.decode()[:2000]
    alias = ModelAlias.objects.get(name="gpt-4o-mini")
    assert alias.model == target and alias.enabled
    changelist = admin_site.get("/admin/llm/modelalias/", {"q": "sim-model"})  # searched by the target's name
    assert changelist.status_code == 200
    assert "gpt-4o-mini" in changelist.content.decode()
    assert admin_site.get(f"/admin/llm/modelalias/{alias.pk}/change/").status_code == 200
    # The target field is an autocomplete over the models.
    found = admin_site.get(
        "/admin/autocomplete/",
        {"app_label": "llm", "model_name": "modelalias", "field_name": "model", "term": "sim"},
    )
    assert found.status_code == 200
    assert found.json()["results"] == [{"id": str(target.pk), "text": "sim-model"}]


@pytest.mark.django_db
def test_the_admin_refuses_an_alias_named_like_a_model_and_a_model_named_like_an_alias(admin_site):
    target = LLMModelFactory(name="sim-model")
    LLMModelFactory(name="gpt-4o-mini", provider=target.provider)

    response = admin_site.post("/admin/llm/modelalias/add/", alias_form("gpt-4o-mini", target))

    assert response.status_code == 200  # the form again, with the error on the name
    assert response.context["adminform"].form.errors["name"] == [
        "'gpt-4o-mini' is already the name of a model; an alias needs its own."
    ]
    assert not ModelAlias.objects.exists()

    ModelAlias.objects.create(name="fast", model=target)
    response = admin_site.post(
        "/admin/llm/llmmodel/add/",
        {
            "name": "fast",
            "provider": str(target.provider.pk),
            "upstream_model": "sim-1",
            "context_window": "8192",
            "default_parameters": "{}",
            "enabled": "on",
            "input_price_per_million": "0",
            "output_price_per_million": "0",
            "tokenizer": "auto",
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["name"] == [
        "'fast' is already the name of a model alias; rename or delete it first."
    ]
    assert not LLMModel.objects.filter(name="fast").exists()


# --- Over HTTP: the SDKs, /v1/models and the cache ----------------------------------------------


@pytest.fixture
def aliased(db, sim_model):
    """``gpt-4o-mini`` → ``sim-model`` (on the fast simulator), and a second model ``other-model``."""
    other = LLMModelFactory(name="other-model", provider=sim_model.provider, upstream_model="sim-1")
    alias = ModelAlias.objects.create(name="gpt-4o-mini", model=sim_model)
    return alias, other


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_sdks_send_an_alias_and_get_the_target_models_reply(api_key_secret, sim_model, aliased, asgi_server):
    messages = [{"role": "user", "content": "Give this chat a title"}]
    async with openai.AsyncOpenAI(base_url=f"{asgi_server}/v1", api_key=api_key_secret, max_retries=0) as sdk:
        listed = [model.id async for model in sdk.models.list()]
        retrieved = await sdk.models.retrieve("gpt-4o-mini")
        completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
        chunks = [chunk async for chunk in stream]
        response = await sdk.responses.create(model="gpt-4o-mini", input="Give this chat a title", store=False)
    async with anthropic.AsyncAnthropic(base_url=asgi_server, api_key=api_key_secret, max_retries=0) as claude:
        message = await claude.messages.create(model="gpt-4o-mini", max_tokens=50, messages=messages)

    assert listed == ["gpt-4o-mini", "other-model", "sim-model"]
    assert (retrieved.id, retrieved.owned_by) == ("gpt-4o-mini", sim_model.provider.name)
    expected = reply_text(messages, FAST_REPLY_TOKENS)
    assert completion.choices[0].message.content == expected
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    # The reply names the model that served it, as OpenAI's and Anthropic's own aliases answer.
    assert completion.model == "sim-model"
    assert {chunk.model for chunk in chunks} == {"sim-model"}
    assert message.model == "sim-model" and message.content[0].text == expected
    assert (response.model, response.output_text) == ("sim-model", expected)
    records = await usage_records()
    assert len(records) == 4
    assert {(record.model_id, record.model_name) for record in records} == {(sim_model.pk, "sim-model")}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients", "broadcast_listener")
async def test_an_alias_edit_is_seen_by_the_next_request(api_key_secret, sim_model, aliased):
    alias, other = aliased
    client = AsyncClient()

    async def chat_model() -> str:
        response = await post_chat(client, chat_body("gpt-4o-mini"), bearer(api_key_secret))
        assert response.status_code == 200, response.content
        return response.json()["model"]

    assert await chat_model() == "sim-model"
    assert await chat_model() == "sim-model"  # now from this process's cache

    def retarget() -> None:  # what the admin does
        alias.model = other
        alias.save()

    await run_sync(retarget)
    assert await chat_model() == "other-model"

    def disable() -> None:
        alias.enabled = False
        alias.save()

    await run_sync(disable)
    assert_error(await post_chat(client, chat_body("gpt-4o-mini"), bearer(api_key_secret)), 400, code="model_disabled")
    listing = (await client.get("/v1/models", headers=bearer(api_key_secret))).json()
    assert [model["id"] for model in listing["data"]] == ["other-model", "sim-model"]

    await run_sync(alias.delete)
    assert_error(await post_chat(client, chat_body("gpt-4o-mini"), bearer(api_key_secret)), 404, code="model_not_found")
    assert_error(
        await client.get("/v1/models/gpt-4o-mini", headers=bearer(api_key_secret)), 404, code="model_not_found"
    )
