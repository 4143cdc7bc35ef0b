"""Plumbing shared by the OpenAI-compatible views: the endpoint decorator, errors, request parsing.

Every error, including unknown URLs and methods, is OpenAI's JSON
(``{"error": {"message", "type", "param", "code"}}``), never Django's HTML.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from functools import partial, wraps
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import ValidationError

from accounts.authentication import Principal, authenticate_token, token_from_headers
from chatbackend.errors import ApplicationError, error_response
from chatbackend.exception_handlers import drf_exception_handler

logger = logging.getLogger(__name__)

# A coroutine function, not any awaitable: Django's ``path()`` takes async views as such.
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def _validation_error_response(exc: ValidationError) -> JsonResponse:
    # The project's DRF exception handler writes the one validation error shape (param, fields).
    response = drf_exception_handler(exc, {})
    assert response is not None  # noqa: S101 - it always handles a ValidationError
    return JsonResponse(response.data, status=response.status_code)


def openai_error_response(exc: ApplicationError) -> JsonResponse:
    """Return ``exc`` as OpenAI's error JSON; a 401 also gets ``WWW-Authenticate: Bearer``."""
    response = error_response(exc)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


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
                    response = openai_error_response(
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
                return openai_error_response(exc)
            except Exception:
                logger.exception("%s %s failed", request.method, request.path)
                return openai_error_response(
                    ApplicationError(
                        "The server had an error while processing your request.", code="internal_error", status=500
                    )
                )

        return csrf_exempt(endpoint)

    return decorate


def request_authenticator(request: HttpRequest) -> Callable[[], Principal]:
    """Return a sync callable that authenticates ``request``'s bearer token or API key header."""
    # ``token_from_headers`` is annotated ``dict[str, str]`` but only reads ``.get``: ``HttpHeaders``
    # (a case-insensitive Mapping) is fine. Annotating it ``Mapping[str, str]`` would drop this ignore.
    return partial(authenticate_token, token_from_headers(request.headers))  # type: ignore[arg-type]


def request_body(request: HttpRequest) -> bytes:
    """Return the raw body; chunked bodies without ``Content-Length`` (NextChat's server) are fine.

    Raises ``ApplicationError`` 413 ``request_too_large`` past ``DATA_UPLOAD_MAX_MEMORY_SIZE``.
    """
    try:
        return request.body
    except RequestDataTooBig:
        raise ApplicationError(
            "The request body is larger than this server accepts (DATA_UPLOAD_MAX_MEMORY_SIZE).",
            code="request_too_large",
            status=413,
        ) from None


def parse_json(raw: bytes) -> Any:
    """Return the JSON value of ``raw``. Raises ``ApplicationError`` 400 ``invalid_json``."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApplicationError(
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


@csrf_exempt
async def unknown_url(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Answer an unknown ``/v1`` or ``/dashboard`` URL with OpenAI's 404 JSON, never Django's HTML page."""
    return openai_error_response(
        ApplicationError(
            f"Invalid URL ({request.method} {request.path}).",
            code="unknown_url",
            status=404,
            type="invalid_request_error",
        )
    )


__all__ = [
    "View",
    "openai_endpoint",
    "openai_error_response",
    "parse_json",
    "request_authenticator",
    "request_body",
    "unknown_url",
]
