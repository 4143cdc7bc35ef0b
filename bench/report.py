"""Turn raw round measurements into the report: statistics, targets, table, chart, profile summary."""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

MB = 1024 * 1024
TARGET_LEVEL = 200
# The server label of rounds run from ``--baseline``: ``uvicorn@baseline``.
BASELINE_SUFFIX = "@baseline"
# The CPU-per-token targets apply from this many streams up: below, one round's CPU time is a
# few clock ticks (10 ms each) and the ratios are noise.
CPU_TARGET_MIN_LEVEL = 50

# The targets (reported, not asserted).
TARGETS = {
    "ttft_overhead_p50_ms": 5.0,
    "ttft_overhead_p99_ms": 25.0,
    "v1_cpu_us_per_token": 40.0,
    "rss_mb_per_100_streams": 20.0,
    "startup_s": 1.5,
    # server CPU per token: at most this share of the baseline's, and this multiple of the simulator's
    "cpu_per_token_vs_baseline": 1 / 3,
    "cpu_per_token_vs_simulator": 2.0,
    # What enforcement (rate limits and budgets, path v1m) adds over the same /v1 request without
    # any (v1), issue 8: at most 1 ms of TTFT at p50 with one stream, and no change in server CPU
    # per token — read as within this ratio: the median over pairs of side-by-side rounds, two
    # server processes of 25 streams each answering v1 and v1m at once, then the other way round
    # (enforcement_paired), else over the blocks' rounds at 50+ streams (A/A runs of one tree differ
    # by a few % over many rounds; single rounds by ±10–25 %).
    "enforcement_ttft_p50_ms": 1.0,
    "enforcement_cpu_ratio": 1.05,
}
# The level whose TTFT the enforcement target is about (the smallest measured when absent).
ENFORCEMENT_LEVEL = 1
ENFORCEMENT_TTFT_TARGET = "enforcement adds to TTFT p50 (ms, v1m − v1)"
ENFORCEMENT_CPU_TARGET = (
    f"server CPU per token v1m / v1, side by side (else rounds at {CPU_TARGET_MIN_LEVEL}+ streams) "
    f"(no change: ≤ {TARGETS['enforcement_cpu_ratio']:g})"
)


# --- statistics -----------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..1) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _cpu_block(cpu_s: float | None, wall_s: float, tokens: int) -> dict[str, Any] | None:
    if cpu_s is None:
        return None
    return {
        "cpu_s": round(cpu_s, 3),
        "cpu_pct_of_core": _r(100 * cpu_s / wall_s) if wall_s > 0 else None,
        "cpu_us_per_token": _r(cpu_s * 1e6 / tokens) if tokens else None,
    }


def summarize_round(raw: dict[str, Any], *, level: int, idle_rss: int | None, direct: bool) -> dict[str, Any]:
    """Return a round's record fields from the load generator's and process samplers' raw data."""
    ttft = sorted(raw["ttft_ms"])
    itl = sorted(raw["itl_ms"])
    tokens, wall = raw["tokens"], raw["wall_s"]
    record: dict[str, Any] = {
        "requests": raw["requests"],
        "ok": raw["ok"],
        "errors": raw["errors"],
        "error_kinds": raw["error_kinds"],
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall) if wall > 0 else 0,
        "ttft_ms": {
            "p50": _r(percentile(ttft, 0.50)),
            "p90": _r(percentile(ttft, 0.90)),
            "p99": _r(percentile(ttft, 0.99)),
            "max": _r(ttft[-1] if ttft else None),
        },
        "itl_ms": {"p50": _r(percentile(itl, 0.50), 2), "p99": _r(percentile(itl, 0.99), 2)},
        "peak_open_streams": raw["peak_open"],
        # Busy share of all the machine's cores during the round (server, simulator, client,
        # PostgreSQL, Redis and the kernel's network stack together): near 100 = saturated.
        "machine_cpu_pct": _r(raw["machine_cpu_pct"]),
        # The rest of the machine's busy time, in % of one core: PostgreSQL, Redis, the kernel's
        # network stack — and any process outside the benchmark. Compare with the 1-stream rows.
        "other_cpu_pct_of_core": _r(
            100
            * (
                raw["machine_busy_s"]
                - raw["client_cpu_s_psutil"]
                - (raw["sim_cpu_s"] or 0.0)
                - (raw["server_cpu_s"] or 0.0)
            )
            / wall
        )
        if wall > 0
        else None,
        "client_process": _cpu_block(raw["client_cpu_s"], wall, tokens),
        "simulator_process": _cpu_block(raw["sim_cpu_s"], wall, tokens),
        "server_process": None,
    }
    if raw["ws_connect_ms"]:
        connect = sorted(raw["ws_connect_ms"])
        record["ws_connect_ms"] = {"p50": _r(percentile(connect, 0.5)), "p99": _r(percentile(connect, 0.99))}
    if raw.get("server_log") is not None:
        record["server_log"] = raw["server_log"]
    if raw.get("client_bugs"):
        record["client_bugs"] = raw["client_bugs"]
    if direct:
        record["simulator_process"]["rss_peak_mb"] = _r(raw["peak_rss"] / MB)
    else:
        server = _cpu_block(raw["server_cpu_s"], wall, tokens) or {}
        server["rss_idle_mb"] = _r(idle_rss / MB) if idle_rss else None
        server["rss_peak_mb"] = _r(raw["peak_rss"] / MB)
        if idle_rss:
            growth = max(raw["peak_rss"] - idle_rss, 0)
            server["rss_mb_per_100_streams"] = _r(growth / MB / level * 100, 2)
        record["server_process"] = server
    return record


# --- the whole report -----------------------------------------------------------------------


def _measured(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rounds if not r.get("skipped")]


def server_labels(config: dict[str, Any]) -> list[str]:
    """Return the servers' round labels: each server, then with ``--baseline`` each ``server@baseline``."""
    servers = list(config["servers"])
    return servers + [s + BASELINE_SUFFIX for s in servers] if config.get("baseline") else servers


def _ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


def _us_per_token(r: dict[str, Any] | None, process: str) -> float | None:
    """Return ``process``'s CPU µs per forwarded token in round ``r``, unrounded (None: not measured)."""
    block = (r or {}).get(process) or {}
    if block.get("cpu_s") is None or not r or not r.get("tokens"):
        return None
    return block["cpu_s"] * 1e6 / r["tokens"]


