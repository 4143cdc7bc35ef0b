"""Health you can probe: ``GET /health/live`` (the process answers) and ``GET /health/ready`` (its dependencies do).

Liveness checks nothing but the event loop: a process that answers it is up, even with its
database down (restarting it would not bring the database back). Readiness checks every service
this configuration uses, each with a short timeout (``HEALTH_CHECK_TIMEOUT_SECONDS``), all at once:

- ``database``: a new connection with that connect timeout and ``SELECT 1`` (PostgreSQL: outside
  the pool, so a down server fails fast instead of after ``DB_POOL_TIMEOUT``; once it answers, the
  pool's idle connections are checked too, so the ones broken by a restart are replaced before
  requests meet them). SQLite: ``SELECT 1``.
- ``cache`` and ``channel_layer``: a Redis ``PING`` (new client, connect and socket timeouts) when
  they are Redis; the local-memory cache is written and read; the in-memory layer is ``skipped``.
- ``broker``: a ``PING`` of a Redis broker, a connection to any other; ``skipped`` when Celery
  tasks run eagerly in the web process.

The checks are django-health-check's (``HealthCheck``: a check runs on the event loop if it is a
coroutine, else in a worker thread, and is abandoned one second past its timeout); the view renders
them as one JSON document, 200 when every check is ``ok`` or ``skipped``, 503 otherwise::

    {"status": "ok" | "unavailable",
     "checks": {"database": {"status": "ok" | "unavailable" | "skipped", "time_ms": float,
                             "error": str (when unavailable)}, "cache": {...}, ...}}

Error texts name the failure, never a host, port or credential (the endpoint has no
authentication); the server log has the detail. Both endpoints bypass authentication, throttling,
CSRF and ``ALLOWED_HOSTS`` (probes send the pod's or container's address as Host) and run through
the lean handler (``chatbackend.handlers``); successful probes are left out of the access log
(``chatbackend.logging.QuietHealthProbesFilter``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
from typing import Any

import redis.asyncio
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.utils.cache import add_never_cache_headers
from django.views.decorators.csrf import csrf_exempt
from health_check.base import HealthCheck, HealthCheckResult
from health_check.checks import Cache as CacheCheck
from health_check.checks import Database as DatabaseCheck
from health_check.contrib.redis import Redis as RedisCheck
from health_check.exceptions import ServiceUnavailable

from .errors import ApplicationError, error_response

logger = logging.getLogger(__name__)

OK, UNAVAILABLE, SKIPPED = "ok", "unavailable", "skipped"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(settings.HEALTH_CHECK_TIMEOUT_SECONDS))


@dataclasses.dataclass
class Skipped(HealthCheck):
    """A dependency this configuration does not have (in-process instead): reported ``skipped``."""

    reason: str = ""

    async def run(self) -> None:
        return None


@dataclasses.dataclass
class PostgresCheck(HealthCheck):
    """Connect to the PostgreSQL server of ``alias`` with a connect timeout, outside the pool; ``SELECT 1``."""

    alias: str = "default"
    timeout: datetime.timedelta = dataclasses.field(default_factory=_timeout, repr=False)

    def run(self) -> None:
        import psycopg  # only with a PostgreSQL database

        connection = connections[self.alias]
        params = connection.get_connection_params()
        seconds = self.timeout.total_seconds()
        try:
            # libpq counts connect_timeout in whole seconds.
            with psycopg.Connection.connect(
                **params, autocommit=True, connect_timeout=max(1, math.ceil(seconds))
            ) as probe:
                probe.execute("SET statement_timeout = %s", (f"{int(seconds * 1000)}ms",))
                row = probe.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            logger.warning("readiness: the database is unavailable: %s", exc)
            raise ServiceUnavailable("cannot connect to the database") from exc
        if row != (1,):
            raise ServiceUnavailable("the database did not answer SELECT 1")
        pool = getattr(connection, "pool", None)  # the PostgreSQL backend's psycopg pool, if any
        if pool is not None and not pool.closed:
            # Replace idle pooled connections that a server restart broke (each would fail one
            # request otherwise). Cheap: one round trip per idle connection.
            pool.check()


@dataclasses.dataclass
class RedisPing(RedisCheck):
    """``PING`` the Redis at ``url`` with a new client whose connect and socket timeouts are the check's."""

    url: str = dataclasses.field(default="", repr=False)
    timeout: datetime.timedelta = dataclasses.field(default_factory=_timeout, repr=False)

    def __post_init__(self) -> None:
        seconds = self.timeout.total_seconds()
        url = self.url
        self.client_factory = lambda: redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=seconds, socket_timeout=seconds, retry_on_timeout=False
        )
        super().__post_init__()

    async def run(self) -> None:
        try:
            await super().run()
        except ServiceUnavailable:
            raise
        except redis.RedisError as exc:  # e.g. an AUTH or READONLY error
            logger.warning("readiness: Redis answered an error: %s", exc)
            raise ServiceUnavailable("Redis answered an error") from exc


