"""Django admin where operators configure providers (upstream APIs) and the models users pick.

A provider's ``api_key`` is write-only here: the form never renders it, and leaving the field
blank on edit keeps the stored key.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin

from .models import Deployment, LLMModel, Provider


class ProviderAdminForm(forms.ModelForm):
    """The provider form with a write-only ``api_key``: blank keeps the stored key."""

    api_key = forms.CharField(
        required=False,
        strip=True,
        max_length=500,
        widget=forms.PasswordInput(render_value=False),
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
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderAdminForm
    list_display = ("name", "kind", "base_url", "has_api_key", "enabled", "connect_timeout", "read_timeout")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "base_url")

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: Provider) -> bool:
        return bool(obj.api_key)


class DeploymentInline(admin.TabularInline):
    """The model's deployments (``llm.routing``): empty, the model's own provider serves it."""

    model = Deployment
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
class LLMModelAdmin(admin.ModelAdmin):
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
