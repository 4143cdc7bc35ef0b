"""``POST /v1/chat/completions``: a chat completion, streamed (SSE) or whole.

A plain ``async def`` Django view (FIELD-NOTES, "DRF and async"), wrapped by
``accounts.endpoints.async_endpoint`` (authentication and errors), so errors come in OpenAI's
order: 401, then 400 for the body, then 404/400 for the model, then the upstream's.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and
https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads of it is in
``/work/shared/nextchat.md``.
"""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint, parse_json, request_body
from accounts.model_access import model_access_for_async
from accounts.models import APIKey
from chatbackend.asyncdb import run_sync
from chatbackend.errors import error_response, unknown_url_error

from ..selectors import enabled_model_get_for_async
from ..streaming import Reply, ReplyDelta, ReplyFailed, ReplyStreamingResponse, open_reply
from .chat_serializers import ChatCompletionCreateInputSerializer
from .frames import chat_completion_frames, usage_object
from .services import RESERVED_PARAMETERS, ChatCompletionPlan, openai_chat_start

# Bodies up to this size are planned on the event loop; their prompt's tokens count in well under a
# millisecond (tiktoken, ~4 bytes per token). Larger ones are planned in a worker thread.
COUNT_ON_LOOP_MAX_BYTES = 32_768

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_CHAT_INPUT = ChatCompletionCreateInputSerializer()


async def _chat_start(principal: Principal, raw_body: bytes) -> ChatCompletionPlan:
    """Parse and validate the request body and plan the reply.

    On the event loop: parsing, validation and planning are CPU only, and the model comes from
    this process's cache (``enabled_model_get_for_async``: 404 outside the caller's allowlists,
    themselves cached: ``accounts.model_access``), so the only worker-thread hops are a cache
    miss's read and, for a body over ``COUNT_ON_LOOP_MAX_BYTES``, the planning (its prompt's
    token count).
    """
    body = parse_json(raw_body)
    data = _CHAT_INPUT.run_validation(body)
    model = await enabled_model_get_for_async(
        access=await model_access_for_async(principal=principal), name=data["model"]
    )
    # Sent upstream as the client wrote them (validation does not change them); unknown fields
    # pass through for provider extensions, nulls mean "the default".
    parameters = {key: value for key, value in body.items() if value is not None and key not in RESERVED_PARAMETERS}
    start = functools.partial(
        openai_chat_start,
        principal=principal,
        model=model,
        messages=body["messages"],
        parameters=parameters,
        stream=bool(data.get("stream")),
        include_usage=bool((data.get("stream_options") or {}).get("include_usage")),
        store=data.get("store") is True,
        metadata=data.get("metadata"),
    )
    if len(raw_body) > COUNT_ON_LOOP_MAX_BYTES:
        return await run_sync(start)  # counting a long prompt's tokens would stall every stream of the loop
    return start()


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def chat_completions(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    """``POST /v1/chat/completions``: a chat completion, streamed (SSE) or whole.

    Before any header: 401 bad credentials, 400 bad JSON or fields (``param`` names the field;
    only ``n`` = 1), 404 ``model_not_found``, 400 ``model_disabled``, and the upstream's own
    failure within ``OPENAI_FIRST_CHUNK_WAIT_SECONDS`` (502 for its 5xx or when unreachable,
    its 400/404/413/422/429 as they are, 504 on timeout): NextChat cannot see an error inside a
    stream, and gives up on headers that take over 60 s. 429 ``rate_limit_exceeded`` (with
    ``Retry-After``) or ``insufficient_quota``, 503 ``metering_unavailable`` when admission control
    (``accounts.metering``) refuses the request. Responses carry OpenAI's ``x-ratelimit-*`` headers
    when a rate limit applies. ``Accept`` is not negotiated: ``stream`` alone decides the response type.
    """
    plan = await _chat_start(principal, request_body(request))
    reply = await open_reply(plan, wait_first_chunk=settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS)
    response: HttpResponseBase
    if reply.plan.stream:
        response = ReplyStreamingResponse(
            reply, chat_completion_frames(reply, keepalive=settings.SSE_KEEPALIVE_SECONDS)
        )
    else:
        response = await _chat_completion_whole(reply)
    reply.add_admission_headers(response)
    return response


def _merge_logprobs(merged: dict[str, list[Any] | None] | None, chunk: dict[str, Any]) -> dict[str, list[Any] | None]:
    """Append a streamed chunk's ``logprobs`` lists (``content``, ``refusal``) to ``merged``; return it.

    A list stays None (as OpenAI sends it) until a chunk brings entries for it.
    """
    if merged is None:
        merged = {"content": None, "refusal": None}
    for key in ("content", "refusal"):
        entries = chunk.get(key)
        if entries and isinstance(entries, list):
            current = merged[key]
            if current is None:
                merged[key] = list(entries)
            else:
                current.extend(entries)
    return merged


async def _chat_completion_whole(reply: Reply[ChatCompletionPlan]) -> JsonResponse:
    """Collect ``reply`` into one ``chat.completion`` object; an upstream failure is its error JSON.

    The upstream's streamed ``logprobs`` (when the client asked for them) are joined into the
    choice's ``logprobs: {"content": [...], "refusal": [...] | null}``, as OpenAI answers them. A
    refusal is the message's ``refusal`` (its ``content`` then null, as OpenAI sends a refusal: the
    openai SDK's ``.parse()`` reads it as ``message.refusal``); the upstream's ``annotations``
    (``url_citation`` objects) are the message's ``annotations``, as they came; its last
    ``system_fingerprint`` is the completion's (left out when it sent none).
    """
    logprobs: dict[str, list[Any] | None] | None = None
    annotations: list[dict[str, Any]] = []
    system_fingerprint: str | None = None
    async with reply:
        async for event in reply.events():
            if type(event) is ReplyDelta:
                if event.chunks[0].system_fingerprint:
                    system_fingerprint = event.chunks[0].system_fingerprint
                for chunk in event.chunks:
                    if chunk.logprobs:
                        logprobs = _merge_logprobs(logprobs, chunk.logprobs)
                    if chunk.annotations:
                        annotations.extend(chunk.annotations)
            elif type(event) is ReplyFailed:
                return error_response(event.error)
    outcome = reply.outcome
    assert outcome is not None  # noqa: S101 - set when the events end
    tool_calls = list(outcome.tool_calls)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": outcome.content if outcome.content or not (tool_calls or outcome.refusal) else None,
        "refusal": outcome.refusal or None,
    }
    if annotations:
        message["annotations"] = annotations
    if outcome.reasoning_content:
        message["reasoning_content"] = outcome.reasoning_content
    if tool_calls:
        message["tool_calls"] = tool_calls
    plan = reply.plan
    completion: dict[str, Any] = {
        "id": plan.reply_id,
        "object": "chat.completion",
        "created": plan.created,
        "model": outcome.model_name,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": outcome.finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
        "usage": usage_object(outcome),
    }
    if system_fingerprint is not None:
        completion["system_fingerprint"] = system_fingerprint
    return JsonResponse(completion)


@csrf_exempt
async def unknown_url(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Answer an unknown ``/v1`` or ``/dashboard`` URL with OpenAI's 404 JSON, never Django's HTML page."""
    return error_response(unknown_url_error(request))


__all__ = ["chat_completions", "unknown_url"]
