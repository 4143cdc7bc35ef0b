"""``POST /v1/chat/completions``: a chat completion, streamed (SSE) or whole.

A plain ``async def`` Django view, not DRF (FIELD-NOTES, "DRF and async": a DRF view costs a
thread hop per request). It makes one ``run_sync`` call (``open_reply``'s ``begin``) that
authenticates and does the request's database work, so errors come in OpenAI's order: 401,
then 400 for the body, then 404/400 for the model.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and
https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads of it is in
``/work/shared/nextchat.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from accounts.authentication import Principal
from chatbackend.errors import ApplicationError

from ..streaming import Reply, ReplyPlan, open_reply
from .chat_serializers import ChatCompletionCreateInputSerializer
from .endpoint import openai_endpoint, openai_error_response, parse_json, request_authenticator, request_body
from .frames import ChatCompletionStreamingResponse, reply_usage
from .services import RESERVED_PARAMETERS, openai_chat_start

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_CHAT_INPUT = ChatCompletionCreateInputSerializer()


def _first_chunk_wait_seconds() -> float:
    """Seconds to wait for the upstream's first chunk before sending the stream's headers.

    Within that time an upstream failure is answered with its own HTTP status and an OpenAI
    error body, which NextChat shows; after it, the headers go out (NextChat gives up on a
    response whose headers take over 60 s) and a later failure is sent inside the stream.
    Setting ``OPENAI_FIRST_CHUNK_WAIT_SECONDS``, default 10.
    """
    return settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS


def _chat_begin(authenticate: Callable[[], Principal], raw_body: bytes) -> ReplyPlan:
    """Authenticate, parse and validate the request, and plan the reply (the ``begin`` of ``open_reply``).

    Runs in a worker thread, once. ``plan.info`` gains ``stream`` and ``include_usage``.
    """
    principal = authenticate()
    body = parse_json(raw_body)
    data = _CHAT_INPUT.run_validation(body)
    # Sent upstream as the client wrote them (validation does not change them); unknown fields
    # pass through for provider extensions, nulls mean "the default".
    parameters = {key: value for key, value in body.items() if value is not None and key not in RESERVED_PARAMETERS}
    plan = openai_chat_start(
        principal=principal, model_name=data["model"], messages=body["messages"], parameters=parameters
    )
    plan.info["stream"] = bool(data.get("stream"))
    plan.info["include_usage"] = bool((data.get("stream_options") or {}).get("include_usage"))
    return plan


@openai_endpoint("POST")
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    """``POST /v1/chat/completions``: a chat completion, streamed (SSE) or whole.

    Before any header: 401 bad credentials, 400 bad JSON or fields (``param`` names the field;
    only ``n`` = 1), 404 ``model_not_found``, 400 ``model_disabled``, and the upstream's own
    failure within ``OPENAI_FIRST_CHUNK_WAIT_SECONDS`` (502 for its 5xx or when unreachable,
    its 400/404/413/422/429 as they are, 504 on timeout). ``Accept`` is not negotiated:
    ``stream`` alone decides the response type.
    """
    reply = await open_reply(
        partial(_chat_begin, request_authenticator(request), request_body(request)),
        wait_first_chunk=_first_chunk_wait_seconds(),
    )
    if reply.plan.info["stream"]:
        return ChatCompletionStreamingResponse(reply, include_usage=reply.plan.info["include_usage"])
    return await _chat_completion_whole(reply)


def _merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Fold streamed ``delta.tool_calls`` entries into whole tool calls, keyed by ``index``.

    The entry with an ``id`` starts a call; later entries append ``function.arguments``.
    """
    for entry in deltas:
        function = entry.get("function") or {}
        call = calls.get(entry.get("index", 0))
        if call is None:
            calls[entry.get("index", 0)] = {
                "id": entry.get("id") or "",
                "type": entry.get("type") or "function",
                "function": {"name": function.get("name") or "", "arguments": function.get("arguments") or ""},
            }
            continue
        if entry.get("id") and not call["id"]:
            call["id"] = entry["id"]
        if function.get("name") and not call["function"]["name"]:
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""


async def _chat_completion_whole(reply: Reply) -> JsonResponse:
    """Collect ``reply`` into one ``chat.completion`` object; an upstream failure is its error JSON."""
    tool_calls: dict[int, dict[str, Any]] = {}
    try:
        async for chunk in reply.chunks():
            if chunk.tool_calls:
                _merge_tool_calls(tool_calls, chunk.tool_calls)
    except ApplicationError as exc:
        return openai_error_response(exc)
    outcome = reply.outcome
    assert outcome is not None  # noqa: S101 - set by Reply.chunks before it returns
    message: dict[str, Any] = {
        "role": "assistant",
        "content": outcome.content if outcome.content or not tool_calls else None,
        "refusal": None,
    }
    if outcome.reasoning_content:
        message["reasoning_content"] = outcome.reasoning_content
    if tool_calls:
        message["tool_calls"] = [tool_calls[index] for index in sorted(tool_calls)]
    info = reply.plan.info
    return JsonResponse(
        {
            "id": info["id"],
            "object": "chat.completion",
            "created": info["created"],
            "model": info["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": outcome.finish_reason or ("tool_calls" if tool_calls else "stop"),
                }
            ],
            "usage": reply_usage(reply),
        }
    )


__all__ = ["chat_completions"]
