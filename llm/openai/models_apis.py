"""``GET /v1/models`` and ``GET /v1/models/{model}``: the enabled models and aliases, as OpenAI lists them.

A request with ``anthropic-version`` (the ``anthropic`` SDK's) is answered by
``llm.anthropic.models_apis`` in Anthropic's shape instead (``llm.anthropic.wire``); these views
answer every other.

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

from ..selectors import ListedModel, listed_model_get_for, listed_model_list_for


def _model_object(entry: ListedModel) -> dict[str, Any]:
    """Return OpenAI's ``Model``: an alias's ``owned_by`` is its target's provider."""
    return {
        "id": entry.id,
        "object": "model",
        "created": int(entry.created_at.timestamp()),
        "owned_by": entry.model.provider.name,
    }


def _model_list(access: ModelAccess) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(entry) for entry in listed_model_list_for(access=access)]}


def _model_retrieve(name: str, access: ModelAccess) -> dict[str, Any]:
    return _model_object(listed_model_get_for(access=access, name=name))


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
