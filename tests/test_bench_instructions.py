"""bench.instructions: reading callgrind's counts and summing up rounds (the run itself needs valgrind and
takes minutes: bench/README.md gives its figures)."""

from __future__ import annotations

import pytest

from bench.instructions import instructions_of, parse_args, summary


def test_the_count_is_the_summary_line_of_a_callgrind_dump() -> None:
    dump = (
        "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 42\nevents: Ir\n"
        "summary: 331234567\n\nfn=(1) main\n5 12\n"
    )
    assert instructions_of(dump) == 331_234_567
    assert instructions_of("events: Ir\ntotals: 17\n") == 17


def test_a_file_without_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="not a callgrind output file"):
        instructions_of("events: Ir\n")


def test_the_summary_compares_medians() -> None:
    counts = {"v1": [16.5e6, 16.4e6, 20e6, 16.6e6], "v1m": [17.4e6, 17.3e6, 17.5e6, 17.45e6]}
    assert summary(counts) == {"v1": 16.55, "v1m": 17.425, "ratio": 1.0529, "added_per_reply": 0.875}


def test_defaults_alternate_four_rounds_of_twenty_replies_per_path() -> None:
    options = parse_args([])
    assert (options.replies, options.rounds, options.tokens, options.token_delay_ms) == (20, 4, 64, 30.0)
