"""Budgets end to end: two server processes, a real Celery worker, Redis and PostgreSQL (issue 8, acceptance).

- 100 concurrent streamed ``/v1`` requests, half to each server, against a user budget worth one
  request's maximum cost: the settled spend stays within budget plus one request's maximum cost,
  every refusal is a 429 ``insufficient_quota`` JSON answer before any stream, and the budget's
  counter equals the sum of its usage rows.
- The Celery worker SIGKILLed while settlement tasks are queued, then started again: each usage row
  exists once and every budget's counter is exact.
- A server SIGKILLed mid-reply: reconciliation releases its reservation, and counts the usage row
  the engine's crash recovery writes for the reply.
- A server whose Redis does not answer: a budgeted request gets 503 ``metering_unavailable``.
- A caller far from every limit, admitted locally on both processes: Redis still holds every
  request, reservation and release exactly.

Needs ``REDIS_URL`` (the worker and the shared counters); skipped on the embedded defaults.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
from celery.exceptions import AlwaysEagerIgnored
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone
from limits.storage import RedisStorage as LimitsRedisStorage

from accounts.metering.budget_store import budget_store, to_units
from accounts.metering.budgets import (
    budget_counter_key,
    budget_counter_repair,
    budget_period,
    budget_reconcile,
    budget_release_stale,
)
from accounts.metering.ratelimit_store import KEY_PREFIX, WINDOW_SECONDS
from accounts.models import APIKey, Budget, UsageRecord, User
from accounts.services import api_key_create
from chatbackend.celery import app as celery_app
from chatbackend.liveness import process_alive
from conversations.models import Message
from llm.models import Provider
from tests.conftest import E2EStack, E2EUser
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import (
    CHAT_URL,
    E2E_REPLY_TOKENS,
    assert_error,
    bearer,
    chat_body,
    conversation_sse,
    poll_until_sync,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PRICED_MODEL = "budget-model"
MAX_TOKENS = 50  # > E2E_REPLY_TOKENS: every reply completes, and costs less than its maximum
OUTPUT_PRICE = Decimal("1000")  # US dollars per million output tokens; input is free
MAX_COST = MAX_TOKENS * OUTPUT_PRICE / 1_000_000  # $0.05: what each request reserves


@pytest.fixture
def priced_model(e2e_stack: E2EStack, e2e_models: Any) -> Any:
    """A model on the stack's simulator whose maximum cost per request is exactly ``MAX_COST``."""
    if not e2e_stack.shares_state:
        pytest.skip("budgets across processes need REDIS_URL (a shared store and a Celery worker)")
    return LLMModelFactory(
        name=PRICED_MODEL,
        provider=Provider.objects.get(name="simulator"),
        upstream_model="sim-1",
        input_price_per_million="0",
        output_price_per_million=str(OUTPUT_PRICE),
    )


def budget_body() -> dict[str, Any]:
    return chat_body(PRICED_MODEL, "Count to forty", stream=True, max_tokens=MAX_TOKENS)


