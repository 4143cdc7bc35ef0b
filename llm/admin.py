"""Django admin where operators configure providers (upstream APIs), the models users pick and their aliases.

A provider's ``api_key`` is write-only here: the form never renders it, and leaving the field
blank on edit keeps the stored key. The password of its base URL's user info
(``https://user:password@gateway/v1``) is a secret too: pages show it as ``********``, and a
base URL submitted with that placeholder keeps the stored password. The action "Test connection"
(on providers and on models) makes a one-token call and reports its latency or the upstream's error, never the key.

Every add, change and delete of a provider, model, alias or deployment writes an audit row
(``accounts.admin.AuditedModelAdmin``); a provider's key appears there only as set or changed.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest

from accounts.admin import AuditedModelAdmin
from accounts.audit import url_password_masked
from chatbackend.admin_guard import RelatedFieldGuardMixin, inline_rows_stored_meanwhile

from .models import Deployment, LLMModel, ModelAlias, Provider, validate_provider_api_key
from .services import llm_model_connection_test


def _report_connection_test(modeladmin: admin.ModelAdmin, request: HttpRequest, model: LLMModel, label: str) -> None:
    """Test ``model``'s connection and report it on the next page as a Django message about ``label``."""
    result = llm_model_connection_test(model=model)
    target = f"{label} (model {model.upstream_model!r})"
    if result.ok:
        modeladmin.message_user(
            request, f"{target}: connected, one-token reply in {result.latency_ms:.0f} ms.", messages.SUCCESS
        )
    else:
        modeladmin.message_user(
            request, f"{target}: failed after {result.latency_ms:.0f} ms: {result.error}", messages.ERROR
        )


# What pages show in place of a base URL's password (or of a user name that has none: a token).
URL_PASSWORD_PLACEHOLDER = "********"  # noqa: S105 - a placeholder, not a password


def base_url_masked(url: str) -> str:
    """Return ``url`` with the password of its user info shown as ``URL_PASSWORD_PLACEHOLDER``."""
    return url_password_masked(url, URL_PASSWORD_PLACEHOLDER)


