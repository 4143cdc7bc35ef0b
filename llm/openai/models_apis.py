"""``GET /v1/models`` and ``GET /v1/models/{model}``: the enabled models, as OpenAI lists them.

Wire format: https://platform.openai.com/docs/api-reference/models (``ListModelsResponse``, ``Model``).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint
from chatbackend.asyncdb import run_sync

from ..models import LLMModel
from ..selectors import llm_model_get_enabled, llm_model_list_enabled


def _model_object(model: LLMModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.provider.name,
    }


def _model_list() -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(model) for model in llm_model_list_enabled().order_by("name")]}


def _model_retrieve(name: str) -> dict[str, Any]:
    return _model_object(llm_model_get_enabled(name=name))


@async_endpoint("GET")
async def model_list(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /v1/models``: the enabled models, as OpenAI's ``ListModelsResponse``."""
    return JsonResponse(await run_sync(_model_list))


@async_endpoint("GET")
async def model_retrieve(request: HttpRequest, principal: Principal, model: str) -> HttpResponse:
    """``GET /v1/models/{model}``: one enabled model; 404 ``model_not_found``, 400 ``model_disabled``."""
    return JsonResponse(await run_sync(_model_retrieve, model))


__all__ = ["model_list", "model_retrieve"]
