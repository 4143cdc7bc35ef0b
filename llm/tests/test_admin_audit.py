"""Provider, model, alias and deployment changes in the admin each write one audit row, keys masked."""

from __future__ import annotations

import json
from typing import Any

import pytest

from accounts.models import AuditEvent
from llm.models import Deployment, LLMModel, ModelAlias, Provider
from tests.factories import UPSTREAM_API_KEY, DeploymentFactory, LLMModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db

Action = AuditEvent.Action


def changes() -> list[AuditEvent]:
    """The audit rows of changes (not the operator's login), oldest first."""
    return list(AuditEvent.objects.exclude(action=Action.LOGIN_SUCCEEDED).order_by("id"))


def all_rows_json() -> str:
    return json.dumps(list(AuditEvent.objects.values()), default=str)


def provider_data(provider: Provider, **overrides: str) -> dict[str, str]:
    data = {
        "name": provider.name,
        "kind": provider.kind,
        "base_url": provider.base_url,
        "api_key": "",
        "extra_headers": "{}",
        "connect_timeout": str(provider.connect_timeout),
        "read_timeout": str(provider.read_timeout),
        "first_token_timeout": str(provider.first_token_timeout),
        "stream_usage": "on",
        "enabled": "on",
    }
    data.update(overrides)
    return data


def model_data(provider: Provider, deployments: list[dict[str, str]], initial: int = 0, **overrides: str) -> dict:
    data: dict[str, Any] = {
        "name": "gpt-audit",
        "provider": str(provider.pk),
        "upstream_model": "gpt-4o-mini",
        "context_window": "8192",
        "max_output_tokens": "",
        "default_parameters": "{}",
        "enabled": "on",
        "input_price_per_million": "1",
        "output_price_per_million": "2",
        "cached_input_price_per_million": "",
        "cache_write_price_per_million": "",
        "tokenizer": "auto",
        "routing_strategy": "weighted",
        "fallbacks": "[]",
        "requests_per_minute": "",
        "tokens_per_minute": "",
        "concurrent_streams": "",
        "deployments-TOTAL_FORMS": str(len(deployments)),
        "deployments-INITIAL_FORMS": str(initial),
        "deployments-MIN_NUM_FORMS": "0",
        "deployments-MAX_NUM_FORMS": "1000",
    }
    for index, deployment in enumerate(deployments):
        row = {"weight": "1", "priority": "0", "enabled": "on", **deployment}
        data.update({f"deployments-{index}-{key}": value for key, value in row.items()})
    data.update(overrides)
    return data


def test_a_new_provider_key_is_one_row_that_never_holds_a_key(admin_site, superuser):
    provider = ProviderFactory(name="upstream", base_url="https://llm.example.com/v1")

    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", provider_data(provider, api_key="sk-new-upstream-key-42")
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    [row] = changes()
    assert (row.action, row.actor, row.object_type, row.object_id) == (
        Action.PROVIDER_UPDATED,
        superuser,
        "llm.provider",
        str(provider.pk),
    )
    assert (row.before, row.after) == ({"api_key": "[set]"}, {"api_key": "[changed]"})
    assert UPSTREAM_API_KEY not in all_rows_json() and "sk-new-upstream-key-42" not in all_rows_json()


def test_a_base_urls_password_never_enters_a_row(admin_site):
    # The user info of a base URL (a proxy's basic auth) was recorded as typed, readable over
    # /api/audit-log/ and in its CSV; the logs already drop it (llm.providers.http.where).
    response = admin_site.post(
        "/admin/llm/provider/add/",
        provider_data(Provider(name="proxied", base_url="https://bob:hunter2-secret@llm.example.com/v1")),
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    provider = Provider.objects.get(name="proxied")
    admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/",
        provider_data(provider, base_url="https://bob:rotated-secret@llm.example.com/v1"),
    )
    admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/",
        provider_data(provider, base_url="https://llm.example.com/v2"),
    )
    admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/",
        provider_data(provider, base_url="https://token-as-user@llm.example.com/v2"),
    )

    created, rotated, moved, tokened = changes()
    assert created.after["base_url"] == "https://bob:[set]@llm.example.com/v1"
    assert (rotated.before, rotated.after) == (
        {"base_url": "https://bob:[set]@llm.example.com/v1"},
        {"base_url": "https://bob:[changed]@llm.example.com/v1"},
    )
    assert moved.after == {"base_url": "https://llm.example.com/v2"}
    assert tokened.after == {"base_url": "https://[set]@llm.example.com/v2"}
    for secret in ("hunter2-secret", "rotated-secret", "token-as-user"):
        assert secret not in all_rows_json()


def test_a_provider_saved_with_a_blank_key_records_only_what_changed(admin_site):
    provider = ProviderFactory(name="upstream", base_url="https://llm.example.com/v1")

    admin_site.post(f"/admin/llm/provider/{provider.pk}/change/", provider_data(provider, read_timeout="42"))
    admin_site.post(f"/admin/llm/provider/{provider.pk}/change/", provider_data(provider, read_timeout="42"))

    [row] = changes()  # the second save changed nothing: no row
    assert (row.before, row.after) == ({"read_timeout": 10.0}, {"read_timeout": 42.0})


