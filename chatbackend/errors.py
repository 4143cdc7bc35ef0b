"""One error family for the whole project, and the adapters that turn it into JSON.

``ApplicationError(message, code, status)`` is raised by services, selectors and the streaming
path. Interfaces turn it (and DRF's own exceptions) into one JSON shape, OpenAI's error object
(https://platform.openai.com/docs/guides/error-codes)::

    {"error": {"message": str, "type": str, "code": str | None, "param": str | None}}

The same shape is used on ``/api`` and ``/v1`` so clients need one parser.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kombu.exceptions
import redis.exceptions
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import utils as db_utils
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.settings import api_settings as drf_settings

logger = logging.getLogger(__name__)

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
    ``fields``: for validation errors, DRF's per-field detail (``{field: [messages]}``; errors of
    no one field under ``non_field_errors``), sent as ``error.fields`` so forms can show every
    field's problem.
    ``detail``: what only the server log may hold (an upstream's host, port, library error text);
    never sent to a client nor stored where clients read it.
    ``headers``: HTTP headers the error's response carries (e.g. ``Retry-After`` on a 429).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_request",
        status: int = 400,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        fields: Any = None,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.detail = detail
        self.headers: Mapping[str, str] = headers or {}
        self.message = message
        self.code = code
        self.status = status
        self.param = param
        self.type = type or error_type_for_status(status)
        self.fields = fields

    def as_dict(self) -> dict[str, Any]:
        """Return the OpenAI error body ``{"error": {"message", "type", "param", "code"[, "fields"]}}``."""
        body = error_body(self.message, type=self.type, code=self.code, param=self.param)
        if self.fields is not None:
            body["error"]["fields"] = self.fields
        return body


class NotFoundError(ApplicationError):
    """The object does not exist or is not visible to the caller (both are a 404)."""

    def __init__(self, message: str = "Not found.", *, code: str = "not_found", param: str | None = None) -> None:
        super().__init__(message, code=code, status=404, param=param)


class ServiceUnavailableError(ApplicationError):
    """A service the server depends on (database, Redis, Celery broker) is unreachable: 503, try again later."""

    def __init__(
        self,
        message: str = "The service is temporarily unavailable; try again in a few seconds.",
        *,
        code: str = "service_unavailable",
    ) -> None:
        super().__init__(message, code=code, status=503)


# What an unreachable dependency raises: Django's wrapped driver errors (connection refused or
# lost, pool timeout), redis-py's (cache, channel layer), kombu's (a broker publish that gave up).
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    db_utils.OperationalError,
    db_utils.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)


def as_outage_error(exc: BaseException) -> ServiceUnavailableError | None:
    """Return a 503 ``ServiceUnavailableError`` if ``exc`` says a dependency is unreachable, else None.

    The client sees no detail (hosts, ports, driver text); the server log gets it, with the traceback.
    """
    if not isinstance(exc, OUTAGE_ERRORS):
        return None
    logger.warning("a dependency is unavailable: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ServiceUnavailableError()


def unknown_url_error(request: HttpRequest) -> ApplicationError:
    """Return the 404 ``unknown_url`` error for a URL that names nothing (OpenAI's wording and type)."""
    return ApplicationError(
        f"Invalid URL ({request.method} {request.path}).", code="unknown_url", status=404, type="invalid_request_error"
    )


def request_too_large_error(size: int | None = None, *, limit: int | None = None) -> ApplicationError:
    """Return the 413 ``request_too_large`` error for a body over ``limit`` bytes.

    ``size``: the body's declared size in bytes (``Content-Length``), when known. ``limit``: default
    ``DATA_UPLOAD_MAX_MEMORY_SIZE``.
    """
    told = f" ({size} bytes)" if size is not None else ""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE if limit is None else limit
    return ApplicationError(
        f"The request body{told} is larger than this server accepts ({limit} bytes).",
        code="request_too_large",
        status=413,
    )


def internal_error() -> ApplicationError:
    """Return the 500 ``internal_error`` a client sees for a bug (the server log has the traceback)."""
    return ApplicationError("The server had an error while processing your request.", code="internal_error", status=500)


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:  # noqa: A002
    """Return OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApplicationError) -> JsonResponse:
    """Return ``exc`` as a JSON response with its status (the plain async views' error renderer).

    A 401 also gets ``WWW-Authenticate: Bearer realm="api"``, as DRF answers on the other endpoints
    (RFC 6750, section 3); the error's own ``headers`` (``Retry-After``, ``x-ratelimit-*``) are set.
    """
    response = JsonResponse(exc.as_dict(), status=exc.status, headers=exc.headers or None)
    if exc.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def _flatten_validation(detail: Any, prefix: str = "") -> tuple[str, str | None]:
    """Return ``(message, param)`` for the first error in a DRF ``ValidationError.detail``.

    ``param`` is the field's path with list indexes as parts (``conversations.0.messages.1.content``),
    as Anthropic's API and this API's ``/v1`` validation name them.
    """
    if isinstance(detail, dict):
        for key, value in detail.items():
            # A ListField's errors are keyed by the item's index (an int: index 0 must not vanish).
            name = str(key) if key != "non_field_errors" else ""
            path = f"{prefix}.{name}" if prefix and name else (name or prefix)
            return _flatten_validation(value, path)
    if isinstance(detail, list) and detail:
        # A list serializer's errors hold one entry per item, ``{}`` for each valid one: the first
        # non-empty entry is the item at fault.
        for index, item in enumerate(detail):
            if isinstance(item, dict | list):
                if item:
                    return _flatten_validation(item, f"{prefix}.{index}" if prefix else str(index))
                continue
            return _flatten_validation(item, prefix)
    message = str(detail)
    return (f"{prefix}: {message}" if prefix else message), (prefix or None)


def as_application_error(exc: Exception) -> ApplicationError | None:
    """Return ``exc`` as an ``ApplicationError`` if it is one the API reports to clients, else None.

    Handles ``ApplicationError`` itself, DRF's ``APIException`` family (a ``ValidationError`` keeps
    its per-field detail in ``fields`` and names the first field at fault in ``param``), and
    Django's ``Http404`` / ``PermissionDenied``, and an unreachable database, Redis or broker
    (``as_outage_error``: 503). Anything else is a bug: None.
    """
    if isinstance(exc, ApplicationError):
        return exc
    if (outage := as_outage_error(exc)) is not None:
        return outage
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    if not isinstance(exc, drf_exceptions.APIException):
        return None
    if isinstance(exc, drf_exceptions.ValidationError):
        message, param = _flatten_validation(exc.detail)
        # Always an object, as documented: a ValidationError raised with a message or a list
        # (a view's or a filter's, not a serializer field's) goes under DRF's non-field key.
        fields = exc.detail if isinstance(exc.detail, dict) else {drf_settings.NON_FIELD_ERRORS_KEY: exc.detail}
        return ApplicationError(
            message,
            code="invalid",
            status=exc.status_code,
            param=param,
            type="invalid_request_error",
            fields=fields,
        )
    detail = exc.detail
    codes = exc.get_codes()
    message = str(detail.get("detail", detail)) if isinstance(detail, dict) else str(detail)
    code = codes.get("detail", codes) if isinstance(codes, dict) else codes
    # An exception may name its OpenAI error type (``error_type``) when the status's is not the one.
    return ApplicationError(message, code=str(code), status=exc.status_code, type=getattr(exc, "error_type", None))
