"""Run the LLM simulator as a real subprocess for tests (``manage.py llm_simulator``).

Usage::

    with running_simulator("--ttft-ms", "5", "--api-key", "sk-x") as sim:   # or start_simulator(...) + sim.stop()
        sim.base_url        # "http://127.0.0.1:PORT/v1", what ProviderConfig.base_url expects
        await sim.astats()  # GET /_simulator/stats as a dict
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["READY_LINE", "SimulatorProcess", "running_simulator", "start_simulator"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"LLM simulator listening on (http://\S+)")


@dataclass
class SimulatorProcess:
    """A running simulator: its ``root_url`` (``http://host:port``), ``base_url`` (``root_url/v1``),
    the ``api_key`` it requires (empty: none) and the ``process``. ``stop()`` ends it."""

    root_url: str
    base_url: str
    api_key: str
    process: subprocess.Popen[str]
    _pump: threading.Thread = field(repr=False)
    _stderr: IO[str] = field(repr=False)

    async def astats(self) -> dict[str, Any]:
        """Return ``GET /_simulator/stats``: requests_started/completed/failed/disconnected, active_streams."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.root_url}/_simulator/stats", timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """Return ``GET /_simulator/stats`` (blocking; for sync tests)."""
        response = httpx.get(f"{self.root_url}/_simulator/stats", timeout=5)
        response.raise_for_status()
        return response.json()

    def fault_set(self, model: str, directives: str) -> None:
        """Make requests for upstream ``model`` fail as ``directives`` says (``PUT /_simulator/faults/{model}``)."""
        response = httpx.put(f"{self.root_url}/_simulator/faults/{model}", content=directives, timeout=5)
        response.raise_for_status()

    def fault_clear(self, model: str) -> None:
        """Let requests for upstream ``model`` succeed again (``DELETE /_simulator/faults/{model}``)."""
        httpx.delete(f"{self.root_url}/_simulator/faults/{model}", timeout=5).raise_for_status()

    def requests_for(self, model: str) -> int:
        """Return how many chat completions the simulator received for upstream ``model``."""
        return int(self.stats()["requests_by_model"].get(model, 0))

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s) and release its pipes."""
        _stop(self.process, self._pump, self._stderr)


def _pump_lines(stream: Iterator[str], lines: queue.Queue[str | None]) -> None:
    """Copy the child's stdout lines into ``lines`` so its pipe never fills and blocks it."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _stop(process: subprocess.Popen[str], pump: threading.Thread, stderr: IO[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    pump.join(timeout=5)  # it ends at EOF, which the child's exit just caused
    if process.stdout is not None:
        process.stdout.close()
    stderr.close()


def start_simulator(*options: str, startup_timeout: float = 30.0) -> SimulatorProcess:
    """Start ``manage.py llm_simulator --port 0 *options`` and return it once it listens.

    ``options`` are the command's flags (``--ttft-ms``, ``--token-delay-ms``, ``--reply-tokens``,
    ``--api-key``, ``--models``). The caller must ``stop()`` it. Raises ``RuntimeError`` with the
    child's stderr if it does not print its ready line within ``startup_timeout`` seconds.
    """
    command = [sys.executable, "manage.py", "llm_simulator", "--host", "127.0.0.1", "--port", "0", *options]
    api_key = options[options.index("--api-key") + 1] if "--api-key" in options else ""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "chatbackend.settings")}
    stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by _stop
    process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1
    )
    assert process.stdout is not None  # noqa: S101 - stdout=PIPE above
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump_lines, args=(process.stdout, lines), daemon=True)
    pump.start()
    root_url = _wait_ready(lines, time.monotonic() + startup_timeout)
    if root_url is None:
        stderr.seek(0)
        output = stderr.read()[-4000:]
        _stop(process, pump, stderr)
        raise RuntimeError(f"llm_simulator did not start (exit code {process.poll()}):\n{output}")
    return SimulatorProcess(
        root_url=root_url, base_url=f"{root_url}/v1", api_key=api_key, process=process, _pump=pump, _stderr=stderr
    )


@contextmanager
def running_simulator(*options: str, startup_timeout: float = 30.0) -> Iterator[SimulatorProcess]:
    """Yield ``start_simulator(*options)`` and stop it on exit."""
    sim = start_simulator(*options, startup_timeout=startup_timeout)
    try:
        yield sim
    finally:
        sim.stop()


def _wait_ready(lines: queue.Queue[str | None], deadline: float) -> str | None:
    """Return the URL from the ready line, or ``None`` if the child exits or the deadline passes."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            return None
        if line is None:
            return None
        if match := READY_LINE.search(line):
            return match.group(1)
    return None
