"""The permission matrix: every endpoint × caller × object → the expected status, on a real server.

Issue 10's acceptance: every REST endpoint, the WebSocket, the SSE endpoint and every ``/v1``
endpoint, called by every kind of caller (the platform superuser; an organization's owner, admin,
member and viewer; a member of another team; a user of another organization; an API key of each
scope; an expired key; a key outside its model allowlist; nobody), on objects owned by the caller,
by a member of the same team, of another team and of another organization. ``MATRIX`` holds the
expected statuses. The test fails when a URL pattern (or a method a DRF view implements) has no row,
so a new endpoint cannot land without its permissions being stated here.

How a cell is read:
- a number is the HTTP status (for the WebSocket: 101 when the socket opens and stays open, else the
  close code the server sent: 4401 unauthenticated, 4403 refused, 4404 not found);
- requests that would change the caller (password change, logout) send a body that fails validation:
  a 400 then means "allowed through authentication, scope, role and lookup", which is what this table
  is about; what each endpoint does when allowed is tested next to it;
- objects are made afresh for every cell, so a cell that deletes or revokes one leaves the next alone.

The world (made once, committed for the server processes): organization ``acme`` with an owner, an
admin, a viewer, ``member`` and ``teammate`` in team ``red`` and ``blue_member`` in team ``blue``;
organization ``globex`` with ``outsider``; a superuser. JWT callers act in acme (``OpenAI-Organization:
acme``), the outsider in globex. The keys are ``member``'s (``key_admin`` is the admin's, with only the
``admin`` scope).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework_simplejwt.tokens import RefreshToken
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from accounts.keys import hash_secret
from accounts.models import APIKey, Budget, Invitation, Membership, Organization, Team, TeamMembership, User
from accounts.services import api_key_create
from conversations.models import Conversation, ConversationTemplate, Message, SharedConversation
from conversations.routing import websocket_urlpatterns
from conversations.services import message_append
from tests.factories import LLMModelFactory, UserFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Column order of every expectation string below.
CALLERS = (
    "anon",
    "superuser",
    "owner",
    "admin",
    "member",
    "viewer",
    "other_team",
    "other_org",
    "key_chat",
    "key_read",
    "key_admin",
    "key_expired",
    "key_blocked",
)
# Whose object a cell acts on: the member's own, their teammate's, another team's, another organization's.
OBJECTS = ("own", "same_team", "other_team", "other_org")
MODEL = "gpt-4o-mini"  # every key but key_blocked may use it
ALLOWED_ONLY = "sim-model"  # key_blocked's allowlist

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
COUNT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": MODEL, "input": "hi", "max_output_tokens": 16}


@dataclass(frozen=True)
class Row:
    """One endpoint and method: ``path`` may hold ``{conversation}``, ``{trashed}``, ``{message}``, ``{completion}``,
    ``{template}``, ``{api_key}``, ``{share}`` (a share link's id), ``{share_token}`` (its token),
    ``{budget}``, ``{user}`` (made afresh per cell for each of ``OBJECTS``); ``expect`` is a string of
    statuses in ``CALLERS`` order, or, for a path with an object, a dict of them per object."""

    method: str
    path: str
    expect: str | dict[str, str]
    body: Any = None  # a JSON value, or a function of the world returning one
    route: str = ""  # the URL pattern the row covers, when the path does not show it

    def statuses(self) -> Iterator[tuple[str | None, str, int]]:
        table = self.expect if isinstance(self.expect, dict) else {None: self.expect}
        for obj, line in table.items():
            codes = line.split()
            assert len(codes) == len(CALLERS), (self.method, self.path, obj, len(codes))
            for caller, code in zip(CALLERS, codes, strict=True):
                yield obj, caller, int(code)


def per_object(own: str, same_team: str, other_team: str, other_org: str) -> dict[str, str]:
    return {"own": own, "same_team": same_team, "other_team": other_team, "other_org": other_org}


# Columns: anon superuser owner admin member viewer other_team other_org key_chat key_read key_admin
# key_expired key_blocked. Rows with an object: own, same_team, other_team, other_org (OWNER_OF: whose).
MATRIX: tuple[Row, ...] = (
    Row("GET", "/health/live", "200 200 200 200 200 200 200 200 200 200 200 200 200"),
    Row("GET", "/health/ready", "200 200 200 200 200 200 200 200 200 200 200 200 200"),
    Row("GET", "/", "200 200 200 200 200 200 200 200 200 200 200 200 200"),
    Row("GET", "/api/schema/", "200 200 200 200 200 200 200 200 200 200 200 401 200"),
    Row("GET", "/api/docs/", "200 200 200 200 200 200 200 200 200 200 200 401 200"),
    Row("POST", "/api/auth/register/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/token/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/token/refresh/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/logout/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("GET", "/api/auth/me/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("POST", "/api/auth/password/change/", "401 400 400 400 400 400 400 400 403 403 400 401 400", body={}),
    Row("POST", "/api/auth/password/reset/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/password/reset/confirm/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/email/verify/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("POST", "/api/auth/email/verify/resend/", "400 400 400 400 400 400 400 400 400 400 400 400 400", body={}),
    Row("GET", "/api/api-keys/", "401 200 200 200 200 200 200 200 403 403 200 401 200"),
    Row("POST", "/api/api-keys/", "401 201 201 201 201 201 201 201 403 403 201 401 201", body={"name": "matrix"}),
    Row(
        "DELETE",
        "/api/api-keys/{api_key}/",
        per_object(
            "401 404 404 404 204 404 404 404 403 403 404 401 403",  # own
            "401 404 404 404 404 404 404 404 403 403 404 401 404",  # same_team
            "401 404 404 404 404 404 204 404 403 403 404 401 404",  # other_team
            "401 404 404 404 404 404 404 204 403 403 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/api-keys/{api_key}/rotate/",
        per_object(
            "401 404 404 404 200 404 404 404 403 403 404 401 403",  # own
            "401 404 404 404 404 404 404 404 403 403 404 401 404",  # same_team
            "401 404 404 404 404 404 200 404 403 403 404 401 404",  # other_team
            "401 404 404 404 404 404 404 200 403 403 404 401 404",  # other_org
        ),
    ),
    Row("GET", "/api/usage/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("GET", "/api/usage/summary/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("GET", "/api/users/", "401 200 200 200 403 403 403 403 403 403 200 401 403"),
    Row(
        "POST",
        "/api/users/{user}/deactivate/",
        per_object(
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # own
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # same_team
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # other_team
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/users/{user}/reactivate/",
        per_object(
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # own
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # same_team
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # other_team
            "401 200 403 403 403 403 403 403 403 403 403 401 403",  # other_org
        ),
    ),
    Row("GET", "/api/audit-log/", "401 200 200 200 403 403 403 403 403 403 200 401 403"),
    Row("GET", "/api/budgets/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("POST", "/api/budgets/", "401 400 400 400 400 400 400 400 403 403 400 401 400", body={}),
    Row("GET", "/api/budgets/mine/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "GET",
        "/api/budgets/{budget}/",
        per_object(
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # own
            "401 200 200 200 404 404 404 404 403 404 200 401 404",  # same_team
            "401 200 200 200 404 404 200 404 403 404 200 401 404",  # other_team
            "401 200 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "PUT",
        "/api/budgets/{budget}/",
        per_object(
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # own
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # same_team
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # other_team
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # other_org
        ),
        body={},
    ),
    Row(
        "PATCH",
        "/api/budgets/{budget}/",
        per_object(
            "401 200 200 200 403 404 404 404 403 403 200 401 403",  # own
            "401 200 200 200 404 404 404 404 403 403 200 401 404",  # same_team
            "401 200 200 200 404 404 403 404 403 403 200 401 404",  # other_team
            "401 200 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
        body={"name": "renamed"},
    ),
    Row(
        "DELETE",
        "/api/budgets/{budget}/",
        per_object(
            "401 204 204 204 403 404 404 404 403 403 204 401 403",  # own
            "401 204 204 204 404 404 404 404 403 403 204 401 404",  # same_team
            "401 204 204 204 404 404 403 404 403 403 204 401 404",  # other_team
            "401 204 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
    ),
    Row("GET", "/api/organizations/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("GET", "/api/organization/members/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "GET",
        "/api/organization/members/{user}/",
        per_object(
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # own
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # same_team
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "PATCH",
        "/api/organization/members/{user}/",
        per_object(
            "401 200 200 200 403 403 403 403 403 403 200 401 403",  # own
            "401 200 200 200 403 403 403 403 403 403 200 401 403",  # same_team
            "401 200 200 200 403 403 403 403 403 403 200 401 403",  # other_team
            "401 404 404 404 403 403 403 403 403 403 404 401 403",  # other_org
        ),
        body={"role": "viewer"},
    ),
    Row(
        "DELETE",
        "/api/organization/members/{user}/",
        per_object(
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # own
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # same_team
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # other_team
            "401 404 404 404 403 403 403 403 403 403 404 401 403",  # other_org
        ),
    ),
    Row("GET", "/api/teams/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "POST",
        "/api/teams/",
        "401 201 201 201 403 403 403 403 403 403 201 401 403",
        body=lambda world: {"name": f"Team {secrets.token_hex(4)}"},
    ),
    Row(
        "GET",
        "/api/teams/{team}/",
        per_object(
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # own
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # same_team
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "PATCH",
        "/api/teams/{team}/",
        per_object(
            "401 200 200 200 403 403 403 404 403 403 200 401 403",  # own
            "401 200 200 200 403 403 403 404 403 403 200 401 403",  # same_team
            "401 200 200 200 403 403 403 404 403 403 200 401 403",  # other_team
            "401 404 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
        body={"name": "Renamed"},
    ),
    Row(
        "DELETE",
        "/api/teams/{team}/",
        per_object(
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # own
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # same_team
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # other_team
            "401 404 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/teams/{team}/members/",
        per_object(
            "401 201 201 201 403 403 403 404 403 403 201 401 403",  # own
            "401 201 201 201 403 403 403 404 403 403 201 401 403",  # same_team
            "401 201 201 201 403 403 403 404 403 403 201 401 403",  # other_team
            "401 404 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
        body=lambda world: {"user_id": world.users["teammate"].pk},
    ),
    Row(
        "DELETE",
        "/api/teams/{team}/members/{user}/",
        per_object(
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # own
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # same_team
            "401 204 204 204 403 403 403 404 403 403 204 401 403",  # other_team
            "401 404 404 404 404 404 404 403 403 403 404 401 404",  # other_org
        ),
    ),
    Row("GET", "/api/invitations/", "401 200 200 200 403 403 403 403 403 403 200 401 403"),
    Row(
        "POST",
        "/api/invitations/",
        "401 201 201 201 403 403 403 403 403 403 201 401 403",
        body=lambda world: {"email": f"{secrets.token_hex(4)}@example.com"},
    ),
    Row(
        "DELETE",
        "/api/invitations/{invitation}/",
        per_object(
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # own
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # same_team
            "401 204 204 204 403 403 403 403 403 403 204 401 403",  # other_team
            "401 404 404 404 403 403 403 403 403 403 404 401 403",  # other_org
        ),
    ),
    Row("POST", "/api/invitations/accept/", "400 400 400 400 400 400 400 400 403 403 400 401 400", body={}),
    # NextChat sync (WebDAV at /dav/, NextChat's proxy form, Upstash): each caller's own document,
    # in this order (a folder made, no document yet, one stored, then read).
    Row("OPTIONS", "/dav/m/chatgpt-next-web/backup.json", "200 200 200 200 200 200 200 200 200 200 200 200 200"),
    Row("MKCOL", "/dav/m/chatgpt-next-web", "401 201 201 201 201 403 201 201 201 403 403 401 201"),
    Row("GET", "/dav/m/chatgpt-next-web/backup.json", "401 404 404 404 404 404 404 404 403 404 404 401 404"),
    Row(
        "PUT",
        "/dav/m/chatgpt-next-web/backup.json",
        "401 201 201 201 201 403 201 201 204 403 403 401 204",
        body={"chat-next-web-store": {"sessions": []}},
    ),
    Row("HEAD", "/dav/m/chatgpt-next-web/backup.json", "401 200 200 200 200 404 200 200 403 200 200 401 200"),
    Row(
        "GET",
        "/api/webdav/chatgpt-next-web/backup.json?endpoint={base}/dav/&proxy_method=GET",
        "401 404 404 404 404 404 404 404 403 404 404 401 404",
        route="^(?:/)?api/webdav/(?P<path>.*)$",
    ),
    Row(
        "PUT",
        "/api/webdav/chatgpt-next-web/backup.json?endpoint={base}/dav/&proxy_method=PUT",
        "401 201 201 201 201 403 201 201 204 403 403 401 204",
        body={"chat-next-web-store": {"sessions": []}},
        route="^(?:/)?api/webdav/(?P<path>.*)$",
    ),
    Row(
        "POST",
        "/api/upstash/set/backup-chunk-0/",
        "401 200 200 200 200 403 200 200 200 403 403 401 200",
        body=b'{"chat-next-web-store": {"sessions": []}}',
    ),
    # key_chat and key_blocked are member's keys: member's count already joined and removed the
    # chunks they share, so theirs finds none (400 sync_upload_incomplete), as a real second upload would.
    Row(
        "POST", "/api/upstash/set/backup-chunk-count/", "401 200 200 200 200 403 200 200 400 403 403 401 400", body=b"1"
    ),
    Row("GET", "/api/upstash/get/backup/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("GET", "/api/models/", "401 200 200 200 200 200 200 200 200 200 200 401 200"),
    # Templates ({template}: the member's private one, the teammate's shared with team red, the other
    # team's member's shared with the organization, the other organization's shared with globex).
    # Reading needs ``read``, writing ``chat``; admins see and change shared ones, never private ones.
    Row("GET", "/api/templates/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "POST",
        "/api/templates/",
        "401 201 201 201 201 403 201 201 201 403 403 401 404",
        body={"name": "matrix", "model": MODEL},
    ),
    Row("GET", "/api/templates/export/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("POST", "/api/templates/import/", "401 201 201 201 201 403 201 201 201 403 403 401 201", body={"name": "m"}),
    Row(
        "GET",
        "/api/templates/{template}/",
        per_object(
            "401 404 404 404 200 404 404 404 403 200 404 401 200",  # own
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # same_team
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "GET",
        "/api/templates/{template}/export/",
        per_object(
            "401 404 404 404 200 404 404 404 403 200 404 401 200",  # own
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # same_team
            "401 200 200 200 200 200 200 404 403 200 200 401 200",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "PUT",
        "/api/templates/{template}/",
        per_object(
            "401 404 404 404 200 403 404 404 200 403 403 401 200",  # own
            "401 403 403 403 403 403 404 404 403 403 403 401 403",  # same_team: admins may not re-share it
            "401 200 200 200 403 403 200 404 403 403 403 401 403",  # other_team
            "401 404 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
        body={"name": "renamed", "visibility": "organization"},
    ),
    Row(
        "PATCH",
        "/api/templates/{template}/",
        per_object(
            "401 404 404 404 200 403 404 404 200 403 403 401 200",  # own
            "401 200 200 200 403 403 404 404 403 403 403 401 403",  # same_team
            "401 200 200 200 403 403 200 404 403 403 403 401 403",  # other_team
            "401 404 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
        body={"name": "renamed"},
    ),
    Row(
        "DELETE",
        "/api/templates/{template}/",
        per_object(
            "401 404 404 404 204 403 404 404 204 403 403 401 204",  # own
            "401 204 204 204 403 403 404 404 403 403 403 401 403",  # same_team
            "401 204 204 204 403 403 204 404 403 403 403 401 403",  # other_team
            "401 404 404 404 404 403 404 204 404 403 403 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/templates/{template}/conversations/",
        per_object(
            "401 404 404 404 201 403 404 404 201 403 403 401 404",  # own
            "401 201 201 201 201 403 404 404 201 403 403 401 404",  # same_team
            "401 201 201 201 201 403 201 404 201 403 403 401 404",  # other_team
            "401 404 404 404 404 403 404 201 404 403 403 401 404",  # other_org
        ),
        body={},
    ),
    Row("GET", "/api/conversations/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("POST", "/api/conversations/", "401 201 201 201 201 403 201 201 201 403 403 401 404", body={"model": MODEL}),
    Row(
        "GET",
        "/api/conversations/{conversation}/",
        per_object(
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # own
            "401 200 200 200 404 404 404 404 403 404 200 401 404",  # same_team
            "401 200 200 200 404 404 200 404 403 404 200 401 404",  # other_team
            "401 200 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "PUT",
        "/api/conversations/{conversation}/",
        per_object(
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # own
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # same_team
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # other_team
            "401 405 405 405 405 405 405 405 403 403 405 401 405",  # other_org
        ),
        body={"title": "renamed"},
    ),
    Row(
        "PATCH",
        "/api/conversations/{conversation}/",
        per_object(
            "401 403 403 403 200 403 404 404 200 403 403 401 200",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 200 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
        body={"title": "renamed"},
    ),
    Row(
        "DELETE",
        "/api/conversations/{conversation}/",
        per_object(
            "401 403 403 403 204 403 404 404 204 403 403 401 204",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 204 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 204 404 403 403 401 404",  # other_org
        ),
    ),
    # Search, the trash, restore and purge (``{trashed}``: a conversation in the trash). Search and the
    # trash list the caller's own only (an admin's hold no member's); restore and purge are the owner's.
    Row(
        "GET",
        "/api/conversations/search/?q=hi",
        "401 200 200 200 200 200 200 200 403 200 200 401 200",
        route="api/^conversations/search/$",
    ),
    Row("GET", "/api/conversations/trash/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "POST",
        "/api/conversations/{trashed}/restore/",
        per_object(
            "401 403 403 403 200 403 404 404 200 403 403 401 200",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 200 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
    ),
    Row(
        "DELETE",
        "/api/conversations/{trashed}/purge/",
        per_object(
            "401 403 403 403 204 403 404 404 204 403 403 401 204",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 204 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 204 404 403 403 401 404",  # other_org
        ),
    ),
    Row(
        "GET",
        "/api/conversations/{conversation}/messages/",
        per_object(
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # own
            "401 200 200 200 404 404 404 404 403 404 200 401 404",  # same_team
            "401 200 200 200 404 404 200 404 403 404 200 401 404",  # other_team
            "401 200 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/messages/",
        per_object(
            "401 403 403 403 201 403 404 404 201 403 403 401 404",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 201 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 201 404 403 403 401 404",  # other_org
        ),
        body={"content": "hi"},
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/messages/{message}/stop/",
        per_object(
            "401 403 403 403 202 403 404 404 202 403 403 401 202",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 202 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 202 404 403 403 401 404",  # other_org
        ),
    ),
    # Branches: edit a user message, regenerate a reply, switch to a branch (the owner's writes), read the tree.
    Row(
        "GET",
        "/api/conversations/{conversation}/tree/",
        per_object(
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # own
            "401 200 200 200 404 404 404 404 403 404 200 401 404",  # same_team
            "401 200 200 200 404 404 200 404 403 404 200 401 404",  # other_team
            "401 200 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/messages/{turn}/edit/",
        per_object(
            "401 403 403 403 201 403 404 404 201 403 403 401 404",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 201 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 201 404 403 403 401 404",  # other_org
        ),
        body={"content": "hi again"},
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/messages/{reply}/regenerate/",
        per_object(
            "401 403 403 403 201 403 404 404 201 403 403 401 404",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 201 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 201 404 403 403 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/messages/{reply}/activate/",
        per_object(
            "401 403 403 403 200 403 404 404 200 403 403 401 200",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 200 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
    ),
    # Export (reading: as reading the conversation) and import (a write: the ``chat`` scope).
    Row(
        "GET",
        "/api/conversations/{conversation}/export/",
        per_object(
            "401 200 200 200 200 404 404 404 403 200 200 401 200",  # own
            "401 200 200 200 404 404 404 404 403 404 200 401 404",  # same_team
            "401 200 200 200 404 404 200 404 403 404 200 401 404",  # other_team
            "401 200 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row("GET", "/api/conversations/export/", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("POST", "/api/conversations/import/", "401 400 400 400 400 403 400 400 400 403 403 401 400", body={}),
    # Share links: only the conversation's owner shares and lists (admins read, so 403), only the
    # link's maker revokes (anyone else: 404); the link itself is public. A fresh conversation has
    # no message to share: 400 is "allowed".
    Row(
        "GET",
        "/api/conversations/{conversation}/shares/",
        per_object(
            "401 403 403 403 200 404 404 404 403 200 403 401 200",  # own
            "401 403 403 403 404 404 404 404 403 404 403 401 404",  # same_team
            "401 403 403 403 404 404 200 404 403 404 403 401 404",  # other_team
            "401 403 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/api/conversations/{conversation}/shares/",
        per_object(
            "401 403 403 403 400 403 404 404 400 403 403 401 400",  # own
            "401 403 403 403 404 403 404 404 404 403 403 401 404",  # same_team
            "401 403 403 403 404 403 400 404 404 403 403 401 404",  # other_team
            "401 403 404 404 404 403 404 400 404 403 403 401 404",  # other_org
        ),
        body={},
    ),
    Row(
        "DELETE",
        "/api/shares/{share}/",
        per_object(
            "401 404 404 404 204 403 404 404 204 403 403 401 204",  # own
            "401 404 404 404 404 403 404 404 404 403 403 401 404",  # same_team
            "401 404 404 404 404 403 204 404 404 403 403 401 404",  # other_team
            "401 404 404 404 404 403 404 204 404 403 403 401 404",  # other_org
        ),
    ),
    # The link's token is the credential: any caller (a stale or expired one too) reads it.
    Row("GET", "/api/share/{share_token}/", {"own": "200 200 200 200 200 200 200 200 200 200 200 200 200"}),
    Row("GET", "/share/{share_token}", {"own": "200 200 200 200 200 200 200 200 200 200 200 200 200"}),
    Row(
        "WS",
        "/ws/conversations/{conversation}/",
        per_object(
            "4401 4403 4403 4403 101 4403 4404 4404 101 4403 4403 4401 101",  # own
            "4401 4403 4403 4403 4404 4403 4404 4404 4404 4403 4403 4401 4404",  # same_team
            "4401 4403 4403 4403 4404 4403 101 4404 4404 4403 4403 4401 4404",  # other_team
            "4401 4403 4404 4404 4404 4403 4404 101 4404 4403 4403 4401 4404",  # other_org
        ),
    ),
    # Any other WebSocket path: closed 4404 for every caller, before any credential is read.
    Row("WS", "/ws/conversations/abc/", "4404 4404 4404 4404 4404 4404 4404 4404 4404 4404 4404 4404 4404"),
    Row("POST", "/v1/chat/completions", "401 200 200 200 200 403 200 200 200 403 403 401 404", body=CHAT),
    # Stored completions: the caller's own only (an organization's admins and the superuser read them
    # as conversations, not here); reading needs ``read``, changing ``chat``.
    Row("GET", "/v1/chat/completions", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "GET",
        "/v1/chat/completions/{completion}",
        per_object(
            "401 404 404 404 200 404 404 404 403 200 404 401 200",  # own
            "401 404 404 404 404 404 404 404 403 404 404 401 404",  # same_team
            "401 404 404 404 404 404 200 404 403 404 404 401 404",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row(
        "POST",
        "/v1/chat/completions/{completion}",
        per_object(
            "401 404 404 404 200 403 404 404 200 403 403 401 200",  # own
            "401 404 404 404 404 403 404 404 404 403 403 401 404",  # same_team
            "401 404 404 404 404 403 200 404 404 403 403 401 404",  # other_team
            "401 404 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
        body={"metadata": {"k": "v"}},
    ),
    Row(
        "DELETE",
        "/v1/chat/completions/{completion}",
        per_object(
            "401 404 404 404 200 403 404 404 200 403 403 401 200",  # own
            "401 404 404 404 404 403 404 404 404 403 403 401 404",  # same_team
            "401 404 404 404 404 403 200 404 404 403 403 401 404",  # other_team
            "401 404 404 404 404 403 404 200 404 403 403 401 404",  # other_org
        ),
    ),
    Row(
        "GET",
        "/v1/chat/completions/{completion}/messages",
        per_object(
            "401 404 404 404 200 404 404 404 403 200 404 401 200",  # own
            "401 404 404 404 404 404 404 404 403 404 404 401 404",  # same_team
            "401 404 404 404 404 404 200 404 403 404 404 401 404",  # other_team
            "401 404 404 404 404 404 404 200 403 404 404 401 404",  # other_org
        ),
    ),
    Row("POST", "/v1/messages", "401 200 200 200 200 403 200 200 200 403 403 401 404", body=MESSAGES),
    Row("POST", "/v1/messages/count_tokens", "401 200 200 200 200 403 200 200 200 403 403 401 404", body=COUNT),
    Row("POST", "/v1/responses", "401 200 200 200 200 403 200 200 200 403 403 401 404", body=RESPONSES),
    Row("GET", "/v1/models", "401 200 200 200 200 200 200 200 200 200 200 401 200"),
    Row("GET", f"/v1/models/{MODEL}", "401 200 200 200 200 200 200 200 200 200 200 401 404"),
    Row("GET", "/dashboard/billing/usage", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row("GET", "/dashboard/billing/subscription", "401 200 200 200 200 200 200 200 403 200 200 401 200"),
    Row(
        "GET", "/v1/unknown", "404 404 404 404 404 404 404 404 404 404 404 404 404", route="^(?:v1|dashboard)(?:/.*)?$"
    ),
    # Anthropic APIs not served here (Message Batches): a 404 in Anthropic's shape, whoever asks.
    Row("GET", "/v1/messages/batches", "404 404 404 404 404 404 404 404 404 404 404 404 404", route="^v1/messages/"),
)


@dataclass
class World:
    acme: Organization
    globex: Organization
    red: Team
    blue: Team
    model_id: int
    users: dict[str, User] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)  # caller -> JWT or key secret
    organization: dict[str, str] = field(default_factory=dict)  # caller -> OpenAI-Organization header


def _member(user: User, organization: Organization, role: str, team: Team | None = None) -> User:
    Membership.objects.update_or_create(user=user, organization=organization, defaults={"role": role})
    if team is not None:
        TeamMembership.objects.get_or_create(team=team, user=user)
    return user


@pytest.fixture
def world(e2e_stack: Any, e2e_models: Any) -> World:
    acme = Organization.objects.create(name="Acme", slug="acme")
    globex = Organization.objects.create(name="Globex", slug="globex")
    red = Team.objects.create(organization=acme, name="Red", slug="red")
    blue = Team.objects.create(organization=acme, name="Blue", slug="blue")
    world = World(acme=acme, globex=globex, red=red, blue=blue, model_id=0)
    world.model_id = LLMModelFactory._meta.model.objects.get(name=MODEL).pk
    role = Membership.Role
    users = {
        "superuser": UserFactory(is_superuser=True, is_staff=True),
        "owner": _member(UserFactory(), acme, role.OWNER),
        "admin": _member(UserFactory(), acme, role.ADMIN),
        "member": _member(UserFactory(), acme, role.MEMBER, red),
        "teammate": _member(UserFactory(), acme, role.MEMBER, red),
        "viewer": _member(UserFactory(), acme, role.VIEWER),
        "other_team": _member(UserFactory(), acme, role.MEMBER, blue),
        "other_org": _member(UserFactory(), globex, role.MEMBER),
    }
    world.users = users
    for name, user in users.items():
        world.credentials[name] = str(RefreshToken.for_user(user).access_token)
        world.organization[name] = "globex" if name == "other_org" else "acme"
    member, past = users["member"], timezone.now() - dt.timedelta(days=1)
    keys = {
        "key_chat": api_key_create(user=member, name="chat", organization=acme, scopes=["chat"]),
        "key_read": api_key_create(user=member, name="read", organization=acme, scopes=["read"]),
        "key_admin": api_key_create(user=users["admin"], name="admin", organization=acme, scopes=["admin"]),
        "key_expired": api_key_create(user=member, name="expired", organization=acme),
        "key_blocked": api_key_create(user=member, name="blocked", organization=acme, allowed_models=[ALLOWED_ONLY]),
    }
    APIKey.objects.filter(pk=keys["key_expired"].api_key.pk).update(expires_at=past)
    for name, created in keys.items():
        world.credentials[name] = created.secret
        e2e_stack.secrets.add(created.secret)
    return world


# --- Objects, made afresh per cell --------------------------------------------------------------

OWNER_OF = {"own": "member", "same_team": "teammate", "other_team": "other_team", "other_org": "other_org"}


def _organization_of(world: World, obj: str) -> Organization:
    return world.globex if obj == "other_org" else world.acme


def _conversation(world: World, obj: str) -> Conversation:
    return Conversation.objects.create(
        owner=world.users[OWNER_OF[obj]], organization=_organization_of(world, obj), model_id=world.model_id, title="t"
    )


def _objects(world: World, obj: str, path: str) -> dict[str, Any]:
    """Make what ``path`` names, owned according to ``obj``; return the format arguments."""
    values: dict[str, Any] = {}
    owner = world.users[OWNER_OF[obj]]
    organization = _organization_of(world, obj)
    if "{conversation}" in path:
        conversation = _conversation(world, obj)
        values["conversation"] = conversation.pk
        if "{message}" in path:
            # A reply "streaming" (nobody streams it: a stop is only broadcast, 202)
            values["message"] = Message.objects.create(
                conversation=conversation, role=Message.Role.ASSISTANT, content="", status=Message.Status.STREAMING
            ).pk
    if "{trashed}" in path:  # a conversation in the trash (DELETE /api/conversations/{id}/)
        trashed = _conversation(world, obj)
        Conversation.objects.filter(pk=trashed.pk).update(deleted_at=timezone.now())
        values["trashed"] = trashed.pk
    if "{turn}" in path or "{reply}" in path:  # a finished exchange: a user message and its reply
        turn = message_append(conversation=conversation, role=Message.Role.USER, content="hi")
        reply = message_append(conversation=conversation, role=Message.Role.ASSISTANT, content="hello")
        values.update(turn=turn.pk, reply=reply.pk)
    if "{completion}" in path:  # a stored chat completion (store: true)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        conversation = Conversation.objects.create(
            owner=owner, organization=organization, model_id=world.model_id, completion_id=completion_id
        )
        Message.objects.bulk_create(
            [
                Message(conversation=conversation, role=Message.Role.USER, content="hi"),
                Message(conversation=conversation, role=Message.Role.ASSISTANT, content="hello", model_name=MODEL),
            ]
        )
        values["completion"] = completion_id
    if "{share}" in path or "{share_token}" in path:  # a link to a conversation of the owner's
        token = secrets.token_urlsafe(32)
        values["share"] = SharedConversation.objects.create(
            conversation=_conversation(world, obj), organization=organization, created_by=owner,
            token_hash=hash_secret(token), title="t", messages=[{"role": "user", "content": "hi", "model": "",
            "created_at": timezone.now().isoformat()}],
        ).pk  # fmt: skip
        values["share_token"] = token
    if "{template}" in path:
        visibility, team = {
            "own": (ConversationTemplate.Visibility.PRIVATE, None),
            "same_team": (ConversationTemplate.Visibility.TEAM, world.red),
            "other_team": (ConversationTemplate.Visibility.ORGANIZATION, None),
            "other_org": (ConversationTemplate.Visibility.ORGANIZATION, None),
        }[obj]
        values["template"] = ConversationTemplate.objects.create(
            owner=owner, organization=organization, name="target", model_name=MODEL, visibility=visibility, team=team
        ).pk
    if "{api_key}" in path:
        values["api_key"] = api_key_create(user=owner, name="target", organization=organization).api_key.pk
    if "{budget}" in path:
        values["budget"] = Budget.objects.create(
            name="target", organization=organization, subject_kind=Budget.SubjectKind.USER,
            subject_id=owner.pk, limit_usd=Decimal("100"),
        ).pk  # fmt: skip
    team = None
    if "{team}" in path:
        # A fresh team (a cell may delete it): the member's own (with them in it) for own and
        # same_team, one they are not in for other_team, another organization's for other_org.
        team = Team.objects.create(organization=organization, name="t", slug=f"t-{secrets.token_hex(4)}")
        if obj in ("own", "same_team"):
            TeamMembership.objects.create(team=team, user=world.users["member"])
        values["team"] = team.slug
    if "{user}" in path:
        # Never the caller itself: deactivating or removing it would change every later cell.
        home = team or {"own": world.red, "same_team": world.red, "other_team": world.blue}.get(obj)
        values["user"] = _member(UserFactory(), organization, Membership.Role.MEMBER, home).pk
    if "{invitation}" in path:
        values["invitation"] = Invitation.objects.create(
            organization=organization, email=f"{secrets.token_hex(4)}@example.com",
            invited_by=owner, expires_at=timezone.now() + dt.timedelta(days=1),
        ).pk  # fmt: skip
    return values


# --- Calls ------------------------------------------------------------------------------------


def _headers(world: World, caller: str) -> dict[str, str]:
    if caller == "anon":
        return {}
    headers = {"Authorization": f"Bearer {world.credentials[caller]}"}
    if not caller.startswith("key_"):
        headers["OpenAI-Organization"] = world.organization[caller]
    return headers


def _websocket_status(base_url: str, world: World, caller: str, path: str) -> int:
    query = ""
    if caller != "anon":
        query = f"?token={world.credentials[caller]}"
        if not caller.startswith("key_"):
            query += f"&organization={world.organization[caller]}"
    url = "ws" + base_url.removeprefix("http") + path + query
    try:
        with connect(url, open_timeout=10) as socket:
            try:
                socket.recv(timeout=0.2)  # a refusal closes at once; an open socket stays quiet
            except TimeoutError:
                return 101
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else 1006
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else 1006


def _call(http: httpx.Client, world: World, row: Row, caller: str, obj: str | None) -> int:
    values = _objects(world, obj, row.path) if obj is not None else {}
    values["base"] = str(http.base_url).rstrip("/")
    path = row.path.format(**values)
    if row.method == "WS":
        return _websocket_status(str(http.base_url).rstrip("/"), world, caller, path)
    body = row.body(world) if callable(row.body) else row.body
    content = {"content": body} if isinstance(body, bytes) else {"json": body}  # bytes: sent as they are
    with http.stream(row.method, path, headers=_headers(world, caller), **content) as response:
        return response.status_code  # a stream (SSE, /v1) is closed unread: its status is what counts


# --- Coverage: no URL without rows ---------------------------------------------------------------


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def _methods(callback: Any) -> set[str]:
    """The methods a DRF view or viewset implements (OPTIONS and HEAD aside); empty for a plain view."""
    actions = getattr(callback, "actions", None)
    if actions:  # DRF adds "head" to a viewset's actions at its first request: read it as GET
        return {method.upper() for method in actions} - {"OPTIONS", "HEAD", "TRACE"}
    view = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if view is None:
        return set()
    names = set(getattr(view, "http_method_names", ())) - {"options", "head", "trace"}
    return {name.upper() for name in names if hasattr(view, name)}


def _covers(route: str, row: Row) -> bool:
    """Whether ``row``'s path is an instance of Django URL ``route`` (path() syntax or a regex)."""
    if row.route:
        return row.route == route
    concrete = re.sub(r"\{\w+\}", "1", row.path).lstrip("/")
    if "^" in route or "(?P" in route:
        # Anchors go (a router's pattern joins "api/" and "^budgets/$"); a class's "[^/]" stays.
        return re.fullmatch(re.sub(r"(?<!\[)\^|\$", "", route), concrete) is not None
    pattern = re.sub(r"<(?:\w+:)?\w+>", "[^/]+", re.escape(route).replace(r"\<", "<").replace(r"\>", ">"))
    pattern = re.sub(r"<(?:\w+:)?\w+>", "[^/]+", pattern)
    return re.fullmatch(pattern, concrete) is not None


def test_every_url_and_method_has_rows() -> None:
    missing = []
    for route, callback in _routes(get_resolver().url_patterns):
        if route.startswith("admin/"):
            continue  # the Django admin: staff only, tested in the apps' test_admin files
        rows = [row for row in MATRIX if _covers(route, row)]
        if not rows:
            missing.append(f"{route}: no row")
            continue
        for method in sorted(_methods(callback) - {row.method for row in rows}):
            missing.append(f"{method} {route}: no row")
    for pattern in websocket_urlpatterns:
        if not any(row.method == "WS" and _covers(str(pattern.pattern), row) for row in MATRIX):
            missing.append(f"WS {pattern.pattern}: no row")
    assert not missing, "endpoints without permission rows:\n" + "\n".join(missing)


# The login, registration and password endpoints are rate-limited per client IP (tested in
# accounts/tests/test_login_throttle.py and tests/test_e2e_login_throttle.py): here every cell comes from
# one IP, so the matrix's server allows far more than the matrix sends.
UNTHROTTLED = {name: "100000/minute" for name in ("AUTH_LOGIN_RATE", "AUTH_REGISTER_RATE", "AUTH_PASSWORD_RATE")}


@pytest.fixture
def http(start_server: Callable[..., Any]) -> Iterator[httpx.Client]:
    _, url = start_server(env=UNTHROTTLED)
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        yield client


@pytest.mark.timeout(600)  # about 1,300 cells, each a real request (about 2 minutes here)
def test_permission_matrix(world: World, http: httpx.Client) -> None:
    """Every cell of ``MATRIX`` on a real server process; all mismatches are listed at once."""
    observed: dict[tuple[str, str, str | None], dict[str, int]] = {}
    wrong = []
    for row in MATRIX:
        for obj, caller, expected in row.statuses():
            status = _call(http, world, row, caller, obj)
            observed.setdefault((row.method, row.path, obj), {})[caller] = status
            if status != expected:
                wrong.append(f"{row.method} {row.path} [{obj or '-'}] as {caller}: {status}, expected {expected}")
    if os.environ.get("PERMISSION_MATRIX_PRINT"):
        for (method, path, obj), line in observed.items():
            print(method, path, obj or "-", " ".join(str(line[caller]) for caller in CALLERS))
    assert not wrong, f"{len(wrong)} cells differ:\n" + "\n".join(wrong)
