"""``python -m bench.adapter_cpu``: the upstream adapter's CPU time per streamed chunk.

Start a simulator first (its CPU must not count, so it runs in its own process), then::

    python manage.py llm_simulator --port 8001 --ttft-ms 5 --token-delay-ms 10 --reply-tokens 64 &
    python -m bench.adapter_cpu --base-url http://127.0.0.1:8001/v1
    python -m bench.adapter_cpu --kind anthropic --base-url http://127.0.0.1:8001
    python -m bench.adapter_cpu --kind openai,anthropic,gemini,azure_openai --simulator-url http://127.0.0.1:8001

It streams replies through the ``--kind`` adapter's ``stream`` (default ``openai``:
``OpenAICompatibleProvider``; ``anthropic``, ``gemini`` and ``azure_openai``, whose base URL is the
simulator's root, without ``/v1``) and discards them, first one after
another, then ``--concurrency`` at a time, and prints for each phase this process's CPU time
(``time.process_time()``: user + system, all threads) divided by the chunks yielded, and the
chunks per batch. The CPU includes everything the adapter costs per reply (sending the request,
aiohttp's connection handling, the event loop), spread over the reply's chunks. The event loop is
uvloop when installed, as under uvicorn. The figures in ``llm.providers.openai_compatible``,
``llm.providers.anthropic`` and ``llm.providers.gemini`` come from this tool.

``--simulator-url`` (instead of ``--base-url``) is the simulator's root: each kind's base URL is
derived from it (``SIMULATOR_PATHS``), so ``--kind`` may list several kinds, measured one after
another in this one process (each with its own warm-up reply; what ``python -m bench`` does, to
pay for one interpreter start instead of four). Text lines then start with the kind.
``--json`` prints one JSON object per kind instead (what ``python -m bench`` reads for its adapter
table): ``{"kind", "phases": [{"phase", "concurrency", "replies", "chunks", "batches",
"chunks_per_batch", "cpu_s", "us_per_chunk"}]}`` (CPU in seconds, µs per chunk). ``--api-key`` is
the key the simulator requires (``manage.py llm_simulator --api-key``), sent as each kind sends it.
A reply that fails raises the adapter's error: the exit status is then 1, with its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

# The path of each kind's API root on the simulator (``--simulator-url``): OpenAI-compatible
# providers' base URL ends in /v1; the other kinds' adapters add their own paths to the root.
SIMULATOR_PATHS = {"openai": "/v1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_cpu", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--base-url",
        help="the simulator's API root as the kind's Provider.base_url: http://127.0.0.1:8001/v1 for openai, "
        "http://127.0.0.1:8001 for anthropic, gemini and azure_openai",
    )
    where.add_argument(
        "--simulator-url",
        help="the simulator's root, http://127.0.0.1:8001: each kind's base URL is derived from it",
    )
    parser.add_argument(
        "--kind",
        default="openai",
        help="the adapter: a Provider.kind (openai, anthropic, gemini, azure_openai; default openai); with "
        "--simulator-url, several separated by commas",
    )
    parser.add_argument("--model", default="sim-1", help="model id to request (default sim-1)")
    parser.add_argument("--api-key", default="", help="the key the simulator requires, if any (default none)")
    parser.add_argument("--replies", type=int, default=50, help="replies streamed one after another (default 50)")
    parser.add_argument("--concurrency", type=int, default=200, help="replies streamed at once (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent replies (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per kind instead of text lines")
    options = parser.parse_args(argv)
    if min(options.replies, options.concurrency, options.rounds) < 1:
        parser.error("--replies, --concurrency and --rounds must be positive")
    options.kinds = [kind.strip() for kind in options.kind.split(",") if kind.strip()]
    if not options.kinds:
        parser.error("--kind names no adapter")
    if len(options.kinds) > 1 and options.base_url:
        parser.error("several kinds need --simulator-url: their base URLs differ")
    return options


def base_url(options: argparse.Namespace, kind: str) -> str:
    """Return ``kind``'s ``Provider.base_url``: ``--base-url``, or derived from ``--simulator-url``."""
    if options.base_url:
        return options.base_url
    return options.simulator_url.rstrip("/") + SIMULATOR_PATHS.get(kind, "")


def phase_line(phase: dict[str, Any]) -> str:
    """Return one phase's figures as the text line this tool prints (see ``measure``)."""
    return (
        f"{phase['phase']}: {phase['replies']} replies, {phase['chunks']} chunks in {phase['batches']} batches "
        f"({phase['chunks_per_batch']:.2f} chunks/batch), CPU {phase['cpu_s']:.3f} s = "
        f"{phase['us_per_chunk']:.1f} µs/chunk"
    )


async def measure(options: argparse.Namespace, kind: str) -> list[dict[str, Any]]:
    """Stream the phases' replies through ``kind``'s adapter and return the phases' figures.

    Each phase: ``phase`` (its name), ``concurrency``, ``replies``, ``chunks``, ``batches``,
    ``chunks_per_batch``, ``cpu_s`` (this process's CPU seconds) and ``us_per_chunk``.
    Raises what the adapter raises (``llm.providers.ProviderError``) when a reply fails.
    """
    from llm.providers import ChatRequest, ProviderConfig, get_provider

    config = ProviderConfig(kind=kind, base_url=base_url(options, kind), api_key=options.api_key)
    provider = get_provider(config)
    request = ChatRequest(model=options.model, messages=[{"role": "user", "content": "Measure me."}])

    async def reply() -> tuple[int, int]:
        chunks = batches = 0
        async for batch in provider.stream(request):
            chunks += len(batch)
            batches += 1
        return chunks, batches

    await reply()  # warm up: the connection pool, imports, caches
    results = []
    phases = [
        ("sequential", 1, options.replies),
        (f"{options.concurrency} concurrent", options.concurrency, options.rounds),
    ]
    for name, concurrency, rounds in phases:
        chunks = batches = 0
        started = time.process_time()
        for _ in range(rounds):
            for reply_chunks, reply_batches in await asyncio.gather(*(reply() for _ in range(concurrency))):
                chunks += reply_chunks
                batches += reply_batches
        cpu = time.process_time() - started
        results.append(
            {
                "phase": name,
                "concurrency": concurrency,
                "replies": rounds * concurrency,
                "chunks": chunks,
                "batches": batches,
                "chunks_per_batch": round(chunks / batches, 3) if batches else None,
                "cpu_s": round(cpu, 6),
                "us_per_chunk": round(cpu / chunks * 1e6, 2) if chunks else None,
            }
        )
    return results


async def measure_all(options: argparse.Namespace, out: TextIO) -> None:
    """Measure each kind in turn and write its figures to ``out`` (text lines, or a JSON object per kind)."""
    from llm.providers.http import aclose_clients

    try:
        for kind in options.kinds:
            phases = await measure(options, kind)
            if options.json:
                out.write(json.dumps({"kind": kind, "phases": phases}) + "\n")
                continue
            prefix = f"{kind} " if len(options.kinds) > 1 else ""
            for phase in phases:
                out.write(prefix + phase_line(phase) + "\n")
            out.flush()
    finally:
        await aclose_clients()


def main(argv: list[str] | None = None, out: Any = None) -> None:
    options = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
    import django

    django.setup()
    from llm.simulator import run_event_loop

    run_event_loop(measure_all(options, out or sys.stdout))


if __name__ == "__main__":
    main()
