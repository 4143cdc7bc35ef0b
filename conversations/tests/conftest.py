"""Fixtures for the conversations tests: a conversation of ``user`` on each kind of upstream.

The simulators and their models are the root conftest's.
"""

from __future__ import annotations

import secrets

import pytest

from llm.selectors import enabled_model_cache
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory


@pytest.fixture
def conversation(user, sim_model):
    """A conversation of ``user`` with the fast simulator's model."""
    return ConversationFactory(owner=user, model=sim_model, title="Fast chat")


@pytest.fixture
def slow_conversation(user, slow_model):
    """A conversation of ``user`` whose replies stream for 10 s."""
    return ConversationFactory(owner=user, model=slow_model, title="Slow chat")


@pytest.fixture
def sleepy_conversation(user, sleepy_model):
    """A conversation of ``user`` whose replies start after 5 s."""
    return ConversationFactory(owner=user, model=sleepy_model, title="Sleepy chat")


@pytest.fixture
def failing_conversation(user, simulator):
    """A conversation whose upstream answers 500 (``sim-error-500``)."""
    provider = ProviderFactory(base_url=simulator.base_url, api_key="")
    model = LLMModelFactory(name="failing-model", provider=provider, upstream_model="sim-error-500")
    return ConversationFactory(owner=user, model=model, title="Failing chat")


@pytest.fixture
def fallback_conversation(user, simulator, settings):
    """A conversation with ``primary``, whose upstream answers 500 (a fault on a fresh model id), so
    every reply falls back to ``backup`` (``LLMModel.fallbacks``)."""
    settings.LLM_ROUTING_BACKOFF_SECONDS = 0.01
    enabled_model_cache.clear()  # other tests name models "primary" and "backup" too
    failing = f"sim-fallback-{secrets.token_hex(4)}"
    simulator.fault_set(failing, "status=500")
    provider = ProviderFactory(name="sim-fallbacks", base_url=simulator.base_url, api_key="")
    LLMModelFactory(name="backup", provider=provider, upstream_model="sim-1")
    primary = LLMModelFactory(name="primary", provider=provider, upstream_model=failing, fallbacks=["backup"])
    yield ConversationFactory(owner=user, model=primary, title="Falling back")
    simulator.fault_clear(failing)
    enabled_model_cache.clear()


@pytest.fixture
def unreachable_conversation(user):
    """A conversation whose provider listens nowhere (127.0.0.1:9, the factory default)."""
    model = LLMModelFactory(name="unreachable-model", provider=ProviderFactory(base_url="http://127.0.0.1:9/v1"))
    return ConversationFactory(owner=user, model=model, title="Unreachable chat")


@pytest.fixture
def model(db):
    """``gpt-test``: an enabled model (on a provider nothing listens to: for the CRUD tests)."""
    return LLMModelFactory(name="gpt-test")
