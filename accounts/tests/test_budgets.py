"""Budgets: periods, reservation, settlement and reconciliation, on real Redis and on the in-process store.

Each behaviour runs against both stores (``store`` fixture): Redis when ``REDIS_URL`` is set (skipped
otherwise), and the in-process store of the embedded defaults.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.utils import timezone

from accounts.metering import MeteringRequest, RateLimits, metering_admit
from accounts.metering import budget_store as store_module
from accounts.metering.budget_store import (
    INDEX_KEY,
    PREFIX,
    MemoryBudgetStore,
    budget_store,
    budget_store_reset,
    reservation_key,
    to_units,
)
from accounts.metering.budgets import (
    budget_cache,
    budget_counter_key,
    budget_period,
    budget_reconcile,
    budget_reserve,
    budget_settle_many,
    budget_usage,
)
from accounts.metering.ratelimits import KEY_PREFIX as RATE_KEY_PREFIX
from accounts.metering.ratelimits import rate_limit_acquire, rate_limit_close
from accounts.metering.types import MeteringSubject
from accounts.models import Budget, Membership, Organization, UsageRecord
from accounts.usage import UsageEvent
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError

pytestmark = pytest.mark.django_db(transaction=True)  # reservations seed counters from a worker thread

MAX_COST = Decimal("0.01")


def budget_keys_clear(url: str) -> None:
    """Delete every budget key (counters, reservations, the index) from the Redis at ``url``, and only those."""
    if not url:
        return
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=PREFIX.replace("{", "\\{").replace("}", "\\}") + "*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """Run the test on the Redis store (skipped without ``REDIS_URL``) and on the in-process store."""
    url = settings.REDIS_URL if request.param == "redis" else ""
    if request.param == "redis" and not url:
        pytest.skip("needs REDIS_URL")
    settings.REDIS_URL = url
    budget_keys_clear(url)
    budget_store_reset()
    budget_cache.clear()
    yield request.param
    budget_keys_clear(url)
    budget_store_reset()
    budget_cache.clear()


def subjects(user: Any, api_key_id: int | None = None) -> tuple[MeteringSubject, ...]:
    found = (MeteringSubject(kind="user", id=user.id),)
    return (*found, MeteringSubject(kind="api_key", id=api_key_id)) if api_key_id else found


def make_budget(user: Any, *, limit: str, kind: str = "user", subject_id: int | None = None, **fields: Any) -> Budget:
    return Budget.objects.create(
        name=fields.pop("name", "team cap"),
        subject_kind=kind,
        subject_id=subject_id if subject_id is not None else user.id,
        limit_usd=Decimal(limit),
        **fields,
    )


def counter(budget: Budget, at: dt.datetime | None = None) -> Any:
    return budget_store().counter(budget_counter_key(budget, budget_period(budget.period, at or timezone.now())))


async def settle(events: list[UsageEvent]) -> int:
    """``budget_settle_many`` as the Celery task calls it: sync, off the event loop."""
    return await run_sync(budget_settle_many, events)


async def usage_of(budget: Budget, **kwargs: Any) -> Any:
    return await run_sync(budget_usage, budget, **kwargs)


def event_for(row: UsageRecord) -> UsageEvent:
    return UsageEvent(
        request_id=row.request_id,
        source=row.source,
        user_id=row.user_id,
        api_key_id=row.api_key_id,
        model_id=None,
        model_name=row.model_name,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost=str(row.cost),
        token_source=row.token_source,
        finish_status=row.finish_status,
    )


# --- Periods ------------------------------------------------------------------------------------


def test_periods_are_calendar_periods_in_time_zone(settings: Any) -> None:
    settings.TIME_ZONE = "America/New_York"
    tz = timezone.get_default_timezone()
    # 2026-11-01 03:30 UTC is still Saturday 2026-10-31 in New York (UTC-4 before the DST change).
    at = dt.datetime(2026, 11, 1, 3, 30, tzinfo=dt.UTC)
    day = budget_period("daily", at)
    assert day.start == dt.datetime(2026, 10, 31, tzinfo=tz)
    assert day.end == dt.datetime(2026, 11, 1, tzinfo=tz)
    assert day.label == "d2026-10-31"
    week = budget_period("weekly", at)
    assert week.start == dt.datetime(2026, 10, 26, tzinfo=tz)  # a Monday
    assert week.end == dt.datetime(2026, 11, 2, tzinfo=tz)
    assert week.end.utcoffset() == dt.timedelta(hours=-5)  # after the change to standard time
    month = budget_period("monthly", at)
    assert (month.start, month.end) == (dt.datetime(2026, 10, 1, tzinfo=tz), dt.datetime(2026, 11, 1, tzinfo=tz))
    december = budget_period("monthly", dt.datetime(2026, 12, 31, 23, 0, tzinfo=tz))
    assert december.end == dt.datetime(2027, 1, 1, tzinfo=tz)
    # The boundary belongs to the next period.
    assert budget_period("daily", dt.datetime(2026, 11, 1, tzinfo=tz)).label == "d2026-11-01"
    lifetime = budget_period("lifetime", at)
    assert (lifetime.start, lifetime.end, lifetime.label) == (None, None, "all")


# --- Reservation --------------------------------------------------------------------------------


async def test_reserve_until_the_limit_then_refuse_naming_budget_and_reset(store: str, user: Any) -> None:
    budget = await Budget.objects.acreate(
        name="alice monthly", subject_kind="user", subject_id=user.id, limit_usd=Decimal("0.025")
    )
    for n in range(2):
        reservation = await budget_reserve(request_id=f"r{n}", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
        assert reservation is not None and reservation.budget_ids == (budget.id,)
    with pytest.raises(ApplicationError) as refused:
        await budget_reserve(request_id="r2", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    error = refused.value
    assert (error.status, error.code, error.type) == (429, "insufficient_quota", "insufficient_quota")
    resets = budget_period("monthly", timezone.now()).end
    assert resets is not None
    assert "'alice monthly'" in error.message and f"resets {resets.isoformat()}" in error.message, error.message
    state = counter(budget)
    assert (state.spent, state.reserved, set(state.holders)) == (0, 2_000_000, {"r0", "r1"})
    # The same request reserving again (a retried admission) takes nothing more.
    assert await budget_reserve(request_id="r1", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    assert counter(budget).reserved == 2_000_000


async def test_lifetime_budget_never_resets(store: str, user: Any) -> None:
    await Budget.objects.acreate(
        name="trial", subject_kind="user", subject_id=user.id, limit_usd=Decimal("0.001"), period="lifetime"
    )
    with pytest.raises(ApplicationError) as refused:
        await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    assert "resets never" in refused.value.message


async def test_one_budget_refusing_reserves_nothing_on_the_others(store: str, user: Any) -> None:
    key = await user.api_keys.acreate(name="k", prefix="sk-x", key_hash="h" * 64)
    roomy = await Budget.objects.acreate(name="user", subject_kind="user", subject_id=user.id, limit_usd=Decimal(5))
    tight = await Budget.objects.acreate(
        name="key tokens", subject_kind="api_key", subject_id=key.id, limit_usd=Decimal(5), token_limit=100
    )
    with pytest.raises(ApplicationError) as refused:
        await budget_reserve(request_id="r0", subjects=subjects(user, key.id), max_cost=MAX_COST, max_tokens=101)
    assert "'key tokens'" in refused.value.message and "tokens" in refused.value.message
    assert counter(roomy).reserved == 0 and counter(roomy).holders == ()
    assert counter(tight).reserved_tokens == 0
    # Within the token limit both are reserved; the user budget (no token limit) holds no tokens.
    assert await budget_reserve(request_id="r1", subjects=subjects(user, key.id), max_cost=MAX_COST, max_tokens=100)
    assert (counter(roomy).reserved, counter(roomy).reserved_tokens) == (1_000_000, 0)
    assert (counter(tight).reserved, counter(tight).reserved_tokens) == (1_000_000, 100)


async def test_no_budget_costs_no_store_call(store: str, user: Any, settings: Any) -> None:
    """A subject without budgets is answered from the process cache: even an unreachable store is not asked."""
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    budget_store_reset()
    assert await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9) is None


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_unreachable_redis_fails_closed(user: Any, settings: Any) -> None:
    await Budget.objects.acreate(name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(5))
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    budget_store_reset()
    budget_cache.clear()
    try:
        with pytest.raises(ApplicationError) as refused:
            await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    finally:
        budget_store_reset()
    assert (refused.value.status, refused.value.code) == (503, "metering_unavailable")


async def test_counter_is_seeded_from_the_rows_of_its_period(store: str, user: Any) -> None:
    budget = await Budget.objects.acreate(
        name="daily", subject_kind="user", subject_id=user.id, limit_usd=Decimal("0.05"), period="daily"
    )
    today = await UsageRecord.objects.acreate(
        request_id="old-today", user=user, model_name="m", source="openai_api", cost=Decimal("0.03"),
        prompt_tokens=7, completion_tokens=3, finish_status="completed",
    )  # fmt: skip
    yesterday = await UsageRecord.objects.acreate(
        request_id="old-yesterday", user=user, model_name="m", source="openai_api", cost=Decimal("1"),
        finish_status="completed",
    )  # fmt: skip
    start = budget_period("daily", timezone.now()).start
    assert start is not None
    await UsageRecord.objects.filter(pk=yesterday.pk).aupdate(created_at=start - dt.timedelta(microseconds=1))
    assert await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    state = counter(budget)
    assert (state.spent, state.spent_tokens, state.reserved) == (3_000_000, 10, 1_000_000)
    with pytest.raises(ApplicationError):  # 0.03 spent + 0.01 reserved + 0.01 asked + 0.01 > 0.05
        await budget_reserve(request_id="r1", subjects=subjects(user), max_cost=Decimal("0.02"), max_tokens=9)
    assert today.cost == Decimal("0.03")


async def test_a_user_budget_limits_what_they_spend_in_its_organization_only(store: str, user: Any) -> None:
    """A user in organizations A and B: A's budget for them neither counts nor limits what they do
    in B (one organization's admins must not cap, or read, another's spend)."""
    default = await run_sync(Organization.objects.default)
    acme = await Organization.objects.acreate(name="Acme", slug="acme")
    await Membership.objects.acreate(user=user, organization=acme)
    budget = await Budget.objects.acreate(
        name="acme cap", organization=acme, subject_kind="user", subject_id=user.id, limit_usd=Decimal("0.015")
    )
    await UsageRecord.objects.acreate(  # spent in the default organization: not acme's to count
        request_id="elsewhere", user=user, organization=default, model_name="m", source="openai_api",
        cost=Decimal("5"), finish_status="completed",
    )  # fmt: skip
    in_acme = (*subjects(user), MeteringSubject(kind="organization", id=acme.id))
    in_default = (*subjects(user), MeteringSubject(kind="organization", id=default.id))

    reservation = await budget_reserve(request_id="r0", subjects=in_acme, max_cost=MAX_COST, max_tokens=9)
    assert reservation is not None and reservation.budget_ids == (budget.id,)
    assert counter(budget).spent == 0  # seeded from acme's rows only
    with pytest.raises(ApplicationError):
        await budget_reserve(request_id="r1", subjects=in_acme, max_cost=MAX_COST, max_tokens=9)
    for n in range(3):  # in the default organization the acme budget does not apply
        assert await budget_reserve(request_id=f"d{n}", subjects=in_default, max_cost=MAX_COST, max_tokens=9) is None
    assert (await usage_of(budget)).spent_usd == Decimal(0)


# --- Settlement ---------------------------------------------------------------------------------


async def test_settle_adds_the_rows_cost_once_and_releases_the_rest(store: str, user: Any) -> None:
    budget = await Budget.objects.acreate(name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(1))
    await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    await budget_reserve(request_id="r1", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    row = await UsageRecord.objects.acreate(
        request_id="r0", user=user, model_name="m", source="openai_api", cost=Decimal("0.00412345"),
        prompt_tokens=11, completion_tokens=4, finish_status="completed",
    )  # fmt: skip
    refused = UsageEvent(**{**event_for(row).__dict__, "request_id": "refused-1", "finish_status": "refused"})
    assert await settle([event_for(row), refused]) == 1
    state = counter(budget)
    assert (state.spent, state.spent_tokens, state.reserved, state.holders) == (412_345, 15, 1_000_000, ("r1",))
    # A redelivered task: nothing twice.
    assert await settle([event_for(row)]) == 0
    assert counter(budget).spent == 412_345
    usage = await usage_of(budget)
    assert (usage.spent_usd, usage.reserved_usd) == (Decimal("0.00412345"), Decimal("0.01000000"))
    assert usage.remaining_usd == Decimal(1) - Decimal("0.01412345")


async def test_a_row_of_the_next_period_is_left_to_that_periods_counter(store: str, user: Any) -> None:
    budget = await Budget.objects.acreate(
        name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(1), period="daily"
    )
    await budget_reserve(request_id="r0", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    row = await UsageRecord.objects.acreate(
        request_id="r0", user=user, model_name="m", source="openai_api", cost=Decimal("0.005"),
        finish_status="completed",
    )  # fmt: skip
    end = budget_period("daily", timezone.now()).end
    assert end is not None
    await UsageRecord.objects.filter(pk=row.pk).aupdate(created_at=end)  # the reply ended after midnight
    assert await settle([event_for(row)]) == 1
    state = counter(budget)
    assert (state.spent, state.reserved) == (0, 0)  # released; tomorrow's counter is seeded from the rows
    assert (await usage_of(budget, now=end)).spent_usd == Decimal("0.005")


# --- Reconciliation -----------------------------------------------------------------------------


async def test_reconcile_releases_dead_and_expired_reservations(store: str, user: Any, settings: Any) -> None:
    budget = await Budget.objects.acreate(name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(1))
    await budget_reserve(request_id="live", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    settings.BUDGET_RESERVATION_TTL_SECONDS = 0.001
    await budget_reserve(request_id="expired", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    settings.BUDGET_RESERVATION_TTL_SECONDS = 3600
    orphan = budget_store()
    dead_line = counter(budget)
    assert dead_line.reserved == 2_000_000
    # A reservation of a process with no heartbeat: written as that process would have.
    await orphan.reserve(
        request_id="dead",
        pid="gone-host:1:deadbeef",
        expires_at=time.time() + 3600,
        lines=[
            store_module.ReserveLine(
                key=budget_counter_key(budget, budget_period("monthly", timezone.now())),
                limit_units=100_000_000,
                token_limit=None,
                units=1_000_000,
                tokens=0,
                ttl_seconds=0,
                start=0.0,
                end=1e12,
            )
        ],
    )
    await asyncio.sleep(0.01)
    result = await _reconcile()
    assert result.released == 2
    state = counter(budget)
    assert (state.reserved, state.holders) == (1_000_000, ("live",))
    assert [rid for rid, _, _ in budget_store().reservations()] == ["live"]


async def _reconcile() -> Any:
    return await run_sync(budget_reconcile)


async def test_reconcile_repairs_drift_from_the_rows_and_logs_it(
    store: str, user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    budget = await Budget.objects.acreate(name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(1))
    await budget_reserve(request_id="settled", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    await budget_reserve(request_id="unsettled", subjects=subjects(user), max_cost=MAX_COST, max_tokens=9)
    settled = await UsageRecord.objects.acreate(
        request_id="settled", user=user, model_name="m", source="openai_api", cost=Decimal("0.002"),
        finish_status="completed",
    )  # fmt: skip
    await settle([event_for(settled)])
    # Written but not settled yet (the task between its two steps): not drift.
    await UsageRecord.objects.acreate(
        request_id="unsettled", user=user, model_name="m", source="openai_api", cost=Decimal("0.004"),
        finish_status="completed",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="accounts.metering.budgets"):
        assert (await _reconcile()).repaired == 0
    assert counter(budget).spent == 200_000
    # A row no reservation ever covered (the crash recovery of a dead process's reply): drift.
    await UsageRecord.objects.acreate(
        request_id="recovered", user=user, model_name="m", source="conversation", cost=Decimal("0.003"),
        prompt_tokens=2, completion_tokens=1, finish_status="failed",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="accounts.metering.budgets"):
        assert (await _reconcile()).repaired == 1
    state = counter(budget)
    assert (state.spent, state.reserved, state.holders) == (500_000, 1_000_000, ("unsettled",))
    drift = [r.getMessage() for r in caplog.records if "drift" in r.getMessage()]
    assert len(drift) == 1 and f"budget {budget.id} (b)" in drift[0] and "0.00200000 -> 0.00500000" in drift[0]
    # Settling the pending row afterwards lands on the repaired counter exactly.
    unsettled = await UsageRecord.objects.aget(request_id="unsettled")
    await settle([event_for(unsettled)])
    state = counter(budget)
    assert (state.spent, state.reserved) == (900_000, 0)
    assert (await _reconcile()).repaired == 0


def test_memory_store_is_the_embedded_default(settings: Any) -> None:
    settings.REDIS_URL = ""
    budget_store_reset()
    try:
        assert isinstance(budget_store(), MemoryBudgetStore)
    finally:
        budget_store_reset()


def test_keys_share_one_hash_tag() -> None:
    assert reservation_key("x").startswith("{budget}:") and INDEX_KEY.startswith("{budget}:")


# --- Rate limits and budgets in one admission (accounts.metering.metering_admit) -------------------


def rate_keys_clear(url: str, subject_id: int) -> None:
    """Delete the rate-limit counters and stream sets of user ``subject_id`` from the Redis at ``url``."""
    if url:
        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(match=f"{RATE_KEY_PREFIX}*:user:{subject_id}*"))
            if keys:
                client.delete(*keys)


def metered(user: Any, *, request_id: str, max_completion_tokens: int, limits: RateLimits) -> MeteringRequest:
    """A request of 10 prompt tokens at $1 / $1,000 per million tokens: up to $0.001 per completion token."""
    return MeteringRequest(
        request_id=request_id,
        subjects=(MeteringSubject(kind="user", id=user.id, limits=limits),),
        prompt_tokens=10,
        max_completion_tokens=max_completion_tokens,
        input_price_per_million=Decimal(1),
        output_price_per_million=Decimal(1000),
    )


async def test_a_budget_refusal_gives_back_the_rate_limits_in_the_same_admission(
    store: str, user: Any, settings: Any
) -> None:
    """All or nothing across both: a request its budget refuses keeps no request, token or stream slot."""
    rate_keys_clear(settings.REDIS_URL, user.id)
    await Budget.objects.acreate(name="cap", subject_kind="user", subject_id=user.id, limit_usd=Decimal("0.015"))
    limits = RateLimits(requests_per_minute=5, tokens_per_minute=1000, concurrent_streams=2)
    try:
        first = await metering_admit(metered(user, request_id="m1", max_completion_tokens=10, limits=limits))
        assert first.reservation is not None
        assert first.headers["x-ratelimit-remaining-requests"] == "4"
        with pytest.raises(ApplicationError) as refused:  # $0.01 held + $0.01 asked > $0.015
            await metering_admit(metered(user, request_id="m2", max_completion_tokens=10, limits=limits))
        assert (refused.value.status, refused.value.code) == (429, "insufficient_quota")
        # Had the refused request kept its slots, this one would see 3 requests and 980 tokens left,
        # and the stream limit (2) would refuse it while the first still streams.
        third = await metering_admit(metered(user, request_id="m3", max_completion_tokens=1, limits=limits))
        assert third.headers["x-ratelimit-remaining-requests"] == "3"
        assert third.headers["x-ratelimit-remaining-tokens"] == "980"
        await first.release(completion_tokens=4)
        await third.release(completion_tokens=1)
    finally:
        await rate_limit_close()
        rate_keys_clear(settings.REDIS_URL, user.id)


async def test_a_rate_limit_refusal_reserves_nothing_on_the_budget(store: str, user: Any, settings: Any) -> None:
    rate_keys_clear(settings.REDIS_URL, user.id)
    budget = await Budget.objects.acreate(name="cap", subject_kind="user", subject_id=user.id, limit_usd=Decimal(5))
    limits = RateLimits(requests_per_minute=1)
    try:
        admitted = await metering_admit(metered(user, request_id="m1", max_completion_tokens=10, limits=limits))
        with pytest.raises(ApplicationError) as refused:
            await metering_admit(metered(user, request_id="m2", max_completion_tokens=10, limits=limits))
        assert (refused.value.status, refused.value.code) == (429, "rate_limit_exceeded")
        state = counter(budget)
        assert state.reserved == to_units(Decimal("0.01001"), round_up=True)  # the first request's only
        assert state.holders == ("m1",)
        await admitted.release(completion_tokens=0)
    finally:
        await rate_limit_close()
        rate_keys_clear(settings.REDIS_URL, user.id)


async def test_budgets_fail_closed_when_rate_limits_fail_open(user: Any, settings: Any) -> None:
    """``RATE_LIMIT_FAIL_OPEN`` lets rate-limited requests through an outage, never budgeted ones."""
    await Budget.objects.acreate(name="b", subject_kind="user", subject_id=user.id, limit_usd=Decimal(5))
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.RATE_LIMIT_FAIL_OPEN = True
    budget_store_reset()
    budget_cache.clear()
    limits = RateLimits(requests_per_minute=5)
    try:
        for request_id in ("m1", "m2"):  # the second is refused without trying the store again
            with pytest.raises(ApplicationError) as refused:
                await metering_admit(metered(user, request_id=request_id, max_completion_tokens=10, limits=limits))
            assert (refused.value.status, refused.value.code) == (503, "metering_unavailable")
        other = MeteringSubject(kind="api_key", id=user.id, limits=limits)  # no budget: admitted, unlimited
        open_lease = await rate_limit_acquire(request_id="m3", subjects=(other,), prompt_tokens=1)
        assert open_lease.headers == {}
    finally:
        await rate_limit_close()
        budget_store_reset()
