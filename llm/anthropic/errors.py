"""Errors in Anthropic's shape, for every answer of ``/v1/messages`` (before or inside a stream).

Spec: https://docs.anthropic.com/en/api/errors — the body is
``{"type": "error", "error": {"type": <error type>, "message": str}}``, the type follows the
HTTP status. The project's ``ApplicationError`` keeps its status and headers (``Retry-After`` and
``x-ratelimit-*`` on a 429), so the official SDK raises its typed exception for each
(``AuthenticationError``, ``BadRequestError``, ``NotFoundError``, ``RateLimitError``...).
"""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse

from chatbackend.errors import ApplicationError

# HTTP status -> Anthropic's error ``type`` (https://docs.anthropic.com/en/api/errors#http-errors).
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    # Anthropic's "temporarily overloaded" is 529; our 503s (metering unavailable, shutting down)
    # mean the same to a client: retry soon.
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    """Return Anthropic's error ``type`` for an HTTP ``status`` (``api_error`` for other 5xx)."""
    return _TYPE_FOR_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(error: ApplicationError) -> dict[str, Any]:
    """Return ``{"type": "error", "error": {"type", "message"}}`` for ``error`` (its ``detail`` stays in the log).

    Anthropic's shape has no ``param``: a message that does not name the field ``error.param`` names
    gets it in front (``messages[0].content: ...``), as Anthropic names the field first.
    """
    message, param = error.message, error.param
    if param and param not in message:
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": anthropic_error_type(error.status), "message": message}}


def anthropic_error_response(error: ApplicationError) -> JsonResponse:
    """Return ``error`` as Anthropic's error JSON with its status and headers (``Retry-After`` on a 429)."""
    return JsonResponse(anthropic_error_body(error), status=error.status, headers=error.headers or None)


__all__ = ["anthropic_error_body", "anthropic_error_response", "anthropic_error_type"]
