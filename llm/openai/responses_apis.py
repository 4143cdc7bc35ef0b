"""``POST /v1/responses``: OpenAI's Responses API, stateless core, streamed (SSE) or whole.

Spec: https://platform.openai.com/docs/api-reference/responses/create (``CreateResponse``,
``Response``, ``ResponseStreamEvent`` in /work/shared/specs/openai-openapi.yaml). The request is
translated into chat messages and parameters (``responses_translate``) and goes through exactly
the path of ``/v1/chat/completions``: ``async_endpoint`` (authentication, OpenAI error JSON),
``openai_chat_start`` (the plan: metering, usage accounting) and ``open_reply`` (rate limits and
budgets, stop, cancel-on-disconnect, persistence); only the encoding differs
(``responses_frames``). Errors come in the same order and shape as chat completions': 401, 400
(``param`` names the field), 404/400 for the model, then the upstream's or admission control's.
"""

from __future__ import annotations

import functools

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint, null_characters_refuse, parse_json, request_body
from accounts.model_access import model_access_for_async
from accounts.models import APIKey, UsageRecord
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, error_response

from ..selectors import enabled_model_get_for_async
from ..streaming import Reply, ReplyDelta, ReplyFailed, ReplyStreamingResponse, open_reply
from .apis import COUNT_ON_LOOP_MAX_BYTES
from .responses_frames import ResponseBuilder, new_response_id, response_frames
from .responses_serializers import ResponseCreateInputSerializer
from .responses_translate import ResponsesRequest, responses_request
from .services import ChatCompletionPlan, openai_chat_start

_RESPONSE_INPUT = ResponseCreateInputSerializer()


async def _response_start(principal: Principal, raw_body: bytes) -> tuple[ChatCompletionPlan, ResponsesRequest]:
    """Parse, validate and translate the body, and plan the reply (on the event loop unless it is long)."""
    body = parse_json(raw_body)
    null_characters_refuse(body, raw_body)
    if not isinstance(body, dict):
        raise ApplicationError("The request body must be a JSON object.", code="invalid_type", param=None)
    data = _RESPONSE_INPUT.run_validation(body)
    request = responses_request(body, data)
    model = await enabled_model_get_for_async(
        access=await model_access_for_async(principal=principal), name=request.model
    )
    start = functools.partial(
        openai_chat_start,
        principal=principal,
        model=model,
        messages=request.messages,
        parameters=request.parameters,
        stream=request.stream,
        include_usage=True,
        reply_id=new_response_id(),
        source=UsageRecord.Source.OPENAI_RESPONSES,
    )
    try:
        if len(raw_body) > COUNT_ON_LOOP_MAX_BYTES:
            return await run_sync(start), request  # counting a long prompt's tokens would stall the loop
        return start(), request
    except ApplicationError as error:
        raise _named_as_sent(error) from None


# Chat completion fields the translation made of the client's own (responses_translate), by their Responses name.
_RESPONSES_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def _named_as_sent(error: ApplicationError) -> ApplicationError:
    """Return ``error`` naming the client's field where it names the chat field translated from it."""
    name = _RESPONSES_NAMES.get(error.param or "")
    if name is not None:
        error.message = error.message.replace(f"'{error.param}'", f"'{name}'")
        error.param = name
    return error


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def responses_create(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    """``POST /v1/responses``: a model response, streamed (``stream: true``, SSE events) or whole.

    Before any header, as ``/v1/chat/completions``: 401 bad credentials; 400 bad JSON, a bad or
    unsupported field (``param`` names it: ``previous_response_id``, ``store``, ``tools[0].type``
    ...); 404 ``model_not_found``; 400 ``model_disabled``; 429 / 503 from admission control (with
    ``Retry-After``); the upstream's own failure within ``OPENAI_FIRST_CHUNK_WAIT_SECONDS``.
    Responses carry OpenAI's ``x-ratelimit-*`` headers when a rate limit applies.
    """
    plan, translated = await _response_start(principal, request_body(request))
    try:
        reply = await open_reply(plan, wait_first_chunk=settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS)
    except ApplicationError as error:  # e.g. the provider's adapter refused a parameter (base.refuse_unsupported)
        raise _named_as_sent(error) from None
    builder = ResponseBuilder(reply.plan, translated.echo)
    response: HttpResponseBase
    if reply.plan.stream:
        body = response_frames(reply, builder, keepalive=settings.SSE_KEEPALIVE_SECONDS)
        response = ReplyStreamingResponse(reply, body)
    else:
        response = await _response_whole(reply, builder)
    reply.add_admission_headers(response)
    return response


async def _response_whole(reply: Reply[ChatCompletionPlan], builder: ResponseBuilder) -> HttpResponseBase:
    """Collect ``reply`` into one ``response`` object; an upstream failure is its error JSON (as chat's)."""
    async with reply:
        async for event in reply.events():
            if type(event) is ReplyDelta:
                for chunk in event.chunks:
                    builder.feed(chunk)
            elif type(event) is ReplyFailed:
                return error_response(event.error)
    outcome = reply.outcome
    assert outcome is not None  # noqa: S101 - set when the events end
    last = builder.end(outcome, outcome.error)[-1]
    return JsonResponse(last["response"])


__all__ = ["responses_create"]
