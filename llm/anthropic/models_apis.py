"""Anthropic's ``GET /v1/models`` and ``GET /v1/models/{model_id}``: the models and aliases here, as ``ModelInfo``.

Routed by ``llm.anthropic.wire.by_wire_format``: a request with ``anthropic-version`` (what the
``anthropic`` SDK sends) comes here; any other gets OpenAI's shape (``llm.openai.models_apis``).
Both list the same names (``llm.selectors.listed_model_list_for``): the enabled models and
aliases the caller may use. Errors are Anthropic's (``llm.anthropic.errors``): 401
``authentication_error``, 404 ``not_found_error`` (no such model, or not the caller's), 400
``invalid_request_error`` (a bad ``limit``, a disabled model).

The list is ordered by ``id`` (Anthropic lists newest first; any fixed order pages the same), so
a cursor need not be a listed id: the page is the ids after (before) it.

Spec: https://docs.anthropic.com/en/api/models-list, https://docs.anthropic.com/en/api/models.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint
from accounts.model_access import ModelAccess, model_access_for_async
from accounts.scopes import MODELS_SCOPE
from chatbackend.asyncdb import run_sync

from ..selectors import ListedModel, listed_model_get_for, listed_model_list_for
from .errors import anthropic_error_response
from .serializers import AnthropicModelListQuerySerializer


def _model_info(entry: ListedModel) -> dict[str, Any]:
    """Return Anthropic's ``ModelInfo``; ``created_at`` RFC 3339 in UTC, to the second. ``lifecycle``
    is always ``active`` (a disabled model is not listed); ``max_input_tokens`` is the model's context
    window, ``max_tokens`` its output cap (None when it has none: the window bounds the reply)."""
    created = entry.created_at.astimezone(dt.UTC).replace(microsecond=0)
    return {
        "type": "model",
        "id": entry.id,
        "display_name": entry.id,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "lifecycle": "active",
        "max_input_tokens": entry.model.context_window,
        "max_tokens": entry.model.max_output_tokens,
    }


def _page(entries: list[ListedModel], query: dict[str, Any]) -> dict[str, Any]:
    """Return the page ``query`` asks for of ``entries`` (sorted by ``id``) and whether more follow it.

    ``before_id`` alone: the last ``limit`` ids before it; otherwise the first ``limit`` ids after
    ``after_id`` (all when absent) and, with ``before_id`` too, before it.
    """
    limit: int = query["limit"]
    if "before_id" in query:
        entries = [entry for entry in entries if entry.id < query["before_id"]]
    if "before_id" in query and "after_id" not in query:
        page, has_more = entries[-limit:], len(entries) > limit
    else:
        after = [entry for entry in entries if "after_id" not in query or entry.id > query["after_id"]]
        page, has_more = after[:limit], len(after) > limit
    return {
        "data": [_model_info(entry) for entry in page],
        "has_more": has_more,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


def _model_list(access: ModelAccess, query: dict[str, Any]) -> dict[str, Any]:
    return _page(listed_model_list_for(access=access), query)


def _model_retrieve(name: str, access: ModelAccess) -> dict[str, Any]:
    return _model_info(listed_model_get_for(access=access, name=name))


@async_endpoint("GET", scope=MODELS_SCOPE, errors=anthropic_error_response)
async def model_list(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /v1/models?after_id=&before_id=&limit=``: a page of ``ModelInfo``, ``has_more``, ``first_id``, ``last_id``.

    ``limit``: 1 to 1000, default 20. 400 ``invalid_request_error`` for another ``limit`` or a
    blank cursor. A caller sees only the models and aliases it may use (``accounts.model_access``).
    """
    # A plain dict, not the QueryDict: DRF reads a blank value in form data as absent, so
    # ``?before_id=`` would list everything rather than be the 400 the schema promises.
    serializer = AnthropicModelListQuerySerializer(data=request.GET.dict())
    serializer.is_valid(raise_exception=True)
    access = await model_access_for_async(principal=principal)
    return JsonResponse(await run_sync(_model_list, access, serializer.validated_data))


@async_endpoint("GET", scope=MODELS_SCOPE, errors=anthropic_error_response)
async def model_retrieve(request: HttpRequest, principal: Principal, model: str) -> HttpResponse:
    """``GET /v1/models/{model_id}``: one ``ModelInfo``.

    404 ``not_found_error`` for no such model or alias, 400 ``invalid_request_error`` for a disabled
    one. A model or alias outside the caller's allowlists is a 404, as if it did not exist.
    """
    return JsonResponse(await run_sync(_model_retrieve, model, await model_access_for_async(principal=principal)))


__all__ = ["model_list", "model_retrieve"]
