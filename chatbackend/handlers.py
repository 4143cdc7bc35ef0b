"""A lean ASGI handler for the streaming endpoints, and the router that picks it.

Under ASGI every sync ``MiddlewareMixin`` in ``MIDDLEWARE`` (Security, Session, Common, Csrf,
Authentication, Message, XFrameOptions) runs through ``sync_to_async``: a thread hop per
middleware per request (FIELD-NOTES, "Middleware matters more than the view layer"; profiled:
12% of CPU under 200 streams). The OpenAI-compatible API (``/v1``, ``/dashboard``) and the SSE
send view (``POST /api/conversations/<id>/messages/``) authenticate with bearer tokens only, use
no session, cookie, CSRF token or message, and answer JSON or ``text/event-stream``, so they run
through ``settings.STREAMING_MIDDLEWARE`` instead. Everything else keeps the full chain.

Both handlers are Django ``ASGIHandler``\\ s (``BoundedBodyASGIHandler``, which bounds a request's
body while it arrives): the same ``ROOT_URLCONF``, the same ``request_started``/``request_finished``
signals (so ``close_old_connections`` still runs), the same exception handling. The lean one also
saves two per-request costs those endpoints do not need (see ``StreamingASGIHandler``).
"""

from __future__ import annotations

import asyncio
import gc
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import logger
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.utils.decorators import async_only_middleware
from django.utils.module_loading import import_string

from .errors import ApplicationError, error_response, request_too_large_error
from .exception_handlers import is_api_path
from .http import EventStreamResponse

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

# Any method: every /v1 and /dashboard URL is served by async, token-only views (unknown ones too).
_STREAMING_ANY_METHOD = re.compile(r"^/(?:v1|dashboard)(?:/|$)")
# The health probes (chatbackend.health): no session, cookie or CSRF; cheap even while the
# database is down. They skip the ALLOWED_HOSTS check: probes send a pod's or container's address.
_HEALTH = re.compile(r"^/health/(?:live|ready)$")
# POST only: GET on the same URL lists messages through DRF, which keeps the full chain.
_STREAMING_POST = re.compile(r"^/api/conversations/[0-9]+/messages/$")


def request_path(scope: Mapping[str, Any]) -> str:
    """Return an HTTP ``scope``'s path without the script prefix, as ``ASGIRequest.path_info`` has it."""
    script_name = get_script_prefix(scope)
    path: str = scope["path"]
    return path.removeprefix(script_name) if script_name else path


def is_streaming_request(scope: dict[str, Any]) -> bool:
    """Return whether an HTTP ``scope`` goes to the lean handler (path as Django resolves it)."""
    path = request_path(scope)
    if _STREAMING_ANY_METHOD.match(path) or _HEALTH.match(path):
        return True
    return str(scope.get("method", "")).upper() == "POST" and _STREAMING_POST.match(path) is not None


# The answer to an error on an API path before a request exists: (ASGI scope, error) -> response.
ScopeErrorResponse = Callable[[Mapping[str, Any], ApplicationError], HttpResponseBase]


def _project_error_response(scope: Mapping[str, Any], error: ApplicationError) -> HttpResponseBase:
    return error_response(error)


class _BodyTooLargeError(Exception):
    """A request body went past ``REQUEST_BODY_MAX_BYTES`` while it arrived (``read_body`` to ``handle``)."""


class _RequestTasks:
    """The tasks Django's ``handle`` starts for the request it serves (one sends the response, one
    listens for a disconnect), and whether the server cancelled the request. They inherit this
    object from ``handle``'s context (``_request_tasks``), so it is the one ``handle`` changes."""

    __slots__ = ("cancelled_by_server", "tasks")

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.cancelled_by_server = False


_request_tasks: ContextVar[_RequestTasks] = ContextVar("request_tasks")


