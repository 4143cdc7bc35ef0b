"""DRF's exception handler for the project: every API error in OpenAI's error shape.

Kept apart from ``chatbackend.errors`` so low-level modules can raise ``ApplicationError``
without importing DRF's views.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_default_exception_handler

from .errors import ApplicationError, error_body, error_type_for_status


def _flatten_validation(detail: Any, prefix: str = "") -> tuple[str, str | None]:
    """Return ``(message, param)`` for the first error in a DRF ``ValidationError.detail``."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            path = f"{prefix}.{name}" if prefix and name else (name or prefix)
            return _flatten_validation(value, path)
    if isinstance(detail, list) and detail:
        for index, item in enumerate(detail):
            if isinstance(item, dict | list):
                return _flatten_validation(item, f"{prefix}[{index}]" if prefix else f"[{index}]")
        return _flatten_validation(detail[0], prefix)
    message = str(detail)
    return (f"{prefix}: {message}" if prefix else message), (prefix or None)


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Turn ``ApplicationError`` and DRF/Django exceptions into the project's JSON error shape.

    Validation errors keep DRF's per-field detail under ``error.fields`` so forms can show it.
    Anything else (a bug) is left to Django, which answers 500 without a traceback when DEBUG
    is off.
    """
    if isinstance(exc, ApplicationError):
        return Response(exc.as_dict(), status=exc.status)
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    response = drf_default_exception_handler(exc, context)
    if response is None or not isinstance(exc, drf_exceptions.APIException):
        return response
    if isinstance(exc, drf_exceptions.ValidationError):
        message, param = _flatten_validation(exc.detail)
        body = error_body(message, type="invalid_request_error", code="invalid", param=param)
        body["error"]["fields"] = exc.detail
    else:
        detail = exc.detail
        codes = exc.get_codes()
        message = str(detail.get("detail", detail)) if isinstance(detail, dict) else str(detail)
        code = codes.get("detail", codes) if isinstance(codes, dict) else codes
        body = error_body(message, type=error_type_for_status(response.status_code), code=str(code))
    response.data = body
    return response
