"""NextChat's sync protocols, as its clients send them (``app/utils/cloud/webdav.ts``, ``upstash.ts``).

- **WebDAV** at ``/dav/<prefix>/``: ``MKCOL <prefix>/chatgpt-next-web``, ``GET`` and ``PUT
  <prefix>/chatgpt-next-web/backup.json`` (NextChat's server relays them when the endpoint is on
  its ``WHITE_WEBDAV_ENDPOINTS``), HTTP Basic with the username and an API key as password.
- **NextChat's proxy form** ``/api/webdav/<path>?endpoint=<WebDAV URL>&proxy_method=<METHOD>``: what
  the browser sends when the sync "proxy" is this server (a GET standing for MKCOL, then GET and
  PUT). The endpoint must be this server's ``/dav/`` URL: it is served here, never fetched.
- **Upstash REST** ``/api/upstash/get/<key>/`` (GET) and ``/api/upstash/set/<key>/`` (POST, raw
  body), keys ``<name>-chunk-count`` and ``<name>-chunk-<i>``, ``Authorization: Bearer <API key>``;
  the browser's URL has a double slash (``<base>//api/upstash/``). Answers ``{"result": ...}``.

Reads need the key's ``read`` scope, writes its ``chat`` scope (they write conversations; viewers
may not). Errors are the project's JSON; a WebDAV 401 asks for ``Basic``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, urlsplit

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.http.request import validate_host
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import Principal, authenticate_token, token_from_headers
from accounts.keys import looks_like_api_key
from accounts.models import APIKey
from accounts.scopes import ScopeNeed, api_key_scope_check, role_scope_check
from accounts.selectors import ORGANIZATION_HEADER, AuthenticationFailed
from chatbackend.errors import ApplicationError, as_application_error, error_response, internal_error
from chatbackend.parsers import BodyLimit, read_body
from chatbackend.text import holds_nul

from . import selectors, services
from .models import SyncDocument

logger = logging.getLogger(__name__)

FOLDER = "chatgpt-next-web"  # NextChat's STORAGE_KEY
FILE_NAME = "backup.json"
DAV_PREFIX = "/dav"
_DAV_METHODS = ("OPTIONS", "GET", "HEAD", "PUT", "MKCOL")
_BASIC_CHALLENGE = 'Basic realm="chatbackend", charset="UTF-8"'
_UPSTASH_KEY = re.compile(r"^(?P<name>.{1,200})-chunk-(?P<part>count|\d{1,6})$", re.DOTALL)

Handler = Callable[..., HttpResponseBase]


def _scope_check(principal: Principal, scope: ScopeNeed, request: HttpRequest, method: str) -> None:
    action = f"{method} {request.path}"
    api_key_scope_check(principal.api_key, scope, action=action)
    role_scope_check(principal.acting.role, scope, action=action)


def _render(error: ApplicationError, *, basic: bool) -> HttpResponse:
    response = error_response(error)
    if basic and error.status == 401:
        response["WWW-Authenticate"] = _BASIC_CHALLENGE
    if error.status == 405:
        response["Allow"] = ", ".join(_DAV_METHODS)
    return response


def _endpoint(*, basic: bool) -> Callable[[Handler], Handler]:
    """Wrap a sync view: CSRF exempt, errors as the project's JSON (``ApplicationError``, DRF's, outages)."""

    def decorate(view: Handler) -> Handler:
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            try:
                return view(request, *args, **kwargs)
            except Exception as exc:
                error = as_application_error(exc)
                if error is None:  # a bug: logged with its traceback, answered as JSON like the rest
                    logger.exception("%s %s failed", request.method, request.path)
                    error = internal_error()
                return _render(error, basic=basic)

        wrapped.__doc__ = view.__doc__
        wrapped.__name__ = view.__name__
        return csrf_exempt(wrapped)

    return decorate


# --- Authentication -------------------------------------------------------------------------------


def _organization_named(request: HttpRequest) -> str | None:
    """The organization a request names (``OpenAI-Organization``), as on every other endpoint; NextChat
    sends none, so its documents live in the key's organization, or a JWT user's default one."""
    return request.headers.get(ORGANIZATION_HEADER) or None


def _basic_principal(request: HttpRequest) -> Principal:
    """Return the caller of a WebDAV request: HTTP Basic with the username and an API key as the
    password (a ``Bearer`` API key works too). Raises ``AuthenticationFailed`` (401)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        token = token_from_headers(request.headers)
        if token is None:
            raise AuthenticationFailed(
                "Sign in with your username and an API key (sk-...) as the password.", code="missing_api_key"
            )
        return authenticate_token(token, _organization_named(request))
    try:
        username, colon, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationFailed("The Basic credentials are not valid base64 of 'username:password'.") from None
    if not colon or not looks_like_api_key(password):
        raise AuthenticationFailed("The password must be one of your API keys (sk-...).")
    principal = authenticate_token(password, _organization_named(request))
    if username != principal.user.get_username():
        raise AuthenticationFailed("The username is not the one of this API key's user.", code="invalid_username")
    return principal


