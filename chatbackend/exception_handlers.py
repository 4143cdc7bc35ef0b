"""DRF's exception handler for the project: every API error in OpenAI's error shape.

Kept apart from ``chatbackend.errors`` so low-level modules can raise ``ApplicationError``
without importing DRF's views.
"""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_default_exception_handler

from .errors import as_application_error


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
        return Response(error.as_dict(), status=error.status)
    response = drf_default_exception_handler(exc, context)
    if response is None:
        return Response(error.as_dict(), status=error.status)
    response.data = error.as_dict()
    return response
