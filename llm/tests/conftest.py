"""Fixtures for the ``llm`` tests: real simulator processes and the provider's shared clients."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from llm.providers.openai_compatible import aclose_clients
from llm.tests.simulator_process import SimulatorProcess, running_simulator

# Tokens per reply of the fast simulator; tests compare against it.
FAST_REPLY_TOKENS = 12
SIMULATOR_API_KEY = "sk-simulator-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def llm_simulator() -> Iterator[SimulatorProcess]:
    """Yield a simulator with short, fast replies (12 tokens, 2 ms apart) and no API key."""
    with running_simulator("--ttft-ms", "5", "--token-delay-ms", "2", "--reply-tokens", str(FAST_REPLY_TOKENS)) as sim:
        yield sim


@pytest.fixture(scope="session")
def slow_llm_simulator() -> Iterator[SimulatorProcess]:
    """Yield a simulator whose replies take ~20 s (400 tokens, 50 ms apart): for stop/cancel tests."""
    with running_simulator("--ttft-ms", "0", "--token-delay-ms", "50", "--reply-tokens", "400") as sim:
        yield sim


@pytest.fixture(scope="session")
def sleepy_llm_simulator() -> Iterator[SimulatorProcess]:
    """Yield a simulator that waits 5 s before its first token: time to see keep-alives and stop."""
    with running_simulator("--ttft-ms", "5000", "--token-delay-ms", "5", "--reply-tokens", "5") as sim:
        yield sim


@pytest.fixture(scope="session")
def keyed_llm_simulator() -> Iterator[SimulatorProcess]:
    """Yield a fast simulator that requires ``Authorization: Bearer SIMULATOR_API_KEY``."""
    options = ("--ttft-ms", "5", "--token-delay-ms", "2", "--reply-tokens", str(FAST_REPLY_TOKENS))
    with running_simulator(*options, "--api-key", SIMULATOR_API_KEY) as sim:
        yield sim


@pytest.fixture
def closed_port_url() -> str:
    """Return an API root on a local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def provider_clients() -> AsyncIterator[None]:
    """Close the provider's per-loop HTTP client when the test's event loop is done with it."""
    yield
    await aclose_clients()