async def stream_many(urls: list[str], api_key: str, *, waves: int = 1, gap: float = 0.0) -> list[tuple[int, str, str]]:
    """Send one request per URL in ``urls`` at once (``waves`` groups ``gap`` seconds apart); return the answers."""
    limits = httpx.Limits(max_connections=len(urls))
    async with httpx.AsyncClient(timeout=60, trust_env=False, limits=limits) as client:
        per_wave = -(-len(urls) // waves)
        tasks = []
        for start in range(0, len(urls), per_wave):
            tasks += [
                asyncio.create_task(stream_one_at(client, url, api_key)) for url in urls[start : start + per_wave]
            ]
            await asyncio.sleep(gap)
        return list(await asyncio.gather(*tasks))


async def stream_one_at(client: httpx.AsyncClient, base_url: str, api_key: str) -> tuple[int, str, str]:
    """POST one streamed chat completion to ``base_url``; return (status, content type, body read to its end)."""
    async with client.stream("POST", f"{base_url}{CHAT_URL}", json=budget_body(), headers=bearer(api_key)) as response:
        body = (await response.aread()).decode()
        return response.status_code, response.headers.get("content-type", ""), body


def counter_of(budget: Budget) -> Any:
    return budget_store().counter(budget_counter_key(budget, budget_period(budget.period, timezone.now())))


def rows_spend(**subject: Any) -> Decimal:
    return UsageRecord.objects.filter(**subject).aggregate(total=Sum("cost"))["total"] or Decimal(0)


def wait_accounted(stack: E2EStack, expected_rows: int, within: float = 60.0, **subject: Any) -> None:
    """Wait until ``expected_rows`` usage rows of the subject exist and the worker has settled everything."""
    poll_until_sync(
        lambda: UsageRecord.objects.filter(**subject).count(),
        lambda count: count >= expected_rows,
        within=within,
        what=f"{expected_rows} usage rows",
    )
    poll_until_sync(stack.accounting_idle, within=within, what="the worker to finish its tasks")
    poll_until_sync(budget_store().reservations, lambda held: held == [], within=within, what="no reservation held")


def test_concurrent_requests_across_processes_stay_within_the_budget(
    e2e_stack: E2EStack, priced_model: Any, e2e_user: E2EUser
) -> None:
    user = User.objects.get(username=e2e_user.username)
    budget = Budget.objects.create(name="one request", subject_kind="user", subject_id=user.id, limit_usd=MAX_COST)
    urls = [e2e_stack.server_urls[n % 2] for n in range(100)]

    answers = asyncio.run(stream_many(urls, e2e_user.api_key))

    served = [body for status, _, body in answers if status == 200]
    refused = [(status, kind, body) for status, kind, body in answers if status != 200]
    # The first admitted request holds the whole budget while it streams; once settled (0.04 of
    # 0.05 spent) no request's maximum cost fits: one is served, whichever process it reached.
    assert len(served) == 1, (len(served), [a[:2] for a in answers])
    for body in served:
        assert body.rstrip().endswith("data: [DONE]"), body[-300:]
    for status, kind, body in refused:
        # Refused before any stream: a JSON error with a status code, not an SSE error event.
        assert (status, kind) == (429, "application/json"), (status, kind, body[:300])
        response = httpx.Response(status, headers={"Content-Type": kind}, content=body.encode())
        error = assert_error(response, 429, code="insufficient_quota", type="insufficient_quota")
        assert "'one request'" in error["message"] and "resets" in error["message"], error
    wait_accounted(e2e_stack, len(answers), user=user)

    settled = rows_spend(user=user)
    assert settled <= budget.limit_usd + MAX_COST, (settled, len(served))
    assert UsageRecord.objects.filter(user=user).exclude(finish_status="refused").count() == len(served)
    assert UsageRecord.objects.filter(user=user, finish_status="refused").count() == len(refused)
    state = counter_of(budget)
    assert (state.spent, state.reserved, state.holders) == (to_units(settled), 0, ())
    assert not budget_counter_repair(budget), "reconciliation found drift"


def _kill_while_settlement_is_queued(stack: E2EStack, send: Callable[[], list[tuple[int, str, str]]]) -> int:
    """Freeze the worker, ``send`` requests, let it take tasks, SIGKILL it; return the tasks it held unacked.

    While frozen (SIGSTOP) the worker takes nothing: the settlement tasks of the replies queue in
    the broker. Let go (SIGCONT), it moves the first ones into the broker's ``unacked`` set (late
    acks) and runs them one at a time; it is killed as soon as it holds one.
    """
    worker = stack.worker()
    with redis.Redis.from_url(settings.CELERY_BROKER_URL) as broker:
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            answers = send()
            assert all(status == 200 for status, _, _ in answers), [a[:2] for a in answers if a[0] != 200]
            poll_until_sync(lambda: broker.llen("celery"), lambda n: n >= 2, within=20, what="queued usage tasks")
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
        held = poll_until_sync(lambda: broker.hlen("unacked"), within=20, interval=0.001, what="a task taken")
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        return held


def test_settlement_is_exact_after_the_worker_is_sigkilled(
    e2e_stack: E2EStack, priced_model: Any, e2e_user: E2EUser
) -> None:
    user = User.objects.get(username=e2e_user.username)
    key = APIKey.objects.get(user=user)
    on_user = Budget.objects.create(name="user", subject_kind="user", subject_id=user.id, limit_usd=Decimal(100))
    on_key = Budget.objects.create(
        name="key", subject_kind="api_key", subject_id=key.id, limit_usd=Decimal(50), token_limit=10**6
    )
    urls = [e2e_stack.server_urls[n % 2] for n in range(24)]
    visibility = 2
    # Eight waves 0.3 s apart end 0.3 s apart too: each server publishes several task batches.
    held = _kill_while_settlement_is_queued(
        e2e_stack, lambda: asyncio.run(stream_many(urls, e2e_user.api_key, waves=8, gap=0.3))
    )
    assert held >= 1
    unsettled = len(budget_store().reservations())
    assert unsettled > 0, "every reservation was settled before the kill: nothing left to redeliver"

    # The broker hands a dead worker's unacknowledged tasks to another once they are older than the
    # visibility timeout; the new worker looks for them as it starts.
    time.sleep(visibility + 1)
    e2e_stack.worker_replace(env={"CELERY_VISIBILITY_TIMEOUT_SECONDS": str(visibility)})
    wait_accounted(e2e_stack, len(urls), user=user)

    rows = UsageRecord.objects.filter(user=user)
    assert rows.count() == len(urls)
    assert rows.values("request_id").distinct().count() == len(urls)
    assert set(rows.values_list("completion_tokens", flat=True)) == {E2E_REPLY_TOKENS}
    for budget, subject in ((on_user, {"user": user}), (on_key, {"api_key": key})):
        state = counter_of(budget)
        expected_tokens = sum(r.prompt_tokens + r.completion_tokens for r in UsageRecord.objects.filter(**subject))
        assert (state.spent, state.reserved, state.reserved_tokens, state.holders) == (
            to_units(rows_spend(**subject)),
            0,
            0,
            (),
        ), budget.name
        assert state.spent_tokens == expected_tokens, budget.name
        assert not budget_counter_repair(budget), f"reconciliation found drift on {budget.name}"


def _stream_sse(url: str, conversation_id: int, api_key: str) -> None:
    """Stream one conversation reply over SSE until the server dies under it."""
    try:
        with (
            httpx.Client(base_url=url, timeout=60, trust_env=False) as client,
            conversation_sse(client, conversation_id, api_key) as source,
        ):
            for _ in source.iter_sse():
                pass
    except httpx.HTTPError:
        pass


def test_reconciliation_releases_a_dead_servers_reservation_and_counts_its_recovered_reply(
    e2e_stack: E2EStack, priced_model: Any, e2e_user: E2EUser, slow_simulator: Any, start_server: Callable[..., Any]
) -> None:
    owner = User.objects.get(username=e2e_user.username)
    budget = Budget.objects.create(name="roomy", subject_kind="user", subject_id=owner.id, limit_usd=Decimal(100))
    provider = ProviderFactory(base_url=slow_simulator.base_url, api_key="", read_timeout=30)
    model = LLMModelFactory(
        provider=provider, upstream_model="sim-1", input_price_per_million="1", output_price_per_million="1000"
    )
    conversation = ConversationFactory(owner=owner, model=model)
    doomed, doomed_url = start_server(env={"REPLY_CHECKPOINT_SECONDS": "0.5", "PROCESS_HEARTBEAT_SECONDS": "0.5"})
    streaming = threading.Thread(target=_stream_sse, args=(doomed_url, conversation.pk, e2e_user.api_key))
    streaming.start()

    def reply() -> Message | None:
        return Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).first()

    poll_until_sync(reply, lambda m: m is not None and len(m.content.split()) >= 5, what="a checkpointed reply")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    streaming.join(10)
    message = reply()
    assert message is not None and message.status == Message.Status.STREAMING
    [(request_id, pid, _)] = budget_store().reservations()
    assert pid == message.stream_owner
    assert counter_of(budget).reserved > 0
    poll_until_sync(lambda: process_alive(pid), lambda alive: not alive, within=10, what="the heartbeat to lapse")

    # Reconciliation first (the worst order): the reservation is released, nothing is spent yet.
    assert budget_release_stale() == 1
    state = counter_of(budget)
    assert (state.reserved, state.holders, budget_store().reservations()) == (0, (), [])
    # The crash recovery (a beat task, here sent by hand) bills the reply: a row no reservation covers.
    with warnings.catch_warnings():  # through the broker to the real worker, on purpose
        warnings.simplefilter("ignore", AlwaysEagerIgnored)
        celery_app.send_task("conversations.reply_recover_orphans", kwargs={"orphan_after_seconds": 0.5})
    [row] = poll_until_sync(lambda: list(UsageRecord.objects.filter(message=message)), lambda rows: len(rows) == 1)
    assert row.request_id == request_id and row.cost > 0
    poll_until_sync(e2e_stack.accounting_idle, within=30, what="the worker to finish its tasks")
    assert counter_of(budget).spent == 0  # settlement found no reservation: the counter lags the rows

    result = budget_reconcile()
    assert result.repaired == 1
    state = counter_of(budget)
    assert (state.spent, state.reserved) == (to_units(rows_spend(user=owner)), 0)
    assert state.spent == to_units(row.cost)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_redis_unreachable_fails_budgeted_requests_closed(
    e2e_stack: E2EStack, priced_model: Any, e2e_user: E2EUser, start_server: Callable[..., Any]
) -> None:
    user = User.objects.get(username=e2e_user.username)
    Budget.objects.create(name="capped", subject_kind="user", subject_id=user.id, limit_usd=Decimal(100))
    dead = f"redis://127.0.0.1:{_closed_port()}/0"
    # Rate limits may fail open by setting; budgets never do.
    env = {"REDIS_URL": dead, "CELERY_BROKER_URL": dead, "RATE_LIMIT_FAIL_OPEN": "true"}
    _, url = start_server(env={**env, "REDIS_SOCKET_TIMEOUT_SECONDS": "1"})
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        response = client.post(CHAT_URL, json=budget_body(), headers=bearer(e2e_user.api_key))
    error = assert_error(response, 503, code="metering_unavailable")
    assert "try again" in error["message"]
    assert "127.0.0.1" not in error["message"]