class ProviderAdminForm(forms.ModelForm):
    """The provider form with a write-only ``api_key``: blank keeps the stored key."""

    api_key = forms.CharField(
        required=False,
        strip=True,
        max_length=500,
        widget=forms.PasswordInput(render_value=False),
        validators=[validate_provider_api_key],
        help_text="The upstream API key. Never shown; leave blank to keep the stored key.",
    )
    clear_api_key = forms.BooleanField(
        required=False, label="Clear API key", help_text="Remove the stored key (for upstreams that need none)."
    )

    class Meta:
        model = Provider
        fields = (
            "name",
            "kind",
            "base_url",
            "api_key",
            "clear_api_key",
            "extra_headers",
            "connect_timeout",
            "first_token_timeout",
            "read_timeout",
            "stream_usage",
            "enabled",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # ModelForm copies the decrypted key into ``initial``; keep it out of the form entirely.
        self.initial["api_key"] = ""
        if self.initial.get("base_url"):
            self.initial["base_url"] = base_url_masked(self.initial["base_url"])

    def clean_base_url(self) -> str:
        """Return the stored base URL when the one submitted is it as the form showed it (its
        password masked); refuse the placeholder in any other URL (the password was not retyped)."""
        value: str = self.cleaned_data["base_url"]
        stored = self.instance.base_url if self.instance.pk else ""
        if stored and value == base_url_masked(stored):
            return stored
        if URL_PASSWORD_PLACEHOLDER in value.partition("://")[2].partition("/")[0]:
            raise forms.ValidationError(
                "The base URL's password is not shown: type it again when you change the URL's user, host or path."
            )
        return value

    def clean_extra_headers(self) -> Any:
        """Return the headers; an emptied box (or ``null``) is no headers, ``{}``: the form field makes
        it None, which the column (NOT NULL) refused with a 500."""
        value = self.cleaned_data.get("extra_headers")
        return {} if value is None else value

    def clean(self) -> dict[str, Any]:
        """Resolve ``api_key``: "" when "Clear API key" is ticked, the stored key when left blank."""
        super().clean()
        cleaned_data = self.cleaned_data
        if cleaned_data.get("clear_api_key"):
            cleaned_data["api_key"] = ""
        elif not cleaned_data.get("api_key") and self.instance.pk:
            cleaned_data["api_key"] = self.instance.api_key
        return cleaned_data


@admin.register(Provider)
class ProviderAdmin(AuditedModelAdmin):
    form = ProviderAdminForm
    list_display = ("name", "kind", "masked_base_url", "has_api_key", "enabled", "connect_timeout", "read_timeout")
    list_filter = ("kind", "enabled")
    # Not base_url: a search on it would tell its password character by character.
    search_fields = ("name",)

    actions = ("test_connection",)

    @admin.display(description="base URL", ordering="base_url")
    def masked_base_url(self, obj: Provider) -> str:
        return base_url_masked(obj.base_url)

    def _view_only(self, request: HttpRequest, obj: Provider | None) -> bool:
        return obj is not None and not self.has_change_permission(request, obj)

    def get_fields(self, request: HttpRequest, obj: Provider | None = None) -> Any:
        """Show the base URL masked on a read-only page (a user who may view, not change): read-only
        fields render the model's own value."""
        fields = super().get_fields(request, obj)
        if self._view_only(request, obj):
            return ["masked_base_url" if name == "base_url" else name for name in fields if name != "masked_base_url"]
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Provider | None = None) -> Any:
        readonly = super().get_readonly_fields(request, obj)
        return (*readonly, "masked_base_url") if self._view_only(request, obj) else readonly

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: Provider) -> bool:
        return bool(obj.api_key)

    @admin.action(description="Test connection (a one-token call to one of its models)", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        """Make a one-token call through each selected provider, to its first model (enabled ones first)."""
        for provider in queryset:
            model = provider.models.select_related("provider").order_by("-enabled", "name").first()
            if model is None:
                self.message_user(
                    request,
                    f"Provider {provider.name!r}: no model to test with; add a model (its upstream model id) first.",
                    messages.WARNING,
                )
                continue
            _report_connection_test(self, request, model, f"Provider {provider.name!r}")


class DeploymentInlineFormSet(BaseInlineFormSet):
    """The model's deployments; a new one that a stored one already is (added since the page loaded)
    is a field error, not the unique constraint's 500."""

    def clean(self) -> None:
        super().clean()
        inline_rows_stored_meanwhile(
            self,
            ["provider", "upstream_model"],
            "The model already has this deployment: reload the page to see every deployment.",
        )


class DeploymentInline(RelatedFieldGuardMixin, admin.TabularInline):
    """The model's deployments (``llm.routing``): empty, the model's own provider serves it."""

    model = Deployment
    formset = DeploymentInlineFormSet
    extra = 0
    fields = (
        "provider",
        "upstream_model",
        "weight",
        "priority",
        "enabled",
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_streams",
    )
    autocomplete_fields = ("provider",)


@admin.register(LLMModel)
class LLMModelAdmin(RelatedFieldGuardMixin, AuditedModelAdmin):
    list_display = (
        "name",
        "provider",
        "upstream_model",
        "enabled",
        "input_price_per_million",
        "output_price_per_million",
        "cached_input_price_per_million",
        "cache_write_price_per_million",
        "context_window",
        "tokenizer",
        "routing_strategy",
    )
    list_editable = ("enabled",)
    list_filter = ("enabled", "provider", "tokenizer")
    list_select_related = ("provider",)
    search_fields = ("name", "upstream_model")
    autocomplete_fields = ("provider",)
    inlines = (DeploymentInline,)
    actions = ("test_connection",)

    @admin.action(description="Test connection (a one-token call to the upstream model)", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet[LLMModel]) -> None:
        """Make a one-token call to each selected model's upstream model through its provider."""
        for model in queryset.select_related("provider"):
            _report_connection_test(self, request, model, f"Model {model.name!r}")


@admin.register(ModelAlias)
class ModelAliasAdmin(RelatedFieldGuardMixin, AuditedModelAdmin):
    """Aliases: other names for models. A name already a model's is refused on the form (``ModelAlias.clean``)."""

    list_display = ("name", "model", "enabled", "updated_at")
    list_editable = ("enabled",)
    list_filter = ("enabled",)
    list_select_related = ("model",)
    search_fields = ("name", "model__name")
    autocomplete_fields = ("model",)
    fields = ("name", "model", "enabled")
