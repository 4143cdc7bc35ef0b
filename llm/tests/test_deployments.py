"""Deployments (llm.models.Deployment): the snapshot a reply routes over, the admin inline, the cache."""

from __future__ import annotations

import secrets
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.test import AsyncClient

from chatbackend.asyncdb import run_sync
from llm.metering import reply_metering
from llm.models import Deployment, LLMModel
from llm.selectors import enabled_model_cache, enabled_model_get
from tests.factories import DeploymentFactory, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import bearer, chat_body, chunk_objects, chunk_text, post_chat, sse_data, streamed_content, usage_records

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_cache():
    enabled_model_cache.clear()
    yield
    enabled_model_cache.clear()


def test_a_model_without_deployments_is_its_own_one_deployment():
    provider = ProviderFactory(name="solo", first_token_timeout=12)
    LLMModelFactory(name="plain", provider=provider, upstream_model="sim-1")

    (only,) = enabled_model_get(name="plain").deployments

    assert (only.id, only.name, only.upstream_model) == (None, "solo/sim-1", "sim-1")
    assert only.provider.base_url == provider.base_url
    assert only.provider.first_token_timeout == 12


def test_enabled_deployments_on_enabled_providers_replace_the_models_own_in_priority_order():
    model = LLMModelFactory(name="routed", routing_strategy=LLMModel.RoutingStrategy.LEAST_IN_FLIGHT)
    backup = DeploymentFactory(model=model, provider=ProviderFactory(name="backup"), upstream_model="b", priority=5)
    main = DeploymentFactory(
        model=model, provider=ProviderFactory(name="main"), upstream_model="a", weight=3, requests_per_minute=60
    )
    DeploymentFactory(model=model, provider=ProviderFactory(name="off"), enabled=False)
    DeploymentFactory(model=model, provider=ProviderFactory(name="off-provider", enabled=False))

    snapshot = enabled_model_get(name="routed")

    assert [(d.id, d.name, d.weight, d.priority) for d in snapshot.deployments] == [
        (main.pk, "main/a", 3, 0),
        (backup.pk, "backup/b", 1, 5),
    ]
    assert snapshot.deployments[0].limits.requests_per_minute == 60
    assert snapshot.routing_strategy == "least_in_flight"


def test_a_deployment_change_clears_the_cached_model():
    model = LLMModelFactory(name="cached")
    before = enabled_model_get(name="cached")

    deployment = DeploymentFactory(model=model, provider=ProviderFactory(name="new"), upstream_model="x")
    added = enabled_model_get(name="cached")
    Deployment.objects.filter(pk=deployment.pk).delete()
    removed = enabled_model_get(name="cached")

    assert [d.id for d in before.deployments] == [None]
    assert [d.name for d in added.deployments] == ["new/x"]
    assert [d.id for d in removed.deployments] == [None]