# NextChat's state is often larger than DATA_UPLOAD_MAX_MEMORY_SIZE, the limit of other endpoints.
_BODY_LIMIT = BodyLimit("SYNC_MAX_DOCUMENT_BYTES", services.document_too_large_error)


def _read_body(request: HttpRequest) -> bytes:
    """Return the body, at most ``SYNC_MAX_DOCUMENT_BYTES`` (413 ``sync_document_too_large`` past it).
    Chunked bodies without ``Content-Length`` (NextChat's server relays so) are read too."""
    return read_body(request, content_length=request.META.get("CONTENT_LENGTH"), limit=_BODY_LIMIT)


# --- WebDAV ----------------------------------------------------------------------------------------


def _dav_target(path: str) -> tuple[str, str | None]:
    """Split a path below ``/dav/`` into (``"file"``/``"folder"``/``"other"``, the prefix naming the document).

    A path with a NUL character is ``"other"``: no document's name holds one (``holds_nul``).
    """
    segments = [s for s in path.split("/") if s]
    if holds_nul(path) or any(s in (".", "..") for s in segments):
        return "other", None
    if segments[-2:] == [FOLDER, FILE_NAME]:
        kind, prefix = "file", segments[:-2]
    elif segments[-1:] == [FOLDER]:
        kind, prefix = "folder", segments[:-1]
    else:
        return "other", None
    name = "/".join(prefix)
    return (kind, name) if len(name) <= 200 else ("other", None)


def _dav_serve(request: HttpRequest, method: str, path: str) -> HttpResponseBase:
    """Answer WebDAV ``method`` on ``path`` (below ``/dav/``) for an authenticated caller."""
    if method == "OPTIONS":
        return HttpResponse(headers={"Allow": ", ".join(_DAV_METHODS), "DAV": "1"})
    if method not in _DAV_METHODS:
        raise ApplicationError(
            f"Method {method} is not allowed here; allowed: {', '.join(_DAV_METHODS)}.",
            code="method_not_allowed",
            status=405,
        )
    principal = _basic_principal(request)
    kind, name = _dav_target(path)
    protocol = SyncDocument.Protocol.WEBDAV
    if method in ("GET", "HEAD"):
        _scope_check(principal, APIKey.Scope.READ, request, method)
        version = (
            selectors.sync_document_latest(principal=principal, protocol=protocol, name=name)
            if kind == "file" and name is not None
            else None
        )
        if version is None:  # NextChat reads a 404 as "nothing synced yet"
            raise ApplicationError("Nothing is stored at this path.", code="not_found", status=404)
        response = HttpResponse(
            b"" if method == "HEAD" else version.content.encode("utf-8"),
            content_type="application/json; charset=utf-8",
            headers={"ETag": f'"{version.sha256}"'},
        )
        if method == "HEAD":
            response["Content-Length"] = str(version.size_bytes)
        return response
    _scope_check(principal, APIKey.Scope.CHAT, request, method)
    if method == "MKCOL":
        if kind != "folder" or name is None:
            raise ApplicationError(f"Only '{FOLDER}' collections can be made here.", code="forbidden_path", status=403)
        if selectors.sync_document_exists(principal=principal, protocol=protocol, name=name):
            raise ApplicationError("The collection exists.", code="method_not_allowed", status=405)
        return HttpResponse(status=201)
    # PUT
    if kind != "file" or name is None:
        raise ApplicationError(
            f"Only '{FOLDER}/{FILE_NAME}' (NextChat's backup) is stored here.", code="forbidden_path", status=403
        )
    stored = services.sync_document_store(principal=principal, protocol=protocol, name=name, raw=_read_body(request))
    return HttpResponse(status=201 if stored.created else 204, headers={"ETag": f'"{stored.version.sha256}"'})


@_endpoint(basic=True)
def webdav(request: HttpRequest, path: str) -> HttpResponseBase:
    """``MKCOL|GET|HEAD|PUT|OPTIONS /dav/<prefix>/chatgpt-next-web[/backup.json]``: the WebDAV endpoint."""
    with transaction.atomic():
        return _dav_serve(request, request.method or "GET", path)


def _is_this_server(request: HttpRequest, netloc: str) -> bool:
    host = netloc.rpartition("@")[2].lower()
    if host == request.get_host().lower():
        return True
    hostname = urlsplit(f"//{host}").hostname or ""
    return bool(hostname) and validate_host(hostname, settings.ALLOWED_HOSTS)


def _invalid_endpoint(what: str) -> ApplicationError:
    return ApplicationError(
        f"The {what} endpoint must be this server's own URL: it relays to no other server.",
        code="invalid_endpoint",
        param="endpoint",
    )


def _this_server_endpoint(request: HttpRequest, endpoint: str, what: str) -> SplitResult:
    """Return ``endpoint`` split, when it is an http(s) URL of this server; else raise 400 ``invalid_endpoint``.

    A string ``urlsplit`` cannot split (an unclosed IPv6 bracket: ``ValueError``) is no URL of this
    server either.
    """
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        raise _invalid_endpoint(what) from None
    if parts.scheme in ("http", "https") and _is_this_server(request, parts.netloc):
        return parts
    raise _invalid_endpoint(what)


