"""The one wrapper of the plain async views: methods, authentication, request bodies, errors.

DRF views are sync; the streaming endpoints (``/v1``, ``/dashboard``, the conversation send view)
are plain ``async def`` Django views (FIELD-NOTES, "DRF and async"). ``async_endpoint`` gives each
of them what DRF gives its views, in one place:

- the allowed methods: another is a 405 with ``Allow``; a bare ``OPTIONS`` (not a CORS preflight,
  which django-cors-headers answers first) a 200 with ``Allow``; ``HEAD`` is ``GET`` where there is
  one (the server sends no body), as Django's and DRF's views answer it;
- CSRF exemption: credentials are bearer tokens or API keys, never cookies;
- authentication and scope: the caller's ``Principal`` (API key or JWT access token, from ``Authorization:
  Bearer``, ``x-api-key`` or ``api-key``), resolved before the view runs — on the event loop
  when this process has it cached, else in one worker-thread hop (``authenticate_token_async``)
  — and handed to the view, acting in the organization the ``OpenAI-Organization`` header names (else
  the key's, or the user's default); a bad credential or organization is a 401, an API key without
  the endpoint's scope a 403 (``accounts.scopes``), both before the body is read;
- errors: ``ApplicationError``, DRF ``ValidationError`` and the like become the project's JSON error
  (``chatbackend.errors.error_response``: OpenAI's shape, or the ``errors`` renderer an endpoint
  names, e.g. Anthropic's shape on ``/v1/messages``); any other exception is logged and answered
  as a 500 in the same shape, never an HTML page;
- the audit context: the request is the one audit rows written by the view name the client IP and
  path of (``accounts.audit.audit_request``; the sync chain's ``AuditRequestMiddleware`` is not in
  the streaming chain).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from functools import wraps
from typing import Any, Concatenate, ParamSpec

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from chatbackend.errors import (
    ApplicationError,
    as_application_error,
    error_response,
    internal_error,
    request_too_large_error,
)
from chatbackend.parsers import JSONParseError, json_loads, null_character_path

from .audit import audit_request
from .authentication import Principal, authenticate_token_async, token_from_headers
from .scopes import ScopeNeed, api_key_scope_check, role_scope_check
from .selectors import ORGANIZATION_HEADER

logger = logging.getLogger(__name__)

Params = ParamSpec("Params")
# A coroutine function, not any awaitable: Django's ``path()`` takes async views as such.
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]
AuthenticatedView = Callable[Concatenate[HttpRequest, Principal, Params], Coroutine[Any, Any, HttpResponseBase]]
ErrorRenderer = Callable[[ApplicationError], HttpResponseBase]


def async_endpoint(
    *methods: str, scope: ScopeNeed, errors: ErrorRenderer = error_response
) -> Callable[[AuthenticatedView[Params]], View]:
    """Make ``view(request, principal, *args, **kwargs)`` an authenticated endpoint answering ``methods``.

    See the module docstring for what the wrapper does. ``scope``: the ``APIKey.Scope`` a caller
    using an API key needs (``accounts.scopes.api_key_scope_check``: 403 without it, before the
    view runs). ``errors`` renders every error of the endpoint (405, 401, 403, the view's): the
    wire format's own error shape, OpenAI's by default. The returned view takes
    ``(request, *args, **kwargs)`` as Django calls it.
    """
    methods = _with_head(methods)
    allow = ", ".join((*methods, "OPTIONS"))

    def decorate(view: AuthenticatedView[Params]) -> View:
        @wraps(view)
        async def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method not in methods:
                return _method_not_allowed(request, allow, errors)
            try:
                principal = await authenticate_token_async(
                    token_from_headers(request.headers), request.headers.get(ORGANIZATION_HEADER) or None
                )
                api_key_scope_check(principal.api_key, scope, action=f"{request.method} {request.path}")
                role_scope_check(principal.acting.role, scope, action=f"{request.method} {request.path}")
                with audit_request(request):  # audit rows of the view (accounts.audit) name its IP and path
                    return await view(request, principal, *args, **kwargs)
            except Exception as exc:
                error = as_application_error(exc)
                if error is None:
                    logger.exception("%s %s failed", request.method, request.path)
                    error = internal_error()
                return errors(error)

        return csrf_exempt(endpoint)

    return decorate


def _with_head(methods: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``methods`` and ``HEAD`` after them when they have ``GET`` (HTTP: a GET resource answers HEAD)."""
    return (*methods, "HEAD") if "GET" in methods and "HEAD" not in methods else methods


def _method_not_allowed(request: HttpRequest, allow: str, errors: ErrorRenderer) -> HttpResponseBase:
    """Answer a method ``allow`` leaves out: a bare ``OPTIONS`` a 200, any other a 405; both with ``Allow``."""
    if request.method == "OPTIONS":
        response: HttpResponseBase = HttpResponse()
    else:
        response = errors(
            ApplicationError(
                f"Method {request.method} is not allowed on {request.path}; allowed: {allow}.",
                code="method_not_allowed",
                status=405,
            )
        )
    response["Allow"] = allow
    return response


def by_method(views: Mapping[str, View], *, errors: ErrorRenderer = error_response) -> View:
    """Route one URL to an ``async_endpoint`` view per method, e.g. ``{"GET": list, "POST": create}``.

    Each view keeps its own scope (OpenAI's ``GET /v1/chat/completions`` reads, its ``POST`` chats);
    another method is the 405 (bare ``OPTIONS``: the 200) that ``async_endpoint`` answers, ``Allow``
    naming every method here. Costs one dictionary lookup per request.
    """
    allow = ", ".join((*_with_head(tuple(views)), "OPTIONS"))

    async def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        method = request.method or ""
        view = views.get("GET" if method == "HEAD" and "HEAD" not in views else method)
        if view is None:
            return _method_not_allowed(request, allow, errors)
        return await view(request, *args, **kwargs)

    return csrf_exempt(endpoint)


def request_body(request: HttpRequest) -> bytes:
    """Return the raw body; chunked bodies without ``Content-Length`` (NextChat's server) are fine.

    Raises ``ApplicationError`` 413 ``request_too_large`` past ``DATA_UPLOAD_MAX_MEMORY_SIZE``.
    """
    try:
        return request.body
    except RequestDataTooBig:
        raise request_too_large_error() from None


def parse_json(raw: bytes) -> Any:
    """Return the JSON value of ``raw`` (``chatbackend.parsers.json_loads``: strict, bounded depth).

    Raises ``ApplicationError`` 400 ``invalid_json`` whose message says what is wrong (not JSON,
    ``NaN``/``Infinity``, nested too deep).
    """
    try:
        return json_loads(raw)
    except JSONParseError as exc:
        raise ApplicationError(
            f"We could not parse the JSON body of your request: {exc} Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None


def null_characters_refuse(value: Any, raw: bytes) -> None:
    """Refuse a null character anywhere in ``value``, the JSON body parsed from ``raw``: no field of
    an endpoint whose serializer does not check every string takes one (PostgreSQL cannot store it).

    Raises ``ApplicationError`` 400 ``invalid`` (as DRF's fields answer it), ``param`` the path to the
    string (``input[0].content``) or to the object whose key holds one. Walks ``value`` only when
    ``raw`` holds the escape ``\\u0000`` (``chatbackend.parsers.null_character_path``).
    """
    path = null_character_path(value, raw)
    if path is not None:
        raise ApplicationError("Null characters are not allowed.", code="invalid", param=path or None)


__all__ = [
    "ErrorRenderer",
    "View",
    "async_endpoint",
    "by_method",
    "null_characters_refuse",
    "parse_json",
    "request_body",
]
