"""``python -m bench.instructions``: what enforcement adds to a reply, in CPU instructions (callgrind).

``python -m bench`` reads enforcement's CPU cost from the server's CPU time per token, ``v1m``
against ``v1``; on a 2-core VM neighbouring rounds of the same code differ by ±10 %, more than the
5 % the target allows. This counts instead the instructions the server process executes, under
valgrind's callgrind (https://valgrind.org/docs/manual/cl-manual.html), which the machine's load
does not change: one uvicorn process serves ``--replies`` streamed replies one after another per
round, ``v1`` and ``v1m`` rounds alternating (v1 v1m v1m v1 ..., after a first round not
counted), and ``callgrind_control`` zeroes the counts before a round and dumps them after it.
Prints per round the instructions per reply, then the medians and their ratio ``v1m / v1`` (the
"CPU per token" ratio: both paths forward the same tokens)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        python -m bench.instructions [--tree DIR] [--replies 20] [--rounds 4]

What it counts: user-space instructions of the server process and its threads, not the kernel's
(a Redis round trip's send and receive system calls are not in it), nor cache misses: a figure for
comparing code, not a time. One stream: every local admission's record and every release goes in
a script call of its own (the worst case for enforcement; with many streams they share calls).
The simulator sends a token every ``--token-delay-ms`` (default 30 ms), slower than the server
under callgrind (~50x slower than native) handles one, so that every chunk is read on its own and
the count does not depend on how chunks happened to coalesce: rounds of the same path then agree
within ~1 %. A round of 20 replies takes ~45 s; the default run ~8 minutes.

Needs valgrind (``apt install valgrind``), PostgreSQL (``DATABASE_URL``: the database
``--db-name`` is dropped and created there) and Redis (``REDIS_URL``: database ``--redis-db`` is
emptied), as ``v1m`` is about the shared stores. ``--tree DIR`` serves another checkout's code
(its migrations must be this tree's), the simulator and the seed staying this tree's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .run import (
    ROOT,
    Child,
    _http_status,
    free_port,
    server_command,
    server_environment,
    simulator_command,
    wait_for_url,
)

# Replies per path before counting: imports, caches and the callers' views warm.
WARMUP_REPLIES = 10
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the weather in Paris in spring, briefly, with a few details."},
]
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose server is measured (default: this)")
    parser.add_argument("--replies", type=int, default=20, help="replies per round (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per path (default 4)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply (default 64)")
    parser.add_argument("--token-delay-ms", type=float, default=30.0, help="simulator delay between tokens (30)")
    parser.add_argument("--db-name", default="chatbackend_instructions", help="PostgreSQL database to (re)create")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database to use and empty (default 12)")
    parser.add_argument("--out", type=Path, help="keep the logs and callgrind files here (default: a temporary dir)")
    return parser.parse_args(argv)


def instructions_of(dump: str) -> int:
    """Return the instruction count (``Ir``) of a callgrind output file's text: its ``summary:`` (or
    ``totals:``) line. Raises ``ValueError`` when it has neither."""
    match = _TOTALS.search(dump)
    if match is None:
        raise ValueError("not a callgrind output file: no summary or totals line")
    return int(match.group(1))


def _environment(options: argparse.Namespace) -> dict[str, str]:
    database, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not database.startswith("postgres") or not redis_url:
        sys.exit("bench.instructions needs DATABASE_URL (PostgreSQL) and REDIS_URL: v1m is about the shared stores")
    admin = urlsplit(database)
    env = server_environment()
    env.update(
        DATABASE_URL=urlunsplit(admin._replace(path="/" + options.db_name)),
        REDIS_URL=urlunsplit(urlsplit(redis_url)._replace(path=f"/{options.redis_db}")),
        # As in production, and as in python -m bench: usage records queued for a worker (none runs).
        CELERY_TASK_ALWAYS_EAGER="false",
    )
    import psycopg
    import redis
    from psycopg import sql

    with psycopg.connect(urlunsplit(admin._replace(path="/postgres")), autocommit=True) as connection:
        name = sql.Identifier(options.db_name)
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(name))
    with redis.Redis.from_url(env["REDIS_URL"]) as client:
        client.flushdb()
    return env


def _reply(port: int, api_key: str, model: str, tokens: int) -> int:
    """Stream one ``/v1/chat/completions`` reply to its end; return its chunks. Raises ``RuntimeError``
    for another status than 200."""
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True, "max_tokens": tokens})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        text = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {text[:500]}")
        return text.count("data: {")
    finally:
        connection.close()


def measure(options: argparse.Namespace, out: Path) -> dict[str, list[float]]:
    """Run the simulator and a server under callgrind; return instructions per reply of each round, per path."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.instructions needs {tool} (apt install valgrind)")
    env = _environment(options)
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    children: list[Child] = []
    try:
        simulator = Child(
            "simulator",
            simulator_command(
                ttft_ms=options.token_delay_ms,
                token_delay_ms=options.token_delay_ms,
                tokens=options.tokens,
                api_key="bench-upstream-key",
            ),
            env,
            out / "simulator.log",
        )
        children.append(simulator)
        simulator_url = wait_for_url(simulator, r"listening on (http://\S+)")
        seeded = subprocess.run(
            [python, "-m", "bench.seed", "--simulator-url", simulator_url,
             "--simulator-api-key", "bench-upstream-key", "--conversations", "0"],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        data = json.loads(seeded.strip().splitlines()[-1])
        callers = {
            "v1": (data["api_key"], data["model"]),
            "v1m": (data["metered"]["api_key"], data["metered"]["model"]),
        }
        port = free_port()
        server = Child(
            "server",
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p", "--dump-instr=no",
             *server_command("uvicorn", port)],
            env,
            out / "server.log",
            cwd=options.tree,
        )  # fmt: skip
        children.append(server)
        deadline = time.monotonic() + 600  # Django's start-up, 50x slower
        while _http_status(port, "/v1/models", {"Authorization": f"Bearer {data['api_key']}"}) != 200:
            if time.monotonic() > deadline or server.process.poll() is not None:
                sys.exit(f"the server did not start under callgrind:\n{server.tail()}")
            time.sleep(1)
        for _ in range(WARMUP_REPLIES):
            for path in callers:
                _reply(port, *callers[path], options.tokens)
        time.sleep(2.0)  # what the warm-up left to do (records, releases, usage) stays out of the first round
        counts: dict[str, list[float]] = {path: [] for path in callers}
        # A first round, not counted: the first dumped round came out ~5 % above the others of its
        # path (seen on both paths, with or without a pause after the warm-up), for reasons not found.
        for index in range(-1, options.rounds * 2):
            path = ("v1", "v1m", "v1m", "v1")[index % 4]
            subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
            chunks = sum(_reply(port, *callers[path], options.tokens) for _ in range(options.replies))
            time.sleep(1.0)  # what the replies left to do: records, releases, usage sent to the queue
            before = set(out.glob("callgrind.*"))
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
            deadline = time.monotonic() + 60
            while not (new := set(out.glob("callgrind.*")) - before) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # written in full
            dump = max(new, key=lambda file: file.stat().st_mtime)
            per_reply = instructions_of(dump.read_text(errors="replace")) / options.replies
            if index >= 0:
                counts[path].append(per_reply)
            dump.rename(out / f"round-{index}-{path}.callgrind")
            print(
                f"round {index}: {path} {per_reply / 1e6:.3f} M instructions per reply "
                f"({chunks / options.replies:.0f} chunks){'' if index >= 0 else ', not counted'}",
                flush=True,
            )
        return counts
    finally:
        for child in reversed(children):
            child.stop()


def summary(counts: dict[str, list[float]]) -> dict[str, Any]:
    """Return the medians (M instructions per reply), their ratio v1m / v1 and the difference per reply."""
    v1, v1m = statistics.median(counts["v1"]), statistics.median(counts["v1m"])
    return {
        "v1": round(v1 / 1e6, 3),
        "v1m": round(v1m / 1e6, 3),
        "ratio": round(v1m / v1, 4),
        "added_per_reply": round((v1m - v1) / 1e6, 3),
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        out = options.out.resolve()
    else:
        out = Path(tempfile.mkdtemp(prefix="chatbackend-instructions-"))
    result = summary(measure(options, out))
    print(
        f"M instructions per reply, median: v1 {result['v1']}, v1m {result['v1m']} "
        f"(+{result['added_per_reply']}); v1m / v1 = {result['ratio']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
