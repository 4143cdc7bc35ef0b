"""``python -m bench.admission``: what admission control costs one request, in this process.

Runs ``accounts.metering.metering_admit`` and then ``Admission.release`` (what the streaming engine
calls before and after a reply) ``--requests`` times one after another, for each kind of caller,
and prints per request the wall time (p50 and p99, ms) and this process's CPU time
(``time.process_time()``, µs) of the pair, with what they leave to send afterwards (records of
local admissions, releases: the store's ``flush``)::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/chatbackend REDIS_URL=redis://127.0.0.1:6379/0 \\
        python -m bench.admission --redis-db 14

Callers (subjects: a user, an API key and a model, as ``llm.metering.reply_metering`` builds them):

- ``none``: no limits and no budget (``/v1`` in ``python -m bench``);
- ``rate``: requests and tokens per minute and concurrent streams on all three subjects;
- ``budget``: a monthly budget on the user and one on the key;
- ``both``: all of it (``v1m`` in ``python -m bench``).

Limits and budgets are far above what the run reaches, so nothing is refused. Budgets are
``Budget`` rows for subject ids no user or key has (no foreign key), deleted at the end. With
``REDIS_URL`` the run uses that server's database ``--redis-db`` (default 14, not the one in the
URL) and empties it at the start and the end: give a database nothing else uses. Reservations are
not settled (that is the Celery task's work, not the request's). The event loop is uvloop when
installed, as under uvicorn. ``--concurrency N`` keeps N requests in flight (N tasks, each admitting
and releasing one request after another), as a server with N streams starting and ending at once
does. ``--reply-ms M`` makes each request wait M ms after its admission (the reply) and after its
release (the gap to the next): then each record goes in a script call of its own (at the reply's end,
when it waits for the record), with the release before it, as at one stream in a server, where
back-to-back requests would share calls and hide their cost. ``--profile`` prints cProfile's top
functions of each caller.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import uuid
from decimal import Decimal
from typing import Any, TextIO

# Subject ids far above any real row's, so the budgets created here never apply to anyone.
_SUBJECT_ID = 9_000_000_000
_CALLERS = ("none", "rate", "budget", "both")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="admissions per caller (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="admissions per caller not measured (default 200)")
    parser.add_argument(
        "--redis-db", type=int, default=14, help="Redis database to use and empty (default 14; needs REDIS_URL)"
    )
    parser.add_argument("--callers", default=",".join(_CALLERS), help="callers to measure (default: all)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once, each admitted then released (default 1: one after another)",
    )
    parser.add_argument(
        "--reply-ms",
        type=float,
        default=0.0,
        help="ms each request waits between admission and release, and after its release, as a reply and the "
        "gap to the next do (default 0: none; above 0, every record goes in a script call of its own)",
    )
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of each caller")
    return parser.parse_args(argv)


def _redis_url(url: str, db: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _setup(options: argparse.Namespace) -> None:
    if os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = _redis_url(os.environ["REDIS_URL"], options.redis_db)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


def _flush_redis() -> None:
    from django.conf import settings

    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushdb()


def _requests(caller: str, count: int) -> list[Any]:
    from accounts.metering import MeteringRequest, MeteringSubject, RateLimits

    limits = RateLimits(1_000_000, 1_000_000_000, 100_000) if caller in ("rate", "both") else RateLimits()
    subjects = (
        MeteringSubject("user", _SUBJECT_ID, limits),
        MeteringSubject("api_key", _SUBJECT_ID, limits),
        MeteringSubject("model", _SUBJECT_ID, limits),
    )
    return [
        MeteringRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            subjects=subjects,
            prompt_tokens=40,
            max_completion_tokens=256,
            input_price_per_million=Decimal("2.50"),
            output_price_per_million=Decimal("10"),
        )
        for _ in range(count)
    ]


async def _run(requests: list[Any], concurrency: int = 1, reply_s: float = 0.0) -> list[float]:
    """Admit and release every request, ``concurrency`` of them in flight at once, each waiting ``reply_s``
    after its admission and after its release; return each one's wall time (its waits excluded)."""
    from accounts.metering import metering_admit

    walls: list[float] = []

    from accounts.metering.ratelimit_store import rate_limit_store

    async def one_after_another(share: list[Any]) -> None:
        for request in share:
            started = time.perf_counter()
            admission = await metering_admit(request)
            if reply_s:
                admitted = time.perf_counter()
                await asyncio.sleep(reply_s)
                await admission.confirmed()
                started += time.perf_counter() - admitted
            await admission.release(completion_tokens=64)
            walls.append(time.perf_counter() - started)
            if reply_s:
                await asyncio.sleep(reply_s)
            # A local admission does not suspend: let the loop run what is due (its record), as a
            # server's loop does between requests.
            await asyncio.sleep(0)

    await asyncio.gather(*(one_after_another(requests[i::concurrency]) for i in range(concurrency)))
    # What the requests left waiting in the process (records, releases) is part of their cost.
    await rate_limit_store().flush()
    return walls


def _budgets(enabled: bool) -> None:
    from accounts.metering.budgets import budget_cache
    from accounts.models import Budget

    Budget.objects.filter(subject_id=_SUBJECT_ID).delete()
    if enabled:
        for kind in ("user", "api_key"):
            Budget.objects.create(
                name=f"bench {kind}", subject_kind=kind, subject_id=_SUBJECT_ID, limit_usd=Decimal(1_000_000)
            )
    budget_cache.clear()


async def measure(options: argparse.Namespace, out: TextIO) -> None:
    """Measure every caller of ``options.callers`` and write one line per caller to ``out``."""
    from asgiref.sync import sync_to_async

    from accounts.metering.ratelimits import rate_limit_close
    from chatbackend import broadcast

    out.write("| caller | wall p50 ms | wall p99 ms | CPU µs per request |\n|---|--:|--:|--:|\n")
    for caller in options.callers.split(","):
        await sync_to_async(_budgets)(caller in ("budget", "both"))
        concurrency = max(1, getattr(options, "concurrency", 1))
        reply_s = max(0.0, getattr(options, "reply_ms", 0.0)) / 1000
        await _run(_requests(caller, options.warmup), concurrency, reply_s)
        requests = _requests(caller, options.requests)
        profiler = cProfile.Profile() if options.profile else None
        cpu = time.process_time()
        if profiler is not None:
            profiler.enable()
        walls = await _run(requests, concurrency, reply_s)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - cpu
        walls.sort()
        p99 = walls[min(len(walls) - 1, int(len(walls) * 0.99))]
        out.write(
            f"| {caller} | {statistics.median(walls) * 1000:.3f} | {p99 * 1000:.3f} "
            f"| {cpu / len(requests) * 1e6:.0f} |\n"
        )
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            out.write(text.getvalue())
    await sync_to_async(_budgets)(False)
    await rate_limit_close()
    await broadcast.stop_listening()  # the budget cache's listener, or the loop's exit waits on it


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    _setup(options)
    _flush_redis()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in bench/requirements.txt
        runner = asyncio.run
    try:
        runner(measure(options, sys.stdout))
    finally:
        _flush_redis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
