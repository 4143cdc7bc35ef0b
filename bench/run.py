"""``python -m bench``: streaming benchmark of chatbackend against the LLM simulator.

Starts the simulator and the backend as real processes, creates what it needs (user, API key,
provider, model, conversations) in a fresh database, and drives concurrent streams at several
concurrency levels through each path — ``direct`` (client → simulator), ``v1``
(``/v1/chat/completions``), ``v1m`` (the same as a caller every rate limit and budget applies
to), ``v1msg`` (``/v1/messages``, Anthropic's shape), ``v1resp`` (``/v1/responses``), ``sse``
(conversation SSE endpoint) and ``ws`` (WebSocket consumer) — under each ASGI server, and
measures each upstream adapter's CPU per chunk (``bench.adapter_cpu``) against the same
simulator. Prints a Markdown table, writes ``<out>/latest.json`` and ``<out>/latest.png``. See
``bench/README.md`` for the columns and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple, cast
from urllib.parse import quote, urlsplit, urlunsplit

from . import report
from .loadgen import raise_open_file_limit, recv_message, send_message
from .procstats import BACKEND as PROCSTATS_BACKEND
from .procstats import ProcessTree, RssSampler, machine_cpu
from .seed import METERED_LIMITS

ROOT = Path(__file__).resolve().parent.parent
# v1m ("/v1, metered") right after v1: with one server their blocks run back to back, so the
# enforcement comparison (report.enforcement) sees the least drift in the machine's load; the
# other inbound APIs (v1msg, v1resp) next, for the same reason (report.inbound_apis).
PATHS = ("direct", "v1", "v1m", "v1msg", "v1resp", "sse", "ws")
DEFAULT_PATHS = PATHS
# Unless --paths names them, the other inbound APIs run on the first server only, their largest level
# last of all: on both servers they would add ~170 s to the default run (~420 s of its 570 s budget
# without them); on one, ~85 s, and ~60 s to --quick (bench/README.md).
FIRST_SERVER_PATHS = ("v1msg", "v1resp")
BACKEND_PATHS = ("v1", "v1m", "v1msg", "v1resp", "sse", "ws")
# Paths whose 1-stream round sends C1_REPLIES replies (replies_for).
C1_PATHS = ("direct", "v1", "v1m", "v1msg", "v1resp")
# The upstream adapters measured by bench.adapter_cpu (Provider.kind), one after another in one process.
ADAPTER_KINDS = ("openai", "anthropic", "gemini", "azure_openai")
# Per kind: a warm-up reply, replies one after another, then this many at once, one round: five
# nominal replies of the simulator (0.69 s each by default), ~3.5 s per kind; ~20 s for the four
# with the process start.
ADAPTER_REPLIES = 3
ADAPTER_CONCURRENCY = 100
ADAPTER_TIMEOUT_S = 120.0
SERVERS = ("uvicorn", "daphne", "granian")
SERVER_MODULES = {"uvicorn": "uvicorn", "daphne": "daphne", "granian": "granian"}
DEFAULT_LEVELS = "1,50,200,1000,2000"
QUICK_LEVELS = "1,50,200"
# With --baseline every backend block runs twice: without 2000 streams (and with one server,
# below) the default run stays within the default budget.
BASELINE_LEVELS = "1,50,200,1000"
BUDGET_S = 570.0
# --quick: 150 s before v1m and the 10 replies at one stream (~45 s more, ~70 s with --baseline);
# at 150 s a busy 2-core machine (server start-ups of 4-6 s) skipped sse and ws at 200 streams.
# Both + 20 s for the adapters' CPU per chunk (measure_adapters), + 60 s for v1msg and v1resp.
# Both + ~60 s per tree for the paired enforcement phase (ENFORCEMENT_PAIRS; ~160 s since its CPU
# rounds run side by side, ENFORCEMENT_CPU_PAIRS: --quick ~230 s, with --baseline ~450 s).
QUICK_BUDGET_S = 350.0
QUICK_BASELINE_BUDGET_S = 540.0
STARTUP_TIMEOUT_S = 60.0
WARMUP_STREAMS = 4
REPORT_RESERVE_S = 20.0  # kept free at the end of the budget for teardown and the report
BLOCK_OVERHEAD_S = 4.0  # a server start, its warm-up round and its stop
IDLE_WARNING_PCT = 15.0  # machine busy share before the run above which the report warns
ESTIMATE_MARGIN = 1.25  # rounds run longer than a linear guess as the server saturates
PROMPT = "Tell me about the benchmark"
MAX_TOKENS_FACTOR = 4  # max_tokens (v1resp: max_output_tokens) sent on direct and /v1: this many times --tokens
C1_REPLIES = 10  # replies of the one stream at level 1 on C1_PATHS (replies_for)
ASGI_APP = "chatbackend.asgi:application"
# The paired enforcement phase (Bench.paired_enforcement): for TTFT, one server answers v1 and v1m
# in alternating rounds, v1 v1m v1m v1 ..., each pair of neighbouring rounds compared; for CPU, two
# server processes answer one caller each at the same time, then the other way round (side_by_side).
# The machine's speed steps by ~30 % within minutes on a shared VM: the blocks' v1m / v1 cannot
# resolve 5 %, and neighbouring rounds of one process still differed by ±10-20 % (the simulator's
# CPU per token, which no backend code changes, by up to 13 %). ``--enforcement-pairs`` pairs of each.
ENFORCEMENT_PAIRS = 6
# Side-by-side CPU pairs: one pair's v1m / v1 varies by ~3 % (its log's standard deviation, 18 pairs
# on this VM), so the median of 12 is good to ~±2 % (95 %), of 6 to ~±3 %; ~5 s a pair.
ENFORCEMENT_CPU_PAIRS = 12
ENFORCEMENT_TTFT_LEVEL = 1  # the TTFT pairs: one stream, as the TTFT target is stated
# Replies per TTFT round: a reply's TTFT varies by ~±1 ms at one stream here, against a 1 ms target;
# with 3 per round, two runs of the same tree gave −0.3 and +1.3 ms added. 10 per round, 6 pairs:
# 120 replies per path (~10 s more than 3).
ENFORCEMENT_TTFT_REPLIES = 10
# The CPU rounds: streams on each of the two processes side by side (Bench.side_by_side), so that the
# machine carries the CPU target's smallest level (report.CPU_TARGET_MIN_LEVEL) as a 2-core VM can.
ENFORCEMENT_CPU_LEVEL = 25


class BenchError(RuntimeError):
    """A failure that stops the benchmark (a process would not start, a setup step failed)."""


# --- options --------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark chatbackend's streaming paths against the LLM simulator (see bench/README.md).",
    )
    parser.add_argument("--levels", help=f"concurrent streams per round, comma-separated (default {DEFAULT_LEVELS})")
    parser.add_argument("--servers", help="ASGI servers: uvicorn, daphne, granian (default uvicorn,daphne)")
    parser.add_argument(
        "--paths",
        help=f"paths to measure, of {','.join(PATHS)} (default all, {' and '.join(FIRST_SERVER_PATHS)} "
        "on the first server only and not with --baseline)",
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply (default 64)")
    parser.add_argument("--token-delay-ms", type=float, default=10.0, help="simulator delay between tokens (10)")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="simulator time to first token (50)")
    parser.add_argument(
        "--replies",
        default="auto",
        help=f"sequential replies per stream: a number, or auto = {C1_REPLIES} at 1 stream on "
        f"{', '.join(C1_PATHS)}, 2 up to 200 streams, 1 above (default auto)",
    )
    parser.add_argument(
        "--ramp-ms",
        type=float,
        help="stream i starts at i/N of this (default: one reply's nominal duration, ttft + tokens*delay)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output directory (bench/results)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"levels {QUICK_LEVELS}, uvicorn only, {QUICK_BUDGET_S:g} s budget "
        f"({QUICK_BASELINE_BUDGET_S:g} s with --baseline)",
    )
    parser.add_argument(
        "--budget-s", type=float, help=f"wall-clock budget; rounds that would not fit are skipped ({BUDGET_S:g})"
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="another checkout of this project (e.g. git worktree add /tmp/old <commit>): every backend block "
        f"runs again with the server started from DIR, labelled SERVER{report.BASELINE_SUFFIX} "
        f"(default levels {BASELINE_LEVELS}, servers uvicorn)",
    )
    parser.add_argument("--client-procs", type=int, default=1, help="load-generator processes (default 1)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="a postgres:// URL: the benchmark (re)creates database --db-name on that server; "
        "empty: a temporary SQLite file (default: $DATABASE_URL)",
    )
    parser.add_argument("--db-name", default="chatbackend_bench", help="PostgreSQL database to (re)create")
    parser.add_argument("--keep-db", action="store_true", help="keep the benchmark database afterwards")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", ""),
        help="Redis for the channel layer, cache and Celery broker (default: $REDIS_URL; empty: in-memory)",
    )
    parser.add_argument(
        "--redis-db", type=int, default=15, help="Redis database index the benchmark uses and cleans (default 15)"
    )
    parser.add_argument(
        "--profile",
        default="",
        help="PATH:LEVEL, e.g. v1:200: after that round (first server), repeat it under py-spy and summarize",
    )
    parser.add_argument(
        "--enforcement-pairs",
        type=int,
        default=ENFORCEMENT_PAIRS,
        help="pairs of alternating v1 / v1m rounds of 1 stream on one server (TTFT), after the blocks; 0: no "
        f"paired phase, the side-by-side CPU rounds neither (default {ENFORCEMENT_PAIRS})",
    )
    parser.add_argument(
        "--enforcement-cpu-pairs",
        type=int,
        default=ENFORCEMENT_CPU_PAIRS,
        help=f"pairs of side-by-side rounds of {ENFORCEMENT_CPU_LEVEL} streams per process (server CPU), with a "
        f"third as many control pairs; 0: none (default {ENFORCEMENT_CPU_PAIRS})",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw latest.png")
    parser.add_argument(
        "--adapters",
        default=",".join(ADAPTER_KINDS),
        help="upstream adapters whose CPU per chunk to measure (bench.adapter_cpu), comma-separated, or none "
        f"(default {','.join(ADAPTER_KINDS)})",
    )
    args = parser.parse_args(argv)

    default_levels = QUICK_LEVELS if args.quick else BASELINE_LEVELS if args.baseline else DEFAULT_LEVELS
    args.levels = [int(x) for x in _csv(args.levels or default_levels)]
    args.servers = _csv(args.servers or ("uvicorn" if args.quick or args.baseline else "uvicorn,daphne"))
    args.first_server_paths = () if args.paths else FIRST_SERVER_PATHS
    if args.paths is None:  # with --baseline, not the other inbound APIs: an older tree may not have them
        args.paths = ",".join(p for p in DEFAULT_PATHS if not (args.baseline and p in FIRST_SERVER_PATHS))
    args.paths = _csv(args.paths)
    args.adapters = [] if args.adapters.strip() == "none" else _csv(args.adapters)
    for kind in args.adapters:
        if kind not in ADAPTER_KINDS:
            parser.error(f"unknown adapter {kind!r}; known: {', '.join(ADAPTER_KINDS)} (or none)")
    if args.budget_s is None:
        args.budget_s = (QUICK_BASELINE_BUDGET_S if args.baseline else QUICK_BUDGET_S) if args.quick else BUDGET_S
    if args.baseline:
        baseline = Path(args.baseline).expanduser().resolve()
        missing = [name for name in ("manage.py", "chatbackend/asgi.py") if not (baseline / name).is_file()]
        if missing:
            parser.error(f"--baseline {args.baseline} is not a checkout of this project: no {', '.join(missing)}")
        args.baseline = baseline
    for server in args.servers:
        if server not in SERVERS:
            parser.error(f"unknown server {server!r}; known: {', '.join(SERVERS)}")
    for path in args.paths:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; known: {', '.join(PATHS)}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels must be positive integers")
    if "v1m" in args.paths and max(args.levels) >= METERED_LIMITS["concurrent_streams"]:
        parser.error(
            f"v1m's caller may stream {METERED_LIMITS['concurrent_streams']} replies at once (bench.seed): "
            "levels must stay below that"
        )
    if args.enforcement_pairs < 0 or args.enforcement_cpu_pairs < 0:
        parser.error("--enforcement-pairs and --enforcement-cpu-pairs must be 0 or more")
    if args.replies != "auto" and (not args.replies.isdigit() or int(args.replies) < 1):
        parser.error("--replies must be auto or a positive integer")
    if args.ramp_ms is None:
        args.ramp_ms = args.ttft_ms + args.tokens * args.token_delay_ms
    if args.profile:
        match = re.fullmatch(r"(v1|v1m|v1msg|v1resp|sse|ws):(\d+)", args.profile)
        if not match:
            parser.error("--profile must look like v1:200")
        args.profile = (match.group(1), int(match.group(2)))
    if args.database_url and not args.database_url.startswith(("postgres://", "postgresql://")):
        if not args.database_url.startswith("sqlite:"):
            parser.error("--database-url must be a postgres:// URL (or empty for SQLite)")
        args.database_url = ""  # a given SQLite file is never touched: the benchmark uses its own
    return args


def replies_for(args: argparse.Namespace, level: int, path: str) -> int:
    """Return the sequential replies per stream of a round on ``path`` with ``level`` streams.

    ``--replies auto``: 2 up to 200 streams (every stream is open at once for a while), 1 above
    (bounds the run time); at 1 stream on direct and the /v1 paths (``C1_PATHS``), ``C1_REPLIES``,
    so that the enforcement figure (v1m's TTFT p50 minus v1's, against a 1 ms target), the other
    inbound APIs' against v1, and the overheads they are read with are medians of more than two
    replies.
    """
    if args.replies != "auto":
        return int(args.replies)
    if level == 1 and path in C1_PATHS:
        return C1_REPLIES
    return 2 if level <= 200 else 1


def check_dependencies(args: argparse.Namespace) -> None:
    import importlib.util

    missing = [s for s in args.servers if importlib.util.find_spec(SERVER_MODULES[s]) is None]
    if missing:
        raise BenchError(
            f"ASGI server(s) not installed: {', '.join(missing)}. Run: pip install -r bench/requirements.txt"
        )
    if args.profile and not _py_spy():
        raise BenchError("--profile needs py-spy: pip install -r bench/requirements.txt")


def _py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


# --- child processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Child:
    """A child process we started, with its log file; stopped (its whole session) on ``stop``."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT, **popen: Any
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        popen.setdefault("stdout", self._log)
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stderr=self._log, start_new_session=True, **popen)
        self.pid = self.process.pid

    @property
    def pipe_in(self) -> BinaryIO:
        assert self.process.stdin is not None
        return cast(BinaryIO, self.process.stdin)

    @property
    def pipe_out(self) -> BinaryIO:
        assert self.process.stdout is not None
        return cast(BinaryIO, self.process.stdout)

    def tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)  # our own child's session, not a name match
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        else:  # the leader is gone; end any of its children still in the session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


