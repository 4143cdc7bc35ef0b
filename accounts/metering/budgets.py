"""Budgets: reserve a request's maximum cost before its call, settle the actual cost after, reconcile.

Flow (issue 8, "Reservation, then settlement"):

1. ``budget_reserve`` — before the upstream call, on the event loop. The enabled budgets of the
   request's subjects come from a per-process cache (``budget_cache``, cleared in every process when a
   budget changes), so a request with no budget costs a dict lookup: no Redis, no query. Otherwise one
   atomic script (``budget_store``) checks every budget's counter for the current period and reserves
   the maximum cost (and tokens, for a budget with a token limit) on all of them, or on none: 429
   ``insufficient_quota`` naming the budget and when it resets. A counter missing in Redis (a new
   period, a restarted Redis) is seeded from the usage rows first: Redis is a cache of the ledger.
   Redis unreachable: 503 ``metering_unavailable`` — budgets always fail closed.
2. ``budget_settle_many`` — in the Celery task that wrote the usage rows, after writing them: for
   each row with a reservation, one script releases what was reserved and adds the row's cost and
   tokens (the ledger's own values), then deletes the reservation. A redelivered task finds no
   reservation and adds nothing twice.
3. ``budget_reconcile`` — celery beat, every ``BUDGET_RECONCILE_SECONDS``: releases reservations whose
   process died (``chatbackend.liveness``) or that outlived ``BUDGET_RESERVATION_TTL_SECONDS``; then
   recomputes every enabled budget's spend in its current period from the rows and repairs the
   counter, logging the drift it corrected. Rows written for a reply whose process died (the
   engine's crash recovery) have no reservation to settle: this is what counts them.

Counting rule: a counter holds the settled rows of its period, plus reservations in flight. A budget
admits a request when ``spent + reserved + max_cost <= limit``, however many processes admit requests
at once, so the settled spend passes the limit only by what replies cost beyond what they reserved:
``max_cost`` is the prompt as counted before the call plus the most the reply may generate (the
client's ``max_tokens``, else the model's ``max_output_tokens``, else the rest of the context
window), and an upstream that outruns that count (a prompt estimated for a model without a known
tokenizer, tool definitions, which are not counted) is still billed in full.

Why a Redis script rather than PostgreSQL row locks (measured 2026-12-01 on the 2-core CI machine,
2000 reservations each, one client): the script reserving one or two budgets took 158 / 168 µs at
p50 from the event loop; a ``SELECT ... FOR UPDATE`` + ``UPDATE`` + reservation ``INSERT``
transaction on a logged table took 2.2–4.0 ms at p50 (the commit's WAL flush), plus a worker-thread
hop and a pooled connection per request, and it holds the budget row's lock until the commit, so
one busy budget admits at most a few hundred requests a second. Redis runs the script in
microseconds and serializes only that. The price is a cache that can drift from the ledger (a
restart, a lost settlement), which seeding and reconciliation bound.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

import redis.exceptions
from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone

from chatbackend import liveness
from chatbackend.asyncdb import run_sync
from chatbackend.errors import OUTAGE_ERRORS, ApplicationError
from chatbackend.lookup_cache import LookupCache

from .budget_store import (
    ReserveLine,
    ReserveRequest,
    ReserveVerdict,
    Settlement,
    budget_store,
    counter_key,
    from_units,
    to_units,
)
from .types import MeteringSubject

if TYPE_CHECKING:  # accounts.models imports this package (its types): models are imported where used
    from ..models import Budget

logger = logging.getLogger(__name__)

# Which usage rows a subject kind's spend is the sum of: the UsageRecord field holding its id. A new
# subject kind adds its choice on Budget and its rows here.
SUBJECT_USAGE_FIELDS: dict[str, str] = {
    "user": "user_id",
    "api_key": "api_key_id",
    "team": "team_id",
    "organization": "organization_id",
}
_LIFETIME_END = 1e12  # Unix seconds past any row's creation: the end of a lifetime budget's "period"
_COUNTER_MARGIN_SECONDS = 86400  # a counter outlives its period by a day, then Redis drops it
_SEED_ATTEMPTS = 3
# What an unreachable store (Redis) or database raises: the request is refused with 503.
_STORE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, *OUTAGE_ERRORS, OSError)
_REPAIR_ATTEMPTS = 5


@dataclass(frozen=True, slots=True, eq=False)
class BudgetSpec:
    """An enabled budget as the metering path reads it (cached per process; immutable).

    Compared and hashed by identity (``eq=False``: in C, where a frozen dataclass hashes its eight
    fields in Python), as ``_current_periods`` keys it once per request: the cache holds one
    snapshot of each budget, and an edited budget is a new one.

    ``organization_id``: the budget's organization. It limits what its subject spends there only:
    a user who belongs to several organizations is budgeted by each of them separately, and one
    organization's admins neither limit nor see what the user spends in another.
    """

    id: int
    organization_id: int
    name: str
    subject_kind: str
    subject_id: int
    period: str
    limit_usd: Decimal
    token_limit: int | None

    @classmethod
    def of(cls, budget: Budget) -> BudgetSpec:
        if budget.organization_id is None:  # typed optional (a default); NOT NULL in the table
            raise ValueError(f"budget {budget.pk} has no organization")
        return cls(
            id=budget.pk,
            organization_id=budget.organization_id,
            name=budget.name,
            subject_kind=budget.subject_kind,
            subject_id=budget.subject_id,
            period=budget.period,
            limit_usd=budget.limit_usd,
            token_limit=budget.token_limit,
        )


@dataclass(frozen=True, slots=True)
class BudgetPeriod:
    """A budget's period around a moment: ``start`` (None: lifetime), ``end`` (None: never resets), ``label``."""

    start: dt.datetime | None
    end: dt.datetime | None
    label: str

    def contains(self, moment: dt.datetime) -> bool:
        return (self.start is None or moment >= self.start) and (self.end is None or moment < self.end)


