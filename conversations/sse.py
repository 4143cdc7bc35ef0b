"""Sending a message: plain async Django views (DRF views are sync; FIELD-NOTES, "DRF and async").

``POST /api/conversations/{id}/messages/`` with ``{"content": ...}``:

- ``Accept: text/event-stream``: an SSE stream (``docs/api.md``, "SSE events"):
  ``reply.start``, ``reply.delta``..., then ``reply.done`` or ``error``, and ``: keep-alive``
  comments while the upstream is slow to start. Closing the connection stops the reply (Django
  cancels the request task; ``conversations.streaming`` persists it ``cancelled``).
- otherwise: 201 ``{user_message, assistant_message}`` once the reply ends, or the upstream's
  error status with the project's error JSON.

``GET`` on the same path lists the messages through DRF (``conversation_messages_view``).
Authentication is ``Authorization: Bearer <JWT or sk-... key>``, checked in the same worker
thread hop that writes the messages (one hop before the stream starts; FIELD-NOTES, "Database").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import authenticate_token, token_from_headers
from accounts.selectors import AuthenticationFailed
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError, error_response
from llm.providers import ChatChunk

from .apis import ConversationMessageListApi
from .payloads import reply_message_data, reply_start_data, track_message
from .serializers import clean_message_content, message_data
from .services import reply_start
from .stop import ReplyStopper, listen_for_stop, stoppable_chunks
from .streaming import Reply, ReplyPlan, open_reply

SSE_CONTENT_TYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"

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


def delta_event(chunk: ChatChunk) -> bytes:
    """Return the ``reply.delta`` event of ``chunk``: ``sse_event("reply.delta", delta_data(chunk))``."""
    if chunk.reasoning_content:
        return sse_event("reply.delta", delta_data(chunk))
    return _DELTA_HEAD + _encode_str(chunk.content).encode() + _DELTA_TAIL


def delta_data(chunk: ChatChunk) -> dict[str, str]:
    """Return the ``reply.delta`` payload of ``chunk``: ``content``, and ``reasoning_content`` if any."""
    if chunk.reasoning_content:
        return {"content": chunk.content, "reasoning_content": chunk.reasoning_content}
    return {"content": chunk.content}


def parse_message_content(body: bytes) -> str:
    """Return ``content`` from a JSON body ``{"content": "..."}``.

    Raises ``ApplicationError`` (400) for a body that is not JSON, not an object, or whose
    ``content`` is not a non-empty string.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ApplicationError("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApplicationError("The request body must be a JSON object.", code="invalid_json")
    return clean_message_content(data.get("content"))


def _reply_start_for_token(token: str | None, conversation_id: int, content: str) -> ReplyPlan:
    """Authenticate ``token`` and start the reply, in one worker thread hop."""
    principal = authenticate_token(token)
    return track_message(
        reply_start(user=principal.user, api_key=principal.api_key, conversation_id=conversation_id, content=content)
    )


async def message_send(request: HttpRequest, conversation_id: int) -> HttpResponseBase:
    """Send the user's message and answer with the reply: an SSE stream or, at its end, JSON."""
    token = token_from_headers({name.lower(): value for name, value in request.headers.items()})
    try:
        content = parse_message_content(request.body)
    except ApplicationError as exc:
        # Credentials first, as DRF checks them: an anonymous caller gets 401 whatever it sent.
        try:
            await run_sync(authenticate_token, token)
        except AuthenticationFailed as auth_exc:
            return _error_response(auth_exc)
        return _error_response(exc)
    try:
        reply = await open_reply(partial(_reply_start_for_token, token, conversation_id, content))
    except ApplicationError as exc:
        return _error_response(exc)
    if SSE_CONTENT_TYPE not in request.headers.get("Accept", ""):
        return await _reply_json(reply)
    events = _reply_events(reply, keepalive=settings.SSE_KEEPALIVE_SECONDS)
    # Run the generator to its first ``yield``: from then on its ``finally`` ends the reply however
    # the response goes (a generator that never started would never run it, e.g. when the client
    # leaves before Django iterates it).
    await anext(events)
    response = StreamingHttpResponse(events, content_type=SSE_CONTENT_TYPE)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _error_response(exc: ApplicationError) -> HttpResponse:
    response = error_response(exc)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'  # as DRF answers on the other endpoints
    return response


async def _reply_events(reply: Reply, *, keepalive: float) -> AsyncGenerator[bytes, None]:
    """Yield the SSE events of ``reply``; its first item is empty (see ``message_send``).

    An async generator, so each event reaches the client as it is yielded (a sync iterator
    would be collected whole first; FIELD-NOTES, "HTTP streaming"). The client leaving usually
    cancels it inside the upstream wait; if it leaves while Django sends an event, Django drops
    the generator and the event loop's async-generator finalizer closes it: either way the
    ``finally`` blocks below end the reply ``cancelled``.
    """
    info = reply.plan.info
    stopper = ReplyStopper(asyncio.current_task())
    try:
        async with listen_for_stop(info["message_id"], stopper):
            yield b""
            yield sse_event("reply.start", reply_start_data(info))
            async with aclosing(stoppable_chunks(reply, stopper, keepalive=keepalive)) as chunks:
                async for chunk in chunks:
                    if chunk is None:
                        yield KEEPALIVE
                    elif chunk.content or chunk.reasoning_content:
                        yield delta_event(chunk)
    except ApplicationError as exc:
        await reply.aclose()  # ended already by ``stoppable_chunks``: a no-op
        yield sse_event("error", {**exc.as_dict(), "message": reply_message_data(reply)})
        return
    finally:
        await reply.aclose()  # a no-op once the reply has ended
    # Built from what the reply wrote: no read-back (``conversations.payloads``).
    yield sse_event("reply.done", {"message": reply_message_data(reply)})


async def _reply_json(reply: Reply) -> JsonResponse:
    """Run ``reply`` to its end; answer 201 with both messages, or the upstream's error."""
    info = reply.plan.info
    stopper = ReplyStopper(asyncio.current_task())
    try:
        async with listen_for_stop(info["message_id"], stopper):
            async with aclosing(stoppable_chunks(reply, stopper)) as chunks:
                async for _chunk in chunks:
                    pass
    except ApplicationError as exc:
        return error_response(exc)
    finally:
        await reply.aclose()
    user_message, assistant_message = await run_sync(message_data, info["user_message_id"], info["message_id"])
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
