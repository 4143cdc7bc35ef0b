"""Fixtures shared by every app's tests.

The suite runs on whatever ``DATABASE_URL`` / ``REDIS_URL`` point at (``.ci/run`` sets
PostgreSQL and Redis; unset, the embedded defaults). The LLM upstream is always the simulator
process, over real HTTP.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from rest_framework.test import APIClient

from accounts.usage import usage_flush
from llm.tests.simulator_process import SimulatorProcess, running_simulator
from tests.factories import PASSWORD, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import access_token, bearer, poll_until

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
def _usage_queue_drained() -> Iterator[None]:
    """Wait, after each test, until the usage records it queued are written.

    ``accounts.usage`` writes them from a sender thread after the reply has ended, possibly after
    the test returned: left running, that write races the flush of the test database (a deadlock
    against ``TRUNCATE`` on PostgreSQL) or lands in the next test. Set up after pytest-django's
    database fixtures (autouse fixtures of plugins come first), so it is torn down before them.
    """
    yield
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
    return APIClient(headers=bearer(access_token(user)))


@pytest.fixture
def token(user) -> str:
    """A JWT access token for ``user``."""
    return access_token(user)


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
    await poll_until(lambda: server.started or task.done(), what="uvicorn's start-up")
    assert not task.done(), "uvicorn stopped during start-up"
    host, port = sock.getsockname()
    yield f"http://{host}:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, timeout=10)
    sock.close()
