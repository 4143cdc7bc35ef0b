"""Reads for models and providers."""

from __future__ import annotations

from django.db.models import QuerySet

from chatbackend.errors import ApplicationError

from .models import LLMModel
from .providers import ProviderConfig


def llm_model_list_enabled() -> QuerySet[LLMModel]:
    """Return the models users may pick: enabled, on an enabled provider, ordered by name."""
    return LLMModel.objects.filter(enabled=True, provider__enabled=True).select_related("provider")


def llm_model_get_enabled(*, name: str) -> LLMModel:
    """Return the enabled model called ``name`` with its provider loaded.

    Raises ``ApplicationError`` 404 ``model_not_found`` when no model has that name, and 400
    ``model_disabled`` when it (or its provider) is disabled — OpenAI's statuses for the cases.
    """
    try:
        model = LLMModel.objects.select_related("provider").get(name=name)
    except LLMModel.DoesNotExist:
        raise ApplicationError(
            f"The model '{name}' does not exist.", code="model_not_found", status=404, param="model"
        ) from None
    if not model.enabled or not model.provider.enabled:
        raise ApplicationError(f"The model '{name}' is disabled.", code="model_disabled", status=400, param="model")
    return model


def provider_config_for(*, model: LLMModel) -> ProviderConfig:
    """Return the plain ``ProviderConfig`` (with the decrypted key) for ``model``'s provider."""
    provider = model.provider
    return ProviderConfig(
        kind=provider.kind,
        base_url=provider.base_url,
        api_key=provider.api_key or "",
        connect_timeout=provider.connect_timeout,
        read_timeout=provider.read_timeout,
    )