def server_environment() -> dict[str, str]:
    """Return the environment of the benchmark's processes: this one's, without its database, pool,
    Celery and Redis settings (the caller sets those), production-like (no debug, warnings only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "DB_POOL_", "CELERY_", "REDIS_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="chatbackend.settings",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        DJANGO_DEBUG="false",
        LOG_LEVEL="WARNING",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        # Every stream's database work goes through the thread pool (a handful of threads),
        # so 40 connections never run out; the timeout only guards against a stuck pool.
        DB_POOL_MIN_SIZE="2",
        DB_POOL_MAX_SIZE="40",
        DB_POOL_TIMEOUT="60",
    )
    return env


def simulator_command(*, ttft_ms: float, token_delay_ms: float, tokens: int, api_key: str) -> list[str]:
    """Return the command that runs the LLM simulator on a free port (it logs ``listening on <url>``)."""
    return [
        sys.executable, "manage.py", "llm_simulator", "--host", "127.0.0.1", "--port", "0",
        "--ttft-ms", str(ttft_ms), "--token-delay-ms", str(token_delay_ms),
        "--reply-tokens", str(tokens), "--api-key", api_key,
    ]  # fmt: skip


def wait_for_url(child: Child, pattern: str, timeout: float = STARTUP_TIMEOUT_S) -> str:
    """Return the URL ``child`` logs (``pattern``'s group 1, without a trailing slash) once it does.

    Exits (``SystemExit``, with the end of its log) when it exits first or has not within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, child.tail())
        if match:
            return match.group(1).rstrip("/")
        if child.process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"{child.name} did not start:\n{child.tail()}")


