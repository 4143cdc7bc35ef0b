"""OpenAI's stored chat completions: list, retrieve, update metadata, delete, and their messages.

``GET /v1/chat/completions`` (and ``POST``: ``llm.openai.apis.chat_completions``, routed by method
here), ``GET`` / ``POST`` / ``DELETE /v1/chat/completions/{completion_id}`` and
``GET /v1/chat/completions/{completion_id}/messages``, as the openai SDK's
``chat.completions.list / retrieve / update / delete / messages.list`` call them. Plain async views
wrapped by ``accounts.endpoints.async_endpoint`` (OpenAI's error JSON); reading needs an API key's
``read`` scope, changing its ``chat`` scope. Each does one worker-thread hop.

Wire format: https://platform.openai.com/docs/api-reference/chat/list (``ChatCompletionList``,
``CreateChatCompletionResponse``, ``ChatCompletionMessageList``, ``ChatCompletionDeleted`` in
OpenAI's OpenAPI description). A stored completion carries ``metadata`` and one extension,
``status``: ``completed``, or ``cancelled`` / ``failed`` for a reply stopped or cut off, which
keeps the text generated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint, by_method, parse_json, request_body
from accounts.models import APIKey
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from chatbackend.text import refuse_nul
from llm.openai.apis import chat_completions as chat_completion_create

from ..models import Conversation, Message
from .selectors import (
    ORDERS,
    stored_completion_get_for,
    stored_completion_list,
    stored_completion_messages,
    stored_completion_reply,
)
from .serializers import StoredCompletionUpdateInputSerializer
from .services import stored_completion_delete, stored_completion_metadata_update

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_METADATA_PARAMETER = re.compile(r"^metadata\[(.+)\]$")
_UPDATE_INPUT = StoredCompletionUpdateInputSerializer()


# --- Shapes -----------------------------------------------------------------------------------


def completion_object(conversation: Conversation) -> dict[str, Any]:
    """Return stored completion ``conversation`` as OpenAI's ``chat.completion`` object, with its ``metadata``.

    As the client was answered (``llm.openai.apis``): a refusal is the message's ``refusal`` (its
    ``content`` then null when the model said nothing else), ``usage`` carries the provider's
    ``prompt_tokens_details`` / ``completion_tokens_details`` when it reported them, its tool calls are
    the message's ``tool_calls`` (``content`` null when it said nothing else). A reply stopped
    or cut off before the upstream sent a ``finish_reason`` has ``finish_reason: null`` (as its
    stream had none; ``status`` says ``cancelled`` or ``failed``), not ``stop``, a natural end.
    """
    reply = stored_completion_reply(conversation)
    prompt_tokens = (reply.prompt_tokens if reply else 0) or 0
    completion_tokens = (reply.completion_tokens if reply else 0) or 0
    text = reply.content if reply else ""
    refusal = reply.refusal if reply else ""
    if refusal and text.endswith(refusal):  # ``content`` holds the whole text; the refusal is its end
        text = text[: len(text) - len(refusal)]
    tool_calls = reply.tool_calls if reply else None
    status = reply.status if reply else Message.Status.COMPLETED.value
    finish_reason: str | None = (reply.finish_reason if reply else "") or (
        "stop" if status == Message.Status.COMPLETED else None
    )
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reply is not None and reply.cached_tokens is not None and reply.reasoning_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
        usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
    return {
        "id": conversation.completion_id,
        "object": "chat.completion",
        "created": int(conversation.created_at.timestamp()),
        "model": (reply.model_name if reply else "") or conversation.model.name,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text if text or not (refusal or tool_calls) else None,
                    "refusal": refusal or None,
                    **({"tool_calls": tool_calls} if tool_calls else {}),
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "metadata": conversation.metadata or {},
        "status": status,
    }


def _message_object(completion_id: str, index: int, message: Message) -> dict[str, Any]:
    """One message of ``ChatCompletionMessageList``; an assistant turn's ``tool_calls`` with it (its
    ``content`` then null when it said nothing else, as OpenAI sends such a turn), a tool message's
    ``tool_call_id``."""
    item = {
        "id": f"{completion_id}-{index}",
        "role": message.role,
        "content": message.content if message.content or not message.tool_calls else None,
        "refusal": None,
        "content_parts": None,
    }
    if message.tool_calls:
        item["tool_calls"] = message.tool_calls
    if message.tool_call_id:
        item["tool_call_id"] = message.tool_call_id
    return item


def _list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        # Strings, as OpenAI's schema requires them: "" for an empty page.
        "first_id": data[0]["id"] if data else "",
        "last_id": data[-1]["id"] if data else "",
        "has_more": has_more,
    }


# --- Query parameters -------------------------------------------------------------------------


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise ApplicationError(
            f"'limit' must be a whole number from 1 to {MAX_LIMIT}.", code="invalid_value", param="limit"
        )
    return limit


def _order(query: Mapping[str, str]) -> str:
    order = query.get("order", "asc")  # present but empty is not a way to ask for the default
    if order not in ORDERS:
        raise ApplicationError("'order' must be 'asc' or 'desc'.", code="invalid_value", param="order")
    return order


def _text(query: Mapping[str, str], name: str) -> str | None:
    """Return query parameter ``name``, None when absent or empty; 400 naming it when it holds a NUL."""
    value = query.get(name) or None
    if value is not None:
        refuse_nul(value, param=name)
    return value


def _metadata_filter(query: Mapping[str, str]) -> dict[str, str]:
    """Return the ``metadata[key]=value`` pairs of the query string (OpenAI's ``deepObject`` style).

    A NUL character in a key is a 400 naming ``metadata`` (the parameter's name would hold it), in
    a value a 400 naming ``metadata[key]``.
    """
    pairs = {}
    for name, value in query.items():
        match = _METADATA_PARAMETER.match(name)
        if match:
            refuse_nul(match.group(1), param="metadata")
            refuse_nul(value, param=name)
            pairs[match.group(1)] = value
    return pairs


# --- Work done in the worker thread (one hop per request) --------------------------------------


def _list(principal: Principal, query: Mapping[str, str]) -> dict[str, Any]:
    page = stored_completion_list(
        actor=principal,
        limit=_limit(query),
        order=_order(query),
        after=_text(query, "after"),
        model=_text(query, "model"),
        metadata=_metadata_filter(query),
    )
    return _list_object([completion_object(conversation) for conversation in page.items], page.has_more)


def _retrieve(principal: Principal, completion_id: str) -> dict[str, Any]:
    return completion_object(stored_completion_get_for(actor=principal, completion_id=completion_id))


def _update(principal: Principal, completion_id: str, body: Any) -> dict[str, Any]:
    data = _UPDATE_INPUT.run_validation(body)
    conversation = stored_completion_get_for(actor=principal, completion_id=completion_id)
    return completion_object(stored_completion_metadata_update(conversation=conversation, metadata=data["metadata"]))


def _delete(principal: Principal, completion_id: str) -> dict[str, Any]:
    stored_completion_delete(conversation=stored_completion_get_for(actor=principal, completion_id=completion_id))
    return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}


def _message_index(completion_id: str, message_id: str) -> int:
    """Return the index that message id ``<completion_id>-<index>`` names; 404 for any other string."""
    prefix = f"{completion_id}-"
    index = message_id.removeprefix(prefix)
    if index == message_id or not index.isdigit():
        raise ApplicationError(f"No message found with id '{message_id}'.", code="message_not_found", status=404)
    return int(index)


def _messages(principal: Principal, completion_id: str, query: Mapping[str, str]) -> dict[str, Any]:
    limit, order, after = _limit(query), _order(query), _text(query, "after")
    conversation = stored_completion_get_for(actor=principal, completion_id=completion_id)
    indexed = list(enumerate(stored_completion_messages(conversation=conversation)))
    if order == "desc":
        indexed.reverse()
    if after is not None:
        start = _message_index(completion_id, after)
        indexed = [(index, m) for index, m in indexed if (index < start if order == "desc" else index > start)]
    data = [_message_object(completion_id, index, message) for index, message in indexed[:limit]]
    return _list_object(data, len(indexed) > limit)


# --- Endpoints --------------------------------------------------------------------------------


@async_endpoint("GET", scope=APIKey.Scope.READ)
async def completion_list(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /v1/chat/completions``: the caller's stored completions (``ChatCompletionList``).

    ``after`` (a completion id: 404 when it is not one of the caller's; one deleted since the previous
    page goes on from where it stood), ``limit`` (1-100, default 20: 400 otherwise), ``order``
    (``asc``, the default, or ``desc``, by creation time), ``model``, ``metadata[key]=value`` (every
    pair must match).
    """
    return JsonResponse(await run_sync(_list, principal, request.GET.dict()))


@async_endpoint("GET", scope=APIKey.Scope.READ)
async def completion_retrieve(request: HttpRequest, principal: Principal, completion_id: str) -> HttpResponse:
    """``GET /v1/chat/completions/{completion_id}``: one stored completion; 404 ``completion_not_found``."""
    return JsonResponse(await run_sync(_retrieve, principal, completion_id))


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def completion_update(request: HttpRequest, principal: Principal, completion_id: str) -> HttpResponse:
    """``POST /v1/chat/completions/{completion_id}``: replace its ``metadata`` (required; null clears it)."""
    body = parse_json(request_body(request))
    return JsonResponse(await run_sync(_update, principal, completion_id, body))


@async_endpoint("DELETE", scope=APIKey.Scope.CHAT)
async def completion_delete(request: HttpRequest, principal: Principal, completion_id: str) -> HttpResponse:
    """``DELETE /v1/chat/completions/{completion_id}``: delete it (``chat.completion.deleted``)."""
    return JsonResponse(await run_sync(_delete, principal, completion_id))


@async_endpoint("GET", scope=APIKey.Scope.READ)
async def completion_message_list(request: HttpRequest, principal: Principal, completion_id: str) -> HttpResponse:
    """``GET /v1/chat/completions/{completion_id}/messages``: its request messages (``ChatCompletionMessageList``).

    Message ids are ``<completion_id>-<index>``; ``after`` takes one (404 for another string),
    ``limit`` and ``order`` as for the list of completions.
    """
    return JsonResponse(await run_sync(_messages, principal, completion_id, request.GET.dict()))


# One URL, two scopes: POST creates a completion (``chat``), GET lists the stored ones (``read``).
chat_completions = by_method({"GET": completion_list, "POST": chat_completion_create})
completion_detail = by_method({"GET": completion_retrieve, "POST": completion_update, "DELETE": completion_delete})


__all__ = [
    "chat_completions",
    "completion_delete",
    "completion_detail",
    "completion_list",
    "completion_message_list",
    "completion_object",
    "completion_retrieve",
    "completion_update",
]
