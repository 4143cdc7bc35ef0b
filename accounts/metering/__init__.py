"""Admission control, in one place: rate limits and budgets, checked before a reply's upstream call.

The streaming engine (``llm.streaming``) calls ``metering_admit`` with the plan's
``MeteringRequest`` before it opens the upstream request, whichever interface started the reply
(``/v1``, conversation SSE, WebSocket), and ``Admission.release`` once the reply has ended, however
it ended. The usage record of the reply (``accounts.usage``) settles the budget reservation in the
Celery task that writes it (``budgets.budget_settle_many``).

Cost: one script call to the store (Redis) per admission; the release of a reply is queued and
rides with the next admission or the next batch of releases (``ratelimit_store``), so it costs no
round trip of its own. A caller far from every limit does not wait for that call: it is admitted on
this process's view of the counters and the call records it during the upstream call
(``headroom``: local admission). ``python -m bench.admission`` measures the call.

Order: rate limits first (a request over its rate must not hold budget), then the budget
reservation, in one script on the store (Redis): when the reservation is refused, the rate limits
are given back in the same script.
"""

from __future__ import annotations

import logging

from .budget_store import ReserveRequest, ReserveVerdict
from .budgets import BudgetReservation, budget_plan, budget_reserve_with
from .ratelimits import RateLease, rate_limit_acquire
from .types import NO_LIMITS, MeteringRequest, MeteringSubject, RateLimits

logger = logging.getLogger(__name__)


class Admission:
    """What an admitted request holds until its reply ends.

    ``headers``: OpenAI's ``x-ratelimit-*`` response headers (empty when no rate limit applies).
    ``reservation``: what was reserved on budgets, or None.
    """

    __slots__ = ("_lease", "_released", "reservation")

    def __init__(self, lease: RateLease, reservation: BudgetReservation | None) -> None:
        self._lease = lease
        self.reservation = reservation
        self._released = False

    @property
    def headers(self) -> dict[str, str]:
        return self._lease.headers

    @property
    def has_headers(self) -> bool:
        """Whether ``headers`` is not empty (a requests or tokens limit applies), without computing them."""
        return self._lease.has_headers

    async def confirmed(self) -> None:
        """Wait until the store holds this admission: at once, but for a local admission (``headroom``),
        whose record in the store answers during the upstream call. Call it before the reply's usage is
        accounted (settlement releases the reservation the record makes). Never raises but for the
        caller's own cancellation."""
        await self._lease.confirmed()

    async def confirmed_headers(self) -> dict[str, str]:
        """Wait until ``confirmed``; return ``headers`` as the store's answer gives them
        (``RateLease.confirmed_headers``: a local admission's view may lack other processes' latest
        requests). For a response that sends its headers once the upstream answered. Never raises but
        for the caller's own cancellation."""
        return await self._lease.confirmed_headers()

    async def release(self, *, completion_tokens: int, not_for: MeteringSubject | None = None) -> None:
        """Give back the request's rate-limit lease and count its completion tokens (on every subject
        but ``not_for``: ``RateLease.release``); once, never raises."""
        if self._released:
            return
        self._released = True
        try:
            await self._lease.release(completion_tokens=completion_tokens, not_for=not_for)
        except Exception:  # an outage here must not lose the reply's end; the lease expires
            logger.warning("could not release the rate-limit lease", exc_info=True)


async def metering_admit(request: MeteringRequest) -> Admission:
    """Admit ``request`` against every rate limit and budget of its subjects; return what it holds.

    One round trip to the store (Redis) for a request with limits or budgets: the rate limits and
    the budget reservation run in one script, all or nothing (``ratelimit_store``); none for a
    request with neither. A budget counter seen for the first time in its period is seeded from
    the usage rows first (a query, then the script once more).

    Raises ``ApplicationError``: 429 ``rate_limit_exceeded`` (with ``Retry-After``) when a rate limit
    is reached, 429 ``insufficient_quota`` when a budget cannot cover the request's maximum cost,
    503 ``metering_unavailable`` when the shared store (Redis) cannot be reached. Nothing is held
    when it raises.
    """
    plan = await budget_plan(
        request_id=request.request_id,
        subjects=request.subjects,
        max_cost=request.max_cost,
        max_tokens=request.max_tokens,
    )
    if plan is None:
        lease = await rate_limit_acquire(
            request_id=request.request_id, subjects=request.subjects, prompt_tokens=request.prompt_tokens
        )
        return Admission(lease, None)
    leases: list[RateLease] = []

    async def admit(reserve: ReserveRequest) -> ReserveVerdict:
        lease = await rate_limit_acquire(
            request_id=request.request_id,
            subjects=request.subjects,
            prompt_tokens=request.prompt_tokens,
            budget=reserve,
        )
        leases.append(lease)
        assert lease.budget is not None  # noqa: S101 - asked with a reservation, admitted by the rate limits
        return lease.budget

    reservation = await budget_reserve_with(plan, admit)  # the last lease holds what was taken
    return Admission(leases[-1], reservation)


__all__ = [
    "NO_LIMITS",
    "Admission",
    "MeteringRequest",
    "MeteringSubject",
    "RateLease",
    "RateLimits",
    "metering_admit",
    "rate_limit_acquire",
]
