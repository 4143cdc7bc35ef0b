"""Fixtures and helpers for the conversations tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llm.tests.simulator_process import SimulatorProcess, start_simulator
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory

# The slow simulator's reply: 200 tokens, 50 ms apart, i.e. 10 s; tests stop it long before.
SLOW_REPLY_TOKENS = 200


@pytest.fixture(scope="session")
def slow_simulator() -> Iterator[SimulatorProcess]:
    """A simulator whose replies take 10 s (200 tokens, 50 ms apart): time to stop them mid-way."""
    sim = start_simulator("--ttft-ms", "100", "--token-delay-ms", "50", "--reply-tokens", str(SLOW_REPLY_TOKENS))
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def sleepy_simulator() -> Iterator[SimulatorProcess]:
    """A simulator that waits 5 s before its first token: time to stop a reply before it starts."""
    sim = start_simulator("--ttft-ms", "5000", "--token-delay-ms", "5", "--reply-tokens", "5")
    yield sim
    sim.stop()


@pytest.fixture
def conversation(user, sim_model):
    """A conversation of ``user`` with the session simulator's model."""
    return ConversationFactory(owner=user, model=sim_model, title="Fast chat")


@pytest.fixture
def slow_conversation(user, slow_simulator):
    """A conversation of ``user`` whose replies stream for 10 s."""
    provider = ProviderFactory(base_url=slow_simulator.base_url, api_key="")
    model = LLMModelFactory(name="slow-model", provider=provider, upstream_model="sim-1")
    return ConversationFactory(owner=user, model=model, title="Slow chat")


@pytest.fixture
def sleepy_conversation(user, sleepy_simulator):
    """A conversation of ``user`` whose replies start after 5 s."""
    provider = ProviderFactory(base_url=sleepy_simulator.base_url, api_key="")
    model = LLMModelFactory(name="sleepy-model", provider=provider, upstream_model="sim-1")
    return ConversationFactory(owner=user, model=model, title="Sleepy chat")


@pytest.fixture
def failing_conversation(user, simulator):
    """A conversation whose upstream answers 500 (``sim-error-500``)."""
    provider = ProviderFactory(base_url=simulator.base_url, api_key="")
    model = LLMModelFactory(name="failing-model", provider=provider, upstream_model="sim-error-500")
    return ConversationFactory(owner=user, model=model, title="Failing chat")


@pytest.fixture
def unreachable_conversation(user):
    """A conversation whose provider listens nowhere (127.0.0.1:9, the factory default)."""
    model = LLMModelFactory(name="unreachable-model", provider=ProviderFactory(base_url="http://127.0.0.1:9/v1"))
    return ConversationFactory(owner=user, model=model, title="Unreachable chat")


@pytest.fixture
async def release_db_connections() -> AsyncIterator[None]:
    """Close, after an async test, the connections its ORM calls opened in asgiref's sync thread.

    Async ORM calls run in one long-lived thread that no request ends; a connection left open
    there (checked out of PostgreSQL's pool) would keep the test database from being dropped.
    """
    yield
    await sync_to_async(connections.close_all, thread_sensitive=True)()


def sync_db(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Return ``fn`` runnable from async tests (ORM calls must not run on the event loop)."""
    return sync_to_async(fn, thread_sensitive=True)