def budget_period(period: str, at: dt.datetime) -> BudgetPeriod:
    """Return the calendar period of kind ``period`` (a ``Budget.Period``) that holds the moment ``at``.

    Days start at midnight in ``settings.TIME_ZONE``, weeks on Monday (ISO 8601), months on the 1st;
    a lifetime budget's period has no bounds. ``at`` must be aware.
    """
    if period == "lifetime":
        return BudgetPeriod(None, None, "all")
    tz = timezone.get_default_timezone()
    day = at.astimezone(tz).date()
    if period == "daily":
        first, following = day, day + dt.timedelta(days=1)
    elif period == "weekly":
        first = day - dt.timedelta(days=day.weekday())
        following = first + dt.timedelta(days=7)
    elif period == "monthly":
        first = day.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    start = dt.datetime.combine(first, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(following, dt.time.min, tzinfo=tz)
    return BudgetPeriod(start, end, f"{period[0]}{first.isoformat()}")


def budget_counter_key(budget: BudgetSpec | Budget, period: BudgetPeriod) -> str:
    """Return the store key of ``budget``'s counter in ``period``."""
    return counter_key(
        budget_id=budget.id,
        subject_kind=budget.subject_kind,
        subject_id=budget.subject_id,
        period_label=period.label,
    )


# --- Which budgets apply --------------------------------------------------------------------------

budget_cache: LookupCache[str, dict[tuple[str, int], tuple[BudgetSpec, ...]]] = LookupCache("budgets", maxsize=1)
_ALL = "enabled"


def _enabled_budgets() -> dict[tuple[str, int], tuple[BudgetSpec, ...]]:
    from ..models import Budget

    by_subject: dict[tuple[str, int], list[BudgetSpec]] = {}
    for budget in Budget.objects.filter(enabled=True).order_by("id"):
        by_subject.setdefault((budget.subject_kind, budget.subject_id), []).append(BudgetSpec.of(budget))
    return {subject: tuple(specs) for subject, specs in by_subject.items()}


def _fill_enabled_budgets(ticket: int | None) -> dict[tuple[str, int], tuple[BudgetSpec, ...]]:
    found = _enabled_budgets()
    budget_cache.put(_ALL, found, ticket)
    return found


async def budgets_for(subjects: Sequence[MeteringSubject]) -> list[BudgetSpec]:
    """Return the enabled budgets of ``subjects`` (kinds without budgets are skipped), from the process cache.

    Only the budgets of the organization the request acts in (its ``organization`` subject) apply:
    a user's budget in organization A does not limit what they do in B. One query for every
    enabled budget when the cache is empty (after a change, or ``LOOKUP_CACHE_SECONDS``); a dict
    lookup otherwise.
    """
    found = budget_cache.get(_ALL)
    if found is None:
        ticket = await budget_cache.fill_ticket_async()
        found = await run_sync(_fill_enabled_budgets, ticket)
    if not found:
        return []
    organization_id = next((subject.id for subject in subjects if subject.kind == "organization"), None)
    budgets: list[BudgetSpec] = []
    for subject in subjects:
        if subject.kind in SUBJECT_USAGE_FIELDS:
            for budget in found.get((subject.kind, subject.id), ()):
                if organization_id is None or budget.organization_id == organization_id:
                    budgets.append(budget)
    return budgets


# --- Reservation ----------------------------------------------------------------------------------


class BudgetReservation(NamedTuple):
    """What a request reserved: ``max_cost`` (US dollars) and ``max_tokens`` on each of ``budget_ids``.

    Settled by the request's usage row (``budget_settle_many``, by ``request_id``); released by
    reconciliation if its process dies first. A named tuple: one per budgeted request.
    """

    request_id: str
    budget_ids: tuple[int, ...]
    max_cost: Decimal
    max_tokens: int


def metering_unavailable() -> ApplicationError:
    """Return the 503 a budgeted request gets while the budget store (Redis) cannot be reached."""
    return ApplicationError(
        "Budgets cannot be checked right now (the metering store is unreachable); try again in a few seconds.",
        code="metering_unavailable",
        status=503,
    )


def _money(amount: Decimal) -> str:
    return f"${amount.quantize(Decimal('0.000001')).normalize():f}"


def _resets(period: BudgetPeriod) -> str:
    if period.end is None:
        return "never (a lifetime budget)"
    return period.end.astimezone(timezone.get_default_timezone()).isoformat()


def insufficient_quota(
    budget: BudgetSpec, period: BudgetPeriod, verdict: ReserveVerdict, *, max_cost: Decimal, max_tokens: int
) -> ApplicationError:
    """Return the 429 ``insufficient_quota`` for a request that ``budget`` cannot cover (OpenAI's type and code)."""
    if verdict.by_tokens:
        left = max((budget.token_limit or 0) - verdict.spent - verdict.held, 0)
        shortfall = f"{left} tokens left of {budget.token_limit}; this request may use up to {max_tokens}"
    else:
        left_usd = max(budget.limit_usd - from_units(verdict.spent) - from_units(verdict.held), Decimal(0))
        shortfall = (
            f"{_money(left_usd)} left of {_money(budget.limit_usd)}; this request may cost up to {_money(max_cost)}"
        )
    return ApplicationError(
        f"You exceeded your current quota: budget '{budget.name}' ({budget.period}) has {shortfall}. "
        f"It resets {_resets(period)}.",
        code="insufficient_quota",
        type="insufficient_quota",
        status=429,
    )


def _seed(budget: BudgetSpec, period: BudgetPeriod) -> tuple[int, int]:
    """Return ``budget``'s spend in ``period`` from the usage rows: (cost units, tokens)."""
    totals = _period_rows(budget, period).aggregate(
        cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    return to_units(totals["cost"] or Decimal(0)), (totals["prompt"] or 0) + (totals["completion"] or 0)


def _seeds(wanted: list[tuple[BudgetSpec, BudgetPeriod]]) -> list[tuple[int, int]]:
    return [_seed(budget, period) for budget, period in wanted]


def _period_rows(budget: BudgetSpec | Budget, period: BudgetPeriod) -> Any:
    from ..models import UsageRecord

    # The budget's organization's rows only (for an organization budget that is its subject).
    where = {"organization_id": budget.organization_id, SUBJECT_USAGE_FIELDS[budget.subject_kind]: budget.subject_id}
    rows = UsageRecord.objects.filter(**where)
    if period.start is not None:
        rows = rows.filter(created_at__gte=period.start)
    if period.end is not None:
        rows = rows.filter(created_at__lt=period.end)
    return rows


@dataclass(frozen=True, slots=True)
class _CurrentPeriod:
    """A budget's current period and what every reservation in it repeats: its counter key, its
    limit in units and its bounds in Unix seconds (``end`` ``_LIFETIME_END`` for a lifetime budget)."""

    period: BudgetPeriod
    key: str
    limit_units: int
    start: float
    end: float


# (budget, time zone) -> its current period, reused while ``start <= now < end``: the date arithmetic,
# the key and the Decimal conversion are the same for every request of a period. Budgets are
# immutable snapshots (``BudgetSpec``): an edited budget is a new key. Cleared when it grows past
# _CURRENT_PERIODS_MAX (budgets deleted or edited leave their old entries behind until then).
_current_periods: dict[tuple[BudgetSpec, Any], _CurrentPeriod] = {}
_CURRENT_PERIODS_MAX = 10_000


def _current_period(budget: BudgetSpec, stamp: float) -> _CurrentPeriod:
    """Return ``budget``'s period holding the moment ``stamp`` (Unix seconds), from the cache when it can."""
    tz = timezone.get_default_timezone()
    current = _current_periods.get((budget, tz))
    if current is not None and current.start <= stamp < current.end:
        return current
    period = budget_period(budget.period, dt.datetime.fromtimestamp(stamp, tz=dt.UTC))
    if len(_current_periods) >= _CURRENT_PERIODS_MAX:
        _current_periods.clear()
    current = _current_periods[(budget, tz)] = _CurrentPeriod(
        period=period,
        key=budget_counter_key(budget, period),
        limit_units=to_units(budget.limit_usd),
        start=period.start.timestamp() if period.start is not None else float("-inf"),
        end=period.end.timestamp() if period.end is not None else _LIFETIME_END,
    )
    return current


def _line(budget: BudgetSpec, current: _CurrentPeriod, *, units: int, tokens: int, now: float) -> ReserveLine:
    bounded = current.period.end is not None
    return ReserveLine(
        key=current.key,
        limit_units=current.limit_units,
        token_limit=budget.token_limit,
        units=units,
        tokens=tokens if budget.token_limit is not None else 0,
        ttl_seconds=int(current.end - now) + _COUNTER_MARGIN_SECONDS if bounded else 0,
        start=current.start if current.period.start is not None else 0.0,
        end=current.end,
    )


@dataclass(slots=True)
class BudgetPlan:
    """A request's reservation before it is made: the enabled budgets of its subjects, their current
    periods and what to reserve on each (``ReserveRequest``). Built by ``budget_plan``; made by
    ``budget_reserve_with``."""

    request: ReserveRequest
    budgets: list[BudgetSpec]
    periods: list[BudgetPeriod]
    max_cost: Decimal
    max_tokens: int

    async def _seed(self, missing: Sequence[int]) -> None:
        """Read the period's spend of the budgets at ``missing`` from the usage rows into their lines."""
        seeds = await run_sync(_seeds, [(self.budgets[i], self.periods[i]) for i in missing])
        lines = list(self.request.lines)
        for index, (seed_units, seed_tokens) in zip(missing, seeds, strict=True):
            lines[index] = lines[index]._replace(seed_units=seed_units, seed_tokens=seed_tokens)
        self.request = self.request._replace(lines=tuple(lines))


async def budget_plan(
    *, request_id: str, subjects: Sequence[MeteringSubject], max_cost: Decimal, max_tokens: int
) -> BudgetPlan | None:
    """Return what reserving ``max_cost`` (US dollars) and ``max_tokens`` on every enabled budget of
    ``subjects`` takes, or None when no budget applies (then nothing was read but the process cache).

    ``max_tokens`` counts only on budgets with a token limit. Raises ``ApplicationError`` 503
    ``metering_unavailable`` when the budgets cannot be read.
    """
    try:
        budgets = await budgets_for(subjects)
    except OUTAGE_ERRORS:
        logger.warning("budgets could not be read", exc_info=True)
        raise metering_unavailable() from None
    if not budgets:
        return None
    liveness.start_heartbeat()  # reconciliation releases reservations of processes without one
    stamp = time.time()
    currents = [_current_period(budget, stamp) for budget in budgets]
    periods = [current.period for current in currents]
    units = to_units(max_cost, round_up=True)
    lines = tuple(
        [_line(b, c, units=units, tokens=max_tokens, now=stamp) for b, c in zip(budgets, currents, strict=True)]
    )
    request = ReserveRequest(request_id, liveness.PROCESS_ID, stamp + settings.BUDGET_RESERVATION_TTL_SECONDS, lines)
    return BudgetPlan(request, budgets, periods, max_cost, max_tokens)


async def budget_reserve_with(
    plan: BudgetPlan, reserve: Callable[[ReserveRequest], Awaitable[ReserveVerdict]]
) -> BudgetReservation:
    """Make ``plan``'s reservation with ``reserve`` (a store's, or the admission batch's); return it.

    Atomic across every process: all budgets are reserved, or none. A counter missing in the store (a
    new period, a restarted Redis) is seeded from the usage rows and the reservation tried again.
    Idempotent by request id.

    Raises ``ApplicationError`` 429 ``insufficient_quota`` (type ``insufficient_quota``) when a budget
    cannot cover the request — its message names the budget and when it resets — and 503
    ``metering_unavailable`` when the store (Redis) or the usage rows (to seed a counter) cannot be read.
    ``reserve``'s own errors propagate but for the store's outages, which become that 503.
    """
    try:
        for _ in range(_SEED_ATTEMPTS):
            verdict = await reserve(plan.request)
            if not verdict.missing:
                break
            await plan._seed(verdict.missing)
        else:  # pragma: no cover - a counter dropped three times in a row while being seeded
            raise metering_unavailable()
    except _STORE_ERRORS:
        logger.warning("the budget store is unreachable: refusing a budgeted request", exc_info=True)
        raise metering_unavailable() from None
    if verdict.refused is not None:
        budget, period = plan.budgets[verdict.refused], plan.periods[verdict.refused]
        raise insufficient_quota(budget, period, verdict, max_cost=plan.max_cost, max_tokens=plan.max_tokens)
    return BudgetReservation(
        request_id=plan.request.request_id,
        budget_ids=tuple([b.id for b in plan.budgets]),
        max_cost=plan.max_cost,
        max_tokens=plan.max_tokens,
    )


async def budget_reserve(
    *, request_id: str, subjects: Sequence[MeteringSubject], max_cost: Decimal, max_tokens: int
) -> BudgetReservation | None:
    """Reserve ``max_cost`` (US dollars) and ``max_tokens`` on every enabled budget of ``subjects``, alone.

    ``budget_plan`` then ``budget_reserve_with`` the budget store (one script call); returns None when
    no budget applies (no store call then). The streaming engine reserves through
    ``accounts.metering.metering_admit`` instead, in the same round trip as the rate limits. Raises
    what those two raise.
    """
    plan = await budget_plan(request_id=request_id, subjects=subjects, max_cost=max_cost, max_tokens=max_tokens)
    if plan is None:
        return None
    store = budget_store()

    async def reserve(request: ReserveRequest) -> ReserveVerdict:
        return await store.reserve(
            request_id=request.request_id, pid=request.pid, expires_at=request.expires_at, lines=list(request.lines)
        )

    return await budget_reserve_with(plan, reserve)


# --- Settlement -----------------------------------------------------------------------------------


def budget_settle_many(events: Iterable[Any]) -> int:
    """Settle the reservations of ended requests whose usage rows are written; return how many were settled.

    ``events``: ``accounts.usage.UsageEvent`` (read: ``request_id``, ``finish_status``). Call after the
    rows are committed: the amounts added are the rows' own (``cost``, prompt + completion tokens), to
    the counters whose period holds the row's ``created_at``. One atomic script for the batch; a
    request without a reservation (refused, or no budget, or already settled by an earlier delivery)
    changes nothing; a refused request's row (cost 0) releases a reservation a lost answer left
    held. Raises redis-py's errors when Redis is unreachable (the task then retries).
    """
    from ..models import UsageRecord

    # Refused requests too: a reserve whose answer was lost (a Redis timeout after the script ran)
    # was refused with 503, yet holds a reservation that only settling its row releases.
    request_ids = {event.request_id for event in events}
    if not request_ids:
        return 0
    rows = UsageRecord.objects.filter(request_id__in=request_ids).values_list(
        "request_id", "created_at", "cost", "prompt_tokens", "completion_tokens"
    )
    settlements = [
        Settlement(
            request_id=request_id,
            created=created.timestamp(),
            units=to_units(cost),
            tokens=prompt + completion,
        )
        for request_id, created, cost, prompt, completion in rows
    ]
    return budget_store().settle(settlements)


# --- Reconciliation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What one reconciliation did: reservations released, counters checked, counters repaired."""

    released: int
    checked: int
    repaired: int


def budget_release_stale(*, now: float | None = None) -> int:
    """Release reservations whose process is dead or that are older than ``BUDGET_RESERVATION_TTL_SECONDS``.

    Returns how many were released. Their usage rows, if the engine's crash recovery writes them, are
    counted by ``budget_counters_repair``. Raises what the cache raises when liveness cannot be read.
    """
    now = time.time() if now is None else now
    store = budget_store()
    alive: dict[str, bool] = {}
    stale = []
    for request_id, pid, expires_at in store.reservations():
        if pid not in alive:
            alive[pid] = bool(pid) and liveness.process_alive(pid)
        if expires_at <= now or not alive[pid]:
            stale.append(Settlement(request_id=request_id, created=-1.0, units=0, tokens=0))
    released = store.settle(stale)
    if released:
        logger.warning("released %d budget reservations of dead processes or past their TTL", released)
    return released


def budget_counter_repair(budget: Budget, *, now: dt.datetime | None = None) -> bool:
    """Recompute ``budget``'s counter for its current period from the usage rows; return whether it drifted.

    The counter must equal the rows of the period, minus rows written but not settled yet (their
    reservations are still held), and its reserved amounts the sum of the reservations it holds. The
    repair applies only if no settlement touched the counter while the rows were summed (its version),
    retried a few times. A missing counter is left alone: the next reservation seeds it from the rows.
    Logs a warning with the budget and the old and new values when it corrects a drift.
    """
    period = budget_period(budget.period, now or timezone.now())
    key = budget_counter_key(budget, period)
    store = budget_store()
    for _ in range(_REPAIR_ATTEMPTS):
        state = store.counter(key)
        if state is None:
            return False
        rows = _period_rows(budget, period)
        totals = rows.aggregate(cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        pending = {
            request_id: (to_units(cost), prompt + completion)
            for request_id, cost, prompt, completion in rows.filter(Q(request_id__in=state.holders)).values_list(
                "request_id", "cost", "prompt_tokens", "completion_tokens"
            )
        }
        repaired = store.counter_repair(
            key,
            version=state.version,
            units=to_units(totals["cost"] or Decimal(0)),
            tokens=(totals["prompt"] or 0) + (totals["completion"] or 0),
            pending=pending,
        )
        if repaired is None:
            continue
        old, new = repaired
        if (old.spent, old.spent_tokens, old.reserved, old.reserved_tokens) == (
            new.spent,
            new.spent_tokens,
            new.reserved,
            new.reserved_tokens,
        ):
            return False
        logger.warning(
            "budget %s (%s) counter drift corrected for %s: spent %s -> %s, tokens %d -> %d, "
            "reserved %s -> %s, reserved tokens %d -> %d",
            budget.pk,
            budget.name,
            period.label,
            from_units(old.spent),
            from_units(new.spent),
            old.spent_tokens,
            new.spent_tokens,
            from_units(old.reserved),
            from_units(new.reserved),
            old.reserved_tokens,
            new.reserved_tokens,
        )
        return True
    logger.warning("budget %s counter busy: not reconciled this time", budget.pk)
    return False


def budget_reconcile() -> ReconcileResult:
    """Release stale reservations, then repair every enabled budget's current counter from the rows.

    Run by celery beat every ``BUDGET_RECONCILE_SECONDS`` (task ``accounts.budget_reconcile``).
    """
    from ..models import Budget

    released = budget_release_stale()
    checked = repaired = 0
    for budget in Budget.objects.filter(enabled=True).order_by("id"):
        checked += 1
        repaired += budget_counter_repair(budget)
    return ReconcileResult(released=released, checked=checked, repaired=repaired)


# --- Reading a budget's state (admin, REST) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """A budget in its current period: spent (settled, from the counter or else the rows), reserved
    (requests in flight), remaining (never below 0); US dollars and tokens. ``resets_at`` None: never."""

    period_start: dt.datetime | None
    resets_at: dt.datetime | None
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal
    spent_tokens: int
    reserved_tokens: int
    remaining_tokens: int | None


def budget_usage(budget: Budget, *, now: dt.datetime | None = None) -> BudgetUsage:
    """Return ``budget``'s spend, reservations and what remains in its current period.

    Read from the counter when the store has it; otherwise (not used yet this period, or Redis
    unreachable) spent comes from the usage rows and nothing counts as reserved.
    """
    period = budget_period(budget.period, now or timezone.now())
    state = None
    try:
        state = budget_store().counter(budget_counter_key(budget, period))
    except (redis.exceptions.RedisError, OSError):
        logger.warning("the budget store is unreachable: showing spend from the usage rows", exc_info=True)
    if state is not None:
        spent, spent_tokens, reserved, reserved_tokens = (
            state.spent,
            state.spent_tokens,
            state.reserved,
            state.reserved_tokens,
        )
    else:
        spent, spent_tokens = _seed(BudgetSpec.of(budget), period)
        reserved = reserved_tokens = 0
    spent_usd, reserved_usd = from_units(spent), from_units(reserved)
    return BudgetUsage(
        period_start=period.start,
        resets_at=period.end,
        spent_usd=spent_usd,
        reserved_usd=reserved_usd,
        remaining_usd=max(budget.limit_usd - spent_usd - reserved_usd, Decimal(0)),
        spent_tokens=spent_tokens,
        reserved_tokens=reserved_tokens,
        remaining_tokens=(
            max(budget.token_limit - spent_tokens - reserved_tokens, 0) if budget.token_limit is not None else None
        ),
    )


__all__ = [
    "SUBJECT_USAGE_FIELDS",
    "BudgetPeriod",
    "BudgetPlan",
    "BudgetReservation",
    "BudgetSpec",
    "BudgetUsage",
    "ReconcileResult",
    "budget_cache",
    "budget_counter_key",
    "budget_counter_repair",
    "budget_period",
    "budget_plan",
    "budget_reconcile",
    "budget_release_stale",
    "budget_reserve",
    "budget_reserve_with",
    "budget_settle_many",
    "budget_usage",
    "budgets_for",
    "insufficient_quota",
    "metering_unavailable",
]
