"""``manage.py llm_adapter_cpu``: measure the upstream adapter's CPU time per streamed chunk.

Start a simulator first (its CPU must not count, so it runs in its own process), then::

    python manage.py llm_simulator --port 8001 --ttft-ms 5 --token-delay-ms 10 --reply-tokens 64 &
    python manage.py llm_adapter_cpu --base-url http://127.0.0.1:8001/v1

It streams replies through ``OpenAICompatibleProvider.stream`` and discards them, first one after
another, then ``--concurrency`` at a time, and prints for each phase this process's CPU time
(``time.process_time()``: user + system, all threads) divided by the chunks yielded, and the
chunks per batch. The CPU includes everything the adapter costs per reply (sending the request,
aiohttp's connection handling, the event loop), spread over the reply's chunks. The event loop is
uvloop when installed, as under uvicorn. The figures in ``llm.providers.openai_compatible`` come
from this command.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from llm.providers import ChatRequest, ProviderConfig, UpstreamError, get_provider
from llm.providers.openai_compatible import aclose_clients


class Command(BaseCommand):
    help = (
        "Measure the OpenAI-compatible adapter's CPU time per streamed chunk against a running "
        "LLM simulator (manage.py llm_simulator), sequentially and with concurrent replies."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--base-url", required=True, help="the simulator's API root, e.g. http://127.0.0.1:8001/v1")
        parser.add_argument("--model", default="sim-1", help="model id to request (default sim-1)")
        parser.add_argument("--replies", type=int, default=50, help="replies streamed one after another (default 50)")
        parser.add_argument("--concurrency", type=int, default=200, help="replies streamed at once (default 200)")
        parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent replies (default 3)")

    def handle(self, *args: Any, **options: Any) -> None:
        _run(self._measure(options))

    async def _measure(self, options: dict[str, Any]) -> None:
        provider = get_provider(ProviderConfig(kind="openai", base_url=options["base_url"]))
        request = ChatRequest(model=options["model"], messages=[{"role": "user", "content": "Measure me."}])

        async def reply() -> tuple[int, int]:
            chunks = batches = 0
            async for batch in provider.stream(request):
                chunks += len(batch)
                batches += 1
            return chunks, batches

        try:
            await reply()  # warm up: the connection pool, imports, caches
            phases = [
                ("sequential", 1, options["replies"]),
                (f"{options['concurrency']} concurrent", options["concurrency"], options["rounds"]),
            ]
            for name, concurrency, rounds in phases:
                chunks = batches = 0
                started = time.process_time()
                for _ in range(rounds):
                    for reply_chunks, reply_batches in await asyncio.gather(*(reply() for _ in range(concurrency))):
                        chunks += reply_chunks
                        batches += reply_batches
                cpu = time.process_time() - started
                self.stdout.write(
                    f"{name}: {rounds * concurrency} replies, {chunks} chunks in {batches} batches "
                    f"({chunks / batches:.2f} chunks/batch), CPU {cpu:.3f} s = {cpu / chunks * 1e6:.1f} µs/chunk"
                )
        except UpstreamError as exc:
            raise CommandError(f"the upstream failed: {exc.message}") from exc
        finally:
            await aclose_clients()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when installed (as uvicorn does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)
