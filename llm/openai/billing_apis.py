"""NextChat's billing endpoints: ``GET /dashboard/billing/usage`` and ``/dashboard/billing/subscription``.

NextChat reads them to show "used $X of $Y" (``/work/shared/nextchat.md``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from accounts.authentication import Principal
from accounts.endpoints import async_endpoint
from accounts.models import APIKey
from accounts.selectors import budget_monthly_limit_usd, usage_cost_total
from chatbackend.asyncdb import run_sync

from .serializers import BillingUsageQuerySerializer

# Serializers hold no per-request state once built; building one per request costs ~0.4 ms.
_BILLING_USAGE_QUERY = BillingUsageQuerySerializer()


def _billing_usage(principal: Principal, query: dict[str, str]) -> dict[str, Any]:
    dates = _BILLING_USAGE_QUERY.run_validation(query)
    dollars = usage_cost_total(user=principal.user, organization=principal.organization, **dates)
    return {"object": "list", "total_usage": float(dollars * 100)}


@async_endpoint("GET", scope=APIKey.Scope.READ)
async def billing_usage(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /dashboard/billing/usage[?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD]``.

    ``{"object": "list", "total_usage": <US cents>}``: the cost of the caller's (the user's, across
    all their keys) usage records in the organization the request acts in (what its budgets, behind
    ``/subscription``, count) from ``start_date`` (inclusive) to ``end_date`` (exclusive;
    NextChat sends tomorrow), days in ``settings.TIME_ZONE``. A missing ``start_date`` is the first
    day of the current month, a missing ``end_date`` the first of the next: NextChat's server mode
    relays this request without its query string, and gets this month's usage. 400 (``param``
    naming the date) for a malformed date or an end before the start.
    """
    return JsonResponse(await run_sync(_billing_usage, principal, request.GET.dict()))


def _billing_subscription(principal: Principal) -> dict[str, Any]:
    budget = budget_monthly_limit_usd(
        user=principal.user, api_key=principal.api_key, organization=principal.organization
    )
    limit = float(budget) if budget is not None else float(settings.OPENAI_BILLING_HARD_LIMIT_USD)
    return {
        "object": "billing_subscription",
        "has_payment_method": False,
        "hard_limit_usd": limit,
        "soft_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": 0,
    }


@async_endpoint("GET", scope=APIKey.Scope.READ)
async def billing_subscription(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /dashboard/billing/subscription``: the caller's monthly limit, for NextChat's "used $X of $Y".

    ``hard_limit_usd`` (and ``soft_limit_usd``, ``system_hard_limit_usd``, the same number) is the
    tightest enabled monthly US-dollar budget of the caller's user, API key, the key's team and the
    organization the request acts in (``accounts.selectors.budget_monthly_limit_usd``). Without one it is the setting
    ``OPENAI_BILLING_HARD_LIMIT_USD`` (default 1,000,000 US dollars: "no monthly limit").
    """
    return JsonResponse(await run_sync(_billing_subscription, principal))


__all__ = ["billing_subscription", "billing_usage"]
