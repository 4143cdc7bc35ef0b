"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API, for any model here.

Plain ``async def`` Django views (FIELD-NOTES, "DRF and async") wrapped by
``accounts.endpoints.async_endpoint`` with Anthropic's error renderer, so every error of these
URLs — 405, 401, 400, 404, 429 — is Anthropic's JSON (``llm.anthropic.errors``). The request is
translated into OpenAI messages and parameters (``llm.anthropic.translate``) and planned by the
same ``openai_chat_start`` as ``/v1/chat/completions``, then opened by the one streaming engine
(``llm.streaming.open_reply``): rate limits, budgets, stop, cancel-on-disconnect and usage
accounting are the same; only the encoding differs (``llm.anthropic.frames``), and the usage
record's ``source`` is ``anthropic_api``.

Spec: https://docs.anthropic.com/en/api/messages, https://docs.anthropic.com/en/docs/build-with-claude/streaming,
https://docs.anthropic.com/en/api/messages-count-tokens, https://docs.anthropic.com/en/api/errors.

Authentication: our API keys (``sk-...``) or JWTs, as ``x-api-key`` (what the ``anthropic`` SDK
sends) or ``Authorization: Bearer`` (``accounts.authentication.token_from_headers``).
``anthropic-version`` is accepted and not required: the SDK always sends ``2023-06-01``, the only
version of the wire format, and requiring it would only break hand-written clients (curl);
``anthropic-beta`` is ignored. Every answer, errors included, carries ``request-id`` (the
``X-Request-ID`` value, which the SDK reads as ``_request_id``): ``llm.anthropic.wire``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint, null_characters_refuse, parse_json, request_body
from accounts.model_access import model_access_for_async
from accounts.models import APIKey, UsageRecord
from chatbackend.asyncdb import run_sync
from chatbackend.errors import unknown_url_error

from ..openai.apis import COUNT_ON_LOOP_MAX_BYTES
from ..openai.services import ChatCompletionPlan, openai_chat_start
from ..selectors import EnabledModel, enabled_model_get_for_async
from ..streaming import Reply, ReplyDelta, ReplyFailed, ReplyStreamingResponse, open_reply
from .errors import anthropic_error_response
from .frames import MessageCollector, message_stream_frames, new_message_id
from .serializers import MessageCountTokensInputSerializer, MessageCreateInputSerializer
from .translate import check_fields, openai_messages, openai_parameters

# Serializers hold no per-request state once built.
_CREATE_INPUT = MessageCreateInputSerializer()
_COUNT_INPUT = MessageCountTokensInputSerializer()
_CREATE_FIELDS = frozenset(_CREATE_INPUT.fields)
_COUNT_FIELDS = frozenset(_COUNT_INPUT.fields)


async def _messages_start(principal: Principal, raw_body: bytes) -> ChatCompletionPlan:
    """Parse, validate and translate the body, then plan the reply (on the event loop when the body is small)."""
    body = parse_json(raw_body)
    null_characters_refuse(body, raw_body)
    data = _CREATE_INPUT.run_validation(body)
    check_fields(body, _CREATE_FIELDS)
    messages = openai_messages(data)
    parameters = openai_parameters(data)
    model = await enabled_model_get_for_async(
        access=await model_access_for_async(principal=principal), name=data["model"]
    )
    start = functools.partial(
        openai_chat_start,
        principal=principal,
        model=model,
        messages=messages,
        parameters=parameters,
        stream=bool(data.get("stream")),
        include_usage=False,
        source=UsageRecord.Source.ANTHROPIC_API,
        reply_id=new_message_id(),
    )
    if len(raw_body) > COUNT_ON_LOOP_MAX_BYTES:
        return await run_sync(start)  # counting a long prompt's tokens would stall every stream of the loop
    return start()


@async_endpoint("POST", scope=APIKey.Scope.CHAT, errors=anthropic_error_response)
async def messages_create(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    """``POST /v1/messages``: a message, streamed (SSE, Anthropic's events) or whole (a ``message`` object).

    Before any header, in Anthropic's error shape: 401 ``authentication_error``, 400
    ``invalid_request_error`` (bad JSON; a field or block, named first in the message; a missing
    ``max_tokens``; an unsupported field or block), 404 ``not_found_error`` (no such model), 429
    ``rate_limit_error`` (a rate limit, with ``Retry-After``, or a budget), 503
    ``overloaded_error`` (limits cannot be checked, shutting down), and the upstream's failure
    within ``OPENAI_FIRST_CHUNK_WAIT_SECONDS`` (its 400/404/429 as they are, 502 ``api_error``,
    504). A failure after the headers is an ``error`` event that ends the stream.
    """
    plan = await _messages_start(principal, request_body(request))
    reply = await open_reply(plan, wait_first_chunk=settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS)
    response: HttpResponseBase
    if reply.plan.stream:
        response = ReplyStreamingResponse(reply, message_stream_frames(reply, keepalive=settings.SSE_KEEPALIVE_SECONDS))
    else:
        response = await _message_whole(reply)
    reply.add_admission_headers(response)
    return response


async def _message_whole(reply: Reply[ChatCompletionPlan]) -> JsonResponse:
    """Collect ``reply`` into one Anthropic ``message``; an upstream failure is its error JSON."""
    collector = MessageCollector()
    async with reply:
        async for event in reply.events():
            if type(event) is ReplyDelta:
                for chunk in event.chunks:
                    collector.add(chunk)
            elif type(event) is ReplyFailed:
                return anthropic_error_response(event.error)
    outcome = reply.outcome
    assert outcome is not None  # noqa: S101 - set when the events end
    return JsonResponse(collector.message(reply.plan, outcome))


def _count_input_tokens(model: EnabledModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """Return the prompt's tokens by ``model``'s tokenizer, tool definitions counted as their JSON text."""
    tokenizer = model.tokenizer
    count = tokenizer.count_prompt(messages)
    if tools:
        count += tokenizer.count_text(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    return count


@async_endpoint("POST", scope=APIKey.Scope.CHAT, errors=anthropic_error_response)
async def messages_count_tokens(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": n}`` for a message request's input.

    Counted by the model's tokenizer (``llm.tokens``: exact for OpenAI encodings, an estimate
    otherwise) over the translated OpenAI messages, with the chat framing, plus the tool
    definitions as JSON text; a provider may count its own framing differently. Free and not
    metered, as Anthropic's. Errors as ``POST /v1/messages`` (400, 401, 404).
    """
    raw_body = request_body(request)
    body = parse_json(raw_body)
    null_characters_refuse(body, raw_body)
    data = _COUNT_INPUT.run_validation(body)
    check_fields(body, _COUNT_FIELDS)
    messages = openai_messages(data)
    tools = openai_parameters(data).get("tools") or []
    model = await enabled_model_get_for_async(
        access=await model_access_for_async(principal=principal), name=data["model"]
    )
    if len(raw_body) > COUNT_ON_LOOP_MAX_BYTES:
        count = await run_sync(_count_input_tokens, model, messages, tools)
    else:
        count = _count_input_tokens(model, messages, tools)
    return JsonResponse({"input_tokens": count})


async def unknown_url(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
    """Answer an unknown ``/v1/messages/...`` URL (e.g. the Message Batches API, not served here) with
    Anthropic's 404 ``not_found_error`` JSON, which the Anthropic SDK raises as ``NotFoundError``."""
    return anthropic_error_response(unknown_url_error(request))


__all__ = ["messages_count_tokens", "messages_create", "unknown_url"]
