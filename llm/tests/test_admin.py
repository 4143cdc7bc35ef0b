"""The Django admin where operators configure providers and models; provider keys stay write-only."""

from __future__ import annotations

import json

import pytest

from llm.models import LLMModel, Provider
from tests.factories import UPSTREAM_API_KEY, LLMModelFactory

pytestmark = pytest.mark.django_db

STORED_KEY = UPSTREAM_API_KEY  # what the ``provider`` fixture stores


def change_form_data(provider: Provider, **overrides: str) -> dict[str, str]:
    data = {
        "name": provider.name,
        "kind": provider.kind,
        "base_url": provider.base_url,
        "api_key": "",
        "connect_timeout": str(provider.connect_timeout),
        "read_timeout": str(provider.read_timeout),
        "first_token_timeout": str(provider.first_token_timeout),
        "enabled": "on",
    }
    data.update(overrides)
    return data


def test_provider_pages_load_and_never_show_the_key(admin_site, provider):
    LLMModelFactory(provider=provider)

    changelist = admin_site.get("/admin/llm/provider/")
    change = admin_site.get(f"/admin/llm/provider/{provider.pk}/change/")
    history = admin_site.get(f"/admin/llm/provider/{provider.pk}/history/")
    delete = admin_site.get(f"/admin/llm/provider/{provider.pk}/delete/")

    for page in (changelist, change, history, delete):
        assert page.status_code == 200
        assert STORED_KEY not in page.content.decode()
    assert "upstream" in changelist.content.decode()
    assert 'type="password"' in change.content.decode()


def test_saving_with_a_blank_key_keeps_the_stored_key(admin_site, provider):
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, read_timeout="42")
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.read_timeout == 42
    assert provider.api_key == STORED_KEY


def test_a_new_key_replaces_the_stored_key(admin_site, provider):
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, api_key="sk-new")
    )

    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == "sk-new"
    after = admin_site.get(f"/admin/llm/provider/{provider.pk}/change/")
    assert "sk-new" not in after.content.decode()


@pytest.mark.parametrize("key", ["sk-new\r\nX-Injected: 1", "sk-new\u200b-copied", "sk new", "sk-\u00e9"])
def test_a_key_that_cannot_travel_in_a_header_is_refused(admin_site, provider, key):
    # A CR/LF in the key made every request to the provider, and the "Test connection" action,
    # a 500 (the HTTP client refuses header injection); other stray characters fail upstream.
    response = admin_site.post(f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, api_key=key))

    assert response.status_code == 200  # the form again, with the error
    errors = response.context["adminform"].form.errors["api_key"]
    assert errors == [
        "An API key is visible ASCII characters without spaces or line breaks; check for a stray character "
        "copied with it."
    ]
    assert key not in response.content.decode()
    provider.refresh_from_db()
    assert provider.api_key == STORED_KEY


def test_clear_api_key_removes_the_stored_key(admin_site, provider):
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, clear_api_key="on")
    )

    assert response.status_code == 302
    provider.refresh_from_db()
    assert not provider.api_key  # stored empty (the encrypted field reads an empty key back as None)


def test_the_key_is_stored_encrypted(admin_site, provider):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM llm_provider WHERE id = %s", [provider.pk])
        (raw,) = cursor.fetchone()

    assert raw
    assert STORED_KEY not in raw


def add_form_data(**overrides: str) -> dict[str, str]:
    """Return the provider add form as an operator fills it in, with ``overrides``."""
    return {
        "name": "deepseek",
        "kind": "openai",
        "base_url": "https://api.deepseek.com/v1",
        "api_key": "sk-deepseek",
        "connect_timeout": "5",
        "read_timeout": "120",
        "first_token_timeout": "30",
        "enabled": "on",
        **overrides,
    }


def test_an_operator_adds_a_provider(admin_site):
    response = admin_site.post("/admin/llm/provider/add/", add_form_data())

    assert response.status_code == 302, response.content.decode()[:2000]
    assert Provider.objects.get(name="deepseek").api_key == "sk-deepseek"


