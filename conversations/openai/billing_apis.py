"""NextChat's billing endpoints: ``GET /dashboard/billing/usage`` and ``/dashboard/billing/subscription``.

NextChat reads them to show "used $X of $Y" (``/work/shared/nextchat.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from chatbackend.asyncdb import run_sync

from .endpoint import openai_endpoint, request_authenticator
from .serializers import BillingUsageQuerySerializer
from .services import openai_billing_usage_cents

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_BILLING_USAGE_QUERY = BillingUsageQuerySerializer()


def _billing_usage(authenticate: Callable[[], Principal], query: dict[str, str]) -> dict[str, Any]:
    principal = authenticate()
    dates = _BILLING_USAGE_QUERY.run_validation(query)
    cents = openai_billing_usage_cents(user=principal.user, **dates)
    return {"object": "list", "total_usage": float(cents)}


@openai_endpoint("GET")
async def billing_usage(request: HttpRequest) -> HttpResponse:
    """``GET /dashboard/billing/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD``.

    ``{"object": "list", "total_usage": <US cents>}``: the caller's usage records from
    ``start_date`` (inclusive) to ``end_date`` (exclusive; NextChat sends tomorrow). 400 for a
    missing or malformed date, or an end before the start.
    """
    return JsonResponse(await run_sync(_billing_usage, request_authenticator(request), request.GET.dict()))


def _billing_subscription(authenticate: Callable[[], Principal]) -> dict[str, Any]:
    authenticate()
    limit = settings.OPENAI_BILLING_HARD_LIMIT_USD
    return {
        "object": "billing_subscription",
        "has_payment_method": False,
        "hard_limit_usd": limit,
        "soft_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": 0,
    }


@openai_endpoint("GET")
async def billing_subscription(request: HttpRequest) -> HttpResponse:
    """``GET /dashboard/billing/subscription``: ``{"hard_limit_usd": ...}`` for NextChat's "used $X of $Y".

    There is no quota system yet, so the limit is not enforced anywhere: it is the constant
    setting ``OPENAI_BILLING_HARD_LIMIT_USD`` (default 1,000,000), the same for every caller.
    """
    return JsonResponse(await run_sync(_billing_subscription, request_authenticator(request)))


__all__ = ["billing_subscription", "billing_usage"]