def cpu_per_token(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare server CPU per forwarded token: this tree's, the baseline's, and the simulator's.

    One row per server, backend path and level: ``server_us`` (this tree's server CPU µs per
    token), ``baseline_us`` (the same round with the server run from ``--baseline``; None
    without it), ``vs_baseline`` = server_us / baseline_us, ``sim_us`` (the simulator's CPU µs
    per token in this tree's round: it generated exactly the replies the server forwarded),
    ``vs_simulator`` = server_us / sim_us, and the baseline round's ``baseline_sim_us`` and
    ``baseline_vs_simulator``. Ratios come from the unrounded CPU seconds.
    """
    config = data["config"]
    measured = [r for r in _measured(data["rounds"]) if r["path"] != "direct"]
    rows = []
    for server in config["servers"]:
        for path in [p for p in config["paths"] if p != "direct"]:
            for level in sorted(config["levels"]):
                current = _find(measured, server, path, level)
                base = _find(measured, server + BASELINE_SUFFIX, path, level) if config.get("baseline") else None
                if current is None and base is None:
                    continue
                server_us = _us_per_token(current, "server_process")
                baseline_us = _us_per_token(base, "server_process")
                sim_us = _us_per_token(current, "simulator_process")
                base_sim_us = _us_per_token(base, "simulator_process")
                rows.append(
                    {
                        "server": server,
                        "path": path,
                        "concurrency": level,
                        "server_us": _r(server_us),
                        "baseline_us": _r(baseline_us),
                        "vs_baseline": _ratio(server_us, baseline_us),
                        "sim_us": _r(sim_us),
                        "vs_simulator": _ratio(server_us, sim_us, 2),
                        "baseline_sim_us": _r(base_sim_us),
                        "baseline_vs_simulator": _ratio(baseline_us, base_sim_us, 2),
                    }
                )
    return rows


def cpu_per_token_overall(data: dict[str, Any]) -> dict[str, Any] | None:
    """Sum this tree's and the baseline's server CPU over the rounds both measured at >= 50 streams.

    Returns ``{"rounds", "server_us", "baseline_us", "vs_baseline"}`` (µs per forwarded token),
    or None without a baseline or a common round.
    """
    config = data["config"]
    if not config.get("baseline"):
        return None
    measured = [r for r in _measured(data["rounds"]) if r["path"] != "direct" and r.get("server_process")]
    cpu = {"current": 0.0, "baseline": 0.0}
    tokens = {"current": 0, "baseline": 0}
    count = 0
    for server in config["servers"]:
        for r in measured:
            if r["server"] != server or r["concurrency"] < CPU_TARGET_MIN_LEVEL:
                continue
            base = _find(measured, server + BASELINE_SUFFIX, r["path"], r["concurrency"])
            if base is None:
                continue
            count += 1
            for tree, x in (("current", r), ("baseline", base)):
                cpu[tree] += x["server_process"]["cpu_s"]
                tokens[tree] += x["tokens"]
    if not count or not tokens["current"] or not tokens["baseline"]:
        return None
    current_us = cpu["current"] * 1e6 / tokens["current"]
    baseline_us = cpu["baseline"] * 1e6 / tokens["baseline"]
    return {
        "rounds": count,
        "server_us": _r(current_us),
        "baseline_us": _r(baseline_us),
        "vs_baseline": _ratio(current_us, baseline_us),
    }


def enforcement(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare ``v1m`` (every rate limit and budget applies) with ``v1`` (none), round by round.

    One row per server label (this tree's, then the baseline's) and level measured on both paths:
    ``v1_ttft_ms`` / ``v1m_ttft_ms`` (``{"p50", "p99"}``), ``added_ms`` = v1m's minus v1's
    (``{"p50", "p99"}``, ms: what enforcement adds before the first token), ``v1_us`` /
    ``v1m_us`` (server CPU µs per forwarded token) and ``cpu_ratio`` = v1m_us / v1_us (from the
    unrounded CPU seconds).
    """
    measured = _measured(data["rounds"])
    rows = []
    for server in server_labels(data["config"]):
        for level in sorted(data["config"]["levels"]):
            plain, metered = _find(measured, server, "v1", level), _find(measured, server, "v1m", level)
            if plain is None or metered is None:
                continue
            plain_us, metered_us = _us_per_token(plain, "server_process"), _us_per_token(metered, "server_process")
            added = {
                q: _r(metered["ttft_ms"][q] - plain["ttft_ms"][q])
                if metered["ttft_ms"][q] is not None and plain["ttft_ms"][q] is not None
                else None
                for q in ("p50", "p99")
            }
            rows.append(
                {
                    "server": server,
                    "concurrency": level,
                    "v1_ttft_ms": {q: plain["ttft_ms"][q] for q in ("p50", "p99")},
                    "v1m_ttft_ms": {q: metered["ttft_ms"][q] for q in ("p50", "p99")},
                    "added_ms": added,
                    "v1_us": _r(plain_us),
                    "v1m_us": _r(metered_us),
                    "cpu_ratio": _ratio(metered_us, plain_us),
                }
            )
    return rows


def enforcement_overall(data: dict[str, Any]) -> dict[str, Any]:
    """Sum server CPU and tokens of v1 and v1m over the levels >= 50 streams measured on both, per server label.

    Returns ``{server: {"rounds", "v1_us", "v1m_us", "cpu_ratio", "added_us_per_request"}}``: µs per
    forwarded token, their ratio, and what enforcement costs per request, µs of server CPU (v1m's
    CPU per request minus v1's). A server without such a pair of rounds is left out. Steadier than
    any single round's ratio. Enforcement's work is per request (an admission and a release), none
    per token: with replies of ``--tokens`` tokens, the ratio is 1 + that cost / a reply's CPU.
    """
    measured = [r for r in _measured(data["rounds"]) if r.get("server_process")]
    overall = {}
    for server in server_labels(data["config"]):
        cpu = {"v1": 0.0, "v1m": 0.0}
        tokens = {"v1": 0, "v1m": 0}
        requests = {"v1": 0, "v1m": 0}
        count = 0
        for level in sorted(data["config"]["levels"]):
            pair = {path: _find(measured, server, path, level) for path in ("v1", "v1m")}
            if level < CPU_TARGET_MIN_LEVEL or any(r is None for r in pair.values()):
                continue
            count += 1
            for path, r in pair.items():
                assert r is not None  # noqa: S101 - checked above
                cpu[path] += r["server_process"]["cpu_s"]
                tokens[path] += r["tokens"]
                requests[path] += r["ok"]
        if not count or not tokens["v1"] or not tokens["v1m"]:
            continue
        plain_us, metered_us = cpu["v1"] * 1e6 / tokens["v1"], cpu["v1m"] * 1e6 / tokens["v1m"]
        overall[server] = {
            "rounds": count,
            "v1_us": _r(plain_us),
            "v1m_us": _r(metered_us),
            "cpu_ratio": _ratio(metered_us, plain_us),
            "added_us_per_request": _r(cpu["v1m"] * 1e6 / requests["v1m"] - cpu["v1"] * 1e6 / requests["v1"])
            if requests["v1"] and requests["v1m"]
            else None,
        }
    return overall


def enforcement_paired(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Summarize the paired enforcement rounds (``run.Bench.paired_enforcement``), one row per server label.

    TTFT: every reply's TTFT of the one-stream rounds pooled per path; ``added_ttft_p50_ms`` =
    v1m's p50 minus v1's (ms). CPU, from the side-by-side rounds (``run.Bench.side_by_side``): per
    round, server CPU µs per forwarded token of the process in the v1m role over the one in the v1
    role; per pair of rounds (the processes' roles swapped), the geometric mean of its two rounds'
    ratios, in which a difference between the processes cancels. ``cpu_ratio`` = the median of
    the pairs' ratios, ``cpu_ratio_range`` = [lowest, highest], ``cpu_ratio_pooled`` = all v1m
    CPU over all its tokens against the same of v1, ``added_us_per_request`` = the median over
    pairs of v1m's minus v1's server CPU µs per request. ``control_ratio``: the median ratio of the
    control pairs (v1 in both roles), whose distance from 1 is what the pairing left of the
    machine's noise. Pairs with an error, or a round without tokens, are left out. A row's
    figures are None when no pair was measured.
    """
    rows = []
    for block in data.get("enforcement_pairs") or []:
        rounds = block["rounds"]
        ttft = {
            path: sorted(v for r in rounds if r["kind"] == "ttft" and r["path"] == path for v in r["ttft_ms"])
            for path in ("v1", "v1m")
        }
        p50 = {path: percentile(values, 0.5) for path, values in ttft.items()}
        halves: dict[tuple[str, int], dict[tuple[int, str], dict[str, Any]]] = {}
        for r in rounds:
            if r["kind"] in ("cpu", "control"):
                halves.setdefault((r["kind"], r["pair"]), {})[(r["round"], r["role"])] = r
        ratios: dict[str, list[float]] = {"cpu": [], "control": []}
        added, cpu, tokens = [], {"v1": 0.0, "v1m": 0.0}, {"v1": 0, "v1m": 0}
        for (kind, _), pair in halves.items():
            if len(pair) != 4 or any(
                r["errors"] or not r["tokens"] or not r["ok"] or not r["server_cpu_s"] for r in pair.values()
            ):
                continue
            product, extra = 1.0, 0.0
            for index in (0, 1):
                plain, metered = pair[(index, "v1")], pair[(index, "v1m")]
                product *= (metered["server_cpu_s"] / metered["tokens"]) / (plain["server_cpu_s"] / plain["tokens"])
                extra += 1e6 * (metered["server_cpu_s"] / metered["ok"] - plain["server_cpu_s"] / plain["ok"]) / 2
            ratios[kind].append(math.sqrt(product))
            if kind == "cpu":
                added.append(extra)
                for (_, role), r in pair.items():
                    cpu[role] += r["server_cpu_s"]
                    tokens[role] += r["tokens"]
        measured = ratios["cpu"]
        rows.append(
            {
                "server": block["server"],
                "ttft_level": next((r["level"] for r in rounds if r["kind"] == "ttft"), None),
                "ttft_replies": {path: len(values) for path, values in ttft.items()},
                "v1_ttft_p50_ms": _r(p50["v1"], 2),
                "v1m_ttft_p50_ms": _r(p50["v1m"], 2),
                "added_ttft_p50_ms": _r(p50["v1m"] - p50["v1"], 2)
                if p50["v1"] is not None and p50["v1m"] is not None
                else None,
                "cpu_level": next((r["level"] for r in rounds if r["kind"] == "cpu"), None),
                "pairs": len(measured),
                "cpu_ratio": _r(statistics.median(measured), 3) if measured else None,
                "cpu_ratio_range": [_r(min(measured), 3), _r(max(measured), 3)] if measured else None,
                "cpu_ratio_pooled": _ratio(cpu["v1m"] * 1e6 / tokens["v1m"], cpu["v1"] * 1e6 / tokens["v1"])
                if measured
                else None,
                "added_us_per_request": _r(statistics.median(added)) if added else None,
                "control_pairs": len(ratios["control"]),
                "control_ratio": _r(statistics.median(ratios["control"]), 3) if ratios["control"] else None,
            }
        )
    return rows


# The inbound APIs compared with /v1/chat/completions (path v1): same caller, upstream and conversation.
INBOUND_PATHS = ("v1msg", "v1resp")


def inbound_apis(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare ``/v1/messages`` (v1msg) and ``/v1/responses`` (v1resp) with ``/v1/chat/completions`` (v1).

    One row per server label and level where ``v1`` and at least one of them were measured:
    ``ttft_ms`` (``{path: {"p50", "p99"}}``), ``server_us`` (``{path: µs}``, server CPU per
    forwarded token) and ``vs_v1`` (``{path: server_us / v1's}``, from the unrounded CPU seconds)
    for ``v1`` and each measured inbound path. The same caller, model, upstream reply and
    conversation: only the inbound API's parsing, translation and encoding differ.
    """
    measured = _measured(data["rounds"])
    rows = []
    for server in server_labels(data["config"]):
        for level in sorted(data["config"]["levels"]):
            plain = _find(measured, server, "v1", level)
            others = {path: _find(measured, server, path, level) for path in INBOUND_PATHS}
            found = {path: r for path, r in others.items() if r is not None}
            if plain is None or not found:
                continue
            plain_us = _us_per_token(plain, "server_process")
            paths = {"v1": plain, **found}
            rows.append(
                {
                    "server": server,
                    "concurrency": level,
                    "ttft_ms": {path: {q: r["ttft_ms"][q] for q in ("p50", "p99")} for path, r in paths.items()},
                    "server_us": {path: _r(_us_per_token(r, "server_process")) for path, r in paths.items()},
                    "vs_v1": {path: _ratio(_us_per_token(r, "server_process"), plain_us) for path, r in found.items()},
                }
            )
    return rows


def adapter_cpu(adapters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per upstream adapter measured by ``bench.adapter_cpu`` (``run.Bench.measure_adapters``).

    ``kind`` (``Provider.kind``), ``chunks_per_reply``, ``sequential_us`` and ``concurrent_us``
    (the adapter process's CPU µs per streamed chunk, replies one after another / all at once),
    ``concurrency``, ``chunks_per_batch`` (concurrent phase) and ``error`` (None, or why the tool
    failed; the figures are then None).
    """
    rows = []
    for adapter in adapters:
        phases = adapter.get("phases") or []
        sequential = next((ph for ph in phases if ph["concurrency"] == 1), None)
        concurrent = next((ph for ph in phases if ph["concurrency"] > 1), None)
        rows.append(
            {
                "kind": adapter["kind"],
                "chunks_per_reply": _r(sequential["chunks"] / sequential["replies"]) if sequential else None,
                "sequential_us": sequential["us_per_chunk"] if sequential else None,
                "concurrency": concurrent["concurrency"] if concurrent else None,
                "concurrent_us": concurrent["us_per_chunk"] if concurrent else None,
                "chunks_per_batch": concurrent["chunks_per_batch"] if concurrent else None,
                "error": adapter.get("error"),
            }
        )
    return rows


def add_overheads(rounds: list[dict[str, Any]]) -> None:
    """Set ``ttft_overhead_ms`` on backend rounds: their TTFT percentile minus direct's, same level."""
    direct = {r["concurrency"]: r for r in _measured(rounds) if r["path"] == "direct"}
    for r in _measured(rounds):
        if r["path"] == "direct":
            continue
        base = direct.get(r["concurrency"])
        if base is None:
            r["ttft_overhead_ms"] = None
            continue
        r["ttft_overhead_ms"] = {
            q: _r(r["ttft_ms"][q] - base["ttft_ms"][q])
            if r["ttft_ms"][q] is not None and base["ttft_ms"][q] is not None
            else None
            for q in ("p50", "p90", "p99")
        }


def _closest_level(rounds: list[dict[str, Any]], level: int) -> int | None:
    levels = sorted({r["concurrency"] for r in rounds})
    if not levels:
        return None
    return min(levels, key=lambda n: (abs(math.log(n) - math.log(level)), -n))


def _find(rounds: list[dict[str, Any]], server: str, path: str, level: int | None) -> dict[str, Any] | None:
    for r in rounds:
        if r["server"] == server and r["path"] == path and r["concurrency"] == level:
            return r
    return None


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target for every server (and path) of this tree; ``met`` is None when not measured.

    Baseline rounds only enter as the reference of the CPU-per-token comparison.
    """
    rounds = [r for r in data["rounds"] if r["path"] != "direct"]
    measured = _measured(rounds)
    servers = data["config"]["servers"]
    paths = [p for p in data["config"]["paths"] if p != "direct"]
    ref = _closest_level(measured, TARGET_LEVEL)
    top = max((r["concurrency"] for r in rounds), default=None)
    baseline = bool(data["config"].get("baseline"))
    cpu_rows = {(c["server"], c["path"], c["concurrency"]): c for c in data.get("cpu_per_token") or []}
    cpu_levels = [level for level in sorted(data["config"]["levels"]) if level >= CPU_TARGET_MIN_LEVEL]
    targets: list[dict[str, Any]] = []

    def add(target: str, server: str, path: str | None, level: int | None, value: Any, limit: float, ok: Any) -> None:
        targets.append(
            {
                "target": target,
                "server": server,
                "path": path,
                "concurrency": level,
                "value": value,
                "limit": limit,
                "met": ok,
            }
        )

    for server in servers:
        for path in paths:
            r = _find(measured, server, path, ref)
            over = (r or {}).get("ttft_overhead_ms") or {}
            p50, p99 = over.get("p50"), over.get("p99")
            limit50, limit99 = TARGETS["ttft_overhead_p50_ms"], TARGETS["ttft_overhead_p99_ms"]
            add("TTFT overhead p50 (ms)", server, path, ref, p50, limit50, None if p50 is None else p50 <= limit50)
            add("TTFT overhead p99 (ms)", server, path, ref, p99, limit99, None if p99 is None else p99 <= limit99)
        for path in paths:
            r = _find(rounds, server, path, top)
            errors = None if r is None or r.get("skipped") else r["errors"]
            add(f"errors at {top} streams", server, path, top, errors, 0, None if errors is None else errors == 0)
        r = _find(measured, server, "v1", ref)
        cpu = ((r or {}).get("server_process") or {}).get("cpu_us_per_token")
        limit = TARGETS["v1_cpu_us_per_token"]
        add("server CPU µs per token on /v1", server, "v1", ref, cpu, limit, None if cpu is None else cpu <= limit)
        for path in paths:
            # The worst value at 200 streams or more (below, allocator noise dominates); the
            # largest level when none reaches 200.
            candidates = [
                x for x in measured if x["server"] == server and x["path"] == path and x.get("server_process")
            ]
            big = [x for x in candidates if x["concurrency"] >= TARGET_LEVEL] or sorted(
                candidates, key=lambda x: x["concurrency"]
            )[-1:]
            r = max(big, key=lambda x: x["server_process"].get("rss_mb_per_100_streams") or 0, default=None)
            value = ((r or {}).get("server_process") or {}).get("rss_mb_per_100_streams")
            limit = TARGETS["rss_mb_per_100_streams"]
            level = r["concurrency"] if r else None
            add(
                "server RSS MB per 100 streams (worst at >= 200)",
                server,
                path,
                level,
                value,
                limit,
                None if value is None else value <= limit,
            )
        # CPU per forwarded token against the baseline and the simulator, from 50 streams up.
        for path in paths:
            for level in cpu_levels:
                row = cpu_rows.get((server, path, level)) or {}
                if baseline:
                    value, limit = row.get("vs_baseline"), TARGETS["cpu_per_token_vs_baseline"]
                    add(
                        "server CPU per token / baseline's (≤ 1/3)",
                        server,
                        path,
                        level,
                        value,
                        round(limit, 3),
                        None if value is None else value <= limit,
                    )
                value, limit = row.get("vs_simulator"), TARGETS["cpu_per_token_vs_simulator"]
                add(
                    "server CPU per token / simulator's, same round (≤ 2)",
                    server,
                    path,
                    level,
                    value,
                    limit,
                    None if value is None else value <= limit,
                )
        # What enforcement adds: v1m against v1, TTFT p50 at one stream and CPU per token.
        # The paired rounds' figures when measured (neighbouring rounds of one process for TTFT, two
        # processes side by side for CPU: steadier), else the blocks'.
        if "v1m" in paths and "v1" in paths:
            paired = next((e for e in data.get("enforcement_paired") or [] if e["server"] == server), None)
            rows = [e for e in data.get("enforcement") or [] if e["server"] == server]
            row = next((e for e in rows if e["concurrency"] == ENFORCEMENT_LEVEL), rows[0] if rows else None)
            if paired is not None and paired["added_ttft_p50_ms"] is not None:
                value, level = paired["added_ttft_p50_ms"], paired["ttft_level"]
            else:
                value, level = (row["added_ms"]["p50"], row["concurrency"]) if row else (None, ENFORCEMENT_LEVEL)
            limit = TARGETS["enforcement_ttft_p50_ms"]
            add(ENFORCEMENT_TTFT_TARGET, server, "v1m", level, value, limit, None if value is None else value <= limit)
            overall = (data.get("enforcement_overall") or {}).get(server)
            if paired is not None and paired["cpu_ratio"] is not None:
                value, level = paired["cpu_ratio"], paired["cpu_level"]
            else:
                value, level = (overall["cpu_ratio"] if overall else None), None
            limit = TARGETS["enforcement_cpu_ratio"]
            add(ENFORCEMENT_CPU_TARGET, server, "v1m", level, value, limit, None if value is None else value <= limit)
        startup = data["startup"].get(server)
        value = startup["max_s"] if startup else None
        limit = TARGETS["startup_s"]
        add(
            "start-up to first request (s, worst)",
            server,
            None,
            None,
            value,
            limit,
            None if value is None else value <= limit,
        )
    return targets


def recommend(data: dict[str, Any]) -> dict[str, Any] | None:
    """Pick the server for production: fewest errors, then least server CPU per forwarded token.

    Only (path, level) pairs measured under every server are compared, so a skipped round does
    not favour the server that missed it. Only this tree's rounds count, never the baseline's.
    """
    servers = data["config"]["servers"]
    if len(servers) < 2:
        return None  # nothing to compare
    measured = [
        r
        for r in _measured(data["rounds"])
        if r["path"] != "direct" and r.get("server_process") and r["server"] in servers
    ]
    keys = [{(r["path"], r["concurrency"]) for r in measured if r["server"] == s} for s in servers]
    common = set.intersection(*keys) if keys else set()
    if not common:
        return None
    scores = {}
    for server in servers:
        picked = [r for r in measured if r["server"] == server and (r["path"], r["concurrency"]) in common]
        tokens = sum(r["tokens"] for r in picked)
        cpu = sum(r["server_process"]["cpu_s"] for r in picked)
        at_ref = [r for r in picked if r["concurrency"] == _closest_level(picked, TARGET_LEVEL)]
        p99 = [r["ttft_overhead_ms"]["p99"] for r in at_ref if (r.get("ttft_overhead_ms") or {}).get("p99") is not None]
        scores[server] = {
            "errors": sum(r["errors"] for r in picked),
            "cpu_us_per_token": round(cpu * 1e6 / tokens, 1) if tokens else None,
            "tokens_per_s_sum": sum(r["tokens_per_s"] for r in picked),
            "ttft_overhead_p99_ms_at_ref": max(p99) if p99 else None,
            "rounds": len(picked),
        }
    best = min(servers, key=lambda s: (scores[s]["errors"], scores[s]["cpu_us_per_token"] or math.inf))
    why = "; ".join(
        f"{s}: {v['errors']} errors, {v['cpu_us_per_token']} µs server CPU per token, worst TTFT overhead p99 at "
        f"{_closest_level(measured, TARGET_LEVEL)} streams {v['ttft_overhead_p99_ms_at_ref']} ms"
        for s, v in scores.items()
    )
    return {"server": best, "rule": "fewest errors, then least server CPU per token", "scores": scores, "why": why}


def build(
    *,
    meta: dict[str, Any],
    config: dict[str, Any],
    setup: dict[str, Any],
    startup: dict[str, Any],
    rounds: list[dict[str, Any]],
    profile: dict[str, Any] | None,
    adapters: list[dict[str, Any]] | None = None,
    enforcement_pairs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Return the report's JSON: the inputs, and every comparison, target and table computed from them.

    ``adapters``: ``bench.adapter_cpu``'s results per kind (``run.Bench.adapters``), or None.
    ``enforcement_pairs``: the paired v1 / v1m rounds per server label (``run.Bench.enforcement_pairs``).
    """
    add_overheads(rounds)
    data = {
        "meta": meta,
        "config": config,
        "setup": setup,
        "startup": startup,
        "rounds": rounds,
        "profile": profile,
        "adapter_cpu": adapter_cpu(adapters or []),
        "enforcement_pairs": enforcement_pairs or [],
    }
    data["cpu_per_token"] = cpu_per_token(data)
    data["cpu_per_token_overall"] = cpu_per_token_overall(data)
    data["enforcement"] = enforcement(data)
    data["enforcement_overall"] = enforcement_overall(data)
    data["enforcement_paired"] = enforcement_paired(data)
    data["inbound_apis"] = inbound_apis(data)
    data["targets"] = evaluate_targets(data)
    data["recommendation"] = recommend(data)
    return data


# --- Markdown -------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _log_cell(r: dict[str, Any]) -> str:
    log = r.get("server_log")
    if not log:
        return "–"
    return f"{log['warning']} / {log['error'] + log['critical']}"


def markdown(data: dict[str, Any]) -> str:
    meta, config = data["meta"], data["config"]
    lines = [
        "## chatbackend streaming benchmark",
        "",
        f"{meta['started_at']} · {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}) · "
        f"Python {meta['machine']['python']} · database {meta['database']} · "
        f"Redis {'yes' if meta['redis'] else 'no (in-memory layer)'} · run took {meta['duration_s']} s",
        "",
        f"Workload: {config['tokens']} tokens per reply, {config['ttft_ms']:g} ms to the first token, "
        f"{config['token_delay_ms']:g} ms between tokens; streams start spread over {config['ramp_ms']:g} ms; "
        f"replies per stream: {config['replies']} (auto: 10 at 1 stream on direct and the /v1 paths; 2 up to 200 "
        "streams, 1 above). On direct, v1 and v1m the requests are shaped as the OpenAI SDK and NextChat send "
        "them (system + user message, stream_options "
        f"include_usage, max_tokens {config.get('max_tokens', '–')}, temperature, top_p, penalties); v1msg "
        "(/v1/messages) and v1resp (/v1/responses) send the same system prompt, user message, token limit, "
        "temperature and top_p in Anthropic's and the Responses API's shapes.",
        "",
    ]
    base = config.get("baseline")
    if base:
        lines += [
            f"This tree: {meta.get('git_commit') or '?'}. "
            f"Baseline: `{base['dir']}` at {base.get('git_commit') or '?'}; "
            f"its rounds are labelled `SERVER{BASELINE_SUFFIX}` (same python, environment, database, simulator, "
            "load generator and seed; each of its blocks runs right after this tree's same block).",
            "",
        ]
    lines += [
        "| server | path | streams | TTFT p50 / p90 / p99 ms | overhead p50 / p99 ms | ITL p50 / p99 ms "
        "| tokens/s | errors | server log W/E | server µs/token | server CPU % | server RSS peak MB "
        "| MB per 100 streams "
        "| client CPU % | sim CPU % | machine CPU % |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in data["rounds"]:
        name = r["server"] or "–"
        if r.get("skipped"):
            lines.append(f"| {name} | {r['path']} | {r['concurrency']} | skipped: {r['skipped']} |||||||||||||")
            continue
        t, o, i = r["ttft_ms"], r.get("ttft_overhead_ms") or {}, r["itl_ms"]
        s = r.get("server_process") or {}
        sim = r.get("simulator_process") or {}
        client = r.get("client_process") or {}
        lines.append(
            f"| {name} | {r['path']} | {r['concurrency']} | {_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} "
            f"| {_f(o.get('p50'))} / {_f(o.get('p99'))} | {_f(i['p50'], 2)} / {_f(i['p99'], 2)} "
            f"| {_f(r['tokens_per_s'])} | {_f(r['errors'])} | {_log_cell(r)} | {_f(s.get('cpu_us_per_token'))} "
            f"| {_f(s.get('cpu_pct_of_core'), 0)} | {_f(s.get('rss_peak_mb'))} "
            f"| {_f(s.get('rss_mb_per_100_streams'), 2)} "
            f"| {_f(client.get('cpu_pct_of_core'), 0)} | {_f(sim.get('cpu_pct_of_core'), 0)} "
            f"| {_f(r.get('machine_cpu_pct'), 0)} |"
        )
    connects = [r for r in _measured(data["rounds"]) if r.get("ws_connect_ms")]
    if connects:
        lines += ["", "| server | WebSocket handshake (not in TTFT) at streams: p50 / p99 ms |", "|---|---|"]
        for server in server_labels(data["config"]):
            cells = [
                f"{r['concurrency']}: {_f(r['ws_connect_ms']['p50'])} / {_f(r['ws_connect_ms']['p99'])}"
                for r in connects
                if r["server"] == server
            ]
            if cells:
                lines.append(f"| {server} | {' · '.join(cells)} |")
    lines += _enforcement_markdown(data)
    lines += _inbound_markdown(data)
    lines += _cpu_markdown(data)
    lines += _adapter_markdown(data)
    if data["startup"]:
        lines += ["", "| server | start-up to first served request: median / worst (s) | samples |", "|---|--:|--:|"]
        for server, s in data["startup"].items():
            lines.append(f"| {server} | {s['median_s']:.3f} / {s['max_s']:.3f} | {len(s['samples_s'])} |")
    if data["targets"]:
        lines += ["", "| target | server | path | streams | value | limit | met |", "|---|---|---|--:|--:|--:|:-:|"]
        for t in data["targets"]:
            mark = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(
                f"| {t['target']} | {t['server']} | {t['path'] or '–'} | {_f(t['concurrency'])} | {_f(t['value'], 2)} "
                f"| {t['limit']:g} | {mark} |"
            )
    rec = data.get("recommendation")
    if rec:
        lines += ["", f"**Faster server for production: {rec['server']}** ({rec['rule']}). {rec['why']}."]
    profile = data.get("profile")
    if profile:
        lines += [
            "",
            f"Profile ({profile['server']}, {profile['path']}, {profile['concurrency']} streams, "
            f"{profile['samples']} samples of the thread holding the GIL; raw stacks in {profile['raw_file']}):",
            "",
            "| share of samples (inclusive) | package |",
            "|--:|---|",
        ]
        for name, share in profile["packages_inclusive"][:12]:
            lines.append(f"| {share:.1f}% | {name} |")
        lines += ["", "| self % | function |", "|--:|---|"]
        for name, share in profile["self"][:15]:
            lines.append(f"| {share:.1f}% | `{name}` |")
    notes = list(meta.get("notes") or [])
    if meta.get("fatal"):
        notes.insert(0, f"FATAL: {meta['fatal']}")
    bugs = {b for r in data["rounds"] for b in r.get("client_bugs", [])}
    notes += [f"load generator bug: {b}" for b in sorted(bugs)]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def _enforcement_markdown(data: dict[str, Any]) -> list[str]:
    rows = data.get("enforcement") or []
    if not rows:
        return _paired_markdown(data)
    lines = [
        "",
        "What enforcement adds (v1m: /v1 as a caller whose user, key and model have rate limits and, when the "
        "project has budgets, budgets; v1: the same request with none):",
        "",
        "| server | streams | TTFT p50 v1 / v1m ms | added p50 ms | TTFT p99 v1 / v1m ms | added p99 ms "
        "| server µs/token v1 / v1m | v1m / v1 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in rows:
        lines.append(
            f"| {e['server']} | {e['concurrency']} | {_f(e['v1_ttft_ms']['p50'])} / {_f(e['v1m_ttft_ms']['p50'])} "
            f"| {_f(e['added_ms']['p50'])} | {_f(e['v1_ttft_ms']['p99'])} / {_f(e['v1m_ttft_ms']['p99'])} "
            f"| {_f(e['added_ms']['p99'])} | {_f(e['v1_us'])} / {_f(e['v1m_us'])} | {_f(e['cpu_ratio'], 2)} |"
        )
    targets = {(t["server"], t["target"]): t for t in data.get("targets") or []}
    lines.append("")
    for server in data["config"]["servers"]:
        ttft = targets.get((server, ENFORCEMENT_TTFT_TARGET))
        cpu = targets.get((server, ENFORCEMENT_CPU_TARGET))
        if ttft is None:
            continue
        overall = (data.get("enforcement_overall") or {}).get(server)
        cpu_text = (
            f"server CPU per token v1m / v1 {_f(overall['cpu_ratio'], 2)} ({_f(overall['v1m_us'])} against "
            f"{_f(overall['v1_us'])} µs over {overall['rounds']} rounds at {CPU_TARGET_MIN_LEVEL}+ streams; "
            f"target no change, ≤ {TARGETS['enforcement_cpu_ratio']:g}: {_met(cpu['met'] if cpu else None)}): "
            f"{_f(overall['added_us_per_request'])} µs of server CPU per request"
            if overall
            else f"server CPU per token v1m / v1 not measured (no level of {CPU_TARGET_MIN_LEVEL}+ streams on both)"
        )
        lines.append(
            f"- **{server}: enforcement adds {_f(ttft['value'])} ms at p50** ({_f(ttft['concurrency'])} stream(s); "
            f"target ≤ {TARGETS['enforcement_ttft_p50_ms']:g} ms: {_met(ttft['met'])}); {cpu_text}."
        )
    return lines + _paired_markdown(data)


def _paired_markdown(data: dict[str, Any]) -> list[str]:
    rows = data.get("enforcement_paired") or []
    if not rows:
        return []
    lines = [
        "",
        "The same, paired (the targets read these when measured): TTFT in neighbouring rounds of one stream on "
        "one server process (v1 v1m v1m v1 …); server CPU on two processes side by side, each answering one "
        "caller and then the other, the control answering v1 on both:",
        "",
        "| server | TTFT p50 v1 / v1m ms (replies) | added p50 ms | streams per process | pairs "
        "| server CPU/token v1m / v1, median [range] | pooled | added µs/request | control (pairs) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in rows:
        spread = e["cpu_ratio_range"] or [None, None]
        lines.append(
            f"| {e['server']} | {_f(e['v1_ttft_p50_ms'], 2)} / {_f(e['v1m_ttft_p50_ms'], 2)} "
            f"({e['ttft_replies']['v1']} / {e['ttft_replies']['v1m']}) | {_f(e['added_ttft_p50_ms'], 2)} "
            f"| {_f(e['cpu_level'])} | {e['pairs']} | {_f(e['cpu_ratio'], 3)} [{_f(spread[0], 3)}–{_f(spread[1], 3)}] "
            f"| {_f(e['cpu_ratio_pooled'], 3)} | {_f(e['added_us_per_request'])} "
            f"| {_f(e['control_ratio'], 3)} ({e['control_pairs']}) |"
        )
    return lines


def _inbound_markdown(data: dict[str, Any]) -> list[str]:
    rows = data.get("inbound_apis") or []
    if not rows:
        return []
    paths = ["v1", *[p for p in INBOUND_PATHS if any(p in row["server_us"] for row in rows)]]
    names = " / ".join(paths)
    lines = [
        "",
        "Inbound APIs against /v1/chat/completions (v1msg: /v1/messages, v1resp: /v1/responses; the same "
        "caller, model, upstream reply and conversation):",
        "",
        f"| server | streams | TTFT p50 {names} ms | TTFT p99 {names} ms | server µs/token {names} "
        f"| {' / '.join(f'{p} / v1' for p in paths[1:])} |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:

        def cells(values: dict[str, Any], digits: int = 1) -> str:
            return " / ".join(_f(values.get(p), digits) for p in paths)

        ttft = row["ttft_ms"]
        lines.append(
            f"| {row['server']} | {row['concurrency']} "
            f"| {cells({p: (ttft.get(p) or {}).get('p50') for p in paths})} "
            f"| {cells({p: (ttft.get(p) or {}).get('p99') for p in paths})} "
            f"| {cells(row['server_us'])} | {' / '.join(_f(row['vs_v1'].get(p), 2) for p in paths[1:])} |"
        )
    return lines


def _adapter_markdown(data: dict[str, Any]) -> list[str]:
    rows = data.get("adapter_cpu") or []
    if not rows:
        return []
    adapters = data["config"].get("adapters") or {}
    lines = [
        "",
        "Upstream adapter CPU per chunk (`python -m bench.adapter_cpu`: the adapter alone in its process, streaming "
        f"the simulator's replies, {adapters.get('replies', '?')} one after another, then "
        f"{adapters.get('concurrency', '?')} at once; process CPU / chunks yielded):",
        "",
        "| adapter (Provider.kind) | chunks per reply | sequential µs/chunk | concurrent µs/chunk "
        "| chunks per batch (concurrent) |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        if row["error"]:
            lines.append(f"| {row['kind']} | not measured: {row['error'][:120]} ||||")
            continue
        lines.append(
            f"| {row['kind']} | {_f(row['chunks_per_reply'])} | {_f(row['sequential_us'])} "
            f"| {_f(row['concurrent_us'])} | {_f(row['chunks_per_batch'], 2)} |"
        )
    return lines


def _cpu_markdown(data: dict[str, Any]) -> list[str]:
    rows = data.get("cpu_per_token") or []
    if not rows:
        return []
    lines = [
        "",
        "CPU per forwarded token (µs; server and simulator CPU of the same round / the tokens the client received):",
        "",
        "| server | path | streams | server µs/token | baseline µs/token | new / baseline | sim µs/token "
        "| server / sim | baseline / its sim |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in rows:
        lines.append(
            f"| {c['server']} | {c['path']} | {c['concurrency']} | {_f(c['server_us'])} | {_f(c['baseline_us'])} "
            f"| {_f(c['vs_baseline'], 2)} | {_f(c['sim_us'])} | {_f(c['vs_simulator'], 2)} "
            f"| {_f(c['baseline_vs_simulator'], 2)} |"
        )
    overall = data.get("cpu_per_token_overall")
    if overall:
        lines += [
            "",
            f"Over the {overall['rounds']} rounds at {CPU_TARGET_MIN_LEVEL}+ streams measured in both trees: "
            f"{_f(overall['server_us'])} µs per token here, {_f(overall['baseline_us'])} in the baseline "
            f"(new / baseline {_f(overall['vs_baseline'], 2)}).",
        ]
    return lines


# --- chart ----------------------------------------------------------------------------------

_PATH_COLORS = {
    "v1": "tab:blue",
    "v1m": "tab:purple",
    "v1msg": "tab:red",
    "v1resp": "tab:brown",
    "sse": "tab:orange",
    "ws": "tab:green",
    "direct": "black",
}
_SERVER_STYLES = ["-", "--", ":", "-."]


def draw_chart(data: dict[str, Any], png: Path) -> Path | None:
    """Draw TTFT overhead (p50, p99), server CPU per token and RSS per 100 streams vs concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rounds = [r for r in _measured(data["rounds"]) if r["path"] != "direct"]
    servers = data["config"]["servers"]
    # A server's baseline rounds: its line style, crosses, faded.
    lines_of = [(s, index, False) for index, s in enumerate(servers)]
    if data["config"].get("baseline"):
        lines_of += [(s + BASELINE_SUFFIX, index, True) for index, s in enumerate(servers)]
    panels = [
        ("TTFT overhead over direct, p50 (ms)", lambda r: (r.get("ttft_overhead_ms") or {}).get("p50"), "symlog"),
        ("TTFT overhead over direct, p99 (ms)", lambda r: (r.get("ttft_overhead_ms") or {}).get("p99"), "symlog"),
        (
            "server CPU per forwarded token (µs)",
            lambda r: (r.get("server_process") or {}).get("cpu_us_per_token"),
            "log",
        ),
        (
            "server RSS per 100 open streams (MB)",
            lambda r: (r.get("server_process") or {}).get("rss_mb_per_100_streams"),
            None,
        ),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    limits = {
        0: TARGETS["ttft_overhead_p50_ms"],
        1: TARGETS["ttft_overhead_p99_ms"],
        3: TARGETS["rss_mb_per_100_streams"],
    }
    for index, (ax, (title, value, scale)) in enumerate(zip(axes.flat, panels, strict=True)):
        for label, s_index, is_baseline in lines_of:
            for path in [p for p in _PATH_COLORS if p != "direct"]:
                points = sorted(
                    (r["concurrency"], value(r))
                    for r in rounds
                    if r["server"] == label and r["path"] == path and value(r) is not None
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        _SERVER_STYLES[s_index % len(_SERVER_STYLES)],
                        marker="x" if is_baseline else "o",
                        alpha=0.5 if is_baseline else 1.0,
                        color=_PATH_COLORS[path],
                        label=f"{label} {path}",
                    )
        if index in limits:
            ax.axhline(limits[index], color="red", linewidth=0.8, linestyle=":", label="target")
        if index == 2:
            ax.axhline(TARGETS["v1_cpu_us_per_token"], color="red", linewidth=0.8, linestyle=":", label="target (v1)")
            # The simulator's own CPU per token in the same rounds: what generating a token costs.
            sim = sorted(
                (c["concurrency"], c["sim_us"])
                for c in data.get("cpu_per_token") or []
                if c["server"] == servers[0] and c["path"] == "v1" and c["sim_us"]
            )
            if sim:
                xs, ys = zip(*sim, strict=True)
                ax.plot(xs, ys, "-.", color="grey", marker=".", label=f"simulator ({servers[0]} v1 rounds)")
        ax.set_xscale("log")
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=10)
            lowest = min((y for line in ax.get_lines() for y in line.get_ydata()), default=0)
            ax.set_ylim(bottom=min(0.0, lowest * 1.2))
        elif scale == "log":
            ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(
        f"chatbackend streaming: {meta['machine']['cpus']} CPUs, database {meta['database']}, "
        f"Redis {'yes' if meta['redis'] else 'no'} — {meta['started_at']}"
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --- py-spy profile -------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


_APPS = ("chatbackend", "conversations", "accounts", "llm", "bench")


def _package(file: str) -> str:
    """Name the package of a py-spy file name (``django/core/handlers/asgi.py``, ``<frozen runpy>``)."""
    normalized = file.replace("\\", "/")
    if "site-packages/" in normalized:
        normalized = normalized.split("site-packages/", 1)[1]
    first = normalized.split("/", 1)[0].removesuffix(".py")
    if first.startswith("<frozen "):
        first = first.removeprefix("<frozen ").rstrip(">").split(".")[0]
    if first in _APPS:
        return f"app:{first}"
    if first in sys.stdlib_module_names:
        return f"stdlib:{first}"
    return first or "?"


def summarize_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """Summarize py-spy's raw (collapsed) stacks: self time by function, inclusive by package and function."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages_self: Counter[str] = Counter()
    packages_inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match:
                frames.append((match.group("func"), match.group("file")))
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        self_time[f"{func} ({file})"] += count
        packages_self[_package(file)] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += count
        for package in {_package(p) for _, p in frames}:
            packages_inclusive[package] += count

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "self": shares(self_time, top),
        "inclusive": shares(inclusive, top + 15),
        "packages_self": shares(packages_self, 20),
        "packages_inclusive": shares(packages_inclusive, 20),
    }
