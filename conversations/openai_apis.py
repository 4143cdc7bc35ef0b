"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/models``, NextChat's ``/dashboard/billing``.

Plain ``async def`` Django views, not DRF (FIELD-NOTES, "DRF and async": a DRF view costs a
thread hop per request). Each view makes one ``run_sync`` call that authenticates and does the
request's database work, so errors come in OpenAI's order: 401, then 400 for the body, then
404/400 for the model. Every error, including unknown URLs and methods, is OpenAI's JSON
(``{"error": {"message", "type", "param", "code"}}``), never Django's HTML.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and
https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads of it is in
``/work/shared/nextchat.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial, wraps
from typing import Any, cast

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import ValidationError

from accounts.authentication import Principal, authenticate_token, token_from_headers
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, error_response
from chatbackend.exception_handlers import drf_exception_handler
from llm.models import LLMModel
from llm.providers import ChatChunk

from .openai_serializers import BillingUsageQuerySerializer, ChatCompletionCreateInputSerializer
from .openai_services import (
    RESERVED_PARAMETERS,
    openai_billing_usage_cents,
    openai_chat_start,
    openai_model_get,
    openai_model_list,
)
from .streaming import Reply, ReplyPlan, open_reply

logger = logging.getLogger(__name__)

# One encoder, built once: ``json.dumps`` with arguments builds a new encoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_CHAT_INPUT = ChatCompletionCreateInputSerializer()
_BILLING_USAGE_QUERY = BillingUsageQuerySerializer()

_DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def _first_chunk_wait_seconds() -> float:
    """Seconds to wait for the upstream's first chunk before sending the stream's headers.

    Within that time an upstream failure is answered with its own HTTP status and an OpenAI
    error body, which NextChat shows; after it, the headers go out (NextChat gives up on a
    response whose headers take over 60 s) and a later failure is sent inside the stream.
    Setting ``OPENAI_FIRST_CHUNK_WAIT_SECONDS``, default 10.
    """
    return settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS


# --- Plumbing shared by the views -------------------------------------------------------------


def _validation_error_response(exc: ValidationError) -> JsonResponse:
    # The project's DRF exception handler writes the one validation error shape (param, fields).
    response = drf_exception_handler(exc, {})
    assert response is not None  # noqa: S101 - it always handles a ValidationError
    return JsonResponse(response.data, status=response.status_code)


def _error_response(exc: ApplicationError) -> JsonResponse:
    response = error_response(exc)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


View = Callable[..., Awaitable[HttpResponseBase]]


def openai_endpoint(*methods: str) -> Callable[[View], View]:
    """Make an async view an OpenAI-style endpoint answering ``methods``.

    CSRF-exempt (API clients send no cookies); another method is a 405 OpenAI error with
    ``Allow``; a bare ``OPTIONS`` (not a CORS preflight, which django-cors-headers answers
    first) is a 200 with ``Allow``. ``ApplicationError`` and DRF ``ValidationError`` become
    OpenAI error JSON; any other exception a logged 500 in the same shape.
    """
    allow = ", ".join((*methods, "OPTIONS"))

    def decorate(view: View) -> View:
        @wraps(view)
        async def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method not in methods:
                if request.method == "OPTIONS":
                    response: HttpResponseBase = HttpResponse()
                else:
                    response = _error_response(
                        ApplicationError(
                            f"Method {request.method} is not allowed on {request.path}; allowed: {allow}.",
                            code="method_not_allowed",
                            status=405,
                        )
                    )
                response["Allow"] = allow
                return response
            try:
                return await view(request, *args, **kwargs)
            except ValidationError as exc:
                return _validation_error_response(exc)
            except ApplicationError as exc:
                return _error_response(exc)
            except Exception:
                logger.exception("%s %s failed", request.method, request.path)
                return _error_response(
                    ApplicationError(
                        "The server had an error while processing your request.", code="internal_error", status=500
                    )
                )

        return csrf_exempt(endpoint)

    return decorate


def _authenticate(request: HttpRequest) -> Callable[[], Principal]:
    """Return a sync callable that authenticates ``request``'s bearer token or API key header."""
    return partial(authenticate_token, token_from_headers(request.headers))  # type: ignore[arg-type]


