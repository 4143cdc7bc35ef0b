"""Sending a message: a plain async Django view (DRF views are sync; FIELD-NOTES, "DRF and async").

``POST /api/conversations/{id}/messages/`` with ``{"content": ...}``:

- ``Accept: text/event-stream``: an SSE stream (``docs/api.md``, "SSE events"):
  ``reply.start``, ``reply.delta``..., then ``reply.done`` or ``error``, and ``: keep-alive``
  comments while the upstream is slow to start. Closing the connection stops the reply (Django
  cancels the request task; the engine persists it ``cancelled``).
  A request that admission control refuses (rate limit, budget: ``accounts.metering``) gets one
  ``error`` event with the refusal's status (429 or 503) and headers, and no messages are kept.
- otherwise: 201 ``{user_message, assistant_message}`` once the reply ends, or the upstream's
  error status (or the refusal's) with the project's error JSON.

``GET`` on the same path lists the messages through DRF (``conversation_messages_view``).
``POST .../messages/{message_id}/edit/`` (``{"content"}``) and ``.../regenerate/`` start a sibling
of a message (``conversations.services``) and answer exactly as sending does (``reply_response``).
Authentication and errors: ``accounts.endpoints.async_endpoint``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint, parse_json, request_body
from accounts.models import APIKey
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, error_response
from chatbackend.http import EventStreamResponse
from llm.streaming import KEEPALIVE, ReplyDelta, ReplyFailed, ReplyRefused, ReplyStreamingResponse, open_reply

from .apis import ConversationMessageEditApi, ConversationMessageListApi, ConversationMessageRegenerateApi
from .payloads import ConversationReply, delta_payload, error_payload, reply_event
from .serializers import clean_message_content, message_data
from .services import (
    ConversationReplyPlan,
    conversation_deleted_error,
    reply_edit_start,
    reply_regenerate_start,
    reply_start,
)

SSE_CONTENT_TYPE = "text/event-stream"
KEEPALIVE_COMMENT = b": keep-alive\n\n"

# One encoder, built once: ``json.dumps`` with arguments builds a new encoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A JSON string literal (what ``_encode`` returns for a ``str``, without its type dispatch).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
# ``reply.delta`` of content alone (nearly every token): a template, no dict per token.
_DELTA_HEAD = b'event: reply.delta\ndata: {"content":'
_DELTA_TAIL = b"}\n\n"


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """Return one SSE event: ``event: <event>``, one ``data:`` line of compact JSON, a blank line.

    JSON escapes newlines, so ``data`` is always a single line
    (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
    """
    return b"event: " + event.encode() + b"\ndata: " + _encode(data).encode() + b"\n\n"


def parse_message_content(body: bytes) -> str:
    """Return ``content`` from a JSON body ``{"content": "..."}``.

    Raises ``ApplicationError`` (400) for a body that is not JSON, not an object, or whose
    ``content`` is not a non-empty string.
    """
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApplicationError("The request body must be a JSON object.", code="invalid_json")
    return clean_message_content(data.get("content"))


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def message_send(request: HttpRequest, principal: Principal, conversation_id: int) -> HttpResponseBase:
    """Send the user's message and answer with the reply: an SSE stream or, at its end, JSON."""
    content = parse_message_content(request_body(request))
    begin = run_sync(reply_start, actor=principal, conversation_id=conversation_id, content=content)
    return await reply_response(request, begin)


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def message_edit(
    request: HttpRequest, principal: Principal, conversation_id: int, message_id: int
) -> HttpResponseBase:
    """Edit a user message (a sibling with the new content) and answer with its reply, as ``message_send``."""
    content = parse_message_content(request_body(request))
    begin = run_sync(
        reply_edit_start, actor=principal, conversation_id=conversation_id, message_id=message_id, content=content
    )
    return await reply_response(request, begin)


@async_endpoint("POST", scope=APIKey.Scope.CHAT)
async def message_regenerate(
    request: HttpRequest, principal: Principal, conversation_id: int, message_id: int
) -> HttpResponseBase:
    """Regenerate an assistant message (a sibling reply) and answer with it, as ``message_send``."""
    begin = run_sync(reply_regenerate_start, actor=principal, conversation_id=conversation_id, message_id=message_id)
    return await reply_response(request, begin)


async def reply_response(request: HttpRequest, begin: Awaitable[ConversationReplyPlan]) -> HttpResponseBase:
    """Start the reply ``begin`` plans and answer with it: SSE when the client accepts
    ``text/event-stream``, else JSON once it ends. Every conversation reply is answered here."""
    opener = open_reply(begin)
    if SSE_CONTENT_TYPE not in request.headers.get("Accept", ""):
        async with opener as reply:
            return await _reply_json(reply)
    try:
        reply = await opener
    except ReplyRefused as refusal:
        # Refused before any reply started: the stream's own ``error`` event, with the refusal's status.
        response = EventStreamResponse(_one_event(sse_event(*error_payload(refusal))), status=refusal.status)
        for name, value in refusal.headers.items():
            response[name] = value
        return response
    return ReplyStreamingResponse(reply, _sse_body(reply, keepalive=settings.SSE_KEEPALIVE_SECONDS))


async def _one_event(event: bytes) -> AsyncIterator[bytes]:
    yield event


async def _sse_body(reply: ConversationReply, *, keepalive: float) -> AsyncIterator[bytes]:
    """Yield the SSE events of ``reply`` (``conversations.payloads.reply_event``), as bytes."""
    async for event in reply.events(keepalive=keepalive):
        if type(event) is ReplyDelta:
            chunks = event.chunks
            if len(chunks) == 1 and not chunks[0].reasoning_content:
                if chunks[0].content:  # the frame of nearly every token: a template
                    yield _DELTA_HEAD + _encode_str(chunks[0].content).encode() + _DELTA_TAIL
                    continue
                if not chunks[0].refusal:  # a finish_reason or tool calls: no text to send
                    continue
            payload = delta_payload(event)
        elif event is KEEPALIVE:
            yield KEEPALIVE_COMMENT
            continue
        else:
            payload = reply_event(reply, event)
        if payload is not None:
            yield sse_event(*payload)


async def _reply_json(reply: ConversationReply) -> JsonResponse:
    """Run ``reply`` to its end; answer 201 with both messages, or the upstream's error.

    404 ``conversation_deleted`` when the conversation was deleted while the reply streamed.
    """
    async for event in reply.events():
        if type(event) is ReplyFailed and reply.plan.message_written:
            return error_response(event.error)
    plan = reply.plan
    if not plan.message_written:
        return error_response(conversation_deleted_error())
    user_message, assistant_message = await run_sync(message_data, plan.user_message_id, plan.message_id)
    if user_message is None or assistant_message is None:  # deleted since the reply ended
        return error_response(conversation_deleted_error())
    return JsonResponse({"user_message": user_message, "assistant_message": assistant_message}, status=201)


_message_list_view = ConversationMessageListApi.as_view()


def _message_list(request: HttpRequest, conversation_id: int) -> HttpResponse:
    response = _message_list_view(request, conversation_id=conversation_id)
    return response.render()  # here, in this thread, rather than in another hop by Django


@csrf_exempt  # token authentication only: no cookie, so no cross-site request to forge
async def conversation_messages_view(request: HttpRequest, conversation_id: int) -> HttpResponseBase:
    """Route ``/api/conversations/{id}/messages/``: POST sends (async), the rest goes to DRF."""
    if request.method == "POST":
        return await message_send(request, conversation_id)
    return await sync_to_async(_message_list)(request, conversation_id)


# drf-spectacular documents a URL whose view has ``cls``: the DRF class describes both methods
# (its ``post`` carries the schema of ``message_send``).
conversation_messages_view.cls = ConversationMessageListApi  # type: ignore[attr-defined]
conversation_messages_view.initkwargs = {}  # type: ignore[attr-defined]
message_edit.cls = ConversationMessageEditApi  # type: ignore[attr-defined]
message_edit.initkwargs = {}  # type: ignore[attr-defined]
message_regenerate.cls = ConversationMessageRegenerateApi  # type: ignore[attr-defined]
message_regenerate.initkwargs = {}  # type: ignore[attr-defined]
