"""The OpenAPI schema tells the truth: schemathesis, every check, over every operation, 0 failures.

Schemathesis (its CLI, as a child process) reads ``/api/schema/`` from a real server process
(``start_server``: uvicorn on the end-to-end stack's test database and Redis, the Celery worker
behind it) and sends it generated requests, valid and invalid, in its four phases (examples,
coverage, fuzzing, stateful). Every check is on (``--checks all``): no 5xx, only documented
statuses, content types and headers, bodies that match their schema, schema-valid requests
accepted and schema-violating ones refused, auth not ignored, deleted resources gone.

Run twice: as a JWT user (an admin, so ``/api/users/`` is reachable) and with a member's API key
(the ``/v1`` and ``/dashboard`` operations' credential). The server's registration, login and
password throttles are raised for the run (``AUTH_REGISTER_RATE``, ``AUTH_LOGIN_RATE``,
``AUTH_PASSWORD_RATE``, ``AUTH_LOGIN_FAILURE_LIMIT``), so schemathesis reaches the code behind
them instead of 429s. The upstream is a simulator that
answers at once, with the models ``tests/schemathesis.toml`` names, so conversations and chat
completions get past "no such model".

Bounded: ``MAX_EXAMPLES`` per operation and phase, one worker, a fixed seed (the same generated
requests each run; about 65 s and 80 s on this project's 2 cores, shared); ``RUN_SECONDS`` stops a
run that hangs. One worker also because schemathesis's parallel workers hit a CPython 3.11 race in
``ast.parse`` (hypothesis's lambda descriptions: "AST constructor recursion depth mismatch"). The
exceptions in ``tests/schemathesis.toml`` each say why the schema cannot state a rule.

Run alone: ``./scripts/test tests/test_e2e_schemathesis.py`` (or ``python -m pytest`` the same).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from accounts.models import User
from llm.tests.simulator_process import SimulatorProcess, start_simulator
from tests.conftest import ChildProcess
from tests.factories import LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import bearer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CONFIG = Path(__file__).with_name("schemathesis.toml")
MODEL_NAMES = ("gpt-4o-mini", "sim-model")  # the ``models`` dictionary of CONFIG
MAX_EXAMPLES = 40
SEED = 20261201
RUN_SECONDS = 300
RAISED_THROTTLES = {
    "AUTH_REGISTER_RATE": "100000/minute",
    "AUTH_LOGIN_RATE": "100000/minute",
    "AUTH_PASSWORD_RATE": "100000/minute",
    "AUTH_LOGIN_FAILURE_LIMIT": "100000",
}
OUTPUT_TAIL_CHARS = 20_000


@pytest.fixture(scope="module")
def instant_simulator() -> Iterator[SimulatorProcess]:
    """A simulator that answers at once: 8 tokens, no delay (schemathesis sends many requests)."""
    simulator = start_simulator("--ttft-ms", "0", "--token-delay-ms", "0", "--reply-tokens", "8")
    yield simulator
    simulator.stop()


@pytest.fixture
def schema_models(instant_simulator: SimulatorProcess, transactional_db: None) -> None:
    """Create the provider and the models CONFIG names, committed for the server process."""
    provider = ProviderFactory(name="simulator-instant", base_url=instant_simulator.base_url, read_timeout=30)
    for name in MODEL_NAMES:
        LLMModelFactory(name=name, provider=provider, upstream_model="sim-1")


@pytest.fixture
def throttles_raised_server(
    start_server: Callable[..., tuple[ChildProcess, str]], schema_models: None
) -> tuple[ChildProcess, str]:
    """A uvicorn process whose registration and login throttles do not get in schemathesis's way."""
    return start_server(env=RAISED_THROTTLES)


@dataclass(frozen=True)
class Credential:
    name: str
    authorization: str  # the ``Authorization`` header's value


def _jwt_of_admin(url: str) -> str:
    """Return a JWT access token of a new admin, logged in over HTTP."""
    password = "pw-" + secrets.token_urlsafe(12)
    admin = UserFactory(role=User.Role.ADMIN, password=password)
    response = httpx.post(
        f"{url}/api/auth/token/", json={"username": admin.username, "password": password}, trust_env=False
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access"])


def _api_key_of_member(url: str) -> str:
    """Return the ``sk-...`` secret of an API key of a member registered over HTTP."""
    username, password = f"st-{secrets.token_hex(4)}", "pw-" + secrets.token_urlsafe(12)
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        assert http.post("/api/auth/register/", json={"username": username, "password": password}).status_code == 201
        access = http.post("/api/auth/token/", json={"username": username, "password": password}).json()["access"]
        response = http.post("/api/api-keys/", json={"name": "schemathesis"}, headers=bearer(access))
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def _schemathesis(url: str, authorization: str, report_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the schemathesis CLI against ``url``'s schema with every check; return the finished process."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        *("--config-file", str(CONFIG)),
        "run",
        f"{url}/api/schema/",
        *("--header", f"Authorization: {authorization}"),
        *("--checks", "all"),
        *("--max-examples", str(MAX_EXAMPLES)),
        *("--seed", str(SEED)),
        *("--workers", "1"),
        *("--request-timeout", "30"),
        "--no-color",
        *("--report", "junit"),
        *("--report-dir", str(report_dir)),
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        command, env=env, capture_output=True, text=True, timeout=RUN_SECONDS, cwd=report_dir, check=False
    )


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _logged_errors(log: str, limit: int = 20_000) -> str:
    """Return the server's ERROR and CRITICAL entries with their tracebacks: a 500's cause, which the
    log's tail has often scrolled past by the end of the run."""
    entries: list[str] = []
    keep = False
    for line in log.splitlines():
        if _LOG_LINE.match(line):
            keep = " ERROR " in line or " CRITICAL " in line
        if keep:
            entries.append(line)
    return "\n".join(entries)[-limit:] or "(none)"


@pytest.mark.timeout(RUN_SECONDS + 60)
@pytest.mark.parametrize("credential", ["jwt", "api_key"])
def test_schemathesis_finds_no_failure(
    credential: str, throttles_raised_server: tuple[ChildProcess, str], tmp_path: Path
) -> None:
    server, url = throttles_raised_server
    secret = _jwt_of_admin(url) if credential == "jwt" else _api_key_of_member(url)

    result = _schemathesis(url, f"Bearer {secret}", tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"schemathesis found failures (exit code {result.returncode}); reproduce with the curl lines below.\n"
        f"{output[-OUTPUT_TAIL_CHARS:]}\n----- server errors -----\n{_logged_errors(server.output())}"
        f"\n----- server log -----\n{server.tail()}"
    )
    # Not vacuous: it tested every operation of the schema, login and registration included (the
    # throttles raised: schemathesis warns "Rate limited" when an operation mostly answers 429).
    schema = httpx.get(f"{url}/api/schema/?format=json", trust_env=False).json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    assert f"Selected: {operations}/{operations}" in output, output[-OUTPUT_TAIL_CHARS:]
    assert f"Tested: {operations}" in output, output[-OUTPUT_TAIL_CHARS:]
    assert "Rate limited" not in output, output[-OUTPUT_TAIL_CHARS:]
    assert secret not in output
