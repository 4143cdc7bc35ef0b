"""``GET /v1/models`` and ``GET /v1/models/{model}``: the enabled models, as OpenAI lists them.

Wire format: https://platform.openai.com/docs/api-reference/models (``ListModelsResponse``, ``Model``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from chatbackend.asyncdb import run_sync
from llm.models import LLMModel

from .endpoint import openai_endpoint, request_authenticator
from .services import openai_model_get, openai_model_list


def _model_object(model: LLMModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.provider.name,
    }


def _model_list(authenticate: Callable[[], Principal]) -> dict[str, Any]:
    authenticate()
    return {"object": "list", "data": [_model_object(model) for model in openai_model_list()]}


def _model_retrieve(authenticate: Callable[[], Principal], name: str) -> dict[str, Any]:
    authenticate()
    return _model_object(openai_model_get(name=name))


@openai_endpoint("GET")
async def model_list(request: HttpRequest) -> HttpResponse:
    """``GET /v1/models``: the enabled models, as OpenAI's ``ListModelsResponse``."""
    return JsonResponse(await run_sync(_model_list, request_authenticator(request)))


@openai_endpoint("GET")
async def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    """``GET /v1/models/{model}``: one enabled model; 404 ``model_not_found``, 400 ``model_disabled``."""
    return JsonResponse(await run_sync(_model_retrieve, request_authenticator(request), model))


__all__ = ["model_list", "model_retrieve"]