def test_model_changelist_toggles_enabled_in_place(admin_site, provider):
    model = LLMModelFactory(name="gpt-test", provider=provider, upstream_model="gpt-4o-mini")

    changelist = admin_site.get("/admin/llm/llmmodel/", {"enabled__exact": "1"})
    response = admin_site.post(
        "/admin/llm/llmmodel/",
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000",
            "form-0-id": str(model.pk),
            "_save": "Save",
        },
    )

    assert changelist.status_code == 200
    assert "gpt-4o-mini" in changelist.content.decode()
    assert response.status_code == 302
    model.refresh_from_db()
    assert model.enabled is False


def test_model_change_form_loads(admin_site, provider):
    model = LLMModelFactory(name="gpt-form", provider=provider, upstream_model="gpt-4o-2024-08-06")

    response = admin_site.get(f"/admin/llm/llmmodel/{model.pk}/change/")

    assert response.status_code == 200
    page = response.content.decode()
    assert 'value="gpt-form"' in page and 'value="gpt-4o-2024-08-06"' in page  # the model's own form
    assert STORED_KEY not in page


def test_model_pages_show_the_cache_prices(admin_site, provider):
    model = LLMModelFactory(name="gpt-cache", provider=provider, cached_input_price_per_million="0.075000")

    form = admin_site.get(f"/admin/llm/llmmodel/{model.pk}/change/").content.decode()
    changelist = admin_site.get("/admin/llm/llmmodel/").content.decode()

    assert 'name="cached_input_price_per_million" value="0.075000"' in form
    assert 'name="cache_write_price_per_million"' in form  # empty: the input price applies
    assert "column-cached_input_price_per_million" in changelist and "0.075000" in changelist


def model_add_data(provider, **overrides: str) -> dict[str, str]:
    """The admin's add-model form, filled in, with ``overrides``."""
    return {
        "name": "gpt-sized",
        "provider": str(provider.pk),
        "upstream_model": "gpt-4o-mini",
        "context_window": "8192",
        "default_parameters": "{}",
        "input_price_per_million": "1",
        "output_price_per_million": "2",
        "tokenizer": "auto",
        "routing_strategy": "weighted",
        "fallbacks": "[]",
        "deployments-TOTAL_FORMS": "0",
        "deployments-INITIAL_FORMS": "0",
        **overrides,
    }


@pytest.mark.parametrize(
    "field",
    [
        "input_price_per_million",
        "output_price_per_million",
        "cached_input_price_per_million",
        "cache_write_price_per_million",
    ],
)
def test_a_model_price_below_zero_is_refused(admin_site, provider, field):
    # A negative price made every reply's cost negative, so using the model grew the budgets it spent.
    data = model_add_data(provider, name="gpt-priced", **{field: "-0.5"})

    response = admin_site.post("/admin/llm/llmmodel/add/", data)

    assert response.status_code == 200  # the form again, with the error
    assert response.context["adminform"].form.errors[field] == ["Ensure this value is greater than or equal to 0."]
    assert not LLMModel.objects.filter(name="gpt-priced").exists()
    response = admin_site.post("/admin/llm/llmmodel/add/", {**data, field: "0"})
    assert response.status_code == 302, response.content.decode()[:2000]


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"context_window": "0"}, "context_window", "Ensure this value is greater than or equal to 1."),
        ({"max_output_tokens": "0"}, "max_output_tokens", "Ensure this value is greater than or equal to 1."),
        (
            {"context_window": "4096", "max_output_tokens": "4096"},
            "max_output_tokens",
            "Less than the context window (4096 tokens), which must also hold the prompt; or empty for the rest of it.",
        ),
    ],
)
def test_model_token_counts_that_make_no_sense_are_refused(admin_site, provider, overrides, field, message):
    # A window of 0 tokens fits no prompt; a reply limit of 0 asks for no reply; a reply limit as
    # large as the window leaves the prompt no room (llm.metering.prompt_budget_for).
    response = admin_site.post("/admin/llm/llmmodel/add/", model_add_data(provider, **overrides))

    assert response.status_code == 200  # the form again, with the error
    assert response.context["adminform"].form.errors[field] == [message]
    assert not LLMModel.objects.filter(name="gpt-sized").exists()
    response = admin_site.post(
        "/admin/llm/llmmodel/add/", model_add_data(provider, context_window="4096", max_output_tokens="4095")
    )
    assert response.status_code == 302, response.content.decode()[:2000]