def test_far_from_every_limit_local_admissions_are_recorded_and_settled_exactly(
    e2e_stack: E2EStack, priced_model: Any
) -> None:
    """A key and a user far from their rate limits and budget, on both processes: after the first
    answers each process admits them without waiting for Redis (local admission,
    ``accounts.metering.headroom``), and Redis still ends up holding every request exactly: each one
    counted once, every stream lease given back, every reservation made and settled, the budget's
    spend the sum of its usage rows."""
    created = api_key_create(user=UserFactory(), name="roomy")
    limits = {"requests_per_minute": 100_000, "tokens_per_minute": 10**9, "concurrent_streams": 10_000}
    APIKey.objects.filter(pk=created.api_key.pk).update(**limits)
    streams_key = f"{KEY_PREFIX}:streams:api_key:{created.api_key.pk}"
    with redis.Redis.from_url(settings.REDIS_URL) as client:  # an earlier run's key of the same id
        client.delete(streams_key, *client.scan_iter(f"{KEY_PREFIX}:{{*:api_key:{created.api_key.pk}}}*"))
    user = created.api_key.user
    budget = Budget.objects.create(name="roomy", subject_kind="user", subject_id=user.id, limit_usd=Decimal(100))
    count = 60

    urls = [e2e_stack.server_urls[i % 2] for i in range(count)]
    answers = asyncio.run(stream_many(urls, created.secret, waves=6, gap=0.5))

    assert [status for status, _, _ in answers] == [200] * count, [body[:200] for _, _, body in answers]
    wait_accounted(e2e_stack, count, user=user)
    counter = counter_of(budget)
    assert (counter.reserved, counter.holders) == (0, ())
    assert counter.spent == to_units(rows_spend(user=user)) > 0
    window = LimitsRedisStorage(settings.REDIS_URL, key_prefix=KEY_PREFIX).get_sliding_window(
        f"requests:api_key:{created.api_key.pk}", WINDOW_SECONDS
    )
    assert window[0] + window[2] == count  # the previous and the current minute: every request once
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        poll_until_sync(lambda: client.zcard(streams_key), lambda held: held == 0, what="every stream lease given back")
