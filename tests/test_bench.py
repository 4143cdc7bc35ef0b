"""Keep the benchmark working: run ``python -m bench`` at tiny scale and check its JSON.

Tiny scale: levels 1 and 3, 5-token replies, one server (uvicorn), every path (``v1m``: /v1 as
a caller with rate limits, and budgets when the project has them; ``v1msg`` and ``v1resp``: the
Anthropic Messages and OpenAI Responses APIs) and every upstream adapter's CPU per chunk. It
starts the simulator, a server process per block and the load generator, on a database of its own
(``<database>_bench_test*`` on PostgreSQL when ``DATABASE_URL`` names ``<database>``, else a
temporary SQLite file) and Redis database ``BENCH_TEST_REDIS_DB`` (default 14) when ``REDIS_URL``
is set. Figures are not checked, only that every path streamed every token without an error and
that the report is complete.
``--baseline`` is checked the same way, against the project itself (the plumbing: both trees'
rounds and the CPU comparison), and against a copy whose migrations differ (refused).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench import report
from bench.run import ENFORCEMENT_TTFT_REPLIES

ROOT = Path(__file__).resolve().parent.parent
# Named after the test database's server-side name, so runs against different databases (other
# checkouts on the same PostgreSQL) never drop each other's benchmark database.
_DATABASE_URL = os.environ.get("DATABASE_URL", "")
_DATABASE = urlsplit(_DATABASE_URL).path.strip("/") if _DATABASE_URL.startswith("postgres") else ""
BENCH_DB = (_DATABASE or "chatbackend") + "_bench_test"
LEVELS = (1, 3)
TOKENS = 5
PATHS = ("direct", "v1", "v1m", "v1msg", "v1resp", "sse", "ws")
ADAPTERS = ("openai", "anthropic", "gemini", "azure_openai")
# The Redis database the benchmark owns (and cleans) during these tests: one per checkout that runs them at once.
REDIS_DB = os.environ.get("BENCH_TEST_REDIS_DB", "14")

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
        BENCH_DB,
        "--redis-db",
        REDIS_DB,
        "--budget-s",
        "240",
        "--enforcement-pairs",
        "1",
        "--enforcement-cpu-pairs",
        "1",
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

    # The other inbound APIs against /v1/chat/completions, at each level.
    assert [row["concurrency"] for row in data["inbound_apis"]] == list(LEVELS)
    for row in data["inbound_apis"]:
        assert sorted(row["server_us"]) == ["v1", "v1msg", "v1resp"], row
        for path in ("v1msg", "v1resp"):
            r = next(r for r in rounds if r["path"] == path and r["concurrency"] == row["concurrency"])
            assert row["ttft_ms"][path]["p50"] == r["ttft_ms"]["p50"], (path, row)
            assert row["vs_v1"][path] > 0, (path, row)
    assert "Inbound APIs against /v1/chat/completions" in result.stdout, output
    # Each upstream adapter's CPU per chunk, measured against the simulator.
    assert [a["kind"] for a in data["adapter_cpu"]] == list(ADAPTERS), output
    for adapter in data["adapter_cpu"]:
        assert adapter["error"] is None, adapter
        assert adapter["chunks_per_reply"] >= TOKENS, adapter
        assert adapter["sequential_us"] > 0 and adapter["concurrent_us"] > 0, adapter
        assert f"| {adapter['kind']} |" in result.stdout, output

    # What enforcement adds: v1m against v1 at each level, and its targets.
    assert data["setup"]["metered"]["limits"] == {
        "requests_per_minute": 1_000_000,
        "tokens_per_minute": 1_000_000_000,
        "concurrent_streams": 100_000,
    }
    assert [e["concurrency"] for e in data["enforcement"]] == list(LEVELS)
    for e in data["enforcement"]:
        plain = next(r for r in rounds if r["path"] == "v1" and r["concurrency"] == e["concurrency"])
        metered = next(r for r in rounds if r["path"] == "v1m" and r["concurrency"] == e["concurrency"])
        assert e["added_ms"]["p50"] == pytest.approx(metered["ttft_ms"]["p50"] - plain["ttft_ms"]["p50"], abs=0.11)
        assert e["v1_us"] > 0 and e["v1m_us"] > 0, e
    assert plain["replies_per_stream"] == 2 and metered["replies_per_stream"] == 2  # level 3
    one_stream = [r["replies_per_stream"] for r in rounds if r["concurrency"] == 1 and r["path"] not in ("sse", "ws")]
    assert one_stream == [10] * 5
    assert "uvicorn: enforcement adds" in result.stdout, output
    # The paired rounds (one pair of each kind here, and a control pair); the targets read them.
    (paired,) = data["enforcement_paired"]
    replies = ENFORCEMENT_TTFT_REPLIES  # one pair: one round of each path
    assert paired["server"] == "uvicorn" and paired["ttft_replies"] == {"v1": replies, "v1m": replies}, paired
    assert paired["cpu_level"] == 25 and paired["pairs"] == 1 and paired["cpu_ratio"] > 0, paired
    assert paired["control_pairs"] == 1 and paired["control_ratio"] > 0, paired
    assert paired["added_ttft_p50_ms"] is not None, paired
    ttft_target = next(t for t in data["targets"] if t["target"] == report.ENFORCEMENT_TTFT_TARGET)
    assert ttft_target["concurrency"] == 1 and ttft_target["value"] == paired["added_ttft_p50_ms"]
    cpu_target = next(t for t in data["targets"] if t["target"] == report.ENFORCEMENT_CPU_TARGET)
    assert cpu_target["concurrency"] == 25 and cpu_target["value"] == paired["cpu_ratio"]
    assert "two processes side by side" in result.stdout, output


def _bench(tmp_path: Path, db_name: str, *options: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "bench",
        "--tokens",
        str(TOKENS),
        "--servers",
        "uvicorn",
        "--out",
        str(tmp_path / "out"),
        "--db-name",
        db_name,
        "--redis-db",
        REDIS_DB,
        "--budget-s",
        "240",
        "--adapters",
        "none",
        "--enforcement-pairs",
        "0",
        *options,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)


def test_benchmark_compares_against_a_baseline_checkout(tmp_path: Path) -> None:
    level = 3
    result = _bench(tmp_path, BENCH_DB + "_baseline", "--levels", str(level), "--baseline", str(ROOT))
    output = f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output

    data = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert data["meta"]["fatal"] is None, output
    assert data["config"]["baseline"]["dir"] == str(ROOT)
    rounds = data["rounds"]
    for path in ("v1", "v1m", "sse", "ws"):
        for label, tree in (("uvicorn", "current"), ("uvicorn@baseline", "baseline")):
            measured = [r for r in rounds if r["path"] == path and r["server"] == label]
            assert len(measured) == 1, (path, label, output)
            r = measured[0]
            assert r["tree"] == tree
            assert not r.get("skipped"), (path, label, r.get("skipped"))
            assert r["errors"] == 0, (path, label, r["error_kinds"], output)
            assert r["tokens"] == level * r["replies_per_stream"] * TOKENS, (path, label)
        assert f"| uvicorn@baseline | {path} | {level} |" in result.stdout, output
    assert sorted(data["startup"]) == ["uvicorn", "uvicorn@baseline"]

    comparison = {c["path"]: c for c in data["cpu_per_token"]}
    assert sorted(comparison) == ["sse", "v1", "v1m", "ws"]
    table = result.stdout.split("| server | path | streams | server µs/token | baseline µs/token | new / baseline")[1]
    for path, c in comparison.items():
        assert c["server"] == "uvicorn" and c["concurrency"] == level, c
        assert c["server_us"] > 0 and c["baseline_us"] > 0, (path, c)
        assert isinstance(c["vs_baseline"], float) and c["vs_baseline"] > 0, (path, c)
        row = next(line for line in table.splitlines() if line.startswith(f"| uvicorn | {path} | {level} |"))
        # The table shows the JSON's ratio to two places. (approx(abs=0.005) failed on 0.875 -> "0.88":
        # the difference is 0.005 plus a float error.)
        assert row.split("|")[6].strip() == f"{c['vs_baseline']:.2f}", row
    assert data["recommendation"] is None  # baseline rows are not a second server
    # v1m against v1 in both trees; the targets are about this tree alone.
    assert [(e["server"], e["concurrency"]) for e in data["enforcement"]] == [
        ("uvicorn", level),
        ("uvicorn@baseline", level),
    ]
    assert [t["server"] for t in data["targets"] if t["target"].startswith("enforcement adds")] == ["uvicorn"]


def test_benchmark_refuses_a_baseline_with_other_migrations(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline"
    shutil.copytree(
        ROOT, baseline, ignore=shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "*.sqlite3*")
    )
    migrations = baseline / "accounts" / "migrations"
    latest = max(p.stem for p in migrations.glob("0*.py"))
    (migrations / "0999_bench_probe.py").write_text(
        "from django.db import migrations\n\n\n"
        f"class Migration(migrations.Migration):\n    dependencies = [('accounts', '{latest}')]\n    operations = []\n"
    )
    result = _bench(tmp_path, BENCH_DB + "_baseline", "--levels", "1", "--baseline", str(baseline))
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"

    assert result.returncode == 1, output
    data = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert "has other migrations than this tree" in data["meta"]["fatal"], output
    assert data["rounds"] == []
    assert "0999_bench_probe" in result.stdout, output


def test_benchmark_refuses_a_baseline_that_is_not_a_checkout(tmp_path: Path) -> None:
    result = _bench(tmp_path, BENCH_DB + "_baseline", "--baseline", str(tmp_path))

    assert result.returncode == 2
    assert "is not a checkout of this project" in result.stderr
    assert "manage.py" in result.stderr
