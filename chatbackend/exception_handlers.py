"""DRF's exception handler and Django's error views for the project: every API error in OpenAI's error shape.

Kept apart from ``chatbackend.errors`` so low-level modules can raise ``ApplicationError``
without importing DRF's views.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.views import defaults
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_default_exception_handler

from .errors import (
    ApplicationError,
    as_application_error,
    error_response,
    internal_error,
    request_too_large_error,
    unknown_url_error,
)


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Turn ``ApplicationError`` and DRF/Django exceptions into the project's JSON error shape.

    DRF's own handler runs first for what it adds (``WWW-Authenticate`` on a 401, ``Retry-After``
    on a 429, a rolled-back atomic request); the body is ``as_application_error``'s. Anything else
    (a bug) is left to Django, which answers 500 without a traceback when DEBUG is off.
    """
    error = as_application_error(exc)
    if error is None:
        return drf_default_exception_handler(exc, context)
    if error is exc:
        return Response(error.as_dict(), status=error.status, headers=error.headers or None)
    response = drf_default_exception_handler(exc, context)
    if response is None:
        return Response(error.as_dict(), status=error.status)
    response.data = error.as_dict()
    return response


# --- Django's error views (handler400/404/500 in chatbackend.urls) ------------------------------
# What Django answers itself, before or outside any DRF view: a URL that resolves to nothing (an
# unknown path, a non-integer id), a body over DATA_UPLOAD_MAX_MEMORY_SIZE, a bad Host header, an
# unhandled exception. Under the API prefixes these are the project's JSON error, like every other
# API error; the HTML pages (templates/) keep Django's own.

_API_PATH = re.compile(r"^/(?:api|v1|dashboard)(?:/|$)")


def is_api_path(path: str) -> bool:
    """Return whether ``path`` (without the script prefix) is under an API prefix: errors there are JSON."""
    return _API_PATH.match(path) is not None


def _is_api(request: HttpRequest) -> bool:
    return is_api_path(request.path_info)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler400``: 413 ``request_too_large`` for a body too big, else 400 ``bad_request``, as JSON on the API."""
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return error_response(request_too_large_error())
    return error_response(ApplicationError("The request could not be understood by the server.", code="bad_request"))


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler404``: a URL that names nothing; 404 ``unknown_url`` as JSON on the API."""
    if not _is_api(request):
        return defaults.page_not_found(request, exception)
    return error_response(unknown_url_error(request))


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: a bug (Django has logged it with its traceback); 500 ``internal_error`` as JSON on the API."""
    if not _is_api(request):
        return defaults.server_error(request)
    return error_response(internal_error())
