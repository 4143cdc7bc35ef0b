"""Fixtures for the end-to-end test: real simulator, ASGI server and Celery worker processes.

``e2e_stack`` (one per test module) starts, against the test database pytest-django created:

- the LLM simulator (``manage.py llm_simulator``), requiring an upstream API key;
- two ASGI server processes (``uvicorn chatbackend.asgi:application``, each on a free port) on the
  same database and Redis, since state must hold across processes: a stop request or a revoked
  API key reaches the process that did not receive it through Redis (the channel layer);
- with ``REDIS_URL`` set, a Celery worker (``CELERY_TASK_ALWAYS_EAGER=false`` for all, so usage
  accounting crosses processes through Redis); without it the servers run tasks eagerly, and
  there is no channel layer between the servers (``E2EStack.shares_state`` is False).

Children write to log files that the test scans for secrets and that a failing test's report
shows (see ``pytest_runtest_makereport``). Every child is terminated at the end, whatever happens.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx
import pytest
import redis
from django.conf import settings

from llm.tests.simulator_process import SimulatorProcess, start_simulator
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import E2E_REPLY_TOKENS, bearer, poll_until_sync

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0
STOP_SECONDS = 15.0
LOG_TAIL_CHARS = 12_000
# The ASGI server processes, by log name: two, for what must hold across processes.
SERVER_NAMES = ("server-a", "server-b")

# The simulator's pace: E2E_REPLY_TOKENS tokens 30 ms apart, so a stop lands mid-stream.
SIMULATOR_ARGS = ("--token-delay-ms", "30", "--reply-tokens", str(E2E_REPLY_TOKENS))


@dataclass
class ChildProcess:
    """A child process whose stdout and stderr go to ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def output(self) -> str:
        """Return everything the process wrote so far (it writes to the file directly, unbuffered)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self) -> str:
        """Return the last ``LOG_TAIL_CHARS`` characters of the output, for an error message."""
        return self.output()[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``STOP_SECONDS``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


@dataclass
class E2EStack:
    """The running processes, plus what the tests received and which secrets must never show.

    ``received``: every response body, SSE event and WebSocket frame the tests got.
    ``secrets``: strings that must appear in none of them nor in the server's and worker's logs
    (the upstream API keys and every ``sk-...`` secret created).
    """

    server_urls: tuple[str, ...]
    simulator: SimulatorProcess
    provider_api_key: str
    wrong_provider_api_key: str
    children: list[ChildProcess]
    worker_running: bool
    env: dict[str, str] = field(default_factory=dict, repr=False)
    received: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    log_dir: Path | None = None

    @property
    def server_url(self) -> str:
        """The first server's URL: where the tests go unless they need two processes."""
        return self.server_urls[0]

    @property
    def ws_url(self) -> str:
        return "ws" + self.server_url.removeprefix("http")

    @property
    def shares_state(self) -> bool:
        """Whether the servers reach each other through Redis (the worker runs exactly then)."""
        return self.worker_running

    def logs(self) -> dict[str, str]:
        """Return the output of the servers and the worker (the processes under test), by name."""
        return {child.name: child.output() for child in self.children}

    def accounting_idle(self) -> bool:
        """Return whether the worker has finished every task it received and none waits in the broker.

        Read from the worker's log (Celery logs each task ``received`` and then ``succeeded``,
        ``raised`` or ``retry``) and the length of the default queue in the Redis broker.
        """
        log = self.logs()["worker"]
        received = len(re.findall(r"Task \S+\[[0-9a-f-]+\] received", log))
        ended = len(re.findall(r"Task \S+\[[0-9a-f-]+\] (?:succeeded|raised|retry)", log))
        with redis.Redis.from_url(settings.CELERY_BROKER_URL) as broker:
            waiting = broker.llen("celery")
        # received > 0: called once records exist, so the worker has run tasks; zero would mean
        # these patterns no longer match Celery's log lines and "idle" would prove nothing.
        return received > 0 and received == ended and waiting == 0

    def worker(self) -> ChildProcess:
        """Return the running Celery worker process."""
        return next(child for child in self.children if child.name == "worker")

    def worker_replace(self, env: dict[str, str] | None = None) -> ChildProcess:
        """Start a new Celery worker (without purging the queue) in place of the current one, once ready.

        The previous worker, which the test has stopped or killed, stays in the report under another
        name; ``env``: settings of the new worker on top of the stack's (e.g. a short
        ``CELERY_VISIBILITY_TIMEOUT_SECONDS``, after which it takes over what a killed worker held).
        """
        assert self.log_dir is not None
        old = self.worker()
        old.name = f"worker-{sum(child.name.startswith('worker') for child in self.children)}"
        worker = _start_child(
            "worker",
            worker_command(purge=False),
            {**self.env, **(env or {})},
            self.log_dir,
            log_name=f"{old.name}-replacement",
        )
        self.children.append(worker)
        _wait_for(worker, lambda: " ready." in worker.output(), "ready")
        return worker

    def report(self) -> str:
        """Return the tail of every child's output, for a failure report."""
        parts = []
        for child in self.children:
            text = child.output()
            code = child.process.poll()
            state = "running" if code is None else f"exited with {code}"
            parts.append(f"----- {child.name} ({state}), last {LOG_TAIL_CHARS} chars -----\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _test_database_url() -> str:
    """Return a DATABASE_URL for the test database pytest-django created (call after its setup)."""
    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        name = str(db["NAME"])
        if name in {"", ":memory:"} or name.startswith("file:"):
            raise RuntimeError("the end-to-end test needs a file SQLite test database (settings: DATABASES TEST NAME)")
        return f"sqlite:///{Path(name).resolve()}"
    if db["ENGINE"] == "django.db.backends.postgresql":
        credentials = quote(db.get("USER") or "", safe="")
        if db.get("PASSWORD"):
            credentials += ":" + quote(db["PASSWORD"], safe="")
        host = db.get("HOST") or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        port = db.get("PORT") or "5432"
        return f"postgres://{credentials}@{host}:{port}/{quote(str(db['NAME']), safe='')}"
    raise RuntimeError(f"the end-to-end test does not know how to share a {db['ENGINE']} database")


def _start_child(
    name: str, command: list[str], env: dict[str, str], log_dir: Path, *, log_name: str = ""
) -> ChildProcess:
    log_path = log_dir / f"{log_name or name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return ChildProcess(name=name, process=process, log_path=log_path, log_file=log_file)


def _wait_for(child: ChildProcess, ready: Callable[[], bool], what: str) -> None:
    """Poll ``ready()`` until it is true; fail with the child's output if it exits or time runs out."""
    try:
        poll_until_sync(
            lambda: child.process.poll() is not None or ready(), within=STARTUP_SECONDS, interval=0.2, what=what
        )
    except AssertionError:
        raise RuntimeError(f"{child.name} was not {what} within {STARTUP_SECONDS:.0f} s:\n{child.tail()}") from None
    if child.process.poll() is not None:
        raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")


def worker_command(*, purge: bool) -> list[str]:
    """Return the command of the stack's Celery worker (one process, ``solo`` pool); ``purge``: empty its queue."""
    return [
        *(sys.executable, "-m", "celery", "-A", "chatbackend", "worker", "--pool", "solo", "--loglevel", "info"),
        *(["--purge"] if purge else []),
        *("--without-gossip", "--without-mingle", "--without-heartbeat", "--hostname", f"e2e-{os.getpid()}@%h"),
    ]


def server_command(server: str, port: int, *, grace_seconds: int = 5) -> list[str]:
    """Return the command that serves the project's ASGI app on ``port`` as production runs it.

    ``server``: ``uvicorn`` (with the lifespan protocol on and ``grace_seconds`` of graceful
    shutdown, as README and docker-compose run it) or ``daphne``.
    """
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "chatbackend.asgi:application", "--host", "127.0.0.1"),
            *("--port", str(port), "--lifespan", "on", "--timeout-graceful-shutdown", str(grace_seconds)),
            "--no-proxy-headers",  # chatbackend.client_ip decides the client from TRUSTED_PROXY_IPS
        ]
    if server == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatbackend.asgi:application"]
    raise ValueError(server)


