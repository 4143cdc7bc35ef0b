"""Readiness follows Redis and PostgreSQL going away and coming back, with no server restart.

The machine's shared Redis and PostgreSQL must keep running (other test runs use them), so this
module starts its own: a ``redis-server`` on a free port and a PostgreSQL cluster (``initdb`` into
a temporary directory, trust authentication, ``pg_ctl`` on a free port). A server process
(``start_server``) runs on them; the test stops and restarts each service under it and watches
``/health/ready``, ``/health/live`` and ordinary API requests. Skipped when ``redis-server`` or
PostgreSQL's server binaries are not installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kit import assert_error, bearer, poll_until_sync, run_python

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OUTAGE_SECONDS = 30.0  # how long a change of state may take to show (a readiness check times out in 1 s)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin(name: str) -> str | None:
    """Return the path of PostgreSQL's server program ``name`` (PATH first, then Debian's layout)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass
class PrivateRedis:
    """A ``redis-server`` of this test alone, without persistence: a restart comes back empty."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        poll_until_sync(self._answers, within=OUTAGE_SECONDS, what="the private Redis answering")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test alone, in a temporary directory, trusting local connections.

    Its programs refuse to run as root: as root they run as the ``postgres`` user.
    """

    data_dir: Path
    port: int
    pg_ctl: str
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/chatbackend"

    def run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=120)  # noqa: S603

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir.parent} -c fsync=off"
        log = self.data_dir.parent / "postgres.log"
        self.run(self.pg_ctl, "start", "-w", "-t", "60", "-D", str(self.data_dir), "-l", str(log), "-o", options)

    def stop(self) -> None:
        self.run(self.pg_ctl, "stop", "-w", "-m", "fast", "-D", str(self.data_dir))


@pytest.fixture(scope="module")
def private_services() -> Iterator[tuple[PrivateRedis, PrivatePostgres]]:
    """Start a private Redis and a private PostgreSQL (database ``chatbackend``, migrated)."""
    initdb, pg_ctl, createdb = (_postgres_bin(name) for name in ("initdb", "pg_ctl", "createdb"))
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: cannot run a private Redis to stop and restart")
    if not (initdb and pg_ctl and createdb):
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="chatbackend-health-"))
    if os.geteuid() == 0:
        try:
            postgres_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(root, postgres_user.pw_uid, postgres_user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    postgres = PrivatePostgres(data_dir=root / "data", port=_free_port(), pg_ctl=pg_ctl, as_user=as_user)
    redis_server = PrivateRedis(port=_free_port())
    try:
        postgres.run(initdb, "-D", str(postgres.data_dir), "-U", "postgres", "-A", "trust", "--no-sync")
        postgres.start()
        postgres.run(createdb, "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", "chatbackend")
        migrated = run_python("manage.py", "migrate", "--noinput", env={"DATABASE_URL": postgres.url})
        assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
        redis_server.start()
        yield redis_server, postgres
    finally:
        redis_server.stop()
        try:
            postgres.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(root, ignore_errors=True)


def _ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health/ready", timeout=30, trust_env=False)


def _check_states(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    return {name: check["status"] for name, check in body["checks"].items()}


def _wait_ready(url: str, predicate: Callable[[httpx.Response], bool], what: str) -> httpx.Response:
    return poll_until_sync(lambda: _ready(url), predicate, within=OUTAGE_SECONDS, interval=0.2, what=what)


def test_readiness_follows_redis_and_postgres_outages_without_a_restart(
    private_services: tuple[PrivateRedis, PrivatePostgres], start_server: Callable[..., Any]
) -> None:
    redis_server, postgres = private_services
    server, url = start_server(
        env={
            "DATABASE_URL": postgres.url,
            "REDIS_URL": redis_server.url,
            "CELERY_TASK_ALWAYS_EAGER": "false",
            "HEALTH_CHECK_TIMEOUT_SECONDS": "1",
            "DB_POOL_TIMEOUT": "3",  # how long a request waits for a connection while PostgreSQL is down
        }
    )
    client = httpx.Client(base_url=url, timeout=30, trust_env=False)

    ready = _ready(url)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ok"
    assert _check_states(ready) == {"database": "ok", "cache": "ok", "channel_layer": "ok", "broker": "ok"}
    account = {"username": "health-user", "password": "a-long-password-42"}
    assert client.post("/api/auth/register/", json=account).status_code == 201
    login = client.post("/api/auth/token/", json=account)
    assert login.status_code == 200, login.text
    token = login.json()["access"]

    # Redis stops: cache, channel layer and broker are reported unavailable; the database is not.
    redis_server.stop()
    down = _wait_ready(url, lambda r: r.status_code == 503, "readiness 503 while Redis is stopped")
    assert down.json()["status"] == "unavailable"
    assert _check_states(down) == {
        "database": "ok",
        "cache": "unavailable",
        "channel_layer": "unavailable",
        "broker": "unavailable",
    }
    assert "127.0.0.1" not in down.text and str(redis_server.port) not in down.text  # no internal detail
    assert client.get("/health/live").json() == {"status": "ok"}
    # What needs Redis answers a clear 503 (login is throttled in the cache); what does not, works.
    during = client.post("/api/auth/token/", json=account)
    assert during.status_code != 500, during.text
    if during.status_code == 503:
        assert_error(during, 503, code="service_unavailable")
    conversations = client.get("/api/conversations/", headers=bearer(token))
    assert conversations.status_code == 200, conversations.text

    redis_server.start()
    back = _wait_ready(url, lambda r: r.status_code == 200, "readiness 200 after Redis restarted")
    assert set(_check_states(back).values()) == {"ok"}
    assert client.post("/api/auth/token/", json=account).status_code == 200

    # PostgreSQL stops: the database is reported unavailable and API requests get 503 JSON.
    postgres.stop()
    down = _wait_ready(url, lambda r: r.status_code == 503, "readiness 503 while PostgreSQL is stopped")
    assert _check_states(down) == {"database": "unavailable", "cache": "ok", "channel_layer": "ok", "broker": "ok"}
    assert str(postgres.port) not in down.text
    assert client.get("/health/live").status_code == 200
    assert_error(client.get("/api/conversations/", headers=bearer(token)), 503, code="service_unavailable")

    postgres.start()
    _wait_ready(url, lambda r: r.status_code == 200, "readiness 200 after PostgreSQL restarted")
    recovered = poll_until_sync(
        lambda: client.get("/api/conversations/", headers=bearer(token)),
        lambda r: r.status_code == 200,
        within=OUTAGE_SECONDS,
        interval=0.2,
        what="an API request served again after PostgreSQL restarted",
    )
    assert recovered.json()["results"] == []
    assert server.process.poll() is None, "the server process must not have restarted"
    assert "Internal Server Error" not in server.output()  # Django's log line of a 500