def server_command(server: str, port: int) -> list[str]:
    """The command that serves the ASGI app on ``port``: one worker process, access logs off."""
    py = sys.executable
    if server == "uvicorn":
        return [
            py, "-m", "uvicorn", ASGI_APP, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio",
            "--lifespan", "off", "--no-access-log", "--log-level", "warning", "--backlog", "4096",
        ]  # fmt: skip
    if server == "daphne":
        # Twisted's default listen backlog is 50: 2000 clients connecting at once would see SYN
        # retries (1 s, 3 s, ...). The endpoint string raises it as the other servers' flags do.
        return [
            py, "-m", "daphne", "-e", f"tcp:port={port}:interface=127.0.0.1:backlog=4096",
            "-v", "0", ASGI_APP,
        ]  # fmt: skip
    if server == "granian":
        # asginl: ASGI without lifespan (Channels' router has no lifespan handler); backpressure
        # raised from its default (backlog / workers = 1024), which would cap 2000 streams.
        return [
            py, "-m", "granian", "--interface", "asginl", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--http", "1", "--backlog", "4096",
            "--backpressure", "8192", "--log-level", "warning", "--no-access-log", ASGI_APP,
        ]  # fmt: skip
    raise ValueError(server)


def _migrations(showmigrations: str) -> dict[str, bool]:
    """Parse ``manage.py showmigrations --list`` into ``{"app.name": applied}``."""
    found: dict[str, bool] = {}
    app = ""
    for line in showmigrations.splitlines():
        if line and not line[0].isspace():
            app = line.strip()
            continue
        match = re.match(r"\s*\[([X ])\] (\S+)", line)
        if match:
            found[f"{app}.{match.group(2)}"] = match.group(1) == "X"
    return found


def server_label(server: str, *, baseline: bool) -> str:
    """Return the name of ``server``'s rounds: ``uvicorn``, or ``uvicorn@baseline`` when run from ``--baseline``."""
    return server + report.BASELINE_SUFFIX if baseline else server


def _http_status(port: int, path: str, headers: dict[str, str]) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        connection.close()


_LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+) (.*)$")
_DIGITS = re.compile(r"\d+")
_SECRETISH = re.compile(r"(token=|Bearer\s+|\bsk-)[A-Za-z0-9_\-.]+")


def scan_log(path: Path, offset: int) -> dict[str, Any]:
    """Count what a server logged at WARNING or above from byte ``offset`` on, by kind.

    A kind is the level, the logger and the message with numbers folded (``reply N``); the
    server runs with ``LOG_LEVEL=WARNING``, so anything here is a problem the client may not see
    (e.g. a stop listener that could not register).
    """
    counts = {"warning": 0, "error": 0, "critical": 0, "tracebacks": 0}
    kinds: dict[str, int] = {}
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return {**counts, "kinds": {}}
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            counts["tracebacks"] += 1
            continue
        match = _LOG_LINE.match(line)
        if match:
            level, logger_name, message = match.groups()
            counts[level.lower()] += 1
            message = _SECRETISH.sub(lambda m: m.group(1) + "***", message)
            folded = _DIGITS.sub("N", message)[:100]
            kind = f"{level} {logger_name}: {folded}"
            kinds[kind] = kinds.get(kind, 0) + 1
    top = dict(sorted(kinds.items(), key=lambda item: -item[1])[:8])
    return {**counts, "kinds": top}


# --- the benchmark --------------------------------------------------------------------------


class _Side(NamedTuple):
    """One of the two server processes of the side-by-side rounds (``Bench.side_by_side``)."""

    name: str  # "a" or "b"
    tree: ProcessTree
    base_url: str
    clients: list[Child]  # its load generator
    log: Path | None  # its log, scanned per round


