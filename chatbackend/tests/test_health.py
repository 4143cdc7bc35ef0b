"""The health probes through the ASGI application, and what a dependency outage looks like to clients.

Outages of the real services are in ``tests/test_e2e_health.py`` (a private Redis and PostgreSQL
stopped under a real server process); here a dependency is made unreachable by pointing a setting
at a closed port.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest
from django.conf import settings
from django.db import OperationalError
from django.test import override_settings
from redis.exceptions import ConnectionError as RedisConnectionError

from chatbackend.errors import as_application_error
from chatbackend.exception_handlers import drf_exception_handler
from chatbackend.logging import QuietHealthProbesFilter
from tests.kit import asgi_request, assert_error

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket closes


async def test_liveness_answers_json_without_credentials_or_dependencies() -> None:
    response = await asgi_request("GET", "/health/live")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.content) == {"status": "ok"}
    assert "no-cache" in response.headers["Cache-Control"]
    assert (await asgi_request("HEAD", "/health/live")).status_code == 200
    refused = await asgi_request("POST", "/health/live")
    assert_error(refused, 405, code="method_not_allowed")
    assert refused.headers["Allow"] == "GET, HEAD"


async def test_readiness_reports_every_dependency_of_this_configuration() -> None:
    response = await asgi_request("GET", "/health/ready")

    assert response.status_code == 200, response.content
    body = json.loads(response.content)
    assert body["status"] == "ok"
    states = {name: check["status"] for name, check in body["checks"].items()}
    if settings.REDIS_URL:
        assert states == {"database": "ok", "cache": "ok", "channel_layer": "ok", "broker": "ok"}
    else:  # embedded defaults: SQLite, local-memory cache, in-memory layer, eager Celery
        assert states == {"database": "ok", "cache": "ok", "channel_layer": "skipped", "broker": "skipped"}
        assert body["checks"]["broker"]["reason"]
    assert all(check["time_ms"] >= 0 for check in body["checks"].values())


async def test_probes_answer_any_host_header() -> None:
    # An orchestrator probes the address it reaches the process at, not a public host name.
    headers = {"Host": "10.0.0.7:8000"}

    assert (await asgi_request("GET", "/health/live", headers=headers)).status_code == 200
    assert (await asgi_request("GET", "/health/ready", headers=headers)).status_code == 200
    assert (await asgi_request("GET", "/v1/models", headers=headers)).status_code == 400  # others still check


async def test_readiness_is_503_naming_an_unreachable_broker_without_internal_detail() -> None:
    port = _closed_port()
    with override_settings(
        CELERY_TASK_ALWAYS_EAGER=False, CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0", HEALTH_CHECK_TIMEOUT_SECONDS=1
    ):
        response = await asgi_request("GET", "/health/ready")

    assert response.status_code == 503
    body = json.loads(response.content)
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"]["status"] == "unavailable"
    assert body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["status"] == "ok"
    assert str(port) not in response.content.decode()


@pytest.mark.parametrize(
    "exc",
    [OperationalError("connection to server at 10.1.2.3, port 5432 failed"), RedisConnectionError("Error 111")],
    ids=["database", "redis"],
)
def test_an_unreachable_dependency_is_a_503_json_error_without_detail(exc: Exception) -> None:
    error = as_application_error(exc)
    assert error is not None
    response = drf_exception_handler(exc, {})

    assert response is not None
    assert response.status_code == 503
    assert response.data["error"]["code"] == "service_unavailable"
    assert response.data["error"]["type"] == "api_error"
    assert "10.1.2.3" not in json.dumps(response.data) and "111" not in json.dumps(response.data)


def _access_record(path: str, status: int) -> logging.LogRecord:
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", path, "1.1", status),
        None,
    )


def test_successful_probes_stay_out_of_the_access_log() -> None:
    quiet = QuietHealthProbesFilter()

    assert quiet.filter(_access_record("/health/live", 200)) is False
    assert quiet.filter(_access_record("/health/ready", 200)) is False
    assert quiet.filter(_access_record("/health/ready", 503)) is True  # a failing probe is news
    assert quiet.filter(_access_record("/api/conversations/", 200)) is True
    assert quiet.filter(_access_record("/health/readyz", 200)) is True


def test_assert_error_shape_of_a_503() -> None:
    from chatbackend.errors import ServiceUnavailableError, error_response

    assert_error(error_response(ServiceUnavailableError()), 503, code="service_unavailable", type="api_error")
