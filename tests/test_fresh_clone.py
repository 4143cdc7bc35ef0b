"""README's two commands work on a fresh clone in a fresh virtualenv.

Clones the committed tree (what CI and a newcomer get), then runs ``./scripts/demo`` and
``./scripts/test`` there exactly as README says, with none of this checkout's environment: no
``.venv`` on PATH, no ``DATABASE_URL`` / ``REDIS_URL`` (the embedded defaults).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.kit import bearer, chunk_objects, chunk_text, poll_until_sync, sse_data

ROOT = Path(__file__).resolve().parents[1]
SETUP_SECONDS = 600  # a fresh venv installs every requirement from the package index

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2 * SETUP_SECONDS)]


def _clean_env() -> dict[str, str]:
    """Return this process's environment without our venv and service URLs."""
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV", "CELERY_TASK_ALWAYS_EAGER", "SQLITE_TEST_DATABASE"}
        and not key.startswith(("PYTEST_", "DJANGO_"))
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fresh") / "chatbackend"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True, timeout=120)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    """``./scripts/demo`` running in ``clone``; a thread keeps reading its output (a full pipe would block it).

    Started with SIGINT ignored, as a script's background job (``cmd &``) or a CI runner starts it:
    Ctrl-C (``stop``) must stop it all the same.
    """

    def __init__(self, clone: Path, port: int) -> None:
        self.clone = clone
        self.port = port
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["bash", "-c", 'trap "" INT; exec ./scripts/demo --port "$0"', str(port)],
            cwd=clone,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, *, after: int = 0, within: float = SETUP_SECONDS) -> re.Match[str]:
        """Return the first match of ``pattern`` in the output from line ``after`` on, once it is printed."""

        def search() -> re.Match[str] | None:
            if self.process.poll() is not None and not re.search(pattern, "".join(self.lines[after:])):
                raise AssertionError(f"the demo exited ({self.process.returncode}):\n{self.output()[-4000:]}")
            return re.search(pattern, "".join(self.lines[after:]))

        found = poll_until_sync(search, within=within, interval=0.2, what=f"demo output {pattern!r}")
        assert found is not None
        return found

    def simulator_pid(self) -> int:
        """Return the pid of this demo's simulator: the process running this clone's ``manage.py llm_simulator``."""
        manage_py = str(self.clone / "manage.py")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if manage_py.encode() in argv and b"llm_simulator" in argv:
                return int(entry.name)
        raise AssertionError("no simulator process of this demo")

    def stop(self) -> None:
        """Ctrl-C, as in a terminal; the demo must say it stopped."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        poll_until_sync(lambda: "Stopped." in self.output(), within=10, what="the demo's 'Stopped.'")


def _streamed_reply(base: str, api_key: str) -> str:
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hello!"}]}
    url = f"{base}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=bearer(api_key), timeout=30) as response:
        assert response.status_code == 200, response.read()
        return chunk_text(chunk_objects(sse_data(response.read())))


def test_demo_command_installs_and_serves_a_streamed_reply(clone: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    demo = Demo(clone, port)
    try:
        api_key = demo.wait_for(r"API key\s+(sk-\S+)").group(1)
        models = httpx.get(f"{base}/v1/models", headers=bearer(api_key), timeout=30)
        assert models.status_code == 200, models.text
        assert "gpt-4o-mini" in {model["id"] for model in models.json()["data"]}
        assert _streamed_reply(base, api_key).strip()
    finally:
        demo.stop()  # Ctrl-C; asserts the demo said "Stopped."


def test_demo_restarts_a_dead_simulator_and_keeps_its_api_key_across_restarts(clone: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    demo = Demo(clone, port)
    try:
        api_key = demo.wait_for(r"API key\s+(sk-\S+)").group(1)
        assert _streamed_reply(base, api_key).strip()

        # The simulator dies: the demo says so, starts it again, and replies stream again.
        mark = len(demo.lines)
        os.kill(demo.simulator_pid(), signal.SIGKILL)
        demo.wait_for(r"\[demo\] The LLM simulator exited", after=mark, within=30)
        demo.wait_for(r"\[demo\] The LLM simulator is running again", after=mark, within=60)
        assert _streamed_reply(base, api_key).strip()
        assert demo.process.poll() is None
    finally:
        demo.stop()

    # The key is kept for the next start, readable by this user only, and never committed.
    key_file = clone / ".demo-api-key"
    assert key_file.read_text().strip() == api_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert subprocess.run(["git", "check-ignore", "-q", ".demo-api-key"], cwd=clone, check=False).returncode == 0

    demo = Demo(clone, port)
    try:
        assert demo.wait_for(r"API key\s+(sk-\S+)").group(1) == api_key
        models = httpx.get(f"{base}/v1/models", headers=bearer(api_key), timeout=30)
        assert models.status_code == 200, models.text
    finally:
        demo.stop()


def test_test_command_runs_lint_and_tests(clone: Path) -> None:
    result = subprocess.run(
        ["./scripts/test", "chatbackend/tests/test_logging.py", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=SETUP_SECONDS,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== ruff check" in result.stdout
    assert re.search(r"\b\d+ passed\b", result.stdout)