@_endpoint(basic=True)
def webdav_proxy(request: HttpRequest, path: str) -> HttpResponseBase:
    """``GET|PUT /api/webdav/<path>?endpoint=<this server>/dav/...&proxy_method=MKCOL|GET|PUT``.

    NextChat's browser "proxy" form. The endpoint must name this server's ``/dav/`` URL (else 400
    ``invalid_endpoint``: nothing is fetched from anywhere); the request is then answered as the
    WebDAV request ``proxy_method`` (default: the request's method) on the endpoint's path plus ``<path>``.
    """
    if request.method == "OPTIONS":
        return HttpResponse()
    method = (request.GET.get("proxy_method") or request.method or "GET").upper()
    if request.method not in ("GET", "PUT") or method not in ("MKCOL", "GET", "PUT"):
        raise ApplicationError(
            "NextChat's WebDAV proxy takes GET (proxy_method MKCOL or GET) and PUT.",
            code="method_not_allowed",
            status=405,
        )
    parts = _this_server_endpoint(request, request.GET.get("endpoint", ""), "WebDAV")
    endpoint_path = parts.path if parts.path.endswith("/") else parts.path + "/"
    if not endpoint_path.startswith(f"{DAV_PREFIX}/"):
        raise ApplicationError(
            f"The WebDAV endpoint must be this server's WebDAV URL, {request.scheme}://{request.get_host()}"
            f"{DAV_PREFIX}/ (optionally with a folder after it).",
            code="invalid_endpoint",
            param="endpoint",
        )
    with transaction.atomic():
        return _dav_serve(request, method, endpoint_path[len(DAV_PREFIX) + 1 :] + path)


# --- Upstash ---------------------------------------------------------------------------------------


def _bearer_principal(request: HttpRequest) -> Principal:
    return authenticate_token(token_from_headers(request.headers), _organization_named(request))


@_endpoint(basic=False)
def upstash(request: HttpRequest, action: str, key: str) -> HttpResponseBase:
    """``GET /api/upstash/get/<key>/``, ``POST /api/upstash/set/<key>/`` (also after ``//``).

    Upstash's REST answers: ``{"result": "<value>"}`` or ``{"result": null}`` for a get (a key
    never set, or that is not NextChat's: its ``check`` reads ``<name>`` and wants a 200), and
    ``{"result": "OK"}`` for a set. Values are served from the newest version of the document
    ``<name>`` (``<name>-chunk-count``, then ``-chunk-<i>``: ``selectors.content_chunks``); a set
    of ``-chunk-<i>`` keeps the chunk, of ``-chunk-count`` stores the joined document.
    """
    if request.method == "OPTIONS":
        return HttpResponse()
    expected = {"get": "GET", "set": "POST"}.get(action)
    if expected is None:
        raise ApplicationError(f"Unknown Upstash command '{action}': get and set only.", code="unknown_url", status=404)
    if request.method != expected:
        raise ApplicationError(f"Upstash '{action}' takes {expected}.", code="method_not_allowed", status=405)
    principal = _bearer_principal(request)
    endpoint = request.GET.get("endpoint")
    if endpoint:
        _this_server_endpoint(request, endpoint, "Upstash")
    # A key with a NUL character is not NextChat's: no document's name holds one, and PostgreSQL
    # cannot compare text with it (a 500).
    match = None if holds_nul(key) else _UPSTASH_KEY.match(key)
    if action == "get":
        _scope_check(principal, APIKey.Scope.READ, request, "GET")
        return JsonResponse({"result": _upstash_get(principal, match)})
    _scope_check(principal, APIKey.Scope.CHAT, request, "POST")
    if match is None:
        raise ApplicationError(
            "Only NextChat's keys '<name>-chunk-<i>' and '<name>-chunk-count' can be set.",
            code="unsupported_key",
            param="key",
        )
    body = _read_body(request)
    try:
        value = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApplicationError("The value must be UTF-8 text.", code="invalid_value") from None
    name, part = match["name"], match["part"]
    with transaction.atomic():
        if part == "count":
            try:
                count = int(value.strip())
            except ValueError:
                raise ApplicationError("The chunk count must be an integer.", code="invalid_chunk_count") from None
            services.sync_upload_finish(principal=principal, name=name, count=count)
        else:
            services.sync_upload_chunk_set(principal=principal, name=name, index=int(part), data=value)
    return JsonResponse({"result": "OK"})


def _upstash_get(principal: Principal, match: re.Match[str] | None) -> str | None:
    if match is None:
        return None
    version = selectors.sync_document_latest(
        principal=principal, protocol=SyncDocument.Protocol.UPSTASH, name=match["name"]
    )
    if version is None:
        return None
    chunks = selectors.content_chunks(version.content)
    if match["part"] == "count":
        return str(len(chunks))
    index = int(match["part"])
    return chunks[index] if index < len(chunks) else None
