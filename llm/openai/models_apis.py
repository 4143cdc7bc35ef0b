"""``GET /v1/models`` and ``GET /v1/models/{model}``: the enabled models and aliases, as OpenAI lists them.

An enabled alias (``llm.models.ModelAlias``) to an enabled model is listed as a model of its own,
``id`` its name and ``owned_by`` its target's provider, so clients can pick it; LiteLLM lists its
``model_group_alias`` names the same way (BerriAI/litellm#5524).

Wire format: https://platform.openai.com/docs/api-reference/models (``ListModelsResponse``, ``Model``).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint
from accounts.model_access import ModelAccess, model_access_for_async
from accounts.scopes import MODELS_SCOPE
from chatbackend.asyncdb import run_sync

from ..models import LLMModel, ModelAlias
from ..selectors import (
    llm_model_get_enabled_for,
    llm_model_list_for,
    model_alias_list_enabled,
    model_alias_list_for,
    model_not_found_error,
)


def _model_object(model: LLMModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.provider.name,
    }


def _alias_object(alias: ModelAlias) -> dict[str, Any]:
    return {
        "id": alias.name,
        "object": "model",
        "created": int(alias.created_at.timestamp()),
        "owned_by": alias.model.provider.name,
    }


def _model_list(access: ModelAccess) -> dict[str, Any]:
    objects = [_model_object(model) for model in llm_model_list_for(access=access)]
    objects += [_alias_object(alias) for alias in model_alias_list_for(access=access)]
    return {"object": "list", "data": sorted(objects, key=lambda entry: entry["id"])}


def _model_retrieve(name: str, access: ModelAccess) -> dict[str, Any]:
    # Raises for a name that is neither, is disabled, or is outside the caller's allowlists.
    model = llm_model_get_enabled_for(access=access, name=name)
    if model.name == name:
        return _model_object(model)
    alias = model_alias_list_enabled().filter(name=name).first()
    if alias is None:  # disabled or deleted since the line above
        raise model_not_found_error(name)
    return _alias_object(alias)


@async_endpoint("GET", scope=MODELS_SCOPE)
async def model_list(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /v1/models``: the enabled models and aliases by ``id``, as OpenAI's ``ListModelsResponse``.

    A caller sees only the models and aliases it may use: those its organization's, its teams' and
    its key's allowlists allow (``accounts.model_access``).
    """
    return JsonResponse(await run_sync(_model_list, await model_access_for_async(principal=principal)))


@async_endpoint("GET", scope=MODELS_SCOPE)
async def model_retrieve(request: HttpRequest, principal: Principal, model: str) -> HttpResponse:
    """``GET /v1/models/{model}``: one enabled model or alias; 404 ``model_not_found``, 400 ``model_disabled``.

    A model or alias outside the caller's allowlists (``accounts.model_access``) is a 404
    ``model_not_found``, as if it did not exist.
    """
    return JsonResponse(await run_sync(_model_retrieve, model, await model_access_for_async(principal=principal)))


__all__ = ["model_list", "model_retrieve"]
