"""``python -m bench.admission`` admits and releases through the real metering code and reports it."""

from __future__ import annotations

import argparse
import io
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from accounts.metering.budget_store import budget_store, budget_store_reset
from accounts.metering.budgets import budget_cache
from bench.admission import measure

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def memory_stores(settings: Any) -> Iterator[None]:
    """The in-process stores, so the run leaves nothing in a Redis other tests read."""
    settings.REDIS_URL = ""
    budget_store_reset()
    budget_cache.clear()
    yield
    budget_store_reset()
    budget_cache.clear()


async def test_reports_every_caller_and_reserves_on_the_budgeted_ones(memory_stores: None) -> None:
    options = argparse.Namespace(requests=3, warmup=2, callers="none,rate,budget,both", profile=False)
    out = io.StringIO()

    await measure(options, out)

    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", out.getvalue(), re.MULTILINE)
    assert [row[0] for row in rows] == ["none", "rate", "budget", "both"], out.getvalue()
    # Every admission of the budgeted callers reserved (unsettled: settlement is the Celery task's).
    assert len(budget_store().reservations()) == 2 * (3 + 2)


async def test_concurrent_requests_are_all_admitted_and_released(memory_stores: None) -> None:
    options = argparse.Namespace(requests=6, warmup=2, callers="both", profile=False, concurrency=3)
    out = io.StringIO()

    await measure(options, out)

    assert re.search(r"^\| both \| [\d.]+ \| [\d.]+ \| \d+ \|$", out.getvalue(), re.MULTILINE), out.getvalue()
    assert len(budget_store().reservations()) == 6 + 2


async def test_spaced_requests_wait_between_admission_and_release(memory_stores: None) -> None:
    # --reply-ms: each request waits that long after its admission and after its release (a reply, then
    # the gap to the next), so that every record goes in a call of its own, as at one stream in a server.
    options = argparse.Namespace(requests=3, warmup=1, callers="both", profile=False, reply_ms=20.0)
    out = io.StringIO()
    started = time.monotonic()

    await measure(options, out)

    assert time.monotonic() - started >= (3 + 1) * 2 * 0.02
    row = re.search(r"^\| both \| ([\d.]+) \| [\d.]+ \| \d+ \|$", out.getvalue(), re.MULTILINE)
    assert row is not None, out.getvalue()
    assert float(row.group(1)) < 20  # the waits are not the request's own time
    assert len(budget_store().reservations()) == 3 + 1
