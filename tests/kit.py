"""The shared test kit: helpers every app's tests use (fixtures live in the ``conftest.py`` files).

- ``poll_until`` / ``poll_until_sync``: wait for a condition instead of sleeping.
- ``access_token(user)``: a JWT access token; ``bearer(credential)``: the headers that carry a JWT
  or an ``sk-...`` key. One convention: credentials travel as a headers dict.
- ``assert_error``: the project's one error shape (OpenAI's), on any kind of response.
- ``usage_records``: the usage records written, once this process's accounting queue is empty.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rest_framework_simplejwt.tokens import AccessToken

from accounts.models import UsageRecord, User
from accounts.usage import usage_flush
from chatbackend.asyncdb import run_sync
from llm.tests.openai_schema import validate_against

T = TypeVar("T")


async def poll_until(
    probe: Callable[[], T | Awaitable[T]],
    predicate: Callable[[T], object] = bool,
    *,
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call ``probe()`` (awaiting its result if it is awaitable) until ``predicate`` holds for it; return it.

    The event loop runs between calls, so other tasks make progress. Fails the test
    (``AssertionError`` naming ``what`` and the last value) after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if predicate(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {within} s (last value: {value!r})")
        await asyncio.sleep(interval)


def poll_until_sync(
    probe: Callable[[], T],
    predicate: Callable[[T], object] = bool,
    *,
    within: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """``poll_until`` for sync code: call ``probe()`` until ``predicate`` holds for its value; return it."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {within} s (last value: {value!r})")
        time.sleep(interval)


# --- Credentials -------------------------------------------------------------------------------


def access_token(user: User) -> str:
    """Return a JWT access token for ``user`` (no database access: safe on an event loop)."""
    return str(AccessToken.for_user(user))


def bearer(credential: str) -> dict[str, str]:
    """Return the headers that present ``credential`` (a JWT or an ``sk-...`` key): ``Authorization: Bearer``.

    Every client takes them: Django's ``Client`` / ``AsyncClient`` and DRF's ``APIClient`` (per
    request or as ``APIClient(headers=...)``), httpx, the ASGI driver.
    """
    return {"Authorization": f"Bearer {credential}"}


# --- Error responses ---------------------------------------------------------------------------


def assert_error(
    response: Any, status: int, *, code: str | None = None, param: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """Assert ``response`` is the project's JSON error with ``status``; return its ``error`` object.

    The shape is OpenAI's everywhere (``{"error": {"message", "type", "param", "code"}}``), so the
    body is validated against OpenAI's ``ErrorResponse`` schema. ``code``, ``param`` and ``type``,
    when given, must match. ``response``: anything with ``status_code``, ``headers`` and
    ``content`` (a Django test response, an httpx response, an ``ASGIResult``).
    """
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response.headers["Content-Type"] == "application/json", response.headers["Content-Type"]
    body = json.loads(response.content)
    validate_against("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= error.keys(), error
    assert error["message"], error
    for name, expected in (("code", code), ("param", param), ("type", type)):
        if expected is not None:
            assert error[name] == expected, (name, error)
    return error


async def usage_records(**filters: Any) -> list[UsageRecord]:
    """Return the usage records matching ``filters``, oldest first, once every record this process
    has queued is written (``accounts.usage.usage_flush``; eager Celery writes them in the sender)."""
    assert await asyncio.to_thread(usage_flush, 10), "the usage queue did not drain within 10 s"
    # run_sync, not the async ORM: it hands the thread's connection back (a connection left open
    # in asgiref's executor thread keeps PostgreSQL from dropping the test database).
    return await run_sync(lambda: list(UsageRecord.objects.filter(**filters).order_by("pk")))
