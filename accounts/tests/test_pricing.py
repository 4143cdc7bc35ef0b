"""What tokens cost (``accounts.pricing``): fresh, cached and cache-written prompt tokens, completion
tokens, and the upper bound a budget reserves. Every figure is exact (``Decimal``)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.metering import MeteringRequest
from accounts.pricing import Prices, max_token_cost, token_cost

# Anthropic's Claude Sonnet 4 (https://docs.anthropic.com/en/docs/about-claude/pricing): $3 input,
# $0.30 cache hits, $3.75 5-minute cache writes, $15 output per million tokens.
SONNET = Prices(input=Decimal(3), output=Decimal(15), cached_input=Decimal("0.3"), cache_write=Decimal("3.75"))
# OpenAI's gpt-4o-mini (https://openai.com/api/pricing/): $0.15 input, $0.075 cached input, $0.60 output;
# no cache-write price (OpenAI's cache writes cost the input price).
GPT_4O_MINI = Prices(input=Decimal("0.15"), output=Decimal("0.6"), cached_input=Decimal("0.075"))


def test_each_part_of_the_prompt_is_priced_at_its_own_price() -> None:
    cost = token_cost(
        prices=SONNET, prompt_tokens=10_000, completion_tokens=500, cached_tokens=6_000, cache_creation_tokens=3_000
    )
    # (1000 fresh * 3 + 6000 cached * 0.3 + 3000 written * 3.75 + 500 * 15) / 1e6
    assert cost == Decimal("0.02355")
    assert cost == (Decimal(3_000) + Decimal(1_800) + Decimal(11_250) + Decimal(7_500)) / Decimal(1_000_000)


def test_without_cache_prices_cached_tokens_cost_the_input_price() -> None:
    plain = Prices(input=Decimal("0.15"), output=Decimal("0.6"))
    with_cache = token_cost(prices=plain, prompt_tokens=1234, completion_tokens=567, cached_tokens=1000)
    without = token_cost(prices=plain, prompt_tokens=1234, completion_tokens=567)
    assert with_cache == without == Decimal("0.0005253")


def test_openai_cached_input_halves_the_cached_part() -> None:
    # 2048 of 3000 prompt tokens cached; 100 reasoning tokens are part of the 400 completion tokens.
    cost = token_cost(prices=GPT_4O_MINI, prompt_tokens=3000, completion_tokens=400, cached_tokens=2048)
    assert cost == (Decimal(952) * Decimal("0.15") + Decimal(2048) * Decimal("0.075") + 400 * Decimal("0.6")) / (
        Decimal(1_000_000)
    )
    assert cost == Decimal("0.0005364")


@pytest.mark.parametrize(("cached", "written"), [(5000, 0), (800, 900), (-3, 0)])
def test_cache_counts_are_clamped_into_the_prompt(cached: int, written: int) -> None:
    """A provider that reports more cache than prompt (or a negative count) is never billed below 0."""
    cost = token_cost(
        prices=SONNET, prompt_tokens=1000, completion_tokens=0, cached_tokens=cached, cache_creation_tokens=written
    )
    assert Decimal(0) <= cost <= Decimal(1000) * SONNET.prompt_ceiling / Decimal(1_000_000)


@pytest.mark.parametrize(
    ("prices", "ceiling"),
    [(SONNET, Decimal("3.75")), (GPT_4O_MINI, Decimal("0.15")), (Prices(input=Decimal(2), cached_input=Decimal(5)), 5)],
)
def test_a_reservation_prices_the_prompt_at_its_highest_price(prices: Prices, ceiling: Decimal) -> None:
    assert prices.prompt_ceiling == ceiling
    request = MeteringRequest(
        request_id="r",
        subjects=(),
        prompt_tokens=10_000,
        max_completion_tokens=500,
        input_price_per_million=prices.input,
        output_price_per_million=prices.output,
        cached_input_price_per_million=prices.cached_input,
        cache_write_price_per_million=prices.cache_write,
    )
    assert request.max_cost == max_token_cost(prices=prices, prompt_tokens=10_000, max_completion_tokens=500)
    assert request.max_cost == (10_000 * ceiling + 500 * prices.output) / Decimal(1_000_000)
    # However the provider splits the prompt, the reply costs no more than was reserved.
    for cached, written in ((0, 0), (10_000, 0), (0, 10_000), (4_000, 6_000)):
        cost = token_cost(
            prices=prices,
            prompt_tokens=10_000,
            completion_tokens=500,
            cached_tokens=cached,
            cache_creation_tokens=written,
        )
        assert cost <= request.max_cost
