"""The report says what enforcement adds: v1m (every rate limit and budget applies) against v1 (none);
what the other inbound APIs (v1msg: /v1/messages, v1resp: /v1/responses) cost against v1; and each
upstream adapter's CPU per chunk as ``bench.adapter_cpu`` measured it.

Rounds are built as the benchmark builds them (``report.summarize_round`` on a load generator's
raw measurements), with chosen TTFTs and server CPU, and go through ``report.build`` and
``report.markdown`` like a real run's.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import report

TOKENS = 64


def _round(path: str, level: int, *, ttft_ms: float, server_cpu_s: float | None, replies: int = 2) -> dict[str, Any]:
    requests = level * replies
    tokens = requests * TOKENS
    raw = {
        "requests": requests,
        "ok": requests,
        "errors": 0,
        "error_kinds": {},
        "tokens": tokens,
        "wall_s": 1.5,
        "ttft_ms": [ttft_ms] * requests,
        "itl_ms": [10.0] * (requests * (TOKENS - 1)),
        "ws_connect_ms": [],
        "peak_open": level,
        "machine_cpu_pct": 50.0,
        "machine_busy_s": 1.0,
        "client_cpu_s": 0.05,
        "client_cpu_s_psutil": 0.05,
        "sim_cpu_s": 0.05,
        "server_cpu_s": server_cpu_s,
        "peak_rss": 100 * 1024 * 1024,
    }
    direct = path == "direct"
    record = {
        "server": None if direct else "uvicorn",
        "tree": None if direct else "current",
        "path": path,
        "concurrency": level,
        "replies_per_stream": replies,
    }
    record.update(
        report.summarize_round(raw, level=level, idle_rss=None if direct else 90 * 1024 * 1024, direct=direct)
    )
    return record


def _data(
    rounds: list[dict[str, Any]], paths: list[str], adapters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    meta = {
        "started_at": "2026-12-01T22:00:00+00:00",
        "duration_s": 60.0,
        "machine": {"cpus": 2, "cpu_model": "test", "python": "3.11"},
        "database": "postgresql",
        "redis": True,
        "notes": [],
        "fatal": None,
    }
    config = {
        "levels": [1, 50],
        "servers": ["uvicorn"],
        "paths": paths,
        "tokens": TOKENS,
        "ttft_ms": 50.0,
        "token_delay_ms": 10.0,
        "replies": "auto",
        "ramp_ms": 690.0,
        "max_tokens": 4 * TOKENS,
        "adapters": {"kinds": [a["kind"] for a in adapters or []], "replies": 3, "concurrency": 100},
        "baseline": None,
    }
    return report.build(meta=meta, config=config, setup={}, startup={}, rounds=rounds, profile=None, adapters=adapters)


def _run(*, v1m_ttft_at_1: float, v1m_cpu_at_50: float) -> dict[str, Any]:
    rounds = [
        _round("direct", 1, ttft_ms=50.0, server_cpu_s=None, replies=10),
        _round("direct", 50, ttft_ms=52.0, server_cpu_s=None),
        _round("v1", 1, ttft_ms=51.5, server_cpu_s=0.064, replies=10),
        _round("v1", 50, ttft_ms=55.0, server_cpu_s=0.640),
        _round("v1m", 1, ttft_ms=v1m_ttft_at_1, server_cpu_s=0.070, replies=10),
        _round("v1m", 50, ttft_ms=57.0, server_cpu_s=v1m_cpu_at_50),
    ]
    return _data(rounds, ["direct", "v1", "v1m"])


def _target(data: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [t for t in data["targets"] if t["target"] == name and t["server"] == "uvicorn"]
    return found


def test_enforcement_is_v1m_minus_v1_per_level() -> None:
    data = _run(v1m_ttft_at_1=52.1, v1m_cpu_at_50=0.660)

    rows = {e["concurrency"]: e for e in data["enforcement"]}
    assert sorted(rows) == [1, 50]
    one = rows[1]
    assert one["server"] == "uvicorn"
    assert one["v1_ttft_ms"]["p50"] == 51.5 and one["v1m_ttft_ms"]["p50"] == 52.1
    assert one["added_ms"] == {"p50": 0.6, "p99": 0.6}
    # 0.064 s / 640 tokens = 100 µs; 0.070 s / 640 = 109.4 µs
    assert one["v1_us"] == 100.0 and one["v1m_us"] == 109.4
    assert one["cpu_ratio"] == pytest.approx(0.070 / 0.064, abs=0.001)
    assert rows[50]["added_ms"]["p50"] == 2.0
    # The CPU target reads the rounds at 50+ streams only (one round of one stream is a few clock ticks).
    assert data["enforcement_overall"]["uvicorn"] == {
        "rounds": 1,
        "v1_us": 100.0,
        "v1m_us": 103.1,
        "cpu_ratio": pytest.approx(0.660 / 0.640, abs=0.001),
        # (0.660 - 0.640) s over the round's 100 requests (50 streams, 2 replies each)
        "added_us_per_request": 200.0,
    }


def test_enforcement_targets_met() -> None:
    data = _run(v1m_ttft_at_1=52.1, v1m_cpu_at_50=0.660)

    ttft = _target(data, report.ENFORCEMENT_TTFT_TARGET)
    assert (ttft["path"], ttft["concurrency"], ttft["value"], ttft["limit"], ttft["met"]) == ("v1m", 1, 0.6, 1.0, True)
    cpu = _target(data, report.ENFORCEMENT_CPU_TARGET)
    assert cpu["value"] == pytest.approx(1.031, abs=0.001) and cpu["met"] is True

    text = report.markdown(data)
    assert "| uvicorn | 1 | 51.5 / 52.1 | 0.6 | 51.5 / 52.1 | 0.6 | 100.0 / 109.4 | 1.09 |" in text
    assert "**uvicorn: enforcement adds 0.6 ms at p50** (1 stream(s); target ≤ 1 ms: met)" in text
    assert "server CPU per token v1m / v1 1.03 (103.1 against 100.0 µs over 1 rounds at 50+ streams" in text
    assert f"| {report.ENFORCEMENT_TTFT_TARGET} | uvicorn | v1m | 1 | 0.60 | 1 | yes |" in text


def test_enforcement_targets_missed() -> None:
    data = _run(v1m_ttft_at_1=53.5, v1m_cpu_at_50=0.768)

    ttft = _target(data, report.ENFORCEMENT_TTFT_TARGET)
    assert ttft["value"] == 2.0 and ttft["met"] is False
    cpu = _target(data, report.ENFORCEMENT_CPU_TARGET)
    assert cpu["value"] == pytest.approx(1.2, abs=0.001) and cpu["met"] is False

    text = report.markdown(data)
    assert "**uvicorn: enforcement adds 2.0 ms at p50** (1 stream(s); target ≤ 1 ms: **missed**)" in text
    assert "target no change, ≤ 1.05: **missed**" in text


def test_without_v1m_there_is_no_enforcement_figure() -> None:
    rounds = [
        _round("direct", 1, ttft_ms=50.0, server_cpu_s=None, replies=10),
        _round("v1", 1, ttft_ms=51.5, server_cpu_s=0.064, replies=10),
    ]
    data = _data(rounds, ["direct", "v1"])

    assert data["enforcement"] == [] and data["enforcement_overall"] == {}
    assert not [t for t in data["targets"] if t["path"] == "v1m"]
    assert "enforcement adds" not in report.markdown(data)


def test_a_v1m_path_without_its_v1_pair_is_not_measured() -> None:
    rounds = [
        _round("direct", 1, ttft_ms=50.0, server_cpu_s=None, replies=10),
        _round("v1", 1, ttft_ms=51.5, server_cpu_s=0.064, replies=10),
        {**_round("v1m", 1, ttft_ms=52.0, server_cpu_s=0.07, replies=10), "skipped": "time budget"},
    ]
    data = _data(rounds, ["direct", "v1", "v1m"])

    assert data["enforcement"] == []
    assert _target(data, report.ENFORCEMENT_TTFT_TARGET)["met"] is None
    assert _target(data, report.ENFORCEMENT_CPU_TARGET)["met"] is None


def test_inbound_apis_compare_with_v1_per_level() -> None:
    rounds = [
        _round("direct", 1, ttft_ms=50.0, server_cpu_s=None, replies=10),
        _round("direct", 50, ttft_ms=52.0, server_cpu_s=None),
        _round("v1", 1, ttft_ms=51.5, server_cpu_s=0.064, replies=10),
        _round("v1", 50, ttft_ms=55.0, server_cpu_s=0.640),
        _round("v1msg", 1, ttft_ms=53.0, server_cpu_s=0.080, replies=10),
        _round("v1msg", 50, ttft_ms=56.0, server_cpu_s=0.704),
        _round("v1resp", 1, ttft_ms=52.5, server_cpu_s=0.072, replies=10),
        {**_round("v1resp", 50, ttft_ms=60.0, server_cpu_s=0.7), "skipped": "time budget"},
    ]
    data = _data(rounds, ["direct", "v1", "v1msg", "v1resp"])

    one, fifty = data["inbound_apis"]
    assert (one["server"], one["concurrency"], fifty["concurrency"]) == ("uvicorn", 1, 50)
    assert one["ttft_ms"] == {
        "v1": {"p50": 51.5, "p99": 51.5},
        "v1msg": {"p50": 53.0, "p99": 53.0},
        "v1resp": {"p50": 52.5, "p99": 52.5},
    }
    # 0.064 s / 640 tokens = 100 µs, 0.080 s = 125 µs, 0.072 s = 112.5 µs
    assert one["server_us"] == {"v1": 100.0, "v1msg": 125.0, "v1resp": 112.5}
    assert one["vs_v1"] == {"v1msg": 1.25, "v1resp": 1.125}
    # A skipped round is not compared; the measured one still is.
    assert sorted(fifty["server_us"]) == ["v1", "v1msg"] and fifty["vs_v1"] == {"v1msg": 1.1}

    text = report.markdown(data)
    assert "| uvicorn | 1 | 51.5 / 53.0 / 52.5 | 51.5 / 53.0 / 52.5 | 100.0 / 125.0 / 112.5 | 1.25 / 1.12 |" in text
    assert "| uvicorn | 50 | 55.0 / 56.0 / – | 55.0 / 56.0 / – | 100.0 / 110.0 / – | 1.10 / – |" in text
    # Their rounds have the TTFT-overhead targets of every backend path.
    assert {t["path"] for t in data["targets"] if t["target"] == "TTFT overhead p50 (ms)"} == {"v1", "v1msg", "v1resp"}


def test_without_the_other_inbound_apis_there_is_no_comparison() -> None:
    data = _run(v1m_ttft_at_1=52.1, v1m_cpu_at_50=0.660)

    assert data["inbound_apis"] == []
    assert "Inbound APIs against" not in report.markdown(data)


def test_adapter_cpu_per_chunk_table() -> None:
    def phases(sequential_us: float, concurrent_us: float) -> list[dict[str, Any]]:
        return [
            {"phase": "sequential", "concurrency": 1, "replies": 3, "chunks": 198, "batches": 198,
             "chunks_per_batch": 1.0, "cpu_s": sequential_us * 198e-6, "us_per_chunk": sequential_us},
            {"phase": "100 concurrent", "concurrency": 100, "replies": 100, "chunks": 6600, "batches": 3300,
             "chunks_per_batch": 2.0, "cpu_s": concurrent_us * 6600e-6, "us_per_chunk": concurrent_us},
        ]  # fmt: skip

    adapters = [
        {"kind": "openai", "phases": phases(400.5, 58.0)},
        {"kind": "gemini", "error": "exit 1: ProviderError: upstream returned 401"},
    ]
    data = _data([_round("direct", 1, ttft_ms=50.0, server_cpu_s=None, replies=10)], ["direct"], adapters)

    assert data["adapter_cpu"] == [
        {
            "kind": "openai",
            "chunks_per_reply": 66.0,
            "sequential_us": 400.5,
            "concurrency": 100,
            "concurrent_us": 58.0,
            "chunks_per_batch": 2.0,
            "error": None,
        },
        {
            "kind": "gemini",
            "chunks_per_reply": None,
            "sequential_us": None,
            "concurrency": None,
            "concurrent_us": None,
            "chunks_per_batch": None,
            "error": "exit 1: ProviderError: upstream returned 401",
        },
    ]
    text = report.markdown(data)
    assert "3 one after another, then 100 at once" in text
    assert "| openai | 66.0 | 400.5 | 58.0 | 2.00 |" in text
    assert "| gemini | not measured: exit 1: ProviderError: upstream returned 401 ||||" in text


def test_without_adapters_there_is_no_adapter_table() -> None:
    data = _run(v1m_ttft_at_1=52.1, v1m_cpu_at_50=0.660)

    assert data["adapter_cpu"] == []
    assert "Upstream adapter CPU per chunk" not in report.markdown(data)


def _ttft_round(pair: int, path: str) -> dict:
    """A TTFT round as ``run.Bench.paired_enforcement`` records it: 3 replies of one stream."""
    ttft = {"v1": [51.0, 51.2, 51.4], "v1m": [51.6, 51.8, 52.0]}[path]
    return {"kind": "ttft", "pair": pair, "path": path, "level": 1, "ok": 3, "errors": 0, "tokens": 3 * TOKENS,
            "server_cpu_s": 0.01, "ttft_ms": ttft}  # fmt: skip


def _side_by_side(kind: str, pair: int, ratio: float, *, bias: float = 1.2, errors: int = 0) -> list[dict]:
    """A pair of side-by-side rounds as ``run.Bench.side_by_side`` records them (25 streams, 2 replies
    each): process b needs ``bias`` times a's CPU for the same work, the v1m role ``ratio`` times v1's."""
    rounds = []
    for index in (0, 1):
        roles = ("v1", "v1m") if (pair + index) % 2 == 0 else ("v1m", "v1")
        for process, role in zip("ab", roles, strict=True):
            failed = errors if role == "v1m" else 0
            rounds.append(
                {
                    "kind": kind,
                    "pair": pair,
                    "round": index,
                    "process": process,
                    "role": role,
                    "path": "v1" if kind == "control" else role,
                    "level": 25,
                    "ok": 50 - failed,
                    "errors": failed,
                    "tokens": (50 - failed) * TOKENS,
                    "server_cpu_s": 0.5 * (bias if process == "b" else 1.0) * (ratio if role == "v1m" else 1.0),
                }
            )
    return rounds


def _paired_run(ratios: list[float], *, controls: tuple[float, ...] = (1.0,), failed_pair: bool = False) -> dict:
    rounds = [_ttft_round(index // 2, path) for index, path in enumerate(("v1", "v1m", "v1m", "v1"))]
    for pair, ratio in enumerate(ratios):
        rounds += _side_by_side("cpu", pair, ratio)
    for pair, ratio in enumerate(controls, start=len(ratios)):
        rounds += _side_by_side("control", pair, ratio)
    if failed_pair:  # a pair whose v1m half had errors is left out, whatever its CPU
        rounds += _side_by_side("cpu", len(ratios) + len(controls), 9.0, errors=3)
    data = _run(v1m_ttft_at_1=53.5, v1m_cpu_at_50=0.768)  # the blocks' figures: both targets missed
    return report.build(
        meta=data["meta"],
        config=data["config"],
        setup={},
        startup={},
        rounds=data["rounds"],
        profile=None,
        enforcement_pairs=[{"server": "uvicorn", "rounds": rounds}],
    )


def test_paired_rounds_give_the_median_of_pair_ratios_and_the_targets_read_them() -> None:
    # v1m needs 1.02, 1.04 and 1.10 times v1's CPU per token (a slow spell); process b needs 1.2
    # times a's for anything: the pairs, each caller once on each process, cancel it.
    data = _paired_run([1.02, 1.04, 1.10], failed_pair=True)

    (row,) = data["enforcement_paired"]
    assert row["server"] == "uvicorn"
    assert (row["ttft_level"], row["ttft_replies"]) == (1, {"v1": 6, "v1m": 6})
    assert (row["v1_ttft_p50_ms"], row["v1m_ttft_p50_ms"], row["added_ttft_p50_ms"]) == (51.2, 51.8, 0.6)
    assert (row["cpu_level"], row["pairs"]) == (25, 3)
    assert row["cpu_ratio"] == pytest.approx(1.04) and row["cpu_ratio_range"] == [1.02, 1.1]
    assert row["cpu_ratio_pooled"] == pytest.approx(1.053, abs=0.001)
    # Per request (50 per round), averaged over a pair's two rounds: 11,000 µs × (ratio − 1); the median.
    assert row["added_us_per_request"] == pytest.approx(440.0)
    assert (row["control_ratio"], row["control_pairs"]) == (1.0, 1)

    ttft = _target(data, report.ENFORCEMENT_TTFT_TARGET)
    assert (ttft["concurrency"], ttft["value"], ttft["met"]) == (1, 0.6, True)
    cpu = _target(data, report.ENFORCEMENT_CPU_TARGET)
    assert (cpu["concurrency"], cpu["value"], cpu["met"]) == (25, pytest.approx(1.04), True)

    text = report.markdown(data)
    assert (
        "| uvicorn | 51.20 / 51.80 (6 / 6) | 0.60 | 25 | 3 | 1.040 [1.020–1.100] | 1.053 | 440.0 | 1.000 (1) |" in text
    )


def test_a_process_bias_that_changes_between_rounds_shows_in_the_control() -> None:
    # The control's two rounds send v1 to both processes; were a 1.2 times slower in the first round
    # only, the pair could not cancel it, and the control says so.
    data = _paired_run([1.04], controls=())
    rounds = data["enforcement_pairs"][0]["rounds"]
    control = _side_by_side("control", 1, 1.0)
    assert (control[0]["round"], control[0]["process"], control[0]["role"]) == (0, "a", "v1m")
    control[0]["server_cpu_s"] *= 1.2  # process a, slower in that round only
    rounds += control
    (row,) = report.enforcement_paired({"enforcement_pairs": [{"server": "uvicorn", "rounds": rounds}]})

    assert row["control_pairs"] == 1 and row["control_ratio"] == pytest.approx(math.sqrt(1.2), abs=0.001)
    assert row["cpu_ratio"] == pytest.approx(1.04)


def test_paired_rounds_over_the_ratio_miss_the_target() -> None:
    data = _paired_run([1.08, 1.06, 1.07])

    cpu = _target(data, report.ENFORCEMENT_CPU_TARGET)
    assert cpu["value"] == pytest.approx(1.07) and cpu["met"] is False


def test_without_paired_rounds_the_targets_read_the_blocks() -> None:
    data = _run(v1m_ttft_at_1=52.1, v1m_cpu_at_50=0.660)

    assert data["enforcement_paired"] == []
    assert _target(data, report.ENFORCEMENT_CPU_TARGET)["concurrency"] is None
    assert "two processes side by side" not in report.markdown(data)