class BoundedBodyASGIHandler(ASGIHandler):
    """Django's ``ASGIHandler`` that bounds a request's body while it arrives and sizes a chunked one.

    Under ASGI, Django reads a whole body (spooled to disk past ``FILE_UPLOAD_MAX_MEMORY_SIZE``)
    before any view or middleware runs; ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is only checked later,
    against ``Content-Length``, when the body is read. Here:

    - a body declared (``Content-Length``) or found while arriving to be larger than
      ``REQUEST_BODY_MAX_BYTES`` is not read further: the answer is 413 ``request_too_large`` (the
      project's JSON error on ``/api``, ``/v1``, ``/dashboard``; plain text elsewhere), and the
      server closes the connection, as a reverse proxy over its own limit does;
    - a body sent without ``Content-Length`` (``Transfer-Encoding: chunked``) gets its size as
      ``CONTENT_LENGTH`` once read: DRF (``Request._load_stream``) takes a request without one for a
      request without a body, and Django's own size check reads that header;
    - Django's early 400 and 413 (a request it cannot build) are the project's JSON errors on the API;
    - a request the server cancels ends with its view, as one whose client went away does, and the
      view can tell the two apart (``request_cancelled_by_server``).

    On that last point: Django's ``handle`` runs the view and sends the response in a task of its
    own, and cancels that task when the client disconnects, but not when ``handle`` itself is
    cancelled, which is what a server does to the requests still running when it stops (uvicorn
    past ``--timeout-graceful-shutdown``, daphne on SIGTERM). The view's task would run on, and
    uvicorn drops what it sends once it closed the connection, without an error: a streamed reply
    would be saved with text its client never received. Here both of ``handle``'s tasks are
    cancelled and awaited before the cancellation goes on to the server, so the reply ends with
    what was sent.
    """

    def __init__(self, api_error_response: ScopeErrorResponse | None = None) -> None:
        """``api_error_response(scope, error)``: the answer to ``error`` on an API path before any view
        runs (the 413s and Django's early 400), for an API whose errors have a shape of their own
        (Anthropic's on ``/v1/messages``); default: the project's JSON error (``error_response``)."""
        super().__init__()
        self._api_error_response = api_error_response or _project_error_response

    def _too_large(self, scope: Mapping[str, Any], size: int | None) -> HttpResponseBase:
        limit = settings.REQUEST_BODY_MAX_BYTES
        if _is_api_scope(scope):
            response = self._api_error_response(scope, request_too_large_error(size, limit=limit))
        else:
            response = HttpResponse(f"Request body larger than {limit} bytes.", status=413, content_type="text/plain")
        response["Connection"] = "close"
        return response

    def _early_error(self, scope: Mapping[str, Any], response: HttpResponseBase | None) -> HttpResponseBase | None:
        """Django's own 400 or 413 for a request it could not build, as the project's JSON error on the API."""
        if response is None or not _is_api_scope(scope):
            return response
        if response.status_code == 413:
            return self._api_error_response(scope, request_too_large_error())
        error = ApplicationError("The request could not be understood by the server.", code="bad_request")
        return self._api_error_response(scope, error)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        declared = _declared_length(scope)
        if declared is not None and declared > settings.REQUEST_BODY_MAX_BYTES:
            await self.send_response(self._too_large(scope, declared), send)  # nothing of the body is read
            return
        request = _RequestTasks()
        _request_tasks.set(request)
        try:
            await super().handle(scope, receive, send)
        except _BodyTooLargeError:  # raised by read_body, before anything was sent
            await self.send_response(self._too_large(scope, None), send)
        except asyncio.CancelledError:
            request.cancelled_by_server = True  # what the view's tasks see (request_cancelled_by_server)
            for task in request.tasks:
                task.cancel()  # as Django's handle does on a disconnect: the view ends its reply
            await asyncio.gather(*request.tasks, return_exceptions=True)
            raise

    async def run_get_response(self, request: HttpRequest) -> HttpResponseBase:
        """Django's, in the task that answers the request: ``handle`` keeps that task to cancel it."""
        _keep_request_task()
        return await super().run_get_response(request)

    async def listen_for_disconnect(self, receive: Any) -> Any:
        """Django's, in the task that listens for a disconnect: ``handle`` keeps that task to cancel it."""
        _keep_request_task()
        return await super().listen_for_disconnect(receive)

    async def read_body(self, receive: Any) -> Any:
        """Read the body into a spooled file, as Django does; raise ``_BodyTooLargeError`` past the bound."""
        limit = settings.REQUEST_BODY_MAX_BYTES
        body_file = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b")
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body_file.close()
                raise RequestAborted
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                body_file.close()
                raise _BodyTooLargeError
            if chunk:
                body_file.write(chunk)
            if not message.get("more_body", False):
                break
        body_file.seek(0)
        return body_file

    def create_request(self, scope: Mapping[str, Any], body_file: Any) -> tuple[Any, Any]:
        request, error = super().create_request(scope, body_file)
        if request is None:
            return None, self._early_error(scope, error)
        if "CONTENT_LENGTH" not in request.META:
            size = body_file.seek(0, 2)
            body_file.seek(0)
            if size:
                request.META["CONTENT_LENGTH"] = str(size)
        return request, None


