"""The floor: what relaying a stream costs on this stack before any of chatbackend's own work.

``python -m bench.floor`` starts the LLM simulator and, under uvicorn with the benchmark's flags,
the least relay that can be written with the fixed stack's parts (this module's ``app``: a raw
ASGI app, no Django, no authentication, no parsing, no accounting, no database): it POSTs the
request body to the simulator with aiohttp, then writes whatever bytes the upstream has sent, one
ASGI ``http.response.body`` message per read, exactly as chatbackend's engine reads in batches.
The load generator (``bench.loadgen``) drives the simulator directly and then through the relay,
with the same client-shaped ``/v1/chat/completions`` requests as ``python -m bench``.

It prints, per concurrency level, CPU µs per token of the simulator and of the relay process,
and their ratio. Every figure is from one run; compare ratios, not microseconds across runs.
The relay's ratio to the simulator is a lower bound for any relay built on uvicorn + aiohttp:
``python -m bench`` reports chatbackend's ratio the same way (its ``vs_simulator`` column).

Options: ``--levels 50,200`` (concurrent streams), ``--tokens 64``, ``--token-delay-ms 10``,
``--ttft-ms 50``, ``--replies 2`` (sequential replies per stream).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from .loadgen import recv_message, send_message
from .procstats import ProcessTree
from .run import ROOT, Child, free_port, simulator_command, wait_for_url

UPSTREAM_ENV = "BENCH_FLOOR_UPSTREAM"  # the simulator's base URL, for the relay process
SIMULATOR_KEY = "sk-bench-floor"
STARTUP_TIMEOUT_S = 30.0

_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI 3 app: relay ``POST /v1/chat/completions`` to ``$BENCH_FLOOR_UPSTREAM`` byte for byte."""
    global _session  # noqa: PLW0603 - one client session per process, as chatbackend has
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in (b"authorization", b"content-type")}
    async with _session.post(os.environ[UPSTREAM_ENV] + scope["path"], data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json").encode()
        await send(
            {"type": "http.response.start", "status": upstream.status, "headers": [(b"content-type", content_type)]}
        )
        async for data in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="50,200")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-delay-ms", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--replies", type=int, default=2)
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    children: list[Child] = []
    try:
        simulator = Child(
            "simulator",
            simulator_command(
                ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms, tokens=args.tokens, api_key=SIMULATOR_KEY
            ),
            env,
            logs / "simulator.log",
        )
        children.append(simulator)
        sim_url = wait_for_url(simulator, r"listening on (http://\S+)", STARTUP_TIMEOUT_S)
        port = free_port()
        relay = Child(
            "relay",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.floor:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--lifespan",
                "off",
                "--no-access-log",
                "--log-level",
                "info",
                "--backlog",
                "4096",
            ],  # fmt: skip
            {**env, UPSTREAM_ENV: sim_url},
            logs / "relay.log",
        )
        children.append(relay)
        relay_url = wait_for_url(relay, r"running on (http://\S+)", STARTUP_TIMEOUT_S)
        client = Child(
            "client",
            [sys.executable, "-m", "bench.loadgen"],
            env,
            logs / "client.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        children.append(client)
        pipe_in, pipe_out = client.pipe_in, client.pipe_out
        if not recv_message(pipe_out).get("ready"):
            raise SystemExit(f"the load generator did not start:\n{client.tail()}")
        rows = []
        for level in [int(v) for v in args.levels.split(",")]:
            for label, base_url in (("direct", sim_url), ("relay", relay_url)):
                spec = {
                    "path": "direct", "base_url": base_url, "api_key": SIMULATOR_KEY, "model": "sim-1",
                    "replies": args.replies, "ramp_s": 0.69, "expected_tokens": args.tokens,
                    "max_tokens": 4 * args.tokens, "timeout_s": 120.0, "deadline_s": 300.0,
                    "prompt": "Tell me about the benchmark", "concurrency": level, "conversations": [],
                }  # fmt: skip
                sim_tree, relay_tree = ProcessTree(simulator.pid), ProcessTree(relay.pid)
                sim0, relay0 = sim_tree.cpu_seconds(), relay_tree.cpu_seconds()
                send_message(pipe_in, spec)
                result = recv_message(pipe_out)
                tokens = max(result.get("tokens", 0), 1)
                row = {
                    "level": level,
                    "through": label,
                    "ok": result.get("ok"),
                    "errors": result.get("errors"),
                    "tokens": tokens,
                    "sim_us_per_token": round((sim_tree.cpu_seconds() - sim0) / tokens * 1e6, 1),
                    "relay_us_per_token": round((relay_tree.cpu_seconds() - relay0) / tokens * 1e6, 1),
                }
                row["relay_vs_sim"] = round(row["relay_us_per_token"] / max(row["sim_us_per_token"], 1e-9), 2)
                rows.append(row)
        print("| streams | through | ok | errors | simulator µs/token | relay µs/token | relay / simulator |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['level']} | {r['through']} | {r['ok']} | {r['errors']} | {r['sim_us_per_token']} "
                f"| {r['relay_us_per_token'] if r['through'] == 'relay' else '-'} "
                f"| {r['relay_vs_sim'] if r['through'] == 'relay' else '-'} |"
            )
        print(json.dumps(rows))
        return 0
    finally:
        for child in reversed(children):
            child.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