def _http_ready(url: str) -> bool:
    try:
        httpx.get(url, timeout=2, trust_env=False)
    except httpx.TransportError:
        return False
    return True


@pytest.fixture(scope="module")
def e2e_stack(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    """Start the simulator, the ASGI server and (with Redis) a Celery worker on the test database."""
    log_dir = tmp_path_factory.mktemp("e2e-logs")
    # Not "sk-..." on purpose: the server's log filter redacts that pattern, and this key must
    # stay out of responses and logs because the code never emits it, not because a regex hides it.
    provider_api_key = "upstream-" + secrets.token_hex(20)
    wrong_provider_api_key = "wrong-upstream-" + secrets.token_hex(20)
    simulator = start_simulator(*SIMULATOR_ARGS, "--api-key", provider_api_key)
    children: list[ChildProcess] = []
    try:
        with_redis = bool(settings.REDIS_URL)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatbackend.settings",
            "DATABASE_URL": _test_database_url(),
            "PYTHONUNBUFFERED": "1",
            "DJANGO_DEBUG": "false",
            "LOG_LEVEL": "DEBUG",  # the most the code logs is what the secret scan reads
        }
        if with_redis:
            env["CELERY_TASK_ALWAYS_EAGER"] = "false"

        servers: list[tuple[ChildProcess, str]] = []
        for name in SERVER_NAMES:  # started together, then waited for: they boot in parallel
            port = _free_port()
            server = _start_child(name, server_command("uvicorn", port), env, log_dir)
            children.append(server)
            servers.append((server, f"http://127.0.0.1:{port}"))
        for server, url in servers:
            _wait_for(server, lambda url=url: _http_ready(f"{url}/"), "answering HTTP")

        if with_redis:
            # Tasks left in the queue by an earlier, aborted run name rows of another database:
            # --purge drops them so they cannot be counted here.
            worker = _start_child("worker", worker_command(purge=True), env, log_dir)
            children.append(worker)
            _wait_for(worker, lambda: " ready." in worker.output(), "ready")

        yield E2EStack(
            server_urls=tuple(url for _, url in servers),
            simulator=simulator,
            provider_api_key=provider_api_key,
            wrong_provider_api_key=wrong_provider_api_key,
            children=children,
            worker_running=with_redis,
            env=env,
            log_dir=log_dir,
        )
    finally:
        for child in reversed(children):
            child.stop()
        simulator.stop()


