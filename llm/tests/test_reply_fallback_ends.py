"""However a reply served (or being served) by a fallback ends, its upstream is closed once and the
fallback's own rate-limit lease is given back: stops and closes during the first-chunk wait, with and
without keep-alives, and a shutdown that writes the end from another task while the reply still waits.

``main``'s one deployment answers 500 (a simulator fault on a fresh upstream id); ``backup`` has one
concurrent stream of its own (``ModelRoute.subject``) and, on the sleepy simulator, sends its first
chunk only after seconds. The in-flight counts are ``llm.routing``'s (one per open upstream request).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from accounts.metering import MeteringSubject, RateLimits, rate_limit_acquire
from accounts.metering.ratelimits import rate_limit_close
from chatbackend.errors import ApplicationError
from llm import routing
from llm.providers import ProviderConfig
from llm.routing import DeploymentConfig, ModelRoute
from llm.streaming import ReplyDone, ReplyEvent, ReplyStatus, open_reply, replies_accepting, replies_shutdown
from llm.tests.simulator_process import SimulatorProcess
from llm.tests.test_streaming import RecordingPlan, plan_for
from tests.kit import poll_until

pytestmark = pytest.mark.usefixtures("provider_clients")


def route_on(sim: SimulatorProcess, label: str, *, one_stream: bool = False) -> ModelRoute:
    upstream = f"ends-{label}-{secrets.token_hex(4)}"
    provider = ProviderConfig(kind="openai", base_url=sim.base_url, read_timeout=30)
    only = DeploymentConfig(id=None, key=upstream, name=upstream, provider=provider, upstream_model=upstream)
    subject = (
        MeteringSubject("model", secrets.randbelow(10**12) + 10**12, RateLimits(concurrent_streams=1))
        if one_stream
        else None
    )
    return ModelRoute(name=label, deployments=(only,), subject=subject)


@pytest.fixture(autouse=True)
async def _fast_routing(settings: Any) -> Any:
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    settings.LLM_ROUTING_BACKOFF_MAX_SECONDS = 0.05
    yield
    await rate_limit_close()


async def stream_slot_free(subject: MeteringSubject | None) -> bool:
    """Return whether another reply could take ``subject``'s one concurrent stream now."""
    assert subject is not None
    try:
        lease = await rate_limit_acquire(
            request_id=f"other-{secrets.token_hex(4)}", subjects=(subject,), prompt_tokens=0
        )
    except ApplicationError:
        return False
    await lease.release(completion_tokens=0)
    return True


def falling_back(main_sim: SimulatorProcess, backup_sim: SimulatorProcess) -> tuple[RecordingPlan, ModelRoute]:
    main, backup = route_on(main_sim, "main"), route_on(backup_sim, "backup", one_stream=True)
    main_sim.fault_set(main.deployments[0].upstream_model, "status=500")
    plan = plan_for(main_sim)
    plan.route, plan.fallbacks = main, (backup,)
    return plan, backup


async def test_a_reply_a_limited_fallback_served_frees_its_stream_and_request(simulator):
    plan, backup = falling_back(simulator, simulator)
    async with open_reply(plan) as reply:
        async for _ in reply.events():
            pass

    assert reply.outcome is not None and reply.outcome.status is ReplyStatus.COMPLETED
    assert reply.outcome.model_name == "backup"
    assert routing._in_flight[backup.deployments[0].key] == 0
    assert await stream_slot_free(backup.subject)


@pytest.mark.parametrize("keepalive", [None, 0.05])
async def test_a_stop_while_the_fallback_is_awaited_closes_it_and_frees_its_stream(
    simulator, sleepy_simulator, keepalive
):
    plan, backup = falling_back(simulator, sleepy_simulator)
    key = backup.deployments[0].key
    reply = await open_reply(plan)

    async def consume() -> None:
        async with reply:
            async for _ in reply.events(keepalive=keepalive):
                pass

    task = asyncio.create_task(consume())
    await poll_until(lambda: routing._in_flight.get(key, 0), lambda n: n == 1, what="the fallback's request")
    assert not await stream_slot_free(backup.subject)  # the reply holds it
    reply.stop()
    await task

    assert reply.outcome is not None and reply.outcome.status is ReplyStatus.CANCELLED
    assert routing._in_flight[key] == 0
    assert await stream_slot_free(backup.subject)
    assert plan.finished == [reply.outcome]


async def test_a_reply_closed_after_its_first_chunk_wait_closes_the_fallback(simulator, sleepy_simulator):
    plan, backup = falling_back(simulator, sleepy_simulator)
    reply = await open_reply(plan, wait_first_chunk=0.3)
    assert routing._in_flight[backup.deployments[0].key] == 1

    await reply.aclose()

    assert routing._in_flight[backup.deployments[0].key] == 0
    assert await stream_slot_free(backup.subject)


@pytest.mark.parametrize("keepalive", [None, 0.05])
async def test_a_shutdown_while_the_fallback_is_awaited_closes_it_and_ends_the_events(
    simulator, sleepy_simulator, keepalive
):
    """``replies_shutdown`` writes the end from its own task; the reply's task, still waiting for the
    first chunk, must end its events with ``ReplyDone`` (not a stray ``CancelledError``) and close
    the upstream it opened, whenever that answers."""
    plan, backup = falling_back(simulator, sleepy_simulator)
    key = backup.deployments[0].key
    reply = await open_reply(plan)
    events: list[ReplyEvent] = []

    async def consume() -> None:
        async with reply:
            async for event in reply.events(keepalive=keepalive):
                events.append(event)

    task = asyncio.create_task(consume())
    try:
        await poll_until(lambda: routing._in_flight.get(key, 0), lambda n: n == 1, what="the fallback's request")
        await replies_shutdown(wait_seconds=2)
        await asyncio.wait_for(task, 15)
    finally:
        replies_accepting(True)

    assert reply.outcome is not None and reply.outcome.status is ReplyStatus.CANCELLED
    assert reply.outcome.error is not None and reply.outcome.error.code == "server_shutdown"
    assert type(events[-1]) is ReplyDone and events[-1].outcome is reply.outcome
    assert routing._in_flight[key] == 0
    assert await stream_slot_free(backup.subject)
    assert plan.finished == [reply.outcome]