def _request_body(request: HttpRequest) -> bytes:
    """Return the raw body; chunked bodies without ``Content-Length`` (NextChat's server) are fine."""
    try:
        return request.body
    except RequestDataTooBig:
        raise ApplicationError(
            "The request body is larger than this server accepts (DATA_UPLOAD_MAX_MEMORY_SIZE).",
            code="request_too_large",
            status=413,
        ) from None


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApplicationError(
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


# --- POST /v1/chat/completions ----------------------------------------------------------------


def _chat_begin(authenticate: Callable[[], Principal], raw_body: bytes) -> ReplyPlan:
    """Authenticate, parse and validate the request, and plan the reply (the ``begin`` of ``open_reply``).

    Runs in a worker thread, once. ``plan.info`` gains ``stream`` and ``include_usage``.
    """
    principal = authenticate()
    body = _parse_json(raw_body)
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
        partial(_chat_begin, _authenticate(request), _request_body(request)),
        wait_first_chunk=_first_chunk_wait_seconds(),
    )
    if reply.plan.info["stream"]:
        return ChatCompletionStreamingResponse(reply, include_usage=reply.plan.info["include_usage"])
    return await _chat_completion_whole(reply)


class ChatCompletionStreamingResponse(StreamingHttpResponse):
    """``text/event-stream`` of ``chat.completion.chunk`` frames, then ``data: [DONE]``.

    Headers: ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` so proxies pass each
    frame on at once (FIELD-NOTES, "HTTP streaming"). It must never be gzipped (each chunk would
    become its own gzip member): keep ``GZipMiddleware`` off this path. ``close()`` abandons the
    reply if the frames were never iterated (the client left while the headers were being
    sent), so the reply is still persisted as ``cancelled``.
    """

    def __init__(self, reply: Reply, *, include_usage: bool) -> None:
        frames = _chunk_frames(reply, include_usage, float(settings.SSE_KEEPALIVE_SECONDS))
        super().__init__(frames, content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"
        self.reply = reply

    def close(self) -> None:
        try:
            if self.reply.outcome is None:
                _abandon(self.reply)
        finally:
            super().close()


_abandoned: set[asyncio.Task[None]] = set()


def _abandon(reply: Reply) -> None:
    """Close ``reply`` from sync code: on the event loop if there is one in this thread, else via async_to_sync."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # Django's ASGI handler calls close() in a worker thread
        async_to_sync(reply.aclose)()
        return
    task = loop.create_task(reply.aclose())
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


async def _chunk_frames(reply: Reply, include_usage: bool, keepalive_seconds: float) -> AsyncIterator[str]:
    """Yield the SSE frames of ``reply``: its chunks, the usage chunk if asked for, ``[DONE]``.

    Until the first chunk arrives, an SSE comment (``: keep-alive``) every ``keepalive_seconds``
    keeps proxies from dropping the idle connection (FIELD-NOTES, "HTTP streaming"); clients
    ignore comments. The hot path: the envelope of every frame is serialized once, so a frame
    of plain content costs one string encode. A failure after the headers is sent as
    ``data: {"error": ...}`` and ends the stream (as OpenAI does); ``Reply.chunks`` persisted it
    ``failed``. A client that leaves raises ``CancelledError`` here (or ``GeneratorExit`` at a
    ``yield``); the reply is persisted ``cancelled`` and the upstream request closed, however far
    it got. There is no ``system_fingerprint``: OpenAI's schema types it as a string when
    present, and there is no fingerprint to report.
    """
    info = reply.plan.info
    head = (
        f'data: {{"id":{_encode(info["id"])},"object":"chat.completion.chunk","created":{info["created"]},'
        f'"model":{_encode(info["model"])},"choices":['
    )
    tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"
    content_head = head + '{"index":0,"delta":{"content":'
    content_tail = '},"logprobs":null,"finish_reason":null}' + tail
    role_sent = False

    def frame(chunk: ChatChunk) -> str | None:
        nonlocal role_sent
        if not (chunk.content or chunk.reasoning_content or chunk.tool_calls or chunk.finish_reason):
            return None  # e.g. the upstream's usage-only chunk: usage is sent at the end
        delta: dict[str, Any] = {} if role_sent else {"role": "assistant"}
        role_sent = True
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.reasoning_content:
            delta["reasoning_content"] = chunk.reasoning_content
        if chunk.tool_calls:
            delta["tool_calls"] = chunk.tool_calls
        return (
            head + _encode({"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}) + tail
        )

    chunks = cast(AsyncGenerator[ChatChunk, None], reply.chunks())  # an async generator: closed below
    try:
        first = asyncio.ensure_future(anext(chunks))
        try:
            while not first.done():
                await asyncio.wait((first,), timeout=keepalive_seconds)
                if not first.done():
                    yield KEEPALIVE
        except BaseException:  # the client left while the upstream was silent
            first.cancel()
            await asyncio.wait((first,))
            raise
        try:
            text = frame(first.result())
        except StopAsyncIteration:  # an upstream that finished without a single chunk
            pass
        else:
            if text:
                yield text
            async for chunk in chunks:
                content = chunk.content
                if content and role_sent and not (chunk.reasoning_content or chunk.tool_calls or chunk.finish_reason):
                    yield content_head + _encode(content) + content_tail
                    continue
                text = frame(chunk)
                if text:
                    yield text
    except ApplicationError as exc:
        yield "data: " + _encode(exc.as_dict()) + "\n\n"
        return
    finally:
        await chunks.aclose()
        if reply.outcome is None:  # cancelled before chunks() ever ran
            await reply.aclose()
    if include_usage:
        yield head + '],"usage":' + _encode(_usage(reply)) + "}\n\n"
    yield _DONE


def _usage(reply: Reply) -> dict[str, int]:
    assert reply.outcome is not None  # noqa: S101
    usage = reply.outcome.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


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
        return _error_response(exc)
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
            "usage": _usage(reply),
        }
    )


# --- GET /v1/models, /v1/models/{model} -------------------------------------------------------


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
    return JsonResponse(await run_sync(_model_list, _authenticate(request)))


@openai_endpoint("GET")
async def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    """``GET /v1/models/{model}``: one enabled model; 404 ``model_not_found``, 400 ``model_disabled``."""
    return JsonResponse(await run_sync(_model_retrieve, _authenticate(request), model))


# --- NextChat's billing endpoints -------------------------------------------------------------


def _billing_usage(authenticate: Callable[[], Principal], query: dict[str, str]) -> dict[str, Any]:
    principal = authenticate()
    dates = _BILLING_USAGE_QUERY.run_validation(query)
    cents = openai_billing_usage_cents(user=principal.user, **dates)
    return {"object": "list", "total_usage": float(cents)}


@openai_endpoint("GET")
async def billing_usage(request: HttpRequest) -> HttpResponse:
    """``GET /dashboard/billing/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD``.

    ``{"object": "list", "total_usage": <US cents>}``: the caller's usage records from
    ``start_date`` (inclusive) to ``end_date`` (exclusive; NextChat sends tomorrow). 400 for a
    missing or malformed date, or an end before the start.
    """
    return JsonResponse(await run_sync(_billing_usage, _authenticate(request), request.GET.dict()))


def _billing_subscription(authenticate: Callable[[], Principal]) -> dict[str, Any]:
    authenticate()
    limit = settings.OPENAI_BILLING_HARD_LIMIT_USD
    return {
        "object": "billing_subscription",
        "has_payment_method": False,
        "hard_limit_usd": limit,
        "soft_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": 0,
    }


@openai_endpoint("GET")
async def billing_subscription(request: HttpRequest) -> HttpResponse:
    """``GET /dashboard/billing/subscription``: ``{"hard_limit_usd": ...}`` for NextChat's "used $X of $Y".

    There is no quota system yet, so the limit is not enforced anywhere: it is the constant
    setting ``OPENAI_BILLING_HARD_LIMIT_USD`` (default 1,000,000), the same for every caller.
    """
    return JsonResponse(await run_sync(_billing_subscription, _authenticate(request)))


# --- Anything else under /v1 or /dashboard ----------------------------------------------------


@csrf_exempt
async def unknown_url(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Answer an unknown ``/v1`` or ``/dashboard`` URL with OpenAI's 404 JSON, never Django's HTML page."""
    return _error_response(
        ApplicationError(
            f"Invalid URL ({request.method} {request.path}).",
            code="unknown_url",
            status=404,
            type="invalid_request_error",
        )
    )


__all__ = [
    "ChatCompletionStreamingResponse",
    "billing_subscription",
    "billing_usage",
    "chat_completions",
    "model_list",
    "model_retrieve",
    "openai_endpoint",
    "unknown_url",
]