def control_pairs(pairs: int) -> int:
    """The side-by-side control pairs run with ``pairs`` pairs of CPU rounds (``Bench.side_by_side``)."""
    return max(1, pairs // 3) if pairs else 0


def _round_figures(path: str, level: int, raw: dict[str, Any]) -> dict[str, Any]:
    """What the enforcement rounds keep of a round's raw measurements (``Bench.run_round``)."""
    return {
        "path": path,
        "level": level,
        "ok": raw["ok"],
        "errors": raw["errors"],
        "tokens": raw["tokens"],
        "server_cpu_s": raw["server_cpu_s"],
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.out = Path(args.out)
        self.log_dir = self.out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="chatbackend-bench-"))
        self.children: list[Child] = []
        self.clients: list[Child] = []
        self.rounds: list[dict[str, Any]] = []
        self.startup: dict[str, list[float]] = {}
        self.setup: dict[str, Any] = {}
        self.profile: dict[str, Any] | None = None
        self.adapters: list[dict[str, Any]] = []  # bench.adapter_cpu's result per kind (measure_adapters)
        self.enforcement_pairs: list[dict[str, Any]] = []  # per server label: paired_enforcement's rounds
        self.notes: list[str] = []
        self.env: dict[str, str] = {}
        self.database: dict[str, Any] = {}
        self.redis_url = ""
        self.sim: Child | None = None
        self.sim_url = ""
        self.sim_key = "bench-upstream-key"
        self.api_key = ""
        self.model = ""
        self.metered_api_key = ""  # v1m: the caller every rate limit and budget applies to
        self.metered_model = ""
        self.conversations: list[int] = []
        self._conversation_cursor = 0
        self.fatal: str | None = None
        self.server_log: Path | None = None  # the running server's log, scanned per round
        # (server, path, level) of this tree's rounds skipped for time: the baseline skips them too.
        self.unpaired: set[tuple[str, str, int]] = set()

    # -- time --

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    # -- setup --

    def prepare_environment(self) -> None:
        args = self.args
        env = server_environment()
        if args.database_url:
            parts = urlsplit(args.database_url)
            bench_url = urlunsplit(parts._replace(path="/" + quote(args.db_name)))
            admin_url = urlunsplit(parts._replace(path="/postgres"))
            self._recreate_postgres(admin_url, args.db_name)
            env["DATABASE_URL"] = bench_url
            self.database = {"engine": "postgresql", "name": args.db_name, "host": parts.hostname, "admin": admin_url}
        else:
            path = self.tmp / "bench.sqlite3"
            env["DATABASE_URL"] = f"sqlite:///{path}"
            self.database = {"engine": "sqlite", "name": str(path)}
        if args.redis_url:
            parts = urlsplit(args.redis_url)
            self.redis_url = urlunsplit(parts._replace(path=f"/{args.redis_db}"))
            env["REDIS_URL"] = self.redis_url
            # As in production: the server queues usage records for a worker. No worker runs
            # here (it would compete for the 2 cores); the queue is deleted at the end.
            env["CELERY_TASK_ALWAYS_EAGER"] = "false"
            self._clean_redis()
        else:
            env["CELERY_TASK_ALWAYS_EAGER"] = "true"
        self.env = env

    def _recreate_postgres(self, admin_url: str, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _drop_postgres(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.database["admin"], autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database["name"]))
            )

    def _clean_redis(self) -> None:
        """Delete what the benchmark leaves in its Redis database: the Celery queue, channel keys, and
        v1m's rate-limit counters, stream leases and budget counters and reservations (no Celery
        worker settles them during a run: left behind, the next run's budget counters would start
        with thousands of reservations)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            for pattern in ("celery*", "_kombu*", "unacked*", "asgi*", ":1:*", "chatbackend-ratelimit*", "{budget}*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
        finally:
            client.close()

    def run_python(self, *args: str, cwd: Path = ROOT) -> str:
        """Run ``python *args`` in the project (or the checkout ``cwd``) with the benchmark's environment.

        Returns its stdout. Raises ``BenchError`` with the end of its output when it fails.
        """
        result = subprocess.run(
            [sys.executable, *args], cwd=cwd, env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            where = "" if cwd == ROOT else f" (in {cwd})"
            raise BenchError(f"{' '.join(args)}{where} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result.stdout

    def check_baseline(self) -> None:
        """Check that the baseline checkout runs on the benchmark database as migrated by this tree.

        Its migrations must be this tree's, all applied: ``showmigrations --list`` from both
        trees must agree (a migration only one tree has means models the other's code does not
        know), then ``manage.py migrate --check`` from the baseline (nothing unapplied, a
        consistent history). Raises ``BenchError`` naming the differing migrations otherwise.
        """
        baseline = self.args.baseline
        started = time.perf_counter()
        ours = _migrations(self.run_python("manage.py", "showmigrations", "--list"))
        theirs = _migrations(self.run_python("manage.py", "showmigrations", "--list", cwd=baseline))
        if ours != theirs:
            only_ours = sorted(set(ours) - set(theirs))
            only_theirs = [
                f"{name} ({'applied' if theirs[name] else 'not applied'})"
                for name in sorted(theirs)
                if name not in ours
            ]
            raise BenchError(
                f"the baseline {baseline} has other migrations than this tree, so its models differ and one "
                f"database cannot serve both: only in this tree {only_ours or 'none'}; only in the baseline "
                f"{only_theirs or 'none'}. Compare against a checkout with the same migrations."
            )
        self.run_python("manage.py", "migrate", "--check", cwd=baseline)
        if (baseline / ".env").is_file() and (
            not (ROOT / ".env").is_file() or (baseline / ".env").read_bytes() != (ROOT / ".env").read_bytes()
        ):
            self.notes.append(
                f"{baseline}/.env differs from this tree's: its settings fill in what the benchmark's environment "
                "does not set, for the baseline's server only"
            )
        self.setup["baseline_check_s"] = round(time.perf_counter() - started, 3)

    def run_manage(self, *command: str) -> float:
        started = time.perf_counter()
        self.run_python("manage.py", *command)
        return time.perf_counter() - started

    def start_simulator(self) -> None:
        args = self.args
        started = time.perf_counter()
        command = simulator_command(
            ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms, tokens=args.tokens, api_key=self.sim_key
        )
        self.sim = Child("simulator", command, self.env, self.log_dir / "simulator.log")
        self.children.append(self.sim)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", self.sim.tail())
            if match:
                self.sim_url = match.group(1).rstrip("/")
                break
            if self.sim.process.poll() is not None:
                raise BenchError(f"the simulator exited:\n{self.sim.tail()}")
            time.sleep(0.02)
        else:
            raise BenchError(f"the simulator did not start:\n{self.sim.tail()}")
        self.setup["simulator_start_s"] = round(time.perf_counter() - started, 3)

    def conversations_needed(self) -> int:
        blocks = 2 if len(self.args.levels) > 1 else 1  # see ``run``: lower levels, then the largest
        per_server_path = WARMUP_STREAMS * blocks + sum(self.args.levels)
        conv_paths = [p for p in self.args.paths if p in ("sse", "ws")]
        extra = self.args.profile[1] if self.args.profile and self.args.profile[0] in conv_paths else 0
        trees = 2 if self.args.baseline else 1  # the baseline's blocks take their own conversations
        return trees * len(self.args.servers) * len(conv_paths) * per_server_path + extra

    def seed(self) -> None:
        started = time.perf_counter()
        stdout = self.run_python(
            "-m",
            "bench.seed",
            "--simulator-url",
            self.sim_url,
            "--simulator-api-key",
            self.sim_key,
            "--conversations",
            str(self.conversations_needed()),
        )
        data = json.loads(stdout.strip().splitlines()[-1])
        self.api_key, self.model, self.conversations = data["api_key"], data["model"], data["conversations"]
        metered = data["metered"]
        self.metered_api_key, self.metered_model = metered["api_key"], metered["model"]
        self.setup["metered"] = {"model": metered["model"], "limits": metered["limits"], "budgets": metered["budgets"]}
        if "v1m" in self.args.paths and not metered["budgets"]:
            self.notes.append(
                "v1m: this tree has no budgets (accounts.models.Budget), so v1m is metered by rate limits only"
            )
        self.setup["seed_s"] = round(time.perf_counter() - started, 3)
        self.setup["conversations"] = len(self.conversations)

    def take_conversations(self, count: int) -> list[int]:
        start = self._conversation_cursor
        self._conversation_cursor += count
        taken = self.conversations[start : start + count]
        if len(taken) < count:
            raise BenchError("ran out of seeded conversations (bug in conversations_needed)")
        return taken

    def start_clients(self) -> None:
        self.clients = [self._start_client(f"client-{index}") for index in range(self.args.client_procs)]
        for client in self.clients:
            self._client_ready(client)

    def _start_client(self, name: str) -> Child:
        """Start a load generator (``bench.loadgen``): it serves round specs until its stdin closes."""
        client = Child(
            name,
            [sys.executable, "-m", "bench.loadgen"],
            self.env,
            self.log_dir / f"{name}.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.children.append(client)
        return client

    def _client_ready(self, client: Child) -> None:
        hello = recv_message(client.pipe_out)
        if not hello.get("ready"):
            raise BenchError(f"load generator did not start: {hello}")
        if not hello.get("uvloop") and "the load generator ran without uvloop" not in self.notes:
            self.notes.append("the load generator ran without uvloop")

    # -- servers --

    def start_server(self, server: str, path: str, *, baseline: bool = False) -> tuple[Child, int, float]:
        """Start ``server`` for a block on ``path``: from this tree, or with ``baseline`` from ``--baseline``.

        The baseline's server runs with the checkout as its working directory, so ``python -m``
        puts it first on ``sys.path`` and the ASGI app is imported from there; everything else
        (python, environment, database, simulator) is the same. Returns the child, its port and
        the start-up time (to the first ``200`` from ``GET /v1/models``).
        """
        port = free_port()
        command = server_command(server, port)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        label = server_label(server, baseline=baseline)
        cwd = self.args.baseline if baseline else ROOT
        started = time.perf_counter()
        child = Child(label, command, self.env, self.log_dir / f"server-{label}-{path}.log", cwd=cwd)
        self.children.append(child)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            status = _http_status(port, "/v1/models", headers)
            if status == 200:
                break
            if child.process.poll() is not None:
                raise BenchError(f"{label} exited with {child.process.returncode}:\n{child.tail()}")
            if status is not None and status != 200 and status < 500:
                raise BenchError(f"{label} answered GET /v1/models with {status}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{label} did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n{child.tail()}")
            time.sleep(0.005)
        startup = time.perf_counter() - started
        self.startup.setdefault(label, []).append(round(startup, 4))
        return child, port, startup

    @contextlib.contextmanager
    def serving(self, server: str, path: str, *, baseline: bool, purpose: str) -> Iterator[tuple[ProcessTree, str]]:
        """Run ``server`` (``start_server``; ``path`` names its log) for the block inside; yield its
        process tree and base URL. Its log is scanned per round (``server_log``) while it runs; it is
        stopped on the way out, whatever happened."""
        child, port, startup = self.start_server(server, path, baseline=baseline)
        self.log(f"{server_label(server, baseline=baseline)} up in {startup * 1000:.0f} ms (port {port}) for {purpose}")
        self.server_log = child.log_path
        try:
            yield ProcessTree(child.pid), f"http://127.0.0.1:{port}"
        finally:
            self.server_log = None
            self.stop_child(child)

    def stop_child(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    # -- rounds --

    def estimate_round_s(self, server: str | None, path: str, level: int) -> float:
        """Guess a round's wall time from the last measured round of the same server (label) and path.

        A baseline label without rounds yet borrows this tree's: the same workload. A round of one
        stream says nothing about capacity (the simulator paces its replies one after another):
        scaling its wall time by the work guessed ~86 s for the 2-second round of 50 streams, and
        skipped it in ``--quick``; so only rounds of several streams are extrapolated from.
        """
        nominal = (self.args.ttft_ms + self.args.tokens * self.args.token_delay_ms) / 1000
        replies = replies_for(self.args, level, path)

        def measured(label: str | None) -> list[dict[str, Any]]:
            return [
                r
                for r in self.rounds
                if r["server"] == label and r["path"] == path and not r.get("skipped") and r["concurrency"] > 1
            ]

        previous = measured(server)
        if not previous and server is not None and server.endswith(report.BASELINE_SUFFIX):
            previous = measured(server.removesuffix(report.BASELINE_SUFFIX))
        guess = self.args.ramp_ms / 1000 + replies * nominal
        if previous:
            last = previous[-1]
            work = level * replies
            last_work = last["concurrency"] * last["replies_per_stream"]
            guess = max(guess, last["wall_s"] * work / max(last_work, 1) * ESTIMATE_MARGIN)
        return guess

    def run_round(
        self,
        *,
        server: str | None,
        path: str,
        level: int,
        base_url: str,
        server_tree: ProcessTree | None,
        replies: int,
        conversations: list[int] | None,
        deadline_s: float,
        clients: list[Child] | None = None,
        server_log: Path | None = None,
    ) -> dict[str, Any]:
        """Run one round on the load generator(s) (``clients``, default all); return the merged raw
        measurements. ``server_log``: the server's log to scan (default: the running block's)."""
        args = self.args
        clients = clients or self.clients
        api_key, model = {
            "direct": (self.sim_key, "sim-1"),
            "v1m": (self.metered_api_key, self.metered_model),
        }.get(path, (self.api_key, self.model))
        spec_base = {
            # v1m is v1's request as another caller: the load generator sends both alike.
            "path": "v1" if path == "v1m" else path,
            "base_url": base_url,
            "api_key": api_key,
            "model": model,
            "replies": replies,
            "ramp_s": args.ramp_ms / 1000,
            "expected_tokens": args.tokens,
            # As real clients send it, large enough never to cut a reply (cut: a token-count error).
            "max_tokens": MAX_TOKENS_FACTOR * args.tokens,
            "timeout_s": 120.0,
            "deadline_s": deadline_s,
            "prompt": PROMPT,
        }
        shards = [list(range(level))[k :: len(clients)] for k in range(len(clients))]
        sim_tree = ProcessTree(self.sim.pid) if self.sim else None
        client_trees = [ProcessTree(c.pid) for c in clients]
        measured = server_tree or sim_tree
        assert measured is not None
        sim_cpu0 = sim_tree.cpu_seconds() if sim_tree else 0.0
        server_cpu0 = server_tree.cpu_seconds() if server_tree else 0.0
        client_cpu0 = sum(t.cpu_seconds() for t in client_trees)
        machine_busy0, machine_total0 = machine_cpu()
        log = (server_log or self.server_log) if server_tree is not None else None
        log_offset = log.stat().st_size if log is not None and log.exists() else 0
        results = []
        with RssSampler(measured) as sampler:
            started = time.perf_counter()
            active = []
            for client, shard in zip(clients, shards, strict=True):
                if not shard:
                    continue
                spec = {
                    **spec_base,
                    "concurrency": len(shard),
                    "conversations": [conversations[i] for i in shard] if conversations else [],
                }
                send_message(client.pipe_in, spec)
                active.append(client)
            for client in active:
                results.append(recv_message(client.pipe_out))
            elapsed = time.perf_counter() - started
        machine_busy1, machine_total1 = machine_cpu()
        for result in results:
            if "fatal" in result:
                raise BenchError(f"load generator failed: {result['fatal']}")
        merged: dict[str, Any] = {
            "requests": sum(r["requests"] for r in results),
            "ok": sum(r["ok"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "error_kinds": {},
            "tokens": sum(r["tokens"] for r in results),
            "wall_s": max(r["wall_s"] for r in results),
            "round_s": elapsed,
            "peak_open": sum(r["peak_open"] for r in results),
            "client_cpu_s": sum(r["cpu_s"] for r in results),
            "client_cpu_s_psutil": sum(t.cpu_seconds() for t in client_trees) - client_cpu0,
            "sim_cpu_s": (sim_tree.cpu_seconds() - sim_cpu0) if sim_tree else None,
            "server_cpu_s": (server_tree.cpu_seconds() - server_cpu0) if server_tree else None,
            "machine_cpu_pct": 100 * (machine_busy1 - machine_busy0) / max(machine_total1 - machine_total0, 1e-9),
            "machine_busy_s": machine_busy1 - machine_busy0,
            "peak_rss": sampler.peak,
            "rss_samples": sampler.samples,
            "client_bugs": sorted({b for r in results for b in r.get("client_bugs", [])}),
            "server_log": scan_log(log, log_offset) if log is not None else None,
        }
        for name in ("ttft_ms", "itl_ms", "ws_connect_ms"):
            values = array("f" if name == "itl_ms" else "d")
            for r in results:
                values.frombytes(r[name])
            merged[name] = values
        for r in results:
            for kind, count in r["error_kinds"].items():
                merged["error_kinds"][kind] = merged["error_kinds"].get(kind, 0) + count
        return merged

    def _record(self, server: str | None, path: str, level: int) -> dict[str, Any]:
        """Return the start of a round's record: ``tree`` is current, baseline, or None (direct)."""
        tree = None if server is None else "baseline" if server.endswith(report.BASELINE_SUFFIX) else "current"
        return {
            "server": server,
            "tree": tree,
            "path": path,
            "concurrency": level,
            "replies_per_stream": replies_for(self.args, level, path),
        }

    def measure(
        self,
        *,
        server: str | None,
        path: str,
        level: int,
        base_url: str,
        server_tree: ProcessTree | None,
        idle_rss: int | None,
        reserve_s: float = 0.0,
    ) -> dict[str, Any]:
        """Run the measured round for (server label, path, level) and append its record.

        The round is skipped unless it fits in the budget with ``reserve_s`` to spare (this tree's
        round keeps room for the baseline's rounds that pair with it).
        """
        record = self._record(server, path, level)
        estimate = self.estimate_round_s(server, path, level)
        left = self.time_left() - REPORT_RESERVE_S
        if estimate + reserve_s > left:
            needs = f"~{estimate:.0f} s" + (f" + ~{reserve_s:.0f} s for the baseline's" if reserve_s else "")
            record["skipped"] = f"time budget: needs {needs}, {max(left, 0):.0f} s left"
            self.log(f"skip {server or '-'}/{path}@{level}: {record['skipped']}")
            self.rounds.append(record)
            return record
        deadline_s = max(5.0, min(left, max(60.0, 4 * estimate)))
        conversations = self.take_conversations(level) if path in ("sse", "ws") else None
        raw = self.run_round(
            server=server,
            path=path,
            level=level,
            base_url=base_url,
            server_tree=server_tree,
            replies=record["replies_per_stream"],
            conversations=conversations,
            deadline_s=deadline_s,
        )
        record.update(report.summarize_round(raw, level=level, idle_rss=idle_rss, direct=path == "direct"))
        self.rounds.append(record)
        self.log(
            f"{server or '-':8} {path:6} {level:5} streams: {record['tokens_per_s']:9.0f} tok/s, "
            f"TTFT p50 {record['ttft_ms']['p50']} ms p99 {record['ttft_ms']['p99']} ms, "
            f"errors {record['errors']}, wall {record['wall_s']:.1f} s"
        )
        if record["errors"]:
            self.log(f"    error kinds: {record['error_kinds']}")
        return record

    def warm_up(self, server: str, path: str, base_url: str, tree: ProcessTree) -> None:
        conversations = self.take_conversations(WARMUP_STREAMS) if path in ("sse", "ws") else None
        raw = self.run_round(
            server=server,
            path=path,
            level=WARMUP_STREAMS,
            base_url=base_url,
            server_tree=tree,
            replies=1,
            conversations=conversations,
            deadline_s=60.0,
        )
        if raw["errors"]:
            self.notes.append(f"warm-up {server}/{path}: {raw['errors']} errors {raw['error_kinds']}")
            self.log(f"warm-up {server}/{path} errors: {raw['error_kinds']}")

    def run_profile(self, server: str, path: str, level: int, base_url: str, tree: ProcessTree) -> None:
        """Repeat a round with py-spy attached to the server; keep the raw stacks and a summary.

        ``--gil``: only samples of the thread holding the GIL, i.e. what the interpreter spends
        its time on (one worker is one interpreter); idle threads and waits do not count.
        """
        py_spy = _py_spy()
        assert py_spy is not None
        raw_path = self.out / f"profile-{server}-{path}-{level}.txt"
        command = [
            py_spy, "record", "--pid", str(tree.pid), "--rate", "200", "--format", "raw",
            "--output", str(raw_path), "--gil", "--nolineno", "--subprocesses",
        ]  # fmt: skip
        spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # let it attach
        conversations = self.take_conversations(level) if path in ("sse", "ws") else None
        raw = self.run_round(
            server=server,
            path=path,
            level=level,
            base_url=base_url,
            server_tree=tree,
            replies=replies_for(self.args, level, path),
            conversations=conversations,
            deadline_s=120.0,
        )
        spy.send_signal(signal.SIGINT)
        try:
            output, _ = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            output, _ = spy.communicate()
        if not raw_path.exists():
            self.notes.append(f"py-spy wrote no profile: {output.decode(errors='replace')[-500:]}")
            return
        self.profile = {
            "server": server,
            "path": path,
            "concurrency": level,
            "raw_file": raw_path.name,
            "round_errors": raw["errors"],
            **report.summarize_profile(raw_path.read_text(errors="replace")),
        }

    # -- upstream adapters --

    def measure_adapters(self) -> None:
        """Measure each ``--adapters`` kind's CPU per chunk with ``python -m bench.adapter_cpu --json``.

        One process for all kinds, measured one after another, against the benchmark's simulator
        (its replies: ``--tokens`` tokens at its pace), while no server runs: a warm-up reply, then
        ``ADAPTER_REPLIES`` replies one after another, then ``ADAPTER_CONCURRENCY`` at once. Appends
        ``{"kind", "phases"}`` (``bench.adapter_cpu``'s phases) per kind to ``self.adapters``, or
        ``{"kind", "error"}`` with a note for the kinds it did not measure (the tool failed); the
        rounds go on either way.
        """
        kinds = self.args.adapters
        command = [
            sys.executable, "-m", "bench.adapter_cpu", "--json", "--kind", ",".join(kinds),
            "--simulator-url", self.sim_url, "--api-key", self.sim_key, "--replies", str(ADAPTER_REPLIES),
            "--concurrency", str(ADAPTER_CONCURRENCY), "--rounds", "1",
        ]  # fmt: skip
        started = time.perf_counter()
        why = ""
        try:
            result = subprocess.run(
                command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=ADAPTER_TIMEOUT_S, check=False
            )
            stdout = result.stdout
            if result.returncode != 0:
                why = f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            why = f"no answer within {ADAPTER_TIMEOUT_S:.0f} s"
        measured = {}
        for line in stdout.splitlines():
            with contextlib.suppress(ValueError):
                found = json.loads(line)
                measured[found["kind"]] = found["phases"]
        for kind in kinds:
            if kind not in measured:
                self._adapter_failed(kind, why or "no figures")
                continue
            self.adapters.append({"kind": kind, "phases": measured[kind]})
            figures = ", ".join(f"{phase['phase']} {phase['us_per_chunk']} µs/chunk" for phase in measured[kind])
            self.log(f"adapter {kind}: {figures}")
        self.log(f"adapters measured in {time.perf_counter() - started:.1f} s")

    def _adapter_failed(self, kind: str, why: str) -> None:
        why = _SECRETISH.sub(lambda m: m.group(1) + "***", why).replace(self.sim_key, "***")
        self.adapters.append({"kind": kind, "error": why})
        self.notes.append(f"adapter CPU of {kind} not measured: {why}")
        self.log(f"adapter {kind} failed: {why}")

    # -- the whole run --

    def run(self) -> None:
        args = self.args
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        self.setup["machine_busy_before_pct"] = round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1)
        if self.setup["machine_busy_before_pct"] > IDLE_WARNING_PCT:
            self.notes.append(
                f"the machine was {self.setup['machine_busy_before_pct']}% busy before the run started (other "
                "processes): every figure includes their interference; rerun on a quiet machine"
            )
            self.log(f"warning: {self.notes[-1]}")
        database = "PostgreSQL" if args.database_url else "SQLite (temporary file)"
        self.log(f"database: {database}; redis: {self.redis_url or 'none (in-memory layer, eager Celery)'}")
        self.setup["migrate_s"] = round(self.run_manage("migrate", "--noinput", "-v", "0"), 3)
        self.log(f"migrated in {self.setup['migrate_s']} s")
        if args.baseline:
            self.check_baseline()
            self.log(f"baseline {args.baseline}: same migrations, checked in {self.setup['baseline_check_s']} s")
        self.start_simulator()
        self.seed()
        self.start_clients()
        self.log(f"simulator at {self.sim_url}; {len(self.conversations)} conversations seeded")
        if args.adapters:
            started = time.perf_counter()
            self.measure_adapters()
            self.setup["adapter_cpu_s"] = round(time.perf_counter() - started, 1)

        if "direct" in args.paths:
            for level in args.levels:
                self.measure(
                    server=None, path="direct", level=level, base_url=self.sim_url, server_tree=None, idle_rss=None
                )

        # Phase 1: every server and backend path at every level but the largest; phase 2: the
        # largest level, the production candidate (first server) first. Should the budget run
        # short, what is skipped is the largest level of the last servers, not whole paths.
        paths = [p for p in args.paths if p in BACKEND_PATHS]
        levels = sorted(args.levels)
        lower, top = levels[:-1], levels[-1:]
        # With --baseline, each block is followed at once by the baseline's same block, so any
        # drift in the machine's load hits both alike.
        trees = (False, True) if args.baseline else (False,)
        first_only = [p for p in paths if p in args.first_server_paths]
        for path in paths:
            for server in args.servers[:1] if path in first_only else args.servers:
                for baseline in trees:
                    self.block(server, path, lower, baseline=baseline)
        for server in args.servers:
            for path in paths:
                if path not in first_only:
                    for baseline in trees:
                        self.block(server, path, top, baseline=baseline)
        for path in first_only:
            for baseline in trees:
                self.block(args.servers[0], path, top, baseline=baseline)
        if args.enforcement_pairs and "v1" in paths and "v1m" in paths:
            for baseline in trees:
                self.paired_enforcement(args.servers[0], baseline=baseline)

    def block(self, server: str, path: str, levels: list[int], *, baseline: bool = False) -> None:
        """Start ``server`` afresh, warm it up on ``path``, measure ``levels`` in order, stop it.

        A fresh process per block gives each block a clean idle RSS to measure growth from
        (Python rarely hands freed memory back to the OS), and a start-up time sample.
        ``baseline``: the server runs from ``--baseline``, its rounds labelled
        ``SERVER@baseline``. With ``--baseline``, this tree's block is followed by the baseline's
        on the same levels, and the pair is measured both or neither: this tree's rounds keep
        room in the budget for the baseline's, and a level skipped here is skipped there.
        """
        label = server_label(server, baseline=baseline)
        pair = server_label(server, baseline=True) if self.args.baseline and not baseline else None
        if baseline:
            for level in [lv for lv in levels if (server, path, lv) in self.unpaired]:
                self._skip(label, path, level, "time budget: this tree's round was skipped")
            levels = [lv for lv in levels if (server, path, lv) not in self.unpaired]
        if not levels:
            return
        needed = BLOCK_OVERHEAD_S + self.estimate_round_s(label, path, levels[0])
        if pair:
            needed += BLOCK_OVERHEAD_S + self.estimate_round_s(pair, path, levels[0])
        if self.time_left() - REPORT_RESERVE_S < needed:
            for level in levels:
                self._skip(label, path, level, "time budget")
                if pair:
                    self.unpaired.add((server, path, level))
            return
        with self.serving(server, path, baseline=baseline, purpose=f"{path} {levels}") as (tree, base_url):
            self.warm_up(label, path, base_url, tree)
            time.sleep(0.3)
            idle_rss = tree.rss_bytes()
            for index, level in enumerate(levels):
                # The baseline's block: a start, a warm-up and the rounds measured here so far.
                reserve = (
                    BLOCK_OVERHEAD_S + sum(self.estimate_round_s(pair, path, lv) for lv in levels[: index + 1])
                    if pair
                    else 0.0
                )
                record = self.measure(
                    server=label,
                    path=path,
                    level=level,
                    base_url=base_url,
                    server_tree=tree,
                    idle_rss=idle_rss,
                    reserve_s=reserve,
                )
                if pair and record.get("skipped"):
                    self.unpaired.add((server, path, level))
                profile = self.args.profile
                if (
                    profile
                    and profile == (path, level)
                    and server == self.args.servers[0]
                    and not baseline
                    and self.profile is None
                ):
                    if self.time_left() - REPORT_RESERVE_S > 2 + self.estimate_round_s(label, path, level) + reserve:
                        self.run_profile(server, path, level, base_url, tree)
                    else:
                        self.notes.append("the profile round was skipped: time budget")

    def paired_enforcement(self, server: str, *, baseline: bool = False) -> None:
        """Measure what enforcement adds: TTFT in neighbouring rounds on one ``server`` process, CPU
        on two processes side by side.

        TTFT: the server answers ``v1`` and ``v1m`` alike (they differ by caller only), so one
        process runs ``--enforcement-pairs`` pairs of rounds of one stream in the order v1 v1m v1m
        v1 ... (``ENFORCEMENT_TTFT_REPLIES`` replies each); the ABBA order cancels a steady trend.
        CPU: ``--enforcement-cpu-pairs`` pairs of ``side_by_side`` rounds on that process and a
        second one. Appends ``{"server", "rounds": [...]}`` to ``enforcement_pairs``: the TTFT rounds
        as ``{"kind": "ttft", "pair", "path", "level", "ok", "errors", "tokens", "server_cpu_s",
        "ttft_ms": [...]}``, then the side-by-side rounds; the report reads them
        (``report.enforcement_paired``). Skipped, with a note, when the budget has no room.
        """
        args = self.args
        label = server_label(server, baseline=baseline)
        count = 2 * args.enforcement_pairs
        nominal = (args.ttft_ms + args.tokens * args.token_delay_ms) / 1000
        cpu_rounds = 2 * (args.enforcement_cpu_pairs + control_pairs(args.enforcement_cpu_pairs))
        needed = (
            2 * BLOCK_OVERHEAD_S
            + count * ENFORCEMENT_TTFT_REPLIES * nominal
            + cpu_rounds * self.estimate_round_s(label, "v1", 2 * ENFORCEMENT_CPU_LEVEL)
        )
        if self.time_left() - REPORT_RESERVE_S < needed:
            self.notes.append(f"the paired enforcement rounds of {label} were skipped: time budget (~{needed:.0f} s)")
            self.log(f"skip {label} paired enforcement: time budget (~{needed:.0f} s)")
            return
        rounds: list[dict[str, Any]] = []
        purpose = f"{count} paired v1 / v1m rounds of 1 stream, then {cpu_rounds} side by side"
        with self.serving(server, "paired", baseline=baseline, purpose=purpose) as (tree, base_url):
            for path in ("v1", "v1m"):
                self.warm_up(label, path, base_url, tree)
            for index in range(count):
                path = ("v1", "v1m", "v1m", "v1")[index % 4]
                raw = self.run_round(
                    server=label,
                    path=path,
                    level=ENFORCEMENT_TTFT_LEVEL,
                    base_url=base_url,
                    server_tree=tree,
                    replies=ENFORCEMENT_TTFT_REPLIES,
                    conversations=None,
                    deadline_s=max(60.0, 4 * self.estimate_round_s(label, "v1", ENFORCEMENT_TTFT_LEVEL)),
                )
                rounds.append({"kind": "ttft", "pair": index // 2, **_round_figures(path, ENFORCEMENT_TTFT_LEVEL, raw)})
                rounds[-1]["ttft_ms"] = [round(v, 3) for v in raw["ttft_ms"]]
                if raw["errors"]:
                    self.log(f"    paired ttft {path}: {raw['errors']} errors {raw['error_kinds']}")
            if args.enforcement_cpu_pairs:
                rounds += self.side_by_side(server, label, baseline=baseline, first=(tree, base_url))
        self.enforcement_pairs.append({"server": label, "rounds": rounds})
        summary = report.enforcement_paired({"enforcement_pairs": self.enforcement_pairs[-1:]})
        for row in summary:
            self.log(
                f"{label} paired: enforcement adds {row['added_ttft_p50_ms']} ms TTFT p50 at "
                f"{ENFORCEMENT_TTFT_LEVEL} stream, server CPU per token v1m / v1 {row['cpu_ratio']} (median of "
                f"{row['pairs']} pairs side by side; the control's {row['control_ratio']})"
            )

    def side_by_side(
        self, server: str, label: str, *, baseline: bool, first: tuple[ProcessTree, str]
    ) -> list[dict[str, Any]]:
        """Measure enforcement's server CPU per token on two server processes at once.

        Rounds run on the running process (``first``: its tree and URL, "a") and a second one
        started here ("b"), each with ``ENFORCEMENT_CPU_LEVEL`` streams from a load generator of its
        own, at the same time: whatever the machine does during a round (a neighbour's load, a
        frequency step) falls on both processes alike. In a pair of rounds one process answers
        ``v1`` and the other ``v1m``, then the other way round, so a difference between the two
        processes cancels out of the pair's ratio (the geometric mean of its two rounds' v1m / v1,
        ``report.enforcement_paired``). ``control_pairs`` pairs, spread among them, send ``v1`` to
        both processes in the same roles: their ratio should be 1, and its distance from 1 is what
        the pairing did not cancel. Returns one record per process and round: ``{"kind": "cpu" |
        "control", "pair", "round": 0 | 1, "process": "a" | "b", "role": "v1" | "v1m", "path", "level",
        "ok", "errors", "tokens", "server_cpu_s"}``.
        """
        args = self.args
        pairs = args.enforcement_cpu_pairs
        controls = control_pairs(pairs)
        kinds: list[str] = []
        for index in range(pairs):
            kinds.append("cpu")
            if (index + 1) * controls // pairs > kinds.count("control"):
                kinds.append("control")
        replies = replies_for(args, ENFORCEMENT_CPU_LEVEL, "v1")
        deadline_s = max(60.0, 4 * self.estimate_round_s(label, "v1", 2 * ENFORCEMENT_CPU_LEVEL))
        client = self._start_client("client-side-by-side")
        self._client_ready(client)
        child, port, startup = self.start_server(server, "paired-b", baseline=baseline)
        self.log(f"{label} up in {startup * 1000:.0f} ms (port {port}) beside the first for the CPU rounds")
        processes = (
            _Side("a", *first, self.clients[:1], self.server_log),
            _Side("b", ProcessTree(child.pid), f"http://127.0.0.1:{port}", [client], child.log_path),
        )
        records: list[dict[str, Any]] = []
        try:
            for path in ("v1", "v1m"):
                self.warm_up(label, path, processes[1].base_url, processes[1].tree)
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="side-by-side") as pool:
                for pair, kind in enumerate(kinds):
                    for round_index in (0, 1):
                        roles = ("v1", "v1m") if (pair + round_index) % 2 == 0 else ("v1m", "v1")
                        futures = [
                            pool.submit(
                                self.run_round,
                                server=label,
                                path="v1" if kind == "control" else role,
                                level=ENFORCEMENT_CPU_LEVEL,
                                base_url=side.base_url,
                                server_tree=side.tree,
                                replies=replies,
                                conversations=None,
                                deadline_s=deadline_s,
                                clients=side.clients,
                                server_log=side.log,
                            )
                            for side, role in zip(processes, roles, strict=True)
                        ]
                        for side, role, future in zip(processes, roles, futures, strict=True):
                            path = "v1" if kind == "control" else role
                            raw = future.result()
                            records.append(
                                {
                                    "kind": kind,
                                    "pair": pair,
                                    "round": round_index,
                                    "process": side.name,
                                    "role": role,
                                    **_round_figures(path, ENFORCEMENT_CPU_LEVEL, raw),
                                }
                            )
                            if raw["errors"]:
                                self.log(f"    side by side {kind} {side.name} {path}: {raw['errors']} errors")
        finally:
            self.stop_child(child)
            with contextlib.suppress(OSError):
                client.pipe_in.close()
            self.stop_child(client)
        return records

    def _skip(self, label: str, path: str, level: int, reason: str) -> None:
        self.rounds.append({**self._record(label, path, level), "skipped": reason})
        self.log(f"skip {label}/{path}@{level}: {reason}")

    def cleanup(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.pipe_in.close()
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        self.children.clear()
        if self.redis_url:
            with contextlib.suppress(Exception):
                self._clean_redis()
        if self.database.get("engine") == "postgresql" and not self.args.keep_db:
            with contextlib.suppress(Exception):
                self._drop_postgres()
        if self.args.keep_db and self.database.get("engine") == "sqlite":
            kept = self.out / "bench.sqlite3"
            with contextlib.suppress(OSError):
                shutil.copy(self.database["name"], kept)
                self.notes.append(f"SQLite database kept at {kept}")
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- entry point ----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("django", "channels", "uvicorn", "daphne", "granian", "aiohttp", "uvloop", "httpx", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit(tree: Path = ROOT) -> str | None:
    """Return the short commit of the checkout ``tree``, with ``+dirty`` when tracked files differ from it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=5, check=False
        )
        commit = result.stdout.strip()
        if not commit:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=tree,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return commit + ("+dirty" if status.stdout.strip() else "")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_file_limit()
    try:
        check_dependencies(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench = Bench(args)
    started_at = datetime.now(UTC)
    try:
        bench.prepare_environment()
        bench.run()
    except BenchError as exc:
        bench.fatal = str(exc)
        bench.log(f"FATAL: {exc}")
    except KeyboardInterrupt:
        bench.fatal = "interrupted"
        bench.log("interrupted; writing what was measured")
    finally:
        bench.cleanup()

    meta = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - bench.started, 1),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": _git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "database": bench.database.get("engine"),
        "redis": bool(bench.redis_url),
        "celery_eager": bench.env.get("CELERY_TASK_ALWAYS_EAGER") == "true",
        "procstats": PROCSTATS_BACKEND,
        "client_procs": args.client_procs,
        "fatal": bench.fatal,
        "notes": bench.notes,
    }
    config = {
        "levels": args.levels,
        "servers": args.servers,
        "paths": args.paths,
        "tokens": args.tokens,
        "token_delay_ms": args.token_delay_ms,
        "ttft_ms": args.ttft_ms,
        "replies": args.replies,
        "ramp_ms": args.ramp_ms,
        "budget_s": args.budget_s,
        "enforcement_pairs": args.enforcement_pairs,
        "enforcement_cpu_pairs": args.enforcement_cpu_pairs,
        "max_tokens": MAX_TOKENS_FACTOR * args.tokens,
        "adapters": {"kinds": args.adapters, "replies": ADAPTER_REPLIES, "concurrency": ADAPTER_CONCURRENCY},
        "baseline": {"dir": str(args.baseline), "git_commit": _git_commit(args.baseline)} if args.baseline else None,
    }
    startup = {
        server: {
            "samples_s": samples,
            "median_s": round(statistics.median(samples), 4),
            "max_s": max(samples),
        }
        for server, samples in bench.startup.items()
    }
    data = report.build(
        meta=meta,
        config=config,
        setup=bench.setup,
        startup=startup,
        rounds=bench.rounds,
        profile=bench.profile,
        adapters=bench.adapters,
        enforcement_pairs=bench.enforcement_pairs,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "latest.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    chart = None
    if not args.no_chart:
        chart = report.draw_chart(data, out / "latest.png")
        if chart is None:
            print(
                "note: matplotlib is not installed; no chart (pip install -r bench/requirements.txt)", file=sys.stderr
            )
    print(report.markdown(data))
    print(f"\nWrote {json_path}" + (f" and {chart}" if chart else ""), file=sys.stderr)
    return 1 if bench.fatal else 0