def test_a_deployment_added_since_the_page_loaded_is_a_form_error(admin_site, provider):
    # Another operator stored the same deployment meanwhile: the unique constraint made the save a 500.
    from llm.models import Deployment

    model = LLMModel.objects.create(name="gpt-deployed", provider=provider, upstream_model="gpt-4o-mini")
    Deployment.objects.create(model=model, provider=provider, upstream_model="second")
    row = {"provider": str(provider.pk), "upstream_model": "second", "weight": "1", "priority": "0", "enabled": "on"}
    data = model_add_data(provider, name="gpt-deployed", **{f"deployments-0-{k}": v for k, v in row.items()})

    response = admin_site.post(f"/admin/llm/llmmodel/{model.pk}/change/", {**data, "deployments-TOTAL_FORMS": "1"})

    assert response.status_code == 200
    assert "The model already has this deployment" in response.content.decode()
    assert Deployment.objects.filter(model=model).count() == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://ollama:11434/v1",
        "http://simulator.internal:8001/v1",
        "https://api.openai.com/v1",
        "http://127.0.0.1:8001/v1",
    ],
)
def test_an_operator_saves_a_provider_at_a_service_name_or_an_ip(admin_site, url):
    # Docker compose service names have no dot; Django's URLValidator would refuse them.
    response = admin_site.post("/admin/llm/provider/add/", add_form_data(name="local", base_url=url))

    assert response.status_code == 302, response.content.decode()[:2000]
    assert Provider.objects.get(name="local").base_url == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/v1",
        "api.openai.com/v1",
        "http://",
        "http://host:notaport/v1",
        "http://[::1/v1",  # an unclosed IPv6 bracket: urlsplit raises ValueError (it was a 500)
        "http://[not-an-ip]/v1",
    ],
)
def test_provider_base_url_rejects_non_http_urls(admin_site, url):
    from django.core.exceptions import ValidationError

    from llm.models import validate_base_url

    with pytest.raises(ValidationError):
        validate_base_url(url)
    response = admin_site.post("/admin/llm/provider/add/", add_form_data(name="local", base_url=url))
    assert response.status_code == 200  # the form again, with the error
    assert response.context["adminform"].form.errors["base_url"]
    assert not Provider.objects.filter(name="local").exists()


def test_an_openai_provider_takes_a_key_or_credentials_in_its_base_url_not_both(admin_site, provider):
    # Both go in the Authorization header (Bearer, Basic): the HTTP client refused every request
    # to such a provider (a 500 on each reply), so the form refuses it.
    with_user_info = "http://gateway:secret@ollama:11434/v1"
    response = admin_site.post("/admin/llm/provider/add/", add_form_data(name="both", base_url=with_user_info))
    assert response.status_code == 200
    assert "Use one of the two" in response.context["adminform"].form.errors["base_url"][0]
    assert not Provider.objects.filter(name="both").exists()
    # The stored key counts when the key field is left blank.
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, base_url=with_user_info)
    )
    assert response.status_code == 200 and response.context["adminform"].form.errors["base_url"]

    for name, overrides in {
        "basic": {"api_key": ""},  # the user info alone: HTTP Basic
        "anthropic": {"kind": "anthropic"},  # its key travels in x-api-key
    }.items():
        response = admin_site.post(
            "/admin/llm/provider/add/", add_form_data(name=name, base_url=with_user_info, **overrides)
        )
        assert response.status_code == 302, response.content.decode()[:2000]


