"""Routing: which deployment serves a reply, and failing over before its first chunk.

A public model is served by one or more deployments (``llm.models.Deployment``: a provider and the
model id it knows; a model without any is its own one deployment). The streaming engine asks a
``Router`` for a reply's upstream; the router

1. orders the deployments: lowest ``priority`` first, and within a priority by the model's
   strategy (``deployment_order``): ``weighted`` random by ``weight``, ``least_in_flight`` (requests
   this server process has open to each), ``lowest_latency`` (an exponentially weighted moving
   average of the time to first chunk this process measured; unmeasured deployments first);
2. skips the deployments cooling down (``CooldownStore``: one round trip to Redis for all of them,
   none for a model with one deployment); when every one is cooling down, it tries the one whose
   cooldown ends first rather than failing; and a deployment with rate limits of its own that is
   over one (``Router._lease``, the same store as every rate limit: no cooldown, its quota frees);
3. opens the first and waits for its first chunk. A retryable failure before it (``is_retryable``:
   429, 5xx, 408, unreachable, timed out or disconnected, or no chunk within the provider's
   ``first_token_timeout``) puts the deployment in cooldown for ``LLM_DEPLOYMENT_COOLDOWN_SECONDS``
   (the upstream's ``Retry-After`` when longer) and, after a backoff, opens the next one. Any other
   failure (400, 401, ...) propagates at once. Once a chunk has been passed on, the reply never
   switches: a later failure is the reply's;
4. when every deployment of the model failed so, tries its **fallbacks** (``LLMModel.fallbacks``:
   other models, in order) the same way; the last failure is the reply's. A prompt longer than the
   model's context window goes straight to the first fallback whose window holds it.

Backoff before the next attempt: ``LLM_ROUTING_BACKOFF_SECONDS`` doubled per attempt; when the next
deployment is on the same provider as the one that failed, at least the ``Retry-After`` that one
asked for (the provider's limit is likely shared), and for a deployment tried while cooling down,
what is left of its cooldown; at most ``LLM_ROUTING_BACKOFF_MAX_SECONDS`` in every case.

Cooldowns live in Redis when ``REDIS_URL`` is set (a key with a TTL per deployment, shared by
every server process); without it in this process's memory (right for the single process the
embedded defaults run). An unreachable Redis is logged and the deployments are routed as if none
were cooling: routing never fails a request for it. In-flight counts and latencies are per process.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import random
import time
import weakref
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import redis.exceptions
from django.conf import settings

from accounts.metering import MeteringSubject, RateLease, RateLimits, rate_limit_acquire
from chatbackend.errors import ApplicationError
from chatbackend.redis_clients import async_redis_client

from .providers import ChatChunk, ChatRequest, ProviderConfig, UpstreamError, get_provider
from .providers.base import UPSTREAM_MESSAGES

logger = logging.getLogger(__name__)

__all__ = [
    "COOLDOWN_KEY_PREFIX",
    "DeploymentConfig",
    "ModelRoute",
    "Router",
    "deployment_order",
    "cooldown_store",
    "cooldown_store_close",
    "is_retryable",
]

WEIGHTED = "weighted"
LEAST_IN_FLIGHT = "least_in_flight"
LOWEST_LATENCY = "lowest_latency"
# Weight of the newest time to first chunk in its moving average.
LATENCY_EWMA_ALPHA = 0.3
COOLDOWN_KEY_PREFIX = "chatbackend-cooldown:"
# Failures without an upstream status worth another deployment: the request never got an answer.
RETRYABLE_CODES = frozenset(("upstream_unreachable", "upstream_timeout", "upstream_disconnected"))
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """An immutable snapshot of one deployment (``llm.models.Deployment``), safe to share between replies.

    ``id``: its row (None: the model's own provider, for a model without deployments); ``key``:
    its cooldown and statistics key; ``name``: ``<provider name>/<upstream model>``, what logs and
    usage rows show; ``weight`` (>= 1) and ``priority`` (lower first); ``limits``: its own rate limits.
    """

    id: int | None
    key: str
    name: str
    provider: ProviderConfig
    upstream_model: str
    weight: int = 1
    priority: int = 0
    limits: RateLimits = dataclasses.field(default_factory=RateLimits)

    @property
    def subject(self) -> MeteringSubject | None:
        """Return what its own rate limits are metered as (None: a model's own provider, no row)."""
        return None if self.id is None else MeteringSubject("deployment", self.id, self.limits)


def is_retryable(error: BaseException) -> bool:
    """Return whether another deployment may succeed where this failure happened before the first chunk.

    Retryable: an upstream 408, 429 or 5xx (``UpstreamError.upstream_status``), and an upstream that
    was unreachable, timed out or dropped the connection (``RETRYABLE_CODES``). Not: the client's
    request refused (400, 404, 413, 422), our credentials refused (401, 403), a response we could
    not read, and anything that is not an ``UpstreamError``.
    """
    if not isinstance(error, UpstreamError):
        return False
    status = error.upstream_status
    if status is not None:
        return status in (408, 429) or status >= 500
    return error.code in RETRYABLE_CODES


# --- Strategies (per process) ---------------------------------------------------------------

# Load spreading, not security: a seeded PRNG is what it needs.
_rng = random.Random()  # noqa: S311
_in_flight: dict[str, int] = {}
_latency_ewma: dict[str, float] = {}


def latency_record(key: str, seconds: float) -> None:
    """Fold a time to first chunk (seconds) of deployment ``key`` into its moving average."""
    previous = _latency_ewma.get(key)
    _latency_ewma[key] = (
        seconds if previous is None else LATENCY_EWMA_ALPHA * seconds + (1 - LATENCY_EWMA_ALPHA) * previous
    )


def routing_stats_reset() -> None:
    """Forget this process's in-flight counts and latencies (tests)."""
    _in_flight.clear()
    _latency_ewma.clear()


def deployment_order(
    deployments: Iterable[DeploymentConfig], strategy: str, *, rng: random.Random | None = None
) -> list[DeploymentConfig]:
    """Return ``deployments`` in the order to try them: by ``priority``, then by ``strategy`` within one.

    ``weighted``: a weighted random order, each deployment ahead with odds proportional to its
    ``weight`` (Efraimidis and Spirakis' sampling without replacement: sort by ``u ** (1 / weight)``,
    u uniform in [0, 1), descending; https://doi.org/10.1016/j.ipl.2005.11.003). ``least_in_flight``:
    fewest requests this process has open to it first; ``lowest_latency``: lowest moving average of
    its time to first chunk first, unmeasured ones before all; ties of both in weighted random order.
    An unknown strategy is ``weighted``.
    """
    rng = rng or _rng
    ordered: list[DeploymentConfig] = []
    for _, group in groupby(sorted(deployments, key=lambda d: d.priority), key=lambda d: d.priority):
        members = list(group)
        lottery = {d.key: rng.random() ** (1.0 / d.weight) for d in members}
        members.sort(key=lambda d: -lottery[d.key])
        if strategy == LEAST_IN_FLIGHT:
            members.sort(key=lambda d: _in_flight.get(d.key, 0))  # stable: ties keep the lottery's order
        elif strategy == LOWEST_LATENCY:
            members.sort(key=lambda d: _latency_ewma.get(d.key, 0.0))
        ordered.extend(members)
    return ordered


# --- Cooldowns ------------------------------------------------------------------------------


class CooldownStore(abc.ABC):
    """Which deployments are cooling down, by key, and for how many more seconds."""

    @abc.abstractmethod
    async def cooling(self, keys: Sequence[str]) -> dict[str, float]:
        """Return ``{key: seconds left}`` for those of ``keys`` cooling down. Raises ``UNREACHABLE_ERRORS``."""

    @abc.abstractmethod
    async def cool(self, key: str, seconds: float) -> None:
        """Put deployment ``key`` in cooldown for ``seconds`` (> 0). Raises ``UNREACHABLE_ERRORS``."""

    async def close(self) -> None:  # noqa: B027 - optional: a store without connections has nothing to close
        """Release the store's connections."""


class MemoryCooldownStore(CooldownStore):
    """Cooldowns in this process's memory: right for one server process (the embedded defaults)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}  # key -> time.monotonic() when its cooldown ends

    async def cooling(self, keys: Sequence[str]) -> dict[str, float]:
        now = time.monotonic()
        left = {key: self._until[key] - now for key in keys if key in self._until}
        for key, seconds in list(left.items()):
            if seconds <= 0:
                del left[key]
                self._until.pop(key, None)
        return left

    async def cool(self, key: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._until[key] = max(until, self._until.get(key, 0.0))


class RedisCooldownStore(CooldownStore):
    """Cooldowns in Redis, seen by every server process: a key per deployment that expires with it.

    ``cooling`` reads every key's remaining time in one pipeline (``PTTL`` each: Redis' own clock,
    so the processes' clocks need not agree); ``cool`` is one ``SET ... PX``.
    """

    def __init__(self, url: str) -> None:
        self.client = async_redis_client(url, max_connections=64, timeout=float(settings.REDIS_SOCKET_TIMEOUT_SECONDS))

    async def cooling(self, keys: Sequence[str]) -> dict[str, float]:
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(COOLDOWN_KEY_PREFIX + key)
            answers = await pipe.execute()
        # PTTL: milliseconds left; -2 no such key, -1 no expiry (never written so).
        return {key: ms / 1000 for key, ms in zip(keys, answers, strict=True) if ms > 0}

    async def cool(self, key: str, seconds: float) -> None:
        await self.client.set(COOLDOWN_KEY_PREFIX + key, "1", px=max(1, round(seconds * 1000)))

    async def close(self) -> None:
        await self.client.aclose()


_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, CooldownStore]] = weakref.WeakKeyDictionary()


def cooldown_store() -> CooldownStore:
    """Return this event loop's cooldown store: Redis with ``REDIS_URL``, else this process's memory."""
    url = settings.REDIS_URL
    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(url)
    if store is None:
        store = per_loop[url] = RedisCooldownStore(url) if url else MemoryCooldownStore()
    return store


async def cooldown_store_close() -> None:
    """Close this event loop's cooldown stores (tests, shutdown)."""
    for store in _stores.pop(asyncio.get_running_loop(), {}).values():
        await store.close()


# --- The router -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A model a reply may be served by: its deployments, its strategy and its context window (tokens).

    ``model``: what the caller prices the reply at when this model serves it (for a fallback,
    ``llm.selectors.EnabledModel``); the router only passes it on. ``subject``: the model's own rate
    limits, which the router takes when the model serves as a fallback (the requested model's are
    taken at admission, ``llm.metering``); None: it has none.
    """

    name: str
    deployments: tuple[DeploymentConfig, ...]
    strategy: str = WEIGHTED
    context_window: int | None = None
    model: Any = None
    subject: MeteringSubject | None = None


async def _no_batches() -> AsyncGenerator[list[ChatChunk], None]:
    return
    yield  # an async generator that yields nothing


class Router:
    """The upstream of one reply: ``first()`` opens the deployment that serves it, ``upstream`` yields
    the rest of its chunk batches, ``aclose()`` closes it (``stream()`` does all three).

    ``route``: the model the client asked for; ``fallbacks``: other models to try, in order, once
    every deployment of it failed before the first chunk (``LLMModel.fallbacks``). ``prompt_tokens``
    (counted before the call, None: unknown): a prompt longer than the model's context window goes
    straight to the fallbacks whose window holds it (the model itself when none does), and a
    fallback too small for it is skipped. ``request`` is sent to each deployment with its
    ``upstream_model`` as ``model``. Once a deployment answered (``answered``), ``deployment`` is it
    and ``serving`` its model (before: the last tried, None before any attempt). ``requested``: the
    reply's request is out to ``deployment``, which has not failed it (it answered, or had yet to
    when the reply ended): what a provider bills. False before the first attempt and between a
    failed attempt and the next (a backoff, a cooldown, a rate limit's wait), when nothing is out.
    """

    def __init__(
        self,
        *,
        route: ModelRoute,
        request: ChatRequest,
        fallbacks: Sequence[ModelRoute] = (),
        prompt_tokens: int | None = None,
        reply_id: str = "",
    ) -> None:
        if not route.deployments:
            raise ValueError("a reply needs at least one deployment")
        self.route = route
        self.fallbacks = tuple(fallbacks)
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.reply_id = reply_id
        self.deployment: DeploymentConfig | None = None
        self.serving: ModelRoute | None = None
        self.answered = False  # a deployment sent its first batch (or ended its reply without one)
        self.requested = False  # ``deployment`` has the request and has not failed it (see the class docstring)
        # The serving deployment's batches after the first (set by ``first``), and that deployment while open.
        self.upstream: AsyncGenerator[list[ChatChunk], None] = _no_batches()
        self._open_deployment: DeploymentConfig | None = None
        # Rate-limit leases of the deployments and fallbacks tried that have limits of their own (``_lease``).
        self._leases: list[tuple[DeploymentConfig | ModelRoute, RateLease]] = []

    @property
    def fallback_served(self) -> ModelRoute | None:
        """Return the fallback model that serves the reply, or None (the model asked for, or nothing out).

        The fallback that answered, or whose request is out (``requested``): a reply that ends while
        it awaits the fallback's first chunk cost that model its prompt, so it is billed as the
        fallback's, never as the requested model whose every deployment failed (which bills nothing).
        """
        serving = self.serving
        return serving if self.requested and serving is not None and serving is not self.route else None

    def _routes(self) -> list[ModelRoute]:
        """Return the models to try, in order (context-window fallbacks first: see the class docstring)."""
        tokens = self.prompt_tokens
        fallbacks = [
            route
            for route in self.fallbacks
            if route.deployments and (tokens is None or route.context_window is None or route.context_window >= tokens)
        ]
        window = self.route.context_window
        if tokens is not None and window is not None and tokens > window and fallbacks:
            logger.info(
                "reply %s: %d prompt tokens exceed the context window of %s (%d): trying %s",
                self.reply_id,
                tokens,
                self.route.name,
                window,
                fallbacks[0].name,
            )
            return fallbacks
        return [self.route, *fallbacks]

    async def _candidates(self, route: ModelRoute) -> tuple[list[DeploymentConfig], float]:
        """Return ``route``'s deployments to try, in order, and the seconds to wait before the first.

        Those not cooling down, at once; when all are, the one whose cooldown ends first, after
        what is left of it (at most ``LLM_ROUTING_BACKOFF_MAX_SECONDS``).
        """
        order = deployment_order(route.deployments, route.strategy)
        if len(order) == 1:
            return order, 0.0
        try:
            cooling = await cooldown_store().cooling([d.key for d in order])
        except UNREACHABLE_ERRORS:
            logger.warning(
                "reply %s: the cooldown store is unreachable; routing ignores cooldowns", self.reply_id, exc_info=True
            )
            return order, 0.0
        available = [d for d in order if d.key not in cooling]
        if available:
            return available, 0.0
        soonest = min(order, key=lambda d: cooling[d.key])
        return [soonest], min(cooling[soonest.key], float(settings.LLM_ROUTING_BACKOFF_MAX_SECONDS))

    async def _cool(self, route: ModelRoute, deployment: DeploymentConfig, error: UpstreamError) -> float:
        seconds = max(float(settings.LLM_DEPLOYMENT_COOLDOWN_SECONDS), error.retry_after or 0.0)
        if len(route.deployments) > 1:  # one deployment is tried whatever: no cooldown to share
            try:
                await cooldown_store().cool(deployment.key, seconds)
            except UNREACHABLE_ERRORS:
                logger.warning("reply %s: could not record the cooldown of %s", self.reply_id, deployment.name)
        return seconds

    async def first(self) -> list[ChatChunk] | None:
        """Open the reply's upstream on the first deployment that sends a chunk; return that first batch.

        None: the deployment ended its reply without a chunk. Afterwards ``upstream`` is that
        deployment's own batch iterator (nothing of the router between it and the reply, so routing
        adds no work per chunk), and ``aclose`` closes it. Raises the ``UpstreamError`` of a
        non-retryable failure, or of the last deployment tried. Cancelling the call closes the
        attempt's upstream request.
        """
        routes = self._routes()
        attempt = 0
        previous: tuple[DeploymentConfig, UpstreamError] | None = None
        for index, route in enumerate(routes):
            if route is not self.route:  # a fallback: its own rate limits, as a deployment's
                try:
                    await self._lease(route, route.subject, f"model:{route.name}")
                except ApplicationError as refused:
                    if refused.status != 429 or index == len(routes) - 1:
                        if refused.status == 429 and previous is not None:
                            raise previous[1] from None  # the upstream's failure says more than our quota
                        raise
                    logger.info("reply %s: fallback %s is over its rate limit", self.reply_id, route.name)
                    continue
            candidates, wait = await self._candidates(route)
            for position, deployment in enumerate(candidates):
                if previous is not None:
                    wait = max(wait, self._backoff(attempt, deployment, *previous))
                if wait > 0:
                    await asyncio.sleep(wait)
                wait = 0.0
                try:
                    await self._lease(deployment, deployment.subject, deployment.key)
                except ApplicationError as refused:
                    if refused.status != 429:  # the rate limits' store is unreachable (503)
                        raise
                    if index == len(routes) - 1 and position == len(candidates) - 1:
                        if previous is not None:  # the upstream's failure says more than our quota
                            raise previous[1] from None
                        raise
                    logger.info("reply %s: deployment %s is over its rate limit", self.reply_id, deployment.name)
                    continue
                attempt += 1
                self.deployment, self.serving = deployment, route
                error = await self._open(deployment)
                if not isinstance(error, UpstreamError):
                    return error  # the first batch, or None
                if not is_retryable(error):
                    raise error
                await self._release_lease(deployment)  # the reply goes on elsewhere: free its slot now
                cooldown = await self._cool(route, deployment, error)
                if index == len(routes) - 1 and position == len(candidates) - 1:
                    raise error
                logger.warning(
                    "reply %s: deployment %s of %s failed before its first chunk (%s%s); cooling down %.0f s",
                    self.reply_id,
                    deployment.name,
                    route.name,
                    error.code,
                    f", upstream status {error.upstream_status}" if error.upstream_status else "",
                    cooldown,
                )
                previous = (deployment, error)
            await self._release_lease(route)  # a fallback none of whose deployments served
        raise AssertionError("unreachable: the last candidate returns or raises")  # pragma: no cover

    async def _open(self, deployment: DeploymentConfig) -> list[ChatChunk] | UpstreamError | None:
        """Open ``deployment``'s upstream; return its first batch (then it is ``upstream``), None when it
        ended without one, or its failure before the first batch (then it is closed).

        A failure after the first batch is the reply's: the router no longer sees it.
        """
        provider = deployment.provider
        upstream = get_provider(provider).stream(dataclasses.replace(self.request, model=deployment.upstream_model))
        self.requested = True  # and stays so if the wait is cancelled: the request was out when the reply ended
        _in_flight[deployment.key] = _in_flight.get(deployment.key, 0) + 1
        started = time.perf_counter()
        result: list[ChatChunk] | UpstreamError | None = None
        try:
            async with asyncio.timeout(provider.first_token_timeout) as deadline:
                result = await anext(upstream)
        except StopAsyncIteration:
            pass
        except TimeoutError as exc:
            if not deadline.expired():
                await self._close(deployment, upstream)
                raise
            result = UpstreamError(
                UPSTREAM_MESSAGES["upstream_timeout"],
                code="upstream_timeout",
                status=504,
                detail=f"no first chunk within {provider.first_token_timeout} s",
            )
            result.__cause__ = exc
        except UpstreamError as exc:
            result = exc
        except BaseException:  # cancelled, or a bug: the upstream request must not stay open
            await self._close(deployment, upstream)
            raise
        if result is None or isinstance(result, UpstreamError):
            self.answered = self.requested = result is None  # a failed request is not billed
            await self._close(deployment, upstream)
            return result
        self.answered = True
        latency_record(deployment.key, time.perf_counter() - started)
        self.upstream = upstream
        self._open_deployment = deployment
        return result

    @staticmethod
    async def _close(deployment: DeploymentConfig, upstream: AsyncGenerator[list[ChatChunk], None]) -> None:
        _in_flight[deployment.key] -= 1
        await upstream.aclose()

    async def aclose(self) -> None:
        """Close the upstream ``first`` opened, if any (its request too); idempotent. Raises what closing it raises."""
        deployment, self._open_deployment = self._open_deployment, None
        if deployment is not None:
            await self._close(deployment, self.upstream)

    async def stream(self) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunk batches: ``first``, then ``upstream``'s; closing the generator closes the upstream.

        Raises what ``first`` and the upstream raise.
        """
        try:
            batch = await self.first()
            if batch is None:
                return
            yield batch
            async for batch in self.upstream:
                yield batch
        finally:
            await self.aclose()

    async def _lease(self, owner: DeploymentConfig | ModelRoute, subject: MeteringSubject | None, key: str) -> None:
        """Take ``subject``'s rate limits for this reply on behalf of ``owner`` (a deployment, or a fallback
        model), as a user's are taken; none (or no limits): no I/O.

        Raises ``ApplicationError`` 429 ``rate_limit_exceeded`` when it is over one (the router then
        tries the next one), 503 ``metering_unavailable`` when they cannot be checked.
        """
        if subject is None or not subject.limits.any:
            return
        lease = await rate_limit_acquire(
            request_id=f"{self.reply_id}:{key}", subjects=(subject,), prompt_tokens=self.prompt_tokens or 0
        )
        self._leases.append((owner, lease))

    async def _release_lease(self, owner: DeploymentConfig | ModelRoute) -> None:
        """Give back the lease of ``owner``, which failed before its first chunk (0 completion tokens)."""
        kept = []
        for held, lease in self._leases:
            if held is owner:
                await lease.release(completion_tokens=0)
            else:
                kept.append((held, lease))
        self._leases = kept

    async def release(self, *, completion_tokens: int) -> None:
        """Give back the rate-limit leases of the deployments and fallbacks tried: ``completion_tokens``
        count on the deployment and model that served, 0 on those that failed before their first
        chunk. Once; never raises."""
        leases, self._leases = self._leases, []
        for owner, lease in leases:
            served = owner is self.deployment or owner is self.serving
            await lease.release(completion_tokens=completion_tokens if served else 0)

    def _backoff(
        self, attempt: int, deployment: DeploymentConfig, failed: DeploymentConfig, error: UpstreamError
    ) -> float:
        """Return the seconds to wait before ``attempt`` (>= 1) on ``deployment`` after ``failed`` raised ``error``."""
        wait = float(settings.LLM_ROUTING_BACKOFF_SECONDS) * 2 ** (attempt - 1)
        if error.retry_after is not None and deployment.provider == failed.provider:
            wait = max(wait, error.retry_after)
        return min(wait, float(settings.LLM_ROUTING_BACKOFF_MAX_SECONDS))
