"""What tokens cost: the one formula every price in the project goes through.

Prices are US dollars per million tokens, what providers publish. A model has four:
``input`` (prompt tokens read fresh), ``output`` (completion tokens, reasoning included),
``cached_input`` (prompt tokens read from the provider's prompt cache; ``None``: same as input)
and ``cache_write`` (prompt tokens written to the cache; ``None``: same as input). Sources:
https://openai.com/api/pricing/ ("Cached input" per model; reasoning tokens are billed as output,
https://platform.openai.com/docs/guides/reasoning), https://docs.anthropic.com/en/docs/about-claude/pricing
("Cache Hits & Refreshes" and "5m Cache Writes" per model) and https://ai.google.dev/gemini-api/docs/pricing
(context caching; thinking tokens billed as output).

No Django imports: the metering types (``accounts.metering.types``) use it on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Prices:
    """A model's prices, US dollars per million tokens; ``None`` cache prices mean the input price."""

    input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None

    @property
    def prompt_ceiling(self) -> Decimal:
        """Return the most one prompt token can cost (per million): the highest of the three prompt prices.

        What a budget reserves per prompt token before the call, when it cannot know how much of the
        prompt the provider will read from or write to its cache (Anthropic's cache writes cost more
        than fresh input).
        """
        return max(self.input, self.cached_input or self.input, self.cache_write or self.input)


def token_cost(
    *,
    prices: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
) -> Decimal:
    """Return what a reply cost, in US dollars (exact ``Decimal``).

    ``(prompt - cached - cache_creation) * input + cached * cached_input + cache_creation * cache_write
    + completion * output``, over one million. ``prompt_tokens`` counts every input token, cached or
    not, and ``completion_tokens`` every output token, reasoning included (OpenAI's ``usage``
    convention, ``llm.providers.Usage``). Cached and cache-write counts are clamped into the prompt
    (a provider that reports more cache than prompt is billed at most the whole prompt, never a
    negative remainder).
    """
    cached = min(max(cached_tokens, 0), prompt_tokens)
    written = min(max(cache_creation_tokens, 0), prompt_tokens - cached)
    fresh = prompt_tokens - cached - written
    total = Decimal(fresh) * prices.input + Decimal(completion_tokens) * prices.output
    if cached:
        total += Decimal(cached) * (prices.input if prices.cached_input is None else prices.cached_input)
    if written:
        total += Decimal(written) * (prices.input if prices.cache_write is None else prices.cache_write)
    return total / _MILLION


def max_token_cost(*, prices: Prices, prompt_tokens: int, max_completion_tokens: int) -> Decimal:
    """Return the most a request can cost, in US dollars: an upper bound of ``token_cost`` for it.

    Every prompt token at ``Prices.prompt_ceiling`` (however the provider splits it between fresh,
    cached and cache-written) plus ``max_completion_tokens`` at the output price, over one million.
    """
    return (Decimal(prompt_tokens) * prices.prompt_ceiling + Decimal(max_completion_tokens) * prices.output) / _MILLION


__all__ = ["Prices", "max_token_cost", "token_cost"]
