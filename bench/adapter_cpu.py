"""``python -m bench.adapter_cpu``: the upstream adapter's CPU time per streamed chunk.

Start a simulator first (its CPU must not count, so it runs in its own process), then::

    python manage.py llm_simulator --port 8001 --ttft-ms 5 --token-delay-ms 10 --reply-tokens 64 &
    python -m bench.adapter_cpu --base-url http://127.0.0.1:8001/v1
    python -m bench.adapter_cpu --kind anthropic --base-url http://127.0.0.1:8001

It streams replies through the ``--kind`` adapter's ``stream`` (default ``openai``:
``OpenAICompatibleProvider``; ``anthropic``, ``gemini`` and ``azure_openai``, whose base URL is the
simulator's root, without ``/v1``) and discards them, first one after
another, then ``--concurrency`` at a time, and prints for each phase this process's CPU time
(``time.process_time()``: user + system, all threads) divided by the chunks yielded, and the
chunks per batch. The CPU includes everything the adapter costs per reply (sending the request,
aiohttp's connection handling, the event loop), spread over the reply's chunks. The event loop is
uvloop when installed, as under uvicorn. The figures in ``llm.providers.openai_compatible``,
``llm.providers.anthropic`` and ``llm.providers.gemini`` come from this tool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any, TextIO


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url",
        required=True,
        help="the simulator's API root as the kind's Provider.base_url: http://127.0.0.1:8001/v1 for openai, "
        "http://127.0.0.1:8001 for anthropic, gemini and azure_openai",
    )
    parser.add_argument(
        "--kind",
        default="openai",
        help="the adapter: a Provider.kind (openai, anthropic, gemini, azure_openai; default openai)",
    )
    parser.add_argument("--model", default="sim-1", help="model id to request (default sim-1)")
    parser.add_argument("--replies", type=int, default=50, help="replies streamed one after another (default 50)")
    parser.add_argument("--concurrency", type=int, default=200, help="replies streamed at once (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent replies (default 3)")
    return parser.parse_args(argv)


async def measure(options: argparse.Namespace, out: TextIO) -> None:
    """Stream the phases' replies and write one line per phase to ``out``."""
    from llm.providers import ChatRequest, ProviderConfig, get_provider
    from llm.providers.http import aclose_clients

    provider = get_provider(ProviderConfig(kind=options.kind, base_url=options.base_url))
    request = ChatRequest(model=options.model, messages=[{"role": "user", "content": "Measure me."}])

    async def reply() -> tuple[int, int]:
        chunks = batches = 0
        async for batch in provider.stream(request):
            chunks += len(batch)
            batches += 1
        return chunks, batches

    try:
        await reply()  # warm up: the connection pool, imports, caches
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
            out.write(
                f"{name}: {rounds * concurrency} replies, {chunks} chunks in {batches} batches "
                f"({chunks / batches:.2f} chunks/batch), CPU {cpu:.3f} s = {cpu / chunks * 1e6:.1f} µs/chunk\n"
            )
    finally:
        await aclose_clients()


def main(argv: list[str] | None = None, out: Any = None) -> None:
    options = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
    import django

    django.setup()
    from llm.simulator import run_event_loop

    run_event_loop(measure(options, out or sys.stdout))


if __name__ == "__main__":
    main()
