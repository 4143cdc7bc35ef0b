"""``manage.py llm_simulator``: run the OpenAI-compatible LLM simulator (see ``llm.simulator``)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from llm.simulator import SimulatorConfig, run_simulator


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


class Command(BaseCommand):
    help = (
        "Run the LLM simulator: an OpenAI chat-completions server with deterministic replies, "
        "the fake upstream for tests and benchmarks. Prints 'LLM simulator listening on URL' when ready. "
        "A request's X-Simulator-Fault header asks for failures (status=429, drop-after=5, malformed-line, "
        "stall=3, ttft=2, ...; see the llm.simulator module's documentation)."
    )
    # No system checks: the simulator uses neither the database nor the models, and starts faster.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8001, help="TCP port; 0 picks a free one (default 8001)")
        parser.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
        parser.add_argument("--ttft-ms", type=_non_negative, default=50.0, help="time to first token, ms (default 50)")
        parser.add_argument(
            "--token-delay-ms", type=_non_negative, default=10.0, help="delay between tokens, ms (default 10)"
        )
        parser.add_argument("--reply-tokens", type=_positive_int, default=64, help="tokens per reply (default 64)")
        parser.add_argument(
            "--models", default="sim-1", help="comma-separated ids listed by GET /v1/models (default sim-1)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = SimulatorConfig(
            ttft_ms=options["ttft_ms"],
            token_delay_ms=options["token_delay_ms"],
            reply_tokens=options["reply_tokens"],
            api_key=options["api_key"],
            models=tuple(m.strip() for m in options["models"].split(",") if m.strip()),
        )

        def ready(url: str) -> None:
            # Flushed at once: tests read this line from a pipe to learn the port.
            self.stdout.write(f"LLM simulator listening on {url}")
            self.stdout.flush()

        run_simulator(config, host=options["host"], port=options["port"], on_ready=ready)
