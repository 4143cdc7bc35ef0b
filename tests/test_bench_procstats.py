"""The benchmark reads a process's CPU time from its CPU-time clock, in nanoseconds, all threads included."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench.procstats import _TICKS, BACKEND, ProcessTree, _proc_stat, process_cpu_seconds

# Two threads that each burn CPU, one of which has ended when the process is read.
_BURN = """
import sys, threading, time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
done = threading.Thread(target=burn, args=(0.2,))
done.start(); done.join()
burn(0.2)
sys.stdout.write("burnt\\n"); sys.stdout.flush()
sys.stdin.read()
"""


@pytest.fixture
def burnt() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "burnt\n"
    yield process
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=10)


@pytest.mark.skipif(not BACKEND.startswith("clock_getcpuclockid"), reason="no clock_getcpuclockid in this libc")
def test_a_process_cpu_clock_counts_every_thread_to_the_nanosecond(burnt: subprocess.Popen[str]) -> None:
    seconds = process_cpu_seconds(burnt.pid)
    assert seconds is not None
    fields = _proc_stat(burnt.pid)  # the same CPU in clock ticks (10 ms), as the kernel counts them
    assert fields is not None
    ticks = (int(fields[11]) + int(fields[12])) / _TICKS
    assert 0.4 <= seconds < 1.5
    assert seconds == pytest.approx(ticks, abs=0.03)
    assert ProcessTree(burnt.pid).cpu_seconds() == pytest.approx(seconds, abs=0.01)


def test_a_process_that_ended_has_no_cpu_clock() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=10)
    assert process_cpu_seconds(process.pid) is None
