"""``python -m bench``'s options (``bench.run.parse_args``): which paths a run measures by default, how many
enforcement pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import ENFORCEMENT_CPU_PAIRS, ENFORCEMENT_PAIRS, FIRST_SERVER_PATHS, PATHS, control_pairs, parse_args

ROOT = Path(__file__).resolve().parent.parent


def test_a_default_run_measures_every_path_the_other_inbound_apis_on_the_first_server_only() -> None:
    args = parse_args(["--database-url", ""])

    assert args.paths == list(PATHS)
    assert set(FIRST_SERVER_PATHS) == {"v1msg", "v1resp"}
    assert args.first_server_paths == FIRST_SERVER_PATHS
    assert args.servers == ["uvicorn", "daphne"]


def test_paths_named_on_the_command_line_run_on_every_server() -> None:
    args = parse_args(["--database-url", "", "--paths", "direct,v1,v1msg"])

    assert args.paths == ["direct", "v1", "v1msg"]
    assert args.first_server_paths == ()


def test_a_baseline_run_leaves_out_the_apis_an_older_tree_may_not_serve() -> None:
    args = parse_args(["--database-url", "", "--baseline", str(ROOT)])

    assert not set(FIRST_SERVER_PATHS) & set(args.paths)
    assert {"direct", "v1", "v1m"} <= set(args.paths)


def test_the_side_by_side_cpu_pairs_are_counted_apart_from_the_ttft_pairs() -> None:
    args = parse_args(["--database-url", ""])
    assert (args.enforcement_pairs, args.enforcement_cpu_pairs) == (ENFORCEMENT_PAIRS, ENFORCEMENT_CPU_PAIRS)
    assert [control_pairs(pairs) for pairs in (0, 1, 6, 12)] == [0, 1, 2, 4]

    with pytest.raises(SystemExit):
        parse_args(["--database-url", "", "--enforcement-cpu-pairs", "-1"])
