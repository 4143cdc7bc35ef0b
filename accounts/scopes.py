"""API key scopes: one check for the async views, one DRF permission class, both refusing the same way.

A key's ``scopes`` (``APIKey.Scope``) say what it may do: ``chat`` (inference: ``/v1`` chat
completions, messages, responses, conversation replies and writes), ``read`` (GET usage,
conversations and their history, models, billing, budgets) and ``admin`` (managing API keys and
budgets, which includes reading them: ``APIKey.has_scope``). Listing models needs ``read`` or
``chat`` (``MODELS_SCOPE``). JWT and session callers are not limited by scopes: their role decides
(``User.is_admin``). An organization's viewers may not use the ``chat`` scope, whatever their
credential (``role_scope_check``). A key without the scope an endpoint needs gets a 403 in OpenAI's shape naming
the missing scope, before the view runs.

The async views declare their scope to ``accounts.endpoints.async_endpoint``; DRF views get
``APIKeyScopePermission`` from ``REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"]`` and may name the
scope of each method in ``api_key_scopes`` (default: safe methods ``read``, others ``admin``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from chatbackend.errors import ApplicationError

from .models import APIKey, Membership

Scope = APIKey.Scope


# What an endpoint needs: one scope, or any of several.
ScopeNeed = str | tuple[str, ...]
# Listing models: a key that may chat may list what it can chat with (clients do, before chatting),
# and so may a key that reads.
MODELS_SCOPE: ScopeNeed = (Scope.READ, Scope.CHAT)


def api_key_scope_check(api_key: APIKey | None, scope: ScopeNeed, *, action: str) -> None:
    """Refuse ``api_key`` unless it holds ``scope`` (any of them, for a tuple; ``APIKey.has_scope``);
    None (a JWT or session caller) always passes.

    ``action``: what was asked, for the message (e.g. ``POST /v1/chat/completions``). Raises
    ``ApplicationError`` 403, type ``invalid_request_error``, code ``insufficient_permissions``,
    whose message names the missing scope. CPU only, fine on the event loop.
    """
    needed = (scope,) if isinstance(scope, str) else scope
    if api_key is None or any(api_key.has_scope(one) for one in needed):
        return
    named = " or ".join(f"'{one}'" for one in needed)
    raise ApplicationError(
        f"This API key lacks the {named} scope, which {action} requires. Missing scopes: {', '.join(needed)}. "
        "Create a key with that scope, or use one that has it.",
        code="insufficient_permissions",
        status=403,
        type="invalid_request_error",
    )


def role_scope_check(role: str | None, scope: ScopeNeed, *, action: str) -> None:
    """Refuse the ``chat`` scope to an organization's viewers (``Membership.Role.VIEWER``: read-only),
    whatever their credential; ``role`` None (no organization resolved: the admin site) passes.

    Raises ``ApplicationError`` 403, code ``insufficient_permissions``. CPU only.
    """
    if role == Membership.Role.VIEWER and scope == Scope.CHAT:
        raise ApplicationError(
            f"Viewers of an organization may only read; {action} needs the member role.",
            code="insufficient_permissions",
            status=403,
            type="invalid_request_error",
        )


def drf_view_scope(view: Any, method: str) -> ScopeNeed:
    """Return the scope a key needs for ``method`` on DRF ``view``: its ``api_key_scopes``, else the default."""
    scopes: Mapping[str, ScopeNeed] = getattr(view, "api_key_scopes", {})
    if method in scopes:
        return scopes[method]
    return Scope.READ if method in SAFE_METHODS else Scope.ADMIN


class APIKeyScopePermission(BasePermission):
    """DRF permission: a request authenticated by API key needs the scope of its method (``drf_view_scope``).

    Refusal is ``api_key_scope_check``'s 403 (raised, so the body names the scope).
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        api_key = request.auth if isinstance(request.auth, APIKey) else None
        scope = drf_view_scope(view, request.method or "GET")
        action = f"{request.method} {request.path}"
        if api_key is not None:
            api_key_scope_check(api_key, scope, action=action)
        # The principal the DRF authentications resolved (accounts.authentication): its role.
        principal = getattr(request, "_chatbackend_principal", None)
        role_scope_check(principal.acting.role if principal is not None else None, scope, action=action)
        return True


__all__ = [
    "MODELS_SCOPE",
    "APIKeyScopePermission",
    "Scope",
    "ScopeNeed",
    "api_key_scope_check",
    "drf_view_scope",
    "role_scope_check",
]