def _keep_request_task() -> None:
    """Add the current task to the request's tasks (``_request_tasks``), for ``handle`` to cancel."""
    request = _request_tasks.get(None)
    task = asyncio.current_task()
    if request is not None and task is not None:
        request.tasks.append(task)


def request_cancelled_by_server() -> bool:
    """Return whether the server cancelled the HTTP request the current task serves: it is stopping
    (uvicorn past ``--timeout-graceful-shutdown``, daphne on SIGTERM), as opposed to a client that went
    away. False outside a request served by ``BoundedBodyASGIHandler`` and before the cancellation."""
    request = _request_tasks.get(None)
    return request is not None and request.cancelled_by_server


def _declared_length(scope: Mapping[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # Django's request then answers what it makes of it
    return None


def _is_api_scope(scope: Mapping[str, Any]) -> bool:
    return is_api_path(request_path(scope))


class StreamingASGIHandler(BoundedBodyASGIHandler):
    """``ASGIHandler`` whose middleware chain is ``settings.STREAMING_MIDDLEWARE``.

    ``BaseHandler.load_middleware`` reads ``settings.MIDDLEWARE`` by name, so this override is
    Django 5.2's loop with the list made a parameter (``ASGIHandler.__init__`` calls it with
    ``is_async=True``). Only async-capable middleware belongs in the list: a sync-only one would
    bring back the thread hop this handler exists to avoid.

    Two more costs are cut for these endpoints:

    - No ``asgiref.sync.ThreadSensitiveContext`` per request. Django opens one so that a request's
      thread-sensitive sync code runs in one thread; the first such call then starts a new
      thread for the request (``Thread.start`` showed in the profile). These views do their
      database work through ``chatbackend.asyncdb.run_sync`` (not thread-sensitive), so only the
      ``request_started``/``request_finished`` receivers are thread-sensitive here, and they run
      in asgiref's one shared sync thread instead.
    - An ``EventStreamResponse``'s parts are written as they come (``send_response``), without
      the per-part generator layers of ``StreamingHttpResponse`` (``chatbackend.http``).
    """

    middleware_setting = "STREAMING_MIDDLEWARE"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def send_response(self, response: HttpResponseBase, send: Any) -> None:
        """Send ``response``; an ``EventStreamResponse`` part by part, anything else as Django does."""
        if not isinstance(response, EventStreamResponse):
            await super().send_response(response, send)
            return
        headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()] + [
            (b"Set-Cookie", cookie.output(header="").encode("ascii").strip()) for cookie in response.cookies.values()
        ]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async with aclosing(response.body_parts) as parts:  # type: ignore[type-var]  # an async generator
            async for part in parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []

        # Both exist on BaseHandler; django-stubs does not declare them.
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        handler = convert_exception_to_response(get_response)
        handler_is_async = is_async
        for middleware_path in reversed(getattr(settings, self.middleware_setting)):
            middleware = import_string(middleware_path)
            middleware_can_sync = getattr(middleware, "sync_capable", True)
            middleware_can_async = getattr(middleware, "async_capable", False)
            if not middleware_can_sync and not middleware_can_async:
                raise RuntimeError(
                    f"Middleware {middleware_path} must have at least one of sync_capable/async_capable set to True."
                )
            elif not handler_is_async and middleware_can_sync:
                middleware_is_async = False
            else:
                middleware_is_async = middleware_can_async
            try:
                adapted_handler = self.adapt_method_mode(
                    middleware_is_async,
                    handler,
                    handler_is_async,
                    debug=settings.DEBUG,
                    name=f"middleware {middleware_path}",
                )
                mw_instance = middleware(adapted_handler)
            except MiddlewareNotUsed as exc:
                if settings.DEBUG:
                    logger.debug("MiddlewareNotUsed(%r): %s", middleware_path, exc)
                continue
            else:
                handler = adapted_handler

            if mw_instance is None:
                raise ImproperlyConfigured(f"Middleware factory {middleware_path} returned None.")

            if hasattr(mw_instance, "process_view"):
                self._view_middleware.insert(0, self.adapt_method_mode(is_async, mw_instance.process_view))
            if hasattr(mw_instance, "process_template_response"):
                self._template_response_middleware.append(
                    self.adapt_method_mode(is_async, mw_instance.process_template_response)
                )
            if hasattr(mw_instance, "process_exception"):
                # Django's exception-handling stack is always synchronous.
                self._exception_middleware.append(self.adapt_method_mode(False, mw_instance.process_exception))

            handler = convert_exception_to_response(mw_instance)
            handler_is_async = middleware_is_async

        handler = self.adapt_method_mode(is_async, handler, handler_is_async)
        self._middleware_chain = handler


@async_only_middleware
def api_headers_middleware(
    get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]],
) -> Callable[[HttpRequest], Awaitable[HttpResponseBase]]:
    """What the full chain did that still matters for JSON/SSE answers, without a thread hop.

    - ``request.get_host()`` enforces ``ALLOWED_HOSTS`` (a bad Host gets 400), as
      ``CommonMiddleware`` did for every request; not for the health probes, which an
      orchestrator sends with whatever address it reaches the process at.
    - ``X-Content-Type-Options: nosniff``, as ``SecurityMiddleware`` did. Its other headers
      (``Referrer-Policy``, ``Cross-Origin-Opener-Policy``) only affect HTML documents.
    """

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        if not _HEALTH.match(request.path_info):
            request.get_host()
        response = await get_response(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return middleware


class StreamingRouter:
    """Send streaming-endpoint HTTP requests to ``streaming``, all others to ``default``."""

    def __init__(self, default: ASGIApp, streaming: ASGIApp) -> None:
        self.default = default
        self.streaming = streaming

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and is_streaming_request(scope):
            await self.streaming(scope, receive, send)
        else:
            await self.default(scope, receive, send)


def tune_gc(gen0_threshold: int = 50_000) -> None:
    """Take start-up objects out of the collector's reach and collect the young generation less often.

    ``gc.freeze()`` moves every object alive now (modules, URL resolvers, settings, templates)
    to a permanent generation that collections skip, so a full collection no longer walks them
    (https://docs.python.org/3/library/gc.html#gc.freeze; Instagram's "Dismissing Python Garbage
    Collection at Instagram", https://instagram-engineering.com/dismissing-python-garbage-collection-at-instagram-4dca40b29172).
    Collecting first leaves no garbage frozen. The default gen0 threshold
    (700 net allocations) triggers a collection every few requests under streaming load;
    a larger one trades a little memory for fewer, equally cheap young collections.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, 20, 100)