@dataclasses.dataclass
class BrokerConnection(HealthCheck):
    """Connect to a Celery broker that is not Redis (e.g. AMQP) with the check's timeout."""

    url: str = dataclasses.field(default="", repr=False)
    timeout: datetime.timedelta = dataclasses.field(default_factory=_timeout, repr=False)

    def run(self) -> None:
        from kombu import Connection

        seconds = self.timeout.total_seconds()
        try:
            with Connection(self.url, connect_timeout=seconds) as connection:
                connection.ensure_connection(max_retries=1, timeout=seconds)
        except Exception as exc:
            logger.warning("readiness: the Celery broker is unavailable: %s", exc)
            raise ServiceUnavailable("cannot connect to the Celery broker") from exc


def _redis_url_of(host: Any) -> str:
    # channels_redis takes a URL or a dict with "address" (a URL, or a (host, port) pair).
    if isinstance(host, dict):
        host = host.get("address", "")
    if isinstance(host, list | tuple):
        return f"redis://{host[0]}:{host[1]}/0"
    return str(host)


def readiness_checks() -> dict[str, HealthCheck]:
    """Return the readiness checks of this configuration, by dependency name (read from settings)."""
    checks: dict[str, HealthCheck] = {}

    if connections["default"].vendor == "postgresql":
        checks["database"] = PostgresCheck()
    else:
        checks["database"] = DatabaseCheck(alias="default")
        checks["database"].timeout = _timeout()

    cache = settings.CACHES["default"]
    if cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
        location = cache["LOCATION"]
        checks["cache"] = RedisPing(url=str(location[0] if isinstance(location, list | tuple) else location))
    else:
        checks["cache"] = CacheCheck(alias="default", timeout=_timeout())

    layer: dict[str, Any] = settings.CHANNEL_LAYERS.get("default", {})
    if str(layer.get("BACKEND", "")).startswith("channels_redis."):
        checks["channel_layer"] = RedisPing(url=_redis_url_of(layer["CONFIG"]["hosts"][0]))
    else:
        checks["channel_layer"] = Skipped(reason="in-process channel layer")

    broker = settings.CELERY_BROKER_URL
    if settings.CELERY_TASK_ALWAYS_EAGER:
        checks["broker"] = Skipped(reason="Celery tasks run in the web process")
    elif broker.startswith(("redis://", "rediss://", "unix://")):
        checks["broker"] = RedisPing(url=broker)
    else:
        checks["broker"] = BrokerConnection(url=broker)
    return checks


def _report(result: HealthCheckResult) -> dict[str, Any]:
    report: dict[str, Any] = {"time_ms": round(result.time_taken * 1000, 1)}
    if isinstance(result.check, Skipped):
        report["status"] = SKIPPED
        report["reason"] = result.check.reason
    elif result.error is None:
        report["status"] = OK
    else:
        report["status"] = UNAVAILABLE
        # HealthCheckException.message: our texts (no host, port or credential); "unknown error"
        # for an unexpected exception, which the library logs.
        report["error"] = getattr(result.error, "message", "unknown error")
    return {"status": report.pop("status"), **report}


_ALLOW = "GET, HEAD"


def _method_not_allowed(request: HttpRequest) -> JsonResponse | None:
    """Return the project's JSON 405 (with ``Allow``) unless ``request`` is a GET or HEAD."""
    if request.method in {"GET", "HEAD"}:
        return None
    response = error_response(
        ApplicationError(
            f"Method {request.method} is not allowed on {request.path}; allowed: {_ALLOW}.",
            code="method_not_allowed",
            status=405,
        )
    )
    response["Allow"] = _ALLOW
    return response


@csrf_exempt
async def live(request: HttpRequest) -> JsonResponse:
    """``GET /health/live``: 200 ``{"status": "ok"}`` while the process answers; checks no dependency."""
    if (refused := _method_not_allowed(request)) is not None:
        return refused
    response = JsonResponse({"status": OK})
    add_never_cache_headers(response)
    return response


@csrf_exempt
async def ready(request: HttpRequest) -> JsonResponse:
    """``GET /health/ready``: each dependency's state (see the module docstring); 503 when one is unavailable."""
    if (refused := _method_not_allowed(request)) is not None:
        return refused
    checks = readiness_checks()
    results = await asyncio.gather(*(check.get_result() for check in checks.values()))
    reports = {name: _report(result) for name, result in zip(checks, results, strict=True)}
    healthy = all(report["status"] != UNAVAILABLE for report in reports.values())
    body = {"status": OK if healthy else UNAVAILABLE, "checks": reports}
    response = JsonResponse(body, status=200 if healthy else 503)
    add_never_cache_headers(response)
    return response


__all__ = ["live", "readiness_checks", "ready"]
