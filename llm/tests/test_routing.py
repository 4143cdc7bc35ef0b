"""Routing (llm.routing): deployment order by strategy, cooldowns on both stores, failover before the first chunk.

The upstreams are the simulator over real HTTP; a deployment fails because the simulator was told
to fail its upstream model id (``PUT /_simulator/faults/{model}``), so each test uses fresh ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest
import redis.asyncio
from django.conf import settings as django_settings

from accounts.metering import MeteringSubject, RateLimits, rate_limit_acquire
from accounts.metering.ratelimits import rate_limit_close
from chatbackend.errors import ApplicationError
from llm.providers import ChatChunk, ChatRequest, ProviderConfig, UpstreamError
from llm.routing import (
    COOLDOWN_KEY_PREFIX,
    LEAST_IN_FLIGHT,
    LOWEST_LATENCY,
    WEIGHTED,
    DeploymentConfig,
    ModelRoute,
    Router,
    cooldown_store,
    cooldown_store_close,
    deployment_order,
    is_retryable,
    latency_record,
    routing_stats_reset,
)
from llm.tests.simulator_process import SimulatorProcess

REDIS_URL = django_settings.REDIS_URL


def deployment(name: str, *, weight: int = 1, priority: int = 0, base_url: str = "http://x/v1", **timeouts: float):
    return DeploymentConfig(
        id=None,
        key=f"test-{name}",
        name=name,
        provider=ProviderConfig(kind="openai", base_url=base_url, **timeouts),
        upstream_model=name,
        weight=weight,
        priority=priority,
    )


pytestmark = pytest.mark.usefixtures("provider_clients")


@pytest.fixture(autouse=True)
def _fresh_stats() -> Iterator[None]:
    routing_stats_reset()
    yield
    routing_stats_reset()


@pytest.fixture
def routed(settings) -> None:  # noqa: ANN001 - pytest-django's
    """Short cooldowns and backoffs, so the tests wait little."""
    settings.LLM_DEPLOYMENT_COOLDOWN_SECONDS = 2.0
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    settings.LLM_ROUTING_BACKOFF_MAX_SECONDS = 0.5


def fresh(label: str) -> str:
    return f"route-{label}-{secrets.token_hex(4)}"


async def collect(router: Router) -> list[ChatChunk]:
    chunks: list[ChatChunk] = []
    async for batch in router.stream():
        chunks.extend(batch)
    return chunks


def text(chunks: list[ChatChunk]) -> str:
    return "".join(chunk.content for chunk in chunks)


REQUEST = ChatRequest(model="public-name", messages=[{"role": "user", "content": "Route me"}])


def router_over(*deployments: DeploymentConfig, **options) -> Router:  # noqa: ANN003 - Router's
    """Return the router of a reply to a model served by ``deployments``."""
    return Router(route=ModelRoute(name="public-name", deployments=deployments), request=REQUEST, **options)


# --- Order ----------------------------------------------------------------------------------


def test_priority_comes_first_and_weight_sets_the_odds_of_going_first():
    rng = random.Random(7)  # noqa: S311 - a seeded test sequence
    heavy, light, backup = deployment("heavy", weight=3), deployment("light", weight=1), deployment("b", priority=1)

    firsts = Counter()
    for _ in range(4000):
        order = deployment_order([backup, light, heavy], WEIGHTED, rng=rng)
        assert order[-1] is backup
        firsts[order[0].name] += 1

    assert 0.72 < firsts["heavy"] / 4000 < 0.78  # 3 / (3 + 1)


def test_lowest_latency_prefers_the_fastest_and_tries_unmeasured_ones_first():
    slow, fast, new = deployment("slow"), deployment("fast"), deployment("new")
    latency_record(slow.key, 0.9)
    latency_record(fast.key, 0.2)
    latency_record(fast.key, 1.2)  # one slow reply moves the average only partly: 0.3*1.2 + 0.7*0.2 = 0.5

    for _ in range(20):
        assert [d.name for d in deployment_order([slow, fast, new], LOWEST_LATENCY)] == ["new", "fast", "slow"]


async def test_least_in_flight_prefers_the_deployment_with_fewer_open_requests(slow_simulator, routed):
    busy = deployment("sim-1", base_url=slow_simulator.base_url)
    idle = DeploymentConfig(id=None, key="test-idle", name="idle", provider=busy.provider, upstream_model="sim-1")
    router = router_over(busy)
    stream = router.stream()
    await anext(stream)  # a reply streaming from ``busy``

    try:
        for _ in range(20):
            assert deployment_order([busy, idle], LEAST_IN_FLIGHT)[0] is idle
    finally:
        await stream.aclose()
    assert {deployment_order([busy, idle], LEAST_IN_FLIGHT)[0].name for _ in range(200)} == {"sim-1", "idle"}


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (UpstreamError("x", upstream_status=500), True),
        (UpstreamError("x", upstream_status=503), True),
        (UpstreamError("x", upstream_status=529), True),
        (UpstreamError("x", upstream_status=429, code="upstream_rate_limited"), True),
        (UpstreamError("x", upstream_status=408), True),
        (UpstreamError("x", code="upstream_unreachable"), True),
        (UpstreamError("x", code="upstream_timeout", status=504), True),
        (UpstreamError("x", code="upstream_disconnected"), True),
        (UpstreamError("x", upstream_status=400), False),
        (UpstreamError("x", upstream_status=401, code="upstream_auth_failed"), False),
        (UpstreamError("x", upstream_status=404), False),
        (UpstreamError("x", code="upstream_bad_response"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_failures_go_to_the_next_deployment(error, retryable):
    assert is_retryable(error) is retryable


# --- Cooldown stores ------------------------------------------------------------------------


async def test_a_cooldown_is_seen_until_it_expires(store):
    key = fresh("cool")
    other = fresh("other")
    cooldowns = cooldown_store()

    await cooldowns.cool(key, 0.6)
    cooling = await cooldowns.cooling([key, other])

    assert set(cooling) == {key}
    assert 0.3 < cooling[key] <= 0.6
    await asyncio.sleep(0.8)
    assert await cooldowns.cooling([key, other]) == {}


async def test_redis_cooldowns_are_keys_with_a_ttl_every_process_reads(settings):
    if not REDIS_URL:
        pytest.skip("the Redis store needs REDIS_URL (CI sets it)")
    settings.REDIS_URL = REDIS_URL
    key = fresh("shared")
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await cooldown_store().cool(key, 5)
        ttl_ms = await client.pttl(COOLDOWN_KEY_PREFIX + key)
        await client.set(COOLDOWN_KEY_PREFIX + key, "1", px=100)  # as another process would shorten it
        cooling = await cooldown_store().cooling([key])
    finally:
        await client.aclose()
        await cooldown_store_close()
    assert 4000 < ttl_ms <= 5000
    assert 0 < cooling[key] <= 0.1


# --- Failover -------------------------------------------------------------------------------


def two_deployments(sim: SimulatorProcess, **timeouts: float) -> tuple[DeploymentConfig, DeploymentConfig]:
    """``a`` (priority 0) and ``b`` (priority 1) on ``sim``, each with a fresh upstream model id."""
    provider = ProviderConfig(kind="openai", base_url=sim.base_url, **timeouts)
    a_model, b_model = fresh("a"), fresh("b")
    a = DeploymentConfig(id=1, key=a_model, name=f"sim/{a_model}", provider=provider, upstream_model=a_model)
    b = DeploymentConfig(
        id=2, key=b_model, name=f"sim/{b_model}", provider=provider, upstream_model=b_model, priority=1
    )
    return a, b


@pytest.mark.parametrize(
    ("fault", "timeouts"),
    [("status=500", {}), ("status=429, retry-after=1", {}), ("ttft=10", {"first_token_timeout": 0.5})],
    ids=["500", "429", "no-first-chunk"],
)
async def test_a_failure_before_the_first_chunk_goes_to_the_next_deployment(simulator, store, routed, fault, timeouts):
    a, b = two_deployments(simulator, **timeouts)
    simulator.fault_set(a.upstream_model, fault)
    router = router_over(a, b)

    chunks = await collect(router)

    assert text(chunks).strip()
    assert any(chunk.finish_reason == "stop" for chunk in chunks)
    assert router.deployment is b
    assert simulator.requests_for(a.upstream_model) == 1
    assert simulator.requests_for(b.upstream_model) == 1
    cooling = await cooldown_store().cooling([a.key, b.key])
    assert set(cooling) == {a.key}

    # The next reply skips ``a`` while it cools down, even though ``a`` is the better priority.
    again = router_over(a, b)
    await collect(again)
    assert again.deployment is b
    assert simulator.requests_for(a.upstream_model) == 1


async def test_retry_after_longer_than_the_cooldown_sets_the_cooldown(simulator, store, routed):
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "status=429, retry-after=6")

    await collect(router_over(a, b))

    cooling = await cooldown_store().cooling([a.key])
    assert 4 < cooling[a.key] <= 6  # not the 2 s LLM_DEPLOYMENT_COOLDOWN_SECONDS


async def test_after_its_cooldown_a_deployment_serves_again(simulator, store, routed, settings):
    settings.LLM_DEPLOYMENT_COOLDOWN_SECONDS = 0.5
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "status=503")
    first = router_over(a, b)
    await collect(first)
    simulator.fault_clear(a.upstream_model)

    await asyncio.sleep(0.7)
    later = router_over(a, b)
    chunks = await collect(later)

    assert first.deployment is b and later.deployment is a
    assert text(chunks).strip()
    assert simulator.requests_for(a.upstream_model) == 2


async def test_a_client_error_is_not_retried_elsewhere(simulator, store, routed):
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "status=400")
    router = router_over(a, b)

    with pytest.raises(UpstreamError) as caught:
        await collect(router)

    assert caught.value.status == 400
    assert simulator.requests_for(b.upstream_model) == 0
    assert await cooldown_store().cooling([a.key]) == {}


async def test_once_a_chunk_was_passed_on_the_reply_never_switches(simulator, store, routed):
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "drop-after=2")
    router = router_over(a, b)
    chunks: list[ChatChunk] = []

    with pytest.raises(UpstreamError) as caught:
        async for batch in router.stream():
            chunks.extend(batch)

    assert caught.value.code == "upstream_disconnected"
    assert text(chunks).strip()
    assert router.deployment is a
    assert simulator.requests_for(b.upstream_model) == 0


async def test_the_last_deployments_failure_is_the_replys(simulator, store, routed):
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "status=500")
    simulator.fault_set(b.upstream_model, "status=502")

    with pytest.raises(UpstreamError) as caught:
        await collect(router_over(a, b))

    assert caught.value.upstream_status == 502
    assert set(await cooldown_store().cooling([a.key, b.key])) == {a.key, b.key}


async def test_when_every_deployment_cools_down_the_one_ending_first_is_tried(simulator, store, routed):
    a, b = two_deployments(simulator)
    await cooldown_store().cool(a.key, 30)
    await cooldown_store().cool(b.key, 0.2)

    router = router_over(a, b)
    chunks = await collect(router)

    assert router.deployment is b
    assert text(chunks).strip()
    assert simulator.requests_for(a.upstream_model) == 0


async def test_one_deployment_gets_a_504_when_its_first_chunk_is_late(simulator, store, routed):
    a, _ = two_deployments(simulator, first_token_timeout=0.3)
    simulator.fault_set(a.upstream_model, "ttft=10")

    with pytest.raises(UpstreamError) as caught:
        await collect(router_over(a))

    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")
    await asyncio.sleep(0.3)
    assert (await simulator.astats())["active_streams"] == 0  # the late request was closed


async def test_an_unreachable_cooldown_store_is_ignored_not_fatal(simulator, routed, settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    settings.REDIS_SOCKET_TIMEOUT_SECONDS = 0.5
    a, b = two_deployments(simulator)
    simulator.fault_set(a.upstream_model, "status=500")
    try:
        router = router_over(a, b)
        chunks = await collect(router)
    finally:
        await cooldown_store_close()

    assert router.deployment is b
    assert text(chunks).strip()


# --- Fallback models ------------------------------------------------------------------------


def model_route(sim: SimulatorProcess, label: str, *, window: int = 8192) -> ModelRoute:
    upstream = fresh(label)
    provider = ProviderConfig(kind="openai", base_url=sim.base_url)
    only = DeploymentConfig(id=None, key=upstream, name=f"sim/{upstream}", provider=provider, upstream_model=upstream)
    return ModelRoute(name=label, deployments=(only,), context_window=window)


async def test_fallback_models_are_tried_in_order_once_every_deployment_failed(simulator, store, routed):
    a, b = two_deployments(simulator)
    first, second = model_route(simulator, "fallback-1"), model_route(simulator, "fallback-2")
    for upstream in (a.upstream_model, b.upstream_model, first.deployments[0].upstream_model):
        simulator.fault_set(upstream, "status=503")
    router = router_over(a, b, fallbacks=[first, second])

    chunks = await collect(router)

    assert text(chunks).strip()
    assert router.serving is second
    assert router.deployment is second.deployments[0]
    for upstream in (a.upstream_model, b.upstream_model, first.deployments[0].upstream_model):
        assert simulator.requests_for(upstream) == 1


async def test_a_client_error_does_not_fall_back(simulator, store, routed):
    main, fallback = model_route(simulator, "main"), model_route(simulator, "fallback")
    simulator.fault_set(main.deployments[0].upstream_model, "status=422")
    router = Router(route=main, fallbacks=[fallback], request=REQUEST)

    with pytest.raises(UpstreamError):
        await collect(router)
    assert simulator.requests_for(fallback.deployments[0].upstream_model) == 0


async def test_a_prompt_longer_than_the_window_goes_to_the_first_fallback_that_holds_it(simulator, store, routed):
    main = model_route(simulator, "small-main", window=4096)
    tiny, large = model_route(simulator, "tiny", window=2048), model_route(simulator, "large", window=128_000)
    router = Router(route=main, fallbacks=[tiny, large], request=REQUEST, prompt_tokens=5000)

    chunks = await collect(router)

    assert text(chunks).strip()
    assert router.serving is large
    assert simulator.requests_for(main.deployments[0].upstream_model) == 0
    assert simulator.requests_for(tiny.deployments[0].upstream_model) == 0


async def test_a_prompt_no_model_holds_goes_to_the_model_itself(simulator, store, routed):
    main, tiny = model_route(simulator, "main", window=4096), model_route(simulator, "tiny", window=2048)
    router = Router(route=main, fallbacks=[tiny], request=REQUEST, prompt_tokens=5000)

    await collect(router)

    assert router.serving is main


# --- A deployment's own rate limits ---------------------------------------------------------


def limited(deployment_config: DeploymentConfig, **limits: int) -> DeploymentConfig:
    """``deployment_config`` with rate limits of its own, under a row id no other run shares."""
    return dataclasses.replace(deployment_config, id=secrets.randbelow(10**12) + 10**12, limits=RateLimits(**limits))


async def test_a_deployment_over_its_own_rate_limit_is_passed_over_without_cooling_down(simulator, store, routed):
    a, b = two_deployments(simulator)
    a = limited(a, requests_per_minute=1)
    try:
        first = router_over(a, b)
        await collect(first)
        await first.release(completion_tokens=5)
        second = router_over(a, b)
        await collect(second)
        await second.release(completion_tokens=5)
    finally:
        await rate_limit_close()

    assert (first.deployment, second.deployment) == (a, b)
    assert simulator.requests_for(a.upstream_model) == 1  # the second never reached it
    assert await cooldown_store().cooling([a.key]) == {}  # over its quota is not failing


async def test_a_reply_whose_every_deployment_is_over_its_limit_gets_a_429(simulator, store, routed):
    a, _ = two_deployments(simulator)
    a = limited(a, tokens_per_minute=5)
    router = router_over(a, prompt_tokens=6)
    try:
        with pytest.raises(ApplicationError) as refused:
            await collect(router)
    finally:
        await rate_limit_close()

    assert (refused.value.status, refused.value.code) == (429, "rate_limit_exceeded")
    assert "deployment" in refused.value.message
    assert simulator.requests_for(a.upstream_model) == 0


def limited_model(route: ModelRoute, **limits: int) -> ModelRoute:
    """``route`` with rate limits of its own as a model, under a row id no other run shares."""
    subject = MeteringSubject("model", secrets.randbelow(10**12) + 10**12, RateLimits(**limits))
    return dataclasses.replace(route, subject=subject)


async def test_a_fallback_over_its_own_rate_limit_is_passed_over_for_the_next(simulator, store, routed):
    main = model_route(simulator, "main")
    first, second = (
        limited_model(model_route(simulator, "fallback-1"), requests_per_minute=1),
        model_route(simulator, "fallback-2"),
    )
    simulator.fault_set(main.deployments[0].upstream_model, "status=503")
    try:
        served = []
        for _ in range(2):
            router = Router(route=main, fallbacks=[first, second], request=REQUEST, reply_id=fresh("reply"))
            await collect(router)
            await router.release(completion_tokens=5)
            served.append(router.serving)
    finally:
        await rate_limit_close()

    assert served == [first, second]  # the first fallback's one request a minute was the first reply's
    assert simulator.requests_for(first.deployments[0].upstream_model) == 1


async def test_a_fallback_over_its_limit_leaves_the_upstream_failure_as_the_replys(simulator, store, routed):
    main = model_route(simulator, "main")
    only = limited_model(model_route(simulator, "fallback"), tokens_per_minute=5)
    simulator.fault_set(main.deployments[0].upstream_model, "status=503")
    router = Router(route=main, fallbacks=[only], request=REQUEST, prompt_tokens=6)
    try:
        with pytest.raises(UpstreamError) as failed:
            await collect(router)
    finally:
        await rate_limit_close()

    assert failed.value.upstream_status == 503  # not the fallback's quota: the reply's own failure
    assert simulator.requests_for(only.deployments[0].upstream_model) == 0


async def test_a_fallback_that_failed_gives_its_rate_limit_lease_back_at_once(simulator, store, routed):
    main = model_route(simulator, "main")
    first = limited_model(model_route(simulator, "fallback-1"), concurrent_streams=1)
    second = model_route(simulator, "fallback-2")
    for route in (main, first):
        simulator.fault_set(route.deployments[0].upstream_model, "status=503")
    try:
        router = Router(route=main, fallbacks=[first, second], request=REQUEST, reply_id=fresh("reply"))
        stream = router.stream()
        await anext(stream)  # served by the second fallback, still streaming
        assert router.serving is second
        # The first fallback's only stream slot is free again: another reply may take it.
        assert first.subject is not None
        other = await rate_limit_acquire(request_id=fresh("other"), subjects=(first.subject,), prompt_tokens=0)
        await other.release(completion_tokens=0)
        await stream.aclose()
        await router.release(completion_tokens=1)
    finally:
        await rate_limit_close()