CREDENTIALED_URL = "https://gateway:hunter2-secret@gateway.internal/v1"
MASKED_URL = "https://gateway:********@gateway.internal/v1"


def test_the_base_urls_password_is_never_shown_and_kept_when_left_masked(admin_site, provider):
    Provider.objects.filter(pk=provider.pk).update(base_url=CREDENTIALED_URL, api_key="")
    provider.refresh_from_db()

    changelist = admin_site.get("/admin/llm/provider/")
    change = admin_site.get(f"/admin/llm/provider/{provider.pk}/change/")
    for page in (changelist, change):
        assert page.status_code == 200
        assert "hunter2-secret" not in page.content.decode()
        assert MASKED_URL in page.content.decode()
    # A search on the URL would tell the password a character at a time: it searches names only.
    assert admin_site.get("/admin/llm/provider/?q=hunter2").context["cl"].result_count == 0

    # Saved as the form showed it, the stored password stays.
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, base_url=MASKED_URL, read_timeout="42")
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert (provider.base_url, provider.read_timeout) == (CREDENTIALED_URL, 42)

    # The placeholder in another URL is not a password: the operator types it again.
    moved = MASKED_URL.replace("gateway.internal", "elsewhere.example")
    response = admin_site.post(f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, base_url=moved))
    assert response.status_code == 200 and "type it again" in response.context["adminform"].form.errors["base_url"][0]
    provider.refresh_from_db()
    assert provider.base_url == CREDENTIALED_URL


def test_a_staff_user_who_may_only_view_providers_sees_the_base_url_masked(client, provider):
    from django.contrib.auth.models import Permission

    from tests.factories import UserFactory

    Provider.objects.filter(pk=provider.pk).update(base_url=CREDENTIALED_URL)
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_provider"))
    client.force_login(viewer)

    page = client.get(f"/admin/llm/provider/{provider.pk}/change/")

    assert page.status_code == 200
    assert "hunter2-secret" not in page.content.decode()
    assert MASKED_URL in page.content.decode()


def test_an_operator_sets_extra_headers(admin_site, provider):
    headers = {"HTTP-Referer": "https://chat.example.com", "X-Title": "Team chat"}
    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, extra_headers=json.dumps(headers))
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.extra_headers == headers
    assert "Team chat" in admin_site.get(f"/admin/llm/provider/{provider.pk}/change/").content.decode()
    # Left out of the form (an older client), they are kept empty rather than refused.
    response = admin_site.post("/admin/llm/provider/add/", add_form_data(name="plain"))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Provider.objects.get(name="plain").extra_headers == {}


@pytest.mark.parametrize("value", ["", "null"])
def test_emptied_extra_headers_are_no_headers(admin_site, provider, value):
    # The form field read an emptied box as None, which the NOT NULL column refused: a 500.
    provider.extra_headers = {"X-Title": "Chat"}
    provider.save()

    response = admin_site.post(
        f"/admin/llm/provider/{provider.pk}/change/", change_form_data(provider, extra_headers=value)
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.extra_headers == {}


@pytest.mark.parametrize(
    "value",
    [
        '{"Authorization": "Bearer sk-other"}',  # the adapter sets it from the API key
        '{"content-type": "text/plain"}',
        '{"X-Title": "a\\r\\nInjected: yes"}',  # no header injection
        '{"bad name": "x"}',
        '{"X-Count": 1}',
        '["X-Title"]',
    ],
)
def test_extra_headers_reject_reserved_names_and_bad_values(admin_site, value):
    from django.core.exceptions import ValidationError

    from llm.models import validate_extra_headers

    with pytest.raises(ValidationError):
        validate_extra_headers(json.loads(value))
    response = admin_site.post("/admin/llm/provider/add/", add_form_data(name="local", extra_headers=value))
    assert response.status_code == 200  # the form again, with the error
    assert response.context["adminform"].form.errors["extra_headers"]
    assert not Provider.objects.filter(name="local").exists()
