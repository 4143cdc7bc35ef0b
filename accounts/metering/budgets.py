"""Budgets: reserve a request's maximum cost before its call, settle the actual cost after. Placeholder."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from .types import MeteringSubject


class BudgetReservation:
    """What a request reserved on its budgets (settled by ``budget_settle_many``)."""


async def budget_reserve(
    *, request_id: str, subjects: Sequence[MeteringSubject], max_cost: Decimal, max_tokens: int
) -> BudgetReservation | None:
    """Reserve ``max_cost`` (US dollars) and ``max_tokens`` on every budget of ``subjects``; None if none applies."""
    return None


def budget_settle_many(events: Iterable[Any]) -> int:
    """Settle the reservations of ended requests (``accounts.usage.UsageEvent``); return how many were settled."""
    return 0


__all__ = ["BudgetReservation", "budget_reserve", "budget_settle_many"]
