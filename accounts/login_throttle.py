"""Login lockouts: too many failed logins for one username, or from one client IP, answer 429.

django-axes counts the failures (``settings.AXES_*``): its authentication backend refuses every
attempt of a locked-out username or IP before any password is checked, so the right password is
refused too during a lockout, and Django's ``user_login_failed`` signal counts each failure in
the ``auth_throttle`` cache (Redis when configured, so every server process sees one count).
The username and the IP are counted apart: credential stuffing from many IPs locks the username,
one IP trying many usernames locks the IP. The IP is ``chatbackend.client_ip``'s, so a spoofed
``X-Forwarded-For`` from an untrusted peer changes nothing.

A lockout lasts ``AUTH_LOGIN_LOCKOUT_SECONDS`` from the last attempt: each attempt during it
(counted as a failure) starts it again, so ``Retry-After`` is exactly that many seconds.

Two interfaces meet it: the JWT login (``accounts.apis.AuthTokenObtainApi``, which reads the flag
axes leaves on DRF's request, invisible to ``AxesMiddleware`` because DRF wraps the request) and
the admin's login form (``AxesMiddleware`` calls ``login_lockout_response``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework.exceptions import Throttled

from chatbackend.errors import error_body

LOCKOUT_CODE = "login_locked_out"
LOCKOUT_MESSAGE = "Too many failed logins for this username or from this address."


def login_locked_out(request: Any) -> bool:
    """Return True when django-axes refused or locked out the login attempt made with ``request``.

    ``request``: the request passed to ``django.contrib.auth.authenticate`` (DRF's ``Request`` for
    the JWT login), on which axes sets ``axes_locked_out``.
    """
    return bool(getattr(request, "axes_locked_out", False))


def login_lockout_exception() -> Throttled:
    """Return the DRF exception for a lockout: 429, ``code`` ``login_locked_out``, ``Retry-After`` seconds."""
    return Throttled(wait=settings.AUTH_LOGIN_LOCKOUT_SECONDS, detail=LOCKOUT_MESSAGE, code=LOCKOUT_CODE)


def login_lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict[str, Any] | None = None
) -> HttpResponse:
    """Return the 429 JSON error for a locked-out login (django-axes' ``AXES_LOCKOUT_CALLABLE``).

    The body is the project's error shape, as ``login_lockout_exception`` renders through DRF;
    ``Retry-After`` holds the lockout's seconds (RFC 9110, section 10.2.3).
    """
    exc = login_lockout_exception()
    body = error_body(str(exc.detail), type="rate_limit_error", code=LOCKOUT_CODE)
    response = JsonResponse(body, status=exc.status_code)
    response["Retry-After"] = str(settings.AUTH_LOGIN_LOCKOUT_SECONDS)
    return response
