"""Keep the benchmark working: run ``python -m bench`` at tiny scale and check its JSON.

Tiny scale: levels 1 and 3, 5-token replies, one server (uvicorn), every path. It starts the
simulator, a server process per block and the load generator, on a database of its own
(``chatbackend_bench_test`` on PostgreSQL when ``DATABASE_URL`` is set, else a temporary
SQLite file) and Redis database 14 when ``REDIS_URL`` is set. Figures are not checked, only
that every path streamed every token without an error and that the report is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 3)
TOKENS = 5
PATHS = ("direct", "v1", "sse", "ws")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "--levels",
        ",".join(map(str, LEVELS)),
        "--tokens",
        str(TOKENS),
        "--servers",
        "uvicorn",
        "--paths",
        ",".join(PATHS),
        "--out",
        str(tmp_path),
        "--db-name",
        "chatbackend_bench_test",
        "--redis-db",
        "14",
        "--budget-s",
        "240",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    output = f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output

    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["meta"]["fatal"] is None, output
    assert data["config"]["levels"] == list(LEVELS)

    rounds = data["rounds"]
    for path in PATHS:
        measured = [r for r in rounds if r["path"] == path]
        assert sorted(r["concurrency"] for r in measured) == list(LEVELS), (path, output)
        for r in measured:
            label = f"{path} at {r['concurrency']} streams"
            assert not r.get("skipped"), (label, r.get("skipped"))
            assert r["errors"] == 0, (label, r["error_kinds"], output)
            assert r["requests"] == r["concurrency"] * r["replies_per_stream"], label
            assert r["tokens"] == r["requests"] * TOKENS, label
            assert r["tokens_per_s"] > 0, label
            assert r["ttft_ms"]["p50"] is not None and r["ttft_ms"]["p50"] > 0, label
            assert r["client_process"]["cpu_s"] >= 0, label
            if path == "direct":
                assert r["server"] is None, label
            else:
                assert r["server"] == "uvicorn", label
                assert r["server_process"]["cpu_s"] >= 0, label
                assert r["server_process"]["rss_peak_mb"] > 0, label
                assert r["ttft_overhead_ms"]["p50"] is not None, label
            if path == "ws":
                assert r["ws_connect_ms"]["p50"] > 0, label

    assert data["startup"]["uvicorn"]["median_s"] > 0
    assert data["targets"], "the targets table is empty"
    assert data["recommendation"] is None  # one server: nothing to compare
    # The Markdown table went to stdout, one row per round.
    for path in PATHS:
        assert f"| {path} |" in result.stdout, output
