"""``python -m bench.adapter_cpu`` streams through the real adapter and reports what it counted."""

from __future__ import annotations

import re

from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, run_python


def test_reports_chunks_batches_and_cpu_per_chunk(simulator: SimulatorProcess) -> None:
    options = ["--replies", "2", "--concurrency", "3", "--rounds", "2"]
    result = run_python("-m", "bench.adapter_cpu", "--base-url", simulator.base_url, *options)

    assert result.returncode == 0, result.stdout + result.stderr
    per_reply = FAST_REPLY_TOKENS + 2  # the tokens, the finish chunk, the usage chunk
    pattern = (
        r"(.+): (\d+) replies, (\d+) chunks in (\d+) batches \([\d.]+ chunks/batch\), CPU [\d.]+ s = [\d.]+ µs/chunk"
    )
    lines = [re.fullmatch(pattern, line) for line in result.stdout.splitlines()]
    assert all(lines), result.stdout
    counts = [(m[1], int(m[2]), int(m[3])) for m in lines if m]
    assert counts == [("sequential", 2, 2 * per_reply), ("3 concurrent", 6, 6 * per_reply)]
    assert all(1 <= int(m[4]) <= int(m[3]) for m in lines if m)


def test_measures_the_gemini_adapter_on_the_simulators_gemini_route(simulator: SimulatorProcess) -> None:
    options = ["--replies", "1", "--concurrency", "2", "--rounds", "1"]
    result = run_python("-m", "bench.adapter_cpu", "--kind", "gemini", "--base-url", simulator.root_url, *options)

    assert result.returncode == 0, result.stdout + result.stderr
    per_reply = FAST_REPLY_TOKENS + 1  # the tokens (the last with the finish_reason), the usage chunk
    counts = re.findall(r"(.+): (\d+) replies, (\d+) chunks", result.stdout)
    assert counts == [("sequential", "1", str(per_reply)), ("2 concurrent", "2", str(2 * per_reply))], result.stdout
