"""Fixtures shared by every app's tests.

The suite runs on whatever ``DATABASE_URL`` / ``REDIS_URL`` point at (``.ci/run`` sets
PostgreSQL and Redis; unset, the embedded defaults). The LLM upstream is always the simulator
process, over real HTTP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rest_framework.test import APIClient

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


@dataclass(frozen=True)
class Simulator:
    """A running simulator process: ``base_url`` ends in ``/v1``; ``root`` has no path."""

    root: str
    process: subprocess.Popen[str]

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def stats(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"{self.root}/_simulator/stats", timeout=5).json()


def start_simulator(*args: str) -> Simulator:
    """Start ``manage.py llm_simulator --port 0 *args`` and wait for its "listening" line."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "llm_simulator", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 30
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return Simulator(root=match.group(1).rstrip("/"), process=process)
    process.kill()
    raise RuntimeError("the LLM simulator did not start")


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    """A simulator process for the whole session: 12-token replies, 20 ms TTFT, 5 ms per token."""
    sim = start_simulator("--ttft-ms", "20", "--token-delay-ms", "5", "--reply-tokens", "12")
    yield sim
    sim.process.terminate()
    sim.process.wait(timeout=10)


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
