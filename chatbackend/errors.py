"""One error family for the whole project, and the adapters that turn it into JSON.

``ApplicationError(message, code, status)`` is raised by services, selectors and the streaming
path. Interfaces turn it (and DRF's own exceptions) into one JSON shape, OpenAI's error object
(https://platform.openai.com/docs/guides/error-codes)::

    {"error": {"message": str, "type": str, "code": str | None, "param": str | None}}

The same shape is used on ``/api`` and ``/v1`` so clients need one parser.
"""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse

# HTTP status -> OpenAI error ``type`` (as OpenAI's API returns them).
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for_status(status: int) -> str:
    """Return OpenAI's error ``type`` for an HTTP status (``api_error`` for 5xx)."""
    return _TYPE_FOR_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


class ApplicationError(Exception):
    """An error with a message for the client, a machine-readable code and an HTTP status.

    ``message``: human-readable, safe to show (never holds a secret).
    ``code``: short snake_case identifier, e.g. ``model_not_found``.
    ``status``: HTTP status the interfaces answer with (4xx for the client's fault, 502/504
    for an upstream's).
    ``param``: the request field at fault, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_request",
        status: int = 400,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param
        self.type = type or error_type_for_status(status)

    def as_dict(self) -> dict[str, Any]:
        """Return the OpenAI error body ``{"error": {...}}``."""
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


class NotFoundError(ApplicationError):
    """The object does not exist or is not visible to the caller (both are a 404)."""

    def __init__(self, message: str = "Not found.", *, code: str = "not_found", param: str | None = None) -> None:
        super().__init__(message, code=code, status=404, param=param)


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:  # noqa: A002
    """Return OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApplicationError) -> JsonResponse:
    """Return a Django ``JsonResponse`` for ``exc`` (used by the plain async views)."""
    return JsonResponse(exc.as_dict(), status=exc.status)
