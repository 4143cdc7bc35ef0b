"""What admission control reads: who a request is metered against, their limits, and its maximum size.

Plain immutable records so that every app may build them (``llm`` builds them from its cached
model snapshot and the caller's principal) without this app importing any other. ``RateLimits``
and ``MeteringSubject`` are named tuples: admission hashes and compares a request's subjects several
times (its caller's shape and view are found by them), and a tuple does both in C, where a frozen
dataclass runs its generated ``__hash__`` and ``__eq__`` in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from ..pricing import Prices, max_token_cost


class RateLimits(NamedTuple):
    """A subject's rate limits; None means no limit.

    ``requests_per_minute`` and ``tokens_per_minute`` (prompt plus completion tokens) as OpenAI
    defines them (https://platform.openai.com/docs/guides/rate-limits); ``concurrent_streams``: replies
    streaming at the same moment.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None

    @property
    def any(self) -> bool:
        """Return True when at least one limit is set."""
        return (
            self.requests_per_minute is not None
            or self.tokens_per_minute is not None
            or self.concurrent_streams is not None
        )


NO_LIMITS = RateLimits()


class MeteringSubject(NamedTuple):
    """One party a request counts against: ``kind`` and the row's ``id``, with its rate limits.

    Kinds today: ``"user"``, ``"api_key"``, ``"team"`` (an API key's team), ``"organization"``
    (the organization a request acts in) (budgets and rate limits), ``"model"`` (rate limits:
    a model's upstream quota) and ``"deployment"`` (rate limits: one deployment's share of its
    provider's quota, taken by ``llm.routing`` when it tries that deployment). ``name``: what a
    refusal's message calls it (a model's name, a user's username, a key's or team's name, an
    organization's slug), "" to call it by its id.
    """

    kind: str
    id: int
    limits: RateLimits = NO_LIMITS
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class MeteringRequest:
    """What admission control needs to know about one request before its upstream call.

    ``request_id``: the reply's id, also its ``UsageRecord.request_id`` (settlement finds the
    reservation by it). ``subjects``: every party the request counts against, all of which must
    allow it. ``prompt_tokens``: counted before the call (``llm.tokens``). ``max_completion_tokens``:
    the most the reply may generate (the client's ``max_completion_tokens`` / ``max_tokens``, else
    the model's output cap, else the rest of its context window). Prices: US dollars per million tokens;
    the cache prices None when the model has none (the input price applies: ``accounts.pricing``).
    """

    request_id: str
    subjects: tuple[MeteringSubject, ...]
    prompt_tokens: int
    max_completion_tokens: int
    input_price_per_million: Decimal
    output_price_per_million: Decimal
    cached_input_price_per_million: Decimal | None = None
    cache_write_price_per_million: Decimal | None = None

    @property
    def max_tokens(self) -> int:
        """Return the most tokens the request can use: prompt plus maximum completion."""
        return self.prompt_tokens + self.max_completion_tokens

    @property
    def max_cost(self) -> Decimal:
        """Return the most the request can cost, in US dollars: the prompt at its highest price (fresh,
        cached or cache-written: the provider decides) and the maximum completion at the output price
        (``accounts.pricing.max_token_cost``)."""
        prices = Prices(
            input=self.input_price_per_million,
            output=self.output_price_per_million,
            cached_input=self.cached_input_price_per_million,
            cache_write=self.cache_write_price_per_million,
        )
        return max_token_cost(
            prices=prices, prompt_tokens=self.prompt_tokens, max_completion_tokens=self.max_completion_tokens
        )


__all__ = ["NO_LIMITS", "MeteringRequest", "MeteringSubject", "RateLimits"]
