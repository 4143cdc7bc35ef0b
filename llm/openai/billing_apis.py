"""NextChat's billing endpoints: ``GET /dashboard/billing/usage`` and ``/dashboard/billing/subscription``.

NextChat reads them to show "used $X of $Y" (``/work/shared/nextchat.md``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint
from accounts.selectors import usage_cost_total
from chatbackend.asyncdb import run_sync

from .serializers import BillingUsageQuerySerializer

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_BILLING_USAGE_QUERY = BillingUsageQuerySerializer()


def _billing_usage(principal: Principal, query: dict[str, str]) -> dict[str, Any]:
    dates = _BILLING_USAGE_QUERY.run_validation(query)
    dollars = usage_cost_total(user=principal.user, **dates)
    return {"object": "list", "total_usage": float(dollars * 100)}


@async_endpoint("GET")
async def billing_usage(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /dashboard/billing/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD``.

    ``{"object": "list", "total_usage": <US cents>}``: the caller's usage records from
    ``start_date`` (inclusive) to ``end_date`` (exclusive; NextChat sends tomorrow). 400 for a
    missing or malformed date, or an end before the start.
    """
    return JsonResponse(await run_sync(_billing_usage, principal, request.GET.dict()))


@async_endpoint("GET")
async def billing_subscription(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /dashboard/billing/subscription``: ``{"hard_limit_usd": ...}`` for NextChat's "used $X of $Y".

    There is no quota system yet, so the limit is not enforced anywhere: it is the constant
    setting ``OPENAI_BILLING_HARD_LIMIT_USD`` (default 1,000,000), the same for every caller.
    """
    limit = settings.OPENAI_BILLING_HARD_LIMIT_USD
    return JsonResponse(
        {
            "object": "billing_subscription",
            "has_payment_method": False,
            "hard_limit_usd": limit,
            "soft_limit_usd": limit,
            "system_hard_limit_usd": limit,
            "access_until": 0,
        }
    )


__all__ = ["billing_subscription", "billing_usage"]
