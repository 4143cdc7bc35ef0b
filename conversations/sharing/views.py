"""The HTML page of a share link (``templates/share.html``), for anyone holding its token."""

from __future__ import annotations

import datetime as dt

from django.http import HttpRequest, HttpResponseBase
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from chatbackend.errors import NotFoundError

from .apis import private
from .selectors import share_get_by_token


# csrf_exempt: the page takes no unsafe method, so CSRF protects nothing here, and without it
# CsrfViewMiddleware (which runs before require_safe) answered a POST with 403 instead of 405.
@csrf_exempt
@require_safe
def share_page(request: HttpRequest, token: str) -> HttpResponseBase:
    """Render the snapshot behind ``token``: 200 ``share.html``, or 404 ``share_missing.html`` for
    an unknown, revoked or expired link (as HTML: this page is for browsers). Content is escaped by
    the template engine (autoescape), never marked safe."""
    try:
        share = share_get_by_token(token=token)
    except NotFoundError:
        return private(render(request, "share_missing.html", status=404))
    messages = [
        {**message, "created_at": dt.datetime.fromisoformat(message["created_at"])} for message in share.messages
    ]
    return private(render(request, "share.html", {"share": share, "messages": messages}))
