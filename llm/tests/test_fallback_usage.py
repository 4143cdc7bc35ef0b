"""The usage row of a reply whose requested model failed and which ended while the router was going on
to a fallback: it is billed for the request that was out when it ended, at that model's prices.

``primary`` (input 10, output 20 dollars per million; no known tokenizer: an estimate) answers 500
before any chunk (a simulator fault on a fresh upstream id): providers bill nothing for that.
``backup`` (input 1, output 2; ``o200k_base``) is on the sleepy simulator: it sends its first chunk
only after seconds, so the client leaves while the fallback's request is out. Or the router is
still in its backoff before trying ``backup`` (no request out at all) when the client leaves.
The client is a real HTTP client on ``asgi_server`` that closes its connection: a real disconnect.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest

from llm import routing
from llm.selectors import enabled_model_cache
from llm.tests.simulator_process import SimulatorProcess
from llm.tokens import tokenizer_for
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import bearer, poll_until, usage_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

MESSAGES: Any = [{"role": "user", "content": "Tell me about rivers and the seas they run to"}]


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    # Other tests name models "primary" and "backup" too: never reuse their snapshots.
    enabled_model_cache.clear()
    yield
    enabled_model_cache.clear()


@dataclass
class Models:
    primary_key: str  # the deployment keys of ``routing._in_flight``
    backup_key: str
    failing: str  # primary's upstream model id

    def primary_failed(self, simulator: SimulatorProcess) -> bool:
        """Return whether ``primary``'s request was sent and has been closed (it failed)."""
        return simulator.requests_for(self.failing) >= 1 and routing._in_flight.get(self.primary_key, 0) == 0

    def backup_awaited(self) -> bool:
        return routing._in_flight.get(self.backup_key, 0) == 1


@pytest.fixture
def failing_primary(
    db: Any, simulator: SimulatorProcess, sleepy_simulator: SimulatorProcess, settings: Any
) -> Iterator[Models]:
    """``primary`` (a 500 before any chunk) falling back to ``backup`` on the sleepy simulator."""
    settings.OPENAI_FIRST_CHUNK_WAIT_SECONDS = 0  # headers and keep-alives go out at once
    settings.SSE_KEEPALIVE_SECONDS = 0.05
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    simulator.fault_set(failing, "status=500")
    sleepy = ProviderFactory(name="sim-sleepy", base_url=sleepy_simulator.base_url, api_key="")
    backup = LLMModelFactory(
        name="backup",
        provider=sleepy,
        upstream_model="sim-1",
        tokenizer="o200k_base",
        input_price_per_million="1.000000",
        output_price_per_million="2.000000",
    )
    provider = ProviderFactory(name="sim-primary", base_url=simulator.base_url, api_key="")
    primary = LLMModelFactory(
        name="primary",
        provider=provider,
        upstream_model=failing,
        fallbacks=["backup"],
        input_price_per_million="10.000000",
        output_price_per_million="20.000000",
    )
    yield Models(primary_key=f"model-{primary.pk}", backup_key=f"model-{backup.pk}", failing=failing)
    simulator.fault_clear(failing)


@pytest.fixture
async def http(asgi_server: str, api_key_secret: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=asgi_server, headers=bearer(api_key_secret), timeout=10) as client:
        yield client


async def _leave_after_a_keepalive(http: httpx.AsyncClient, until: Any = None) -> None:
    """Stream a reply of ``primary``; once a keep-alive came (and ``until()`` holds), close the connection."""
    body = {"model": "primary", "messages": MESSAGES, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith(": keep-alive") and (until is None or until()):
                break


async def test_a_reply_cut_while_the_fallback_is_awaited_is_billed_as_the_fallbacks(failing_primary, http):
    """The fallback has the prompt when the client leaves: the row is the fallback's (its name, its
    deployment, its prices), the prompt counted by its tokenizer, as if it had sent a first chunk."""
    await _leave_after_a_keepalive(http, until=failing_primary.backup_awaited)

    (record,) = await poll_until(usage_records, what="the usage record")
    prompt = tokenizer_for(setting="o200k_base", model_name="sim-1").count_prompt(MESSAGES)
    assert (record.model_name, record.finish_status, record.token_source) == ("backup", "cancelled", "counted")
    assert record.deployment == "sim-sleepy/sim-1"
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, 0)
    assert record.cost == prompt * 1 / Decimal(1_000_000)  # backup's input price, not primary's 10


async def test_a_reply_cut_during_the_backoff_before_the_fallback_bills_nothing(
    failing_primary, http, settings, simulator
):
    """Between the requested model's failure and the fallback's request nothing is out: the failed
    request is not billed (as a reply that failed so is not), and none other was sent."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 30
    settings.LLM_ROUTING_BACKOFF_MAX_SECONDS = 30
    await _leave_after_a_keepalive(http, until=lambda: failing_primary.primary_failed(simulator))

    (record,) = await poll_until(usage_records, what="the usage record")
    assert routing._in_flight.get(failing_primary.backup_key, 0) == 0  # the fallback was never asked
    assert record.finish_status == "cancelled"
    assert (record.prompt_tokens, record.completion_tokens, record.cost) == (0, 0, 0)
    assert record.token_source == "counted"  # exactly nothing
