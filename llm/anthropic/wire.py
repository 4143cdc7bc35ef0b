"""Which requests speak Anthropic's wire format, and what every answer to one carries.

One rule, used by every ``/v1`` URL: a request is Anthropic's when its path is under
``/v1/messages`` (Anthropic's Messages API, served only in that shape) or when it carries the
``anthropic-version`` header, which the ``anthropic`` SDKs send on every request and OpenAI's never
do (https://docs.anthropic.com/en/api/versioning). ``/v1/models``, which both SDKs call, answers
each in its own shape by this rule (``by_wire_format``).

Every answer to an Anthropic request carries ``request-id``, the value of ``X-Request-ID``
(django-guid's, ``settings.DJANGO_GUID``): Anthropic sends only ``request-id``, and the SDK reads
it into ``message._request_id``, ``with_raw_response(...).request_id`` and ``APIStatusError.request_id``
(https://docs.anthropic.com/en/api/errors#request-id).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.decorators import async_only_middleware
from django.views.decorators.csrf import csrf_exempt
from django_guid import get_guid

from accounts.endpoints import View
from chatbackend.errors import ApplicationError, error_response
from chatbackend.handlers import request_path

from .errors import anthropic_error_response

VERSION_HEADER = "anthropic-version"
_VERSION_HEADER_BYTES = VERSION_HEADER.encode("ascii")
REQUEST_ID_HEADER = "request-id"
_MESSAGES_PATH = re.compile(r"^/v1/messages(?:/|$)")


def is_anthropic_request(request: HttpRequest) -> bool:
    """Return whether ``request`` gets Anthropic's shape: under ``/v1/messages``, or with ``anthropic-version``."""
    return VERSION_HEADER in request.headers or _MESSAGES_PATH.match(request.path_info) is not None


def is_anthropic_scope(scope: Mapping[str, Any]) -> bool:
    """Return whether an HTTP ASGI ``scope`` is an Anthropic request (``is_anthropic_request``'s rule),
    for answers given before Django builds a request (``chatbackend.handlers``: a body too large)."""
    if _MESSAGES_PATH.match(request_path(scope)) is not None:
        return True
    return any(name.lower() == _VERSION_HEADER_BYTES for name, _ in scope.get("headers", ()))


def scope_error_response(scope: Mapping[str, Any], error: ApplicationError) -> HttpResponseBase:
    """Answer ``error`` for an API request Django has not built (``chatbackend.handlers.ScopeErrorResponse``):
    in Anthropic's shape for an Anthropic request (``is_anthropic_scope``), else the project's."""
    return anthropic_error_response(error) if is_anthropic_scope(scope) else error_response(error)


def by_wire_format(*, openai: View, anthropic: View) -> View:
    """Route one URL to ``anthropic`` for an Anthropic request (``is_anthropic_request``), else to ``openai``.

    Each view keeps its own authentication and error shape (``accounts.endpoints.async_endpoint``),
    so a bad key or an unknown model is an error either client reads.
    """

    async def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        view = anthropic if is_anthropic_request(request) else openai
        return await view(request, *args, **kwargs)

    return csrf_exempt(endpoint)


@async_only_middleware
def request_id_middleware(
    get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]],
) -> Callable[[HttpRequest], Awaitable[HttpResponseBase]]:
    """Add ``request-id`` (the request's ``X-Request-ID``) to every answer to an Anthropic request.

    After django-guid's middleware in ``STREAMING_MIDDLEWARE``: its id is set by then, and it is the
    one django-guid puts in ``X-Request-ID`` on the way out. Errors included (401s, 404s, 405s), as
    they are answers too; a stream's headers are set before its first event.
    """

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        response = await get_response(request)
        request_id = get_guid()
        if request_id and is_anthropic_request(request):
            response[REQUEST_ID_HEADER] = request_id
        return response

    return middleware


__all__ = [
    "REQUEST_ID_HEADER",
    "VERSION_HEADER",
    "by_wire_format",
    "is_anthropic_request",
    "is_anthropic_scope",
    "request_id_middleware",
    "scope_error_response",
]
