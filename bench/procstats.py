"""CPU time and RSS of a process and its descendants, with psutil (or ``/proc`` without it).

A server is a process tree: uvicorn and daphne serve in the process they start in, granian
runs its Python workers as child processes. ``ProcessTree`` sums over the tree.
``RssSampler`` samples the tree's RSS in a thread, to find the peak during a round.

CPU time is read from each process's CPU-time clock (``clock_getcpuclockid(3)``, POSIX; in
nanoseconds, all threads, those that ended included) where libc has it, else from psutil or
``/proc/PID/stat`` in clock ticks (10 ms here: a round of 1 s of server CPU is then ±1 %).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # the benchmark still runs on Linux without it (bench/requirements.txt has it)
    psutil = None  # type: ignore[assignment]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_cpu_clock() -> Any:
    """Return libc's ``clock_getcpuclockid``, or None where there is none (not Linux or BSD libc)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).clock_getcpuclockid
        function.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int))
        return function
    return None


_CPU_CLOCK = _libc_cpu_clock()
_TICK_BACKEND = "psutil" if psutil is not None else "procfs"
BACKEND = f"clock_getcpuclockid, else {_TICK_BACKEND}" if _CPU_CLOCK is not None else _TICK_BACKEND


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far, from its CPU-time clock
    (nanoseconds); None when there is no such clock here or the process is gone."""
    if _CPU_CLOCK is None:
        return None
    clock = ctypes.c_int()
    if _CPU_CLOCK(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        return time.clock_gettime(clock.value)
    except OSError:  # the process ended since
        return None


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def _proc_children(pid: int) -> list[int]:
    """Return all descendants of ``pid`` (scanning /proc for parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ProcessTree:
    """A process and its descendants (re-read at most once a second)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._members: list[int] = [pid]
        self._members_at = 0.0
        self._lock = threading.Lock()

    def _pids(self) -> list[int]:
        with self._lock:
            now = time.monotonic()
            if now - self._members_at > 1.0:
                if psutil is not None:
                    try:
                        children = [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
                    except psutil.Error:
                        children = []
                else:
                    children = _proc_children(self.pid)
                self._members = [self.pid, *children]
                self._members_at = now
            return list(self._members)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the tree's live processes."""
        total = 0.0
        for pid in self._pids():
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                total += seconds
            elif psutil is not None:
                try:
                    times = psutil.Process(pid).cpu_times()
                except psutil.Error:
                    continue
                total += times.user + times.system
            else:
                fields = _proc_stat(pid)
                if fields:
                    total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    def rss_bytes(self) -> int:
        """Resident set size of the tree, in bytes."""
        total = 0
        for pid in self._pids():
            if psutil is not None:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
            else:
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
                except (OSError, IndexError, ValueError):
                    continue
        return total


class RssSampler:
    """Sample a ``ProcessTree``'s RSS every ``interval`` seconds in a daemon thread; keep the peak."""

    def __init__(self, tree: ProcessTree, interval: float = 0.05) -> None:
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.tree.rss_bytes()
            self.samples += 1
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.tree.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.tree.rss_bytes())


def machine_cpu() -> tuple[float, float]:
    """Return (busy, total) CPU seconds of the whole machine so far, summed over all cores."""
    if psutil is not None:
        times = psutil.cpu_times()._asdict()
        # guest time is already counted in user time: leave it out of the total.
        total = sum(v for k, v in times.items() if k not in ("guest", "guest_nice"))
        idle = times["idle"] + times.get("iowait", 0.0)
        return total - idle, total
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]
    total = sum(fields)
    return (total - idle) / _TICKS, total / _TICKS
