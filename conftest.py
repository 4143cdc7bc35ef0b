"""Fixtures shared by every app's tests.

The suite runs on whatever ``DATABASE_URL`` / ``REDIS_URL`` point at (``.ci/run`` sets
PostgreSQL and Redis; unset, the embedded defaults). The LLM upstream is always the simulator
process, over real HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from rest_framework.test import APIClient

from llm.tests.simulator_process import SimulatorProcess, running_simulator
from tests.factories import PASSWORD, LLMModelFactory, ProviderFactory, UserFactory

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _celery_eager_in_process() -> Iterator[None]:
    """Run Celery tasks in-process for unit tests; the end-to-end test uses a real worker."""
    from chatbackend.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield
    app.conf.task_always_eager = previous


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    """Give each test its own channel layer instance (``get_channel_layer()`` builds a new one).

    Each async test runs its own event loop, but the process-wide layer outlives it: channels_redis
    keeps receive state per instance (a lock per channel prefix, buffers) that a loop closing
    mid-receive can leave locked and bound to the dead loop, after which the broadcast listener
    of every later test fails to receive ("bound to a different event loop").
    """
    yield
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


@pytest.fixture(autouse=True)
def _usage_written_before_teardown() -> Iterator[None]:
    """Wait for the usage records the test's replies queued before its database is flushed.

    Eager Celery writes them in this process's sender thread; a write racing the flush's TRUNCATE
    deadlocks PostgreSQL and fails the teardown. Instant when nothing is queued.
    """
    yield
    from accounts.usage import usage_flush

    assert usage_flush(10), "the usage queue did not drain within 10 s"


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorProcess]:
    """A simulator process for the whole session: 12-token replies, 20 ms TTFT, 5 ms per token."""
    with running_simulator("--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "12") as sim:
        yield sim


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def admin_user(db):
    return UserFactory(role="admin")


@pytest.fixture
def password() -> str:
    return PASSWORD


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture
def auth_client(user) -> APIClient:
    """An APIClient logged in as ``user`` with a JWT access token."""
    from rest_framework_simplejwt.tokens import RefreshToken

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


@pytest.fixture
def api_key_secret(user) -> str:
    """A fresh ``sk-...`` secret for ``user``."""
    from accounts.services import api_key_create

    return api_key_create(user=user, name="test key").secret


@pytest.fixture
def sim_model(db, simulator):
    """An enabled model served by the session's simulator."""
    provider = ProviderFactory(base_url=simulator.base_url, api_key="")
    return LLMModelFactory(name="sim-model", provider=provider, upstream_model="sim-1")


@pytest.fixture
async def asgi_server() -> AsyncIterator[str]:
    """Serve ``chatbackend.asgi.application`` with uvicorn in the test's event loop; yield its URL.

    A real HTTP server, so a client that closes its connection is a real disconnect (Django then
    cancels the request task), unlike the test client.
    """
    from chatbackend.asgi import application

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(application, lifespan="off", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done(), "uvicorn stopped during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()
    yield f"http://{host}:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, timeout=10)
    sock.close()