def test_adding_and_deleting_a_provider(admin_site):
    response = admin_site.post(
        "/admin/llm/provider/add/",
        provider_data(Provider(name="fresh", base_url="https://x.example.com/v1"), api_key="sk-fresh-key-1"),
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    provider = Provider.objects.get(name="fresh")

    deleted = admin_site.post(f"/admin/llm/provider/{provider.pk}/delete/", {"post": "yes"})

    assert deleted.status_code == 302
    created_row, deleted_row = changes()
    assert (created_row.action, deleted_row.action) == (Action.PROVIDER_CREATED, Action.PROVIDER_DELETED)
    assert created_row.after["api_key"] == "[set]" and created_row.after["name"] == "fresh"
    assert deleted_row.object_id == str(provider.pk) and deleted_row.before["name"] == "fresh"
    assert "sk-fresh-key-1" not in all_rows_json()


def test_a_model_added_with_a_deployment_is_one_row_each(admin_site, superuser):
    provider = ProviderFactory(name="upstream")
    other = ProviderFactory(name="backup")

    response = admin_site.post(
        "/admin/llm/llmmodel/add/",
        model_data(provider, [{"provider": str(other.pk), "upstream_model": "gpt-4o-mini-backup"}]),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    model = LLMModel.objects.get(name="gpt-audit")
    deployment = Deployment.objects.get()
    model_row, deployment_row = changes()
    assert (model_row.action, model_row.object_id, model_row.actor) == (
        Action.LLM_MODEL_CREATED,
        str(model.pk),
        superuser,
    )
    assert model_row.after["input_price_per_million"] == "1.000000"
    assert (deployment_row.action, deployment_row.object_id) == (Action.DEPLOYMENT_CREATED, str(deployment.pk))
    assert deployment_row.after["provider"] == other.pk and deployment_row.after["model"] == model.pk


def test_changing_a_deployment_and_deleting_another_writes_their_rows_only(admin_site):
    provider = ProviderFactory(name="upstream")
    model = LLMModelFactory(name="gpt-audit", provider=provider, upstream_model="gpt-4o-mini")
    kept = DeploymentFactory(model=model, provider=provider, upstream_model="a")
    gone = DeploymentFactory(model=model, provider=provider, upstream_model="b")
    deployments = [
        {
            "id": str(kept.pk),
            "model": str(model.pk),
            "provider": str(provider.pk),
            "upstream_model": "a",
            "weight": "3",
        },
        {
            "id": str(gone.pk),
            "model": str(model.pk),
            "provider": str(provider.pk),
            "upstream_model": "b",
            "DELETE": "on",
        },
    ]

    response = admin_site.post(
        f"/admin/llm/llmmodel/{model.pk}/change/",
        model_data(provider, deployments, initial=2, input_price_per_million="1.000000"),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert [(row.action, row.object_id) for row in changes()] == [
        (Action.DEPLOYMENT_UPDATED, str(kept.pk)),
        (Action.DEPLOYMENT_DELETED, str(gone.pk)),
    ]
    updated, deleted = changes()
    assert (updated.before, updated.after) == ({"weight": 1}, {"weight": 3})
    assert deleted.before["upstream_model"] == "b"


def test_models_disabled_in_the_changelist_and_deleted_in_bulk(admin_site):
    first = LLMModelFactory(name="m1")
    second = LLMModelFactory(name="m2")

    admin_site.post(
        "/admin/llm/llmmodel/",
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000",
            "form-0-id": str(first.pk),
            "_save": "Save",
        },
    )
    admin_site.post(
        "/admin/llm/llmmodel/",
        {"action": "delete_selected", "_selected_action": [first.pk, second.pk], "post": "yes"},
    )

    rows = changes()
    assert [(row.action, row.object_id) for row in rows] == [
        (Action.LLM_MODEL_UPDATED, str(first.pk)),
        (Action.LLM_MODEL_DELETED, str(first.pk)),
        (Action.LLM_MODEL_DELETED, str(second.pk)),
    ]
    assert (rows[0].before, rows[0].after) == ({"enabled": True}, {"enabled": False})


def test_an_alias_pointed_elsewhere_is_one_row(admin_site, superuser):
    first = LLMModelFactory(name="m1")
    second = LLMModelFactory(name="m2")
    alias = ModelAlias.objects.create(name="gpt-4o-mini", model=first)

    response = admin_site.post(
        f"/admin/llm/modelalias/{alias.pk}/change/", {"name": "gpt-4o-mini", "model": str(second.pk), "enabled": "on"}
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    [row] = changes()
    assert (row.action, row.actor, row.object_repr) == (Action.MODEL_ALIAS_UPDATED, superuser, str(alias))
    assert (row.before, row.after) == ({"model": first.pk}, {"model": second.pk})
