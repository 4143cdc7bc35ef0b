"""A rate limit of 0 is refused wherever a limit is set: empty is "no limit", 1 the least there is.

0 requests (tokens, streams) per minute admitted nothing, yet each refusal said "try again in 1s"
(or "when one of them has ended"): a client honouring ``Retry-After`` retried for ever.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.models import APIKey, Organization, Team, User
from accounts.services import api_key_create
from llm.models import Deployment, LLMModel
from llm.tests.test_admin import model_add_data
from tests.factories import DeploymentFactory, LLMModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db

FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")
ZERO_MESSAGE = "0 would refuse every request; leave it empty for no limit."


def _rows(user: User) -> list[object]:
    organization = Organization.objects.default()
    return [
        user,
        api_key_create(user=user, name="ci").api_key,
        organization,
        Team.objects.create(organization=organization, name="Ops", slug="ops"),
        LLMModelFactory(),
        DeploymentFactory(),
    ]


@pytest.mark.parametrize("field", FIELDS)
def test_the_database_refuses_a_limit_of_zero_and_keeps_one_and_none(user, field):
    for row in _rows(user):
        model = type(row)
        for allowed in (None, 1):
            model.objects.filter(pk=row.pk).update(**{field: allowed})
        with pytest.raises(IntegrityError), transaction.atomic():
            model.objects.filter(pk=row.pk).update(**{field: 0})


@pytest.mark.parametrize("field", FIELDS)
def test_model_validation_names_the_zero_limit(user, field):
    for row in _rows(user):
        setattr(row, field, 0)
        with pytest.raises(ValidationError) as raised:
            row.full_clean()
        assert raised.value.message_dict[field] == [ZERO_MESSAGE], type(row).__name__


def test_the_api_key_page_refuses_zero(admin_site, user):
    api_key = api_key_create(user=user, name="ci").api_key
    url = f"/admin/accounts/apikey/{api_key.pk}/change/"

    response = admin_site.post(url, {"requests_per_minute": "0", "tokens_per_minute": "", "concurrent_streams": "0"})

    assert response.status_code == 200  # the form again, with the errors
    errors = response.context["adminform"].form.errors
    assert errors["requests_per_minute"] == [ZERO_MESSAGE]
    assert errors["concurrent_streams"] == [ZERO_MESSAGE]
    api_key.refresh_from_db()
    assert (api_key.requests_per_minute, api_key.concurrent_streams) == (None, None)
    response = admin_site.post(url, {"requests_per_minute": "1", "tokens_per_minute": "", "concurrent_streams": ""})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert APIKey.objects.get(pk=api_key.pk).requests_per_minute == 1


def test_the_model_page_refuses_zero_on_the_model_and_its_deployments(admin_site):
    provider = ProviderFactory()
    deployment = {
        "provider": str(provider.pk),
        "upstream_model": "second",
        "weight": "1",
        "priority": "0",
        "enabled": "on",
        "tokens_per_minute": "0",
    }
    data = model_add_data(
        provider,
        name="gpt-limited",
        tokens_per_minute="0",
        **{f"deployments-0-{k}": v for k, v in deployment.items()},
        **{"deployments-TOTAL_FORMS": "1"},
    )

    response = admin_site.post("/admin/llm/llmmodel/add/", data)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["tokens_per_minute"] == [ZERO_MESSAGE]
    assert response.context["inline_admin_formsets"][0].formset.errors[0]["tokens_per_minute"] == [ZERO_MESSAGE]
    assert not LLMModel.objects.filter(name="gpt-limited").exists()
    assert not Deployment.objects.filter(upstream_model="second").exists()


def _limits(row: Any) -> tuple[int | None, ...]:
    row.refresh_from_db()
    return (row.requests_per_minute, row.tokens_per_minute, row.concurrent_streams)


# Two tests: django-test-migrations builds the "before" state by applying the full plan up to the
# last target, which would run one app's tested migration while building the other's.
@pytest.mark.django_db(transaction=True)
def test_user_limits_stored_as_zero_become_one_never_unlimited(migrator: Any) -> None:
    old = migrator.apply_initial_migration([("accounts", "0023_organization_slug_unique_ignoring_case")])
    User = old.apps.get_model("accounts", "User")
    blocked = User.objects.create(username="blocked", requests_per_minute=0)
    limited = User.objects.create(username="limited", requests_per_minute=7, concurrent_streams=0)

    new = migrator.apply_tested_migration([("accounts", "0025_rate_limits_not_zero")])

    User = new.apps.get_model("accounts", "User")
    assert _limits(User.objects.get(pk=blocked.pk)) == (1, None, None)
    assert _limits(User.objects.get(pk=limited.pk)) == (7, None, 1)


@pytest.mark.django_db(transaction=True)
def test_model_limits_stored_as_zero_become_one_never_unlimited(migrator: Any) -> None:
    old = migrator.apply_initial_migration([("llm", "0010_model_token_counts_at_least_one")])
    Provider = old.apps.get_model("llm", "Provider")
    provider = Provider.objects.create(name="sim", kind="openai_compatible", base_url="http://127.0.0.1:1/v1")
    model = old.apps.get_model("llm", "LLMModel").objects.create(
        provider=provider, name="m1", upstream_model="m1", tokens_per_minute=0
    )
    deployment = old.apps.get_model("llm", "Deployment").objects.create(
        model=model, provider=provider, upstream_model="m2", concurrent_streams=0
    )

    new = migrator.apply_tested_migration([("llm", "0012_rate_limits_not_zero")])

    assert _limits(new.apps.get_model("llm", "LLMModel").objects.get(pk=model.pk)) == (None, 1, None)
    assert _limits(new.apps.get_model("llm", "Deployment").objects.get(pk=deployment.pk)) == (None, None, 1)