def test_an_operator_adds_deployments_in_the_models_admin_page(admin_site):
    model = LLMModelFactory(name="admin-routed")
    provider = ProviderFactory(name="second")
    form = admin_site.get(f"/admin/llm/llmmodel/{model.pk}/change/")
    data = {
        field: value
        for field, value in form.context["adminform"].form.initial.items()
        if value is not None and not isinstance(value, dict | list)
    }
    data.update(
        {
            "provider": model.provider_id,
            "default_parameters": "{}",
            "deployments-TOTAL_FORMS": "1",
            "deployments-INITIAL_FORMS": "0",
            "deployments-MIN_NUM_FORMS": "0",
            "deployments-MAX_NUM_FORMS": "1000",
            "deployments-0-provider": provider.pk,
            "deployments-0-upstream_model": "second-model",
            "deployments-0-weight": "2",
            "deployments-0-priority": "1",
            "deployments-0-enabled": "on",
            "_save": "Save",
        }
    )
    data["enabled"] = "on"

    response = admin_site.post(f"/admin/llm/llmmodel/{model.pk}/change/", data)

    assert form.status_code == 200 and 'name="deployments-TOTAL_FORMS"' in form.content.decode()
    assert response.status_code == 302, response.content.decode()[:3000]
    (deployment,) = model.deployments.all()
    assert (deployment.provider, deployment.upstream_model, deployment.weight, deployment.priority) == (
        provider,
        "second-model",
        2,
        1,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_fallback_model_serves_and_the_usage_row_is_its_own(api_key_secret, simulator, settings):
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    simulator.fault_set(failing, "status=500")
    provider = await run_sync(ProviderFactory, name="sim-fallbacks", base_url=simulator.base_url, api_key="")
    backup = await run_sync(
        LLMModelFactory,
        name="backup",
        provider=provider,
        upstream_model="sim-1",
        input_price_per_million="10",
        output_price_per_million="20",
    )
    await run_sync(LLMModelFactory, name="primary", provider=provider, upstream_model=failing, fallbacks=["backup"])

    response = await post_chat(AsyncClient(), chat_body("primary", "Fall back", stream=True), bearer(api_key_secret))
    chunks = chunk_objects(sse_data(await streamed_content(response)))

    assert response.status_code == 200
    assert chunk_text(chunks).strip()
    assert {chunk["model"] for chunk in chunks} == {"backup"}  # the model that served, as the usage row says
    [record] = await usage_records()
    assert (record.model_id, record.model_name, record.deployment) == (backup.pk, "backup", "sim-fallbacks/sim-1")
    assert record.cost == Decimal(record.prompt_tokens * 10 + record.completion_tokens * 20) / 1_000_000
    assert simulator.requests_for(failing) == 1


def test_fallbacks_must_name_other_existing_models():
    model = LLMModelFactory(name="chained")
    LLMModelFactory(name="other")

    for fallbacks in ("other", [1], ["chained"], ["other", "other"], ["missing"]):
        model.fallbacks = fallbacks
        with pytest.raises(ValidationError):
            model.full_clean()
    model.fallbacks = ["other"]
    model.full_clean()


def test_every_routing_strategy_an_operator_can_pick_is_one_the_router_knows():
    from llm.routing import LEAST_IN_FLIGHT, LOWEST_LATENCY, WEIGHTED

    assert set(LLMModel.RoutingStrategy.values) == {WEIGHTED, LEAST_IN_FLIGHT, LOWEST_LATENCY}


def test_the_model_list_edits_enabled_even_when_a_fallback_is_gone(admin_site):
    """The list's form has ``enabled`` only: a fallback deleted since (or a name an alias took) must not
    refuse it, nor fail it with a 500 for a field it does not show."""
    kept = LLMModelFactory(name="list-kept", fallbacks=["list-gone"])
    LLMModel.objects.filter(pk=LLMModelFactory(name="list-gone").pk).delete()
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-MIN_NUM_FORMS": "0",
        "form-MAX_NUM_FORMS": "1000",
        "form-0-id": str(kept.pk),
        "_save": "Save",
    }  # "form-0-enabled" left out: unticked

    response = admin_site.post("/admin/llm/llmmodel/", data)

    assert response.status_code == 302, response.content.decode()[:3000]
    kept.refresh_from_db()
    assert kept.enabled is False
    with pytest.raises(ValidationError):  # the full form still names what is wrong
        kept.full_clean()


@pytest.mark.django_db(transaction=True)
def test_the_reservation_covers_the_costliest_model_that_may_serve_the_reply():
    """A prompt longer than the model's window goes to a fallback with a larger one, which may then write
    far more at its own prices: the budget reservation (``reply_metering``) is sized for it."""
    provider = ProviderFactory(name="sized")
    LLMModelFactory(
        name="roomy", provider=provider, context_window=10_000, max_output_tokens=500,
        input_price_per_million="10", output_price_per_million="20",
    )  # fmt: skip
    LLMModelFactory(name="narrow", provider=provider, context_window=100, fallbacks=["roomy"])
    enabled_model_cache.clear()
    narrow = enabled_model_get(name="narrow")
    long_prompt = [{"role": "user", "content": "word " * 300}]

    metering = reply_metering(
        request_id="r", user=UserFactory(), api_key=None, model=narrow, messages=long_prompt, parameters={}
    )

    assert metering.prompt_tokens > narrow.context_window
    assert metering.max_completion_tokens == 500  # the fallback's cap, not narrow's 1 token of room
    assert (metering.input_price_per_million, metering.output_price_per_million) == (Decimal(10), Decimal(20))
    assert [subject.kind for subject in metering.subjects] == ["user", "model"]
    assert metering.subjects[-1].id == narrow.id  # rate limits stay the requested model's


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("provider_clients")
async def test_a_request_its_deployments_rate_limit_refuses_is_recorded_refused(api_key_secret, simulator):
    """Every deployment over its concurrent streams: the request is turned away (429) before any upstream
    call, like one admission refuses — recorded ``refused`` (0 tokens, no cost), not a failed reply."""

    def one_stream_model() -> None:
        provider = ProviderFactory(name="sim-one-stream", base_url=simulator.base_url, api_key="")
        model = LLMModelFactory(name="one-stream", provider=provider)
        DeploymentFactory(model=model, provider=provider, upstream_model="sim-1", concurrent_streams=1)

    await run_sync(one_stream_model)
    client = AsyncClient()
    streaming = await post_chat(client, chat_body("one-stream", "hold it", stream=True), bearer(api_key_secret))
    assert streaming.status_code == 200
    refused = await post_chat(client, chat_body("one-stream", "and me"), bearer(api_key_secret))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    await streamed_content(streaming)  # the first reply holds the stream until its body is read

    records = {record.finish_status: record for record in await usage_records()}
    assert set(records) == {"refused", "completed"}
    row = records["refused"]
    assert (row.prompt_tokens, row.completion_tokens, row.cost) == (0, 0, 0)
