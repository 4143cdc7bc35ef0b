"""``python -m bench.adapter_cpu`` streams through the real adapter and reports what it counted."""

from __future__ import annotations

import json
import re

import pytest

from llm.tests.simulator_process import SimulatorProcess
from tests.kit import FAST_REPLY_TOKENS, SIMULATOR_API_KEY, run_python


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
    per_reply = FAST_REPLY_TOKENS + 2  # the prompt's usage, the tokens (the last with the finish_reason), the usage
    counts = re.findall(r"(.+): (\d+) replies, (\d+) chunks", result.stdout)
    assert counts == [("sequential", "1", str(per_reply)), ("2 concurrent", "2", str(2 * per_reply))], result.stdout


# Chunks per reply besides the tokens: OpenAI's finish and usage chunks (Azure's adapter yields the
# same two; Anthropic's also message_start's prompt usage, first); Gemini's the prompt's usage as its
# responses report it, first, then its last token carries the finish_reason, then the usage.
FRAMING_CHUNKS = {"openai": 2, "anthropic": 3, "gemini": 2, "azure_openai": 2}


def test_every_kind_in_one_process_as_json_with_the_key_the_simulator_requires(
    keyed_simulator: SimulatorProcess,
) -> None:
    # What ``python -m bench`` runs for its adapter table: each kind's base URL derived from the
    # simulator's root, the key sent as each kind sends it, one JSON object per kind.
    kinds = list(FRAMING_CHUNKS)
    options = ["--replies", "2", "--concurrency", "3", "--rounds", "1", "--json", "--api-key", SIMULATOR_API_KEY]
    result = run_python(
        "-m", "bench.adapter_cpu", "--kind", ",".join(kinds), "--simulator-url", keyed_simulator.root_url, *options
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert SIMULATOR_API_KEY not in result.stdout + result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [data["kind"] for data in found] == kinds
    for data in found:
        per_reply = FAST_REPLY_TOKENS + FRAMING_CHUNKS[data["kind"]]
        assert [(p["phase"], p["concurrency"], p["replies"], p["chunks"]) for p in data["phases"]] == [
            ("sequential", 1, 2, 2 * per_reply),
            ("3 concurrent", 3, 3, 3 * per_reply),
        ], data
        for phase in data["phases"]:
            assert 1 <= phase["batches"] <= phase["chunks"], phase
            assert phase["chunks_per_batch"] == pytest.approx(phase["chunks"] / phase["batches"], abs=0.001)
            assert phase["cpu_s"] > 0, phase
            assert phase["us_per_chunk"] == pytest.approx(phase["cpu_s"] / phase["chunks"] * 1e6, rel=0.01)


def test_a_failing_reply_exits_non_zero_without_json(keyed_simulator: SimulatorProcess) -> None:
    options = ["--replies", "1", "--concurrency", "1", "--rounds", "1", "--json", "--api-key", "sk-wrong-key-123"]
    result = run_python("-m", "bench.adapter_cpu", "--base-url", keyed_simulator.base_url, *options)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""


def test_several_kinds_need_the_simulators_root() -> None:
    result = run_python("-m", "bench.adapter_cpu", "--kind", "openai,gemini", "--base-url", "http://127.0.0.1:1/v1")

    assert result.returncode == 2
    assert "several kinds need --simulator-url" in result.stderr