@pytest.fixture
def start_server(e2e_stack: E2EStack, tmp_path: Path) -> Iterator[Callable[..., tuple[ChildProcess, str]]]:
    """Start another server process on the stack's database and Redis, for a test that ends it.

    ``start_server(server="uvicorn", grace_seconds=5, env={...})`` returns the process and its URL
    once it answers HTTP (``env``: settings of its own on top of the stack's); a process still
    running at the end of the test is stopped.
    """
    started: list[ChildProcess] = []

    def start(
        server: str = "uvicorn", *, grace_seconds: int = 5, env: dict[str, str] | None = None
    ) -> tuple[ChildProcess, str]:
        port = _free_port()
        command = server_command(server, port, grace_seconds=grace_seconds)
        child = _start_child(f"{server}-{port}", command, {**e2e_stack.env, **(env or {})}, tmp_path)
        started.append(child)
        url = f"http://127.0.0.1:{port}"
        _wait_for(child, lambda: _http_ready(f"{url}/"), "answering HTTP")
        return child, url

    yield start
    for child in started:
        child.stop()


@dataclass(frozen=True)
class E2EModels:
    """Model names served by the simulator: ``good`` ones, and one whose provider key is wrong."""

    names: tuple[str, ...] = ("gpt-4o-mini", "sim-model")
    wrong_key: str = "sim-wrong-key"


@pytest.fixture
def e2e_models(e2e_stack: E2EStack, transactional_db: None) -> E2EModels:
    """Create the simulator's providers and models in the test database, committed for the server."""
    provider = ProviderFactory(
        name="simulator", base_url=e2e_stack.simulator.base_url, api_key=e2e_stack.provider_api_key, read_timeout=30
    )
    for name in E2EModels.names:
        LLMModelFactory(name=name, provider=provider, upstream_model="sim-1")
    wrong = ProviderFactory(
        name="simulator-wrong-key", base_url=e2e_stack.simulator.base_url, api_key=e2e_stack.wrong_provider_api_key
    )
    LLMModelFactory(name=E2EModels.wrong_key, provider=wrong, upstream_model="sim-1")
    return E2EModels()


def _recording_client(stack: E2EStack, base_url: str) -> httpx.Client:
    """Return an HTTP client for ``base_url`` that records every non-streamed response body."""

    def record(response: httpx.Response) -> None:
        # Streamed bodies (SSE) are recorded by the test as it reads them.
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
            stack.received.append(response.text)

    return httpx.Client(base_url=base_url, timeout=30, trust_env=False, event_hooks={"response": [record]})


@pytest.fixture
def http(e2e_stack: E2EStack) -> Iterator[httpx.Client]:
    """An HTTP client for the first server that records every non-streamed response body."""
    with _recording_client(e2e_stack, e2e_stack.server_urls[0]) as client:
        yield client


@pytest.fixture
def http_b(e2e_stack: E2EStack) -> Iterator[httpx.Client]:
    """The same for the second server process, for what must hold across processes."""
    with _recording_client(e2e_stack, e2e_stack.server_urls[1]) as client:
        yield client


@dataclass(frozen=True)
class E2EUser:
    """A user registered over HTTP, with a JWT ``access`` token and an ``api_key`` secret."""

    username: str
    password: str
    access: str
    api_key: str


@pytest.fixture
def e2e_user(e2e_stack: E2EStack, e2e_models: E2EModels, http: httpx.Client) -> E2EUser:
    """Register a user, log in and create an API key, over HTTP as a client would."""
    username = f"e2e-{secrets.token_hex(4)}"
    password = "pw-" + secrets.token_urlsafe(12)
    e2e_stack.secrets.add(password)
    response = http.post("/api/auth/register/", json={"username": username, "password": password})
    assert response.status_code == 201, response.text
    assert response.json()["username"] == username

    response = http.post("/api/auth/token/", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    access = response.json()["access"]

    response = http.post("/api/api-keys/", json={"name": "e2e"}, headers=bearer(access))
    assert response.status_code == 201, response.text
    api_key = response.json()["key"]
    assert api_key.startswith("sk-")
    # The one answer that must show the secret (once, by contract); every other one must not.
    e2e_stack.received.remove(response.text)
    e2e_stack.secrets.add(api_key)
    return E2EUser(username=username, password=password, access=access, api_key=api_key)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the children's output to the report of a failed end-to-end test."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("e2e_stack")
    if report.failed and isinstance(stack, E2EStack):
        report.sections.append(("e2e process output", stack.report()))
    return report
