"""Failed logins lock out the username and the client IP apart; a spoofed X-Forwarded-For changes nothing.

Requests go through the project's ASGI application (``tests.kit.asgi_request``, peer 127.0.0.1),
so the client IP is decided as in production, by ``chatbackend.client_ip`` from
``TRUSTED_PROXY_IPS``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from accounts.models import User
from tests.factories import UserFactory
from tests.kit import ASGIResult, asgi_request, assert_error

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "/api/auth/token/"
REGISTER = "/api/auth/register/"
LIMIT = 3
WRONG = "not-the-password"


@pytest.fixture(autouse=True)
def _low_limit(settings: Any) -> None:
    settings.AXES_FAILURE_LIMIT = LIMIT
    # Loaded before the test runs: loading it sets up Django's logging again, which would remove
    # the handler caplog adds for the test.
    import chatbackend.asgi  # noqa: F401


async def _login(username: str, password: str, forwarded_for: str | None = None) -> ASGIResult:
    body = json.dumps({"username": username, "password": password}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Host": "localhost"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    return await asgi_request("POST", TOKEN, headers=headers, body=body)


def _assert_locked_out(response: ASGIResult) -> None:
    error = assert_error(response, 429, code="login_locked_out", type="rate_limit_error")
    assert "Expected available in 900 seconds" in error["message"]
    assert response.headers["Retry-After"] == "900"
    assert "access" not in json.loads(response.content)


def _axes_lines(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("axes"))


async def test_spoofed_forwarded_for_does_not_bypass_the_lockout(user: User, password: str, caplog: Any) -> None:
    """The issue's case: wrong passwords, each with a new X-Forwarded-For, then the right one."""
    caplog.set_level(logging.INFO, logger="axes")
    statuses = []
    for attempt in range(LIMIT + 5):
        response = await _login(user.username, WRONG, forwarded_for=f"203.0.113.{attempt}")
        statuses.append(response.status_code)

    assert statuses == [401] * (LIMIT - 1) + [429] * 6
    _assert_locked_out(response)
    _assert_locked_out(await _login(user.username, password, forwarded_for="203.0.113.200"))
    assert "127.0.0.1" in _axes_lines(caplog)
    assert "203.0.113." not in _axes_lines(caplog)


async def test_spoofed_forwarded_for_does_not_give_a_fresh_ip_budget(user: User, password: str) -> None:
    """Failures for many usernames lock the (real) IP: the right password of another user is refused."""
    for attempt in range(LIMIT):
        response = await _login(f"nobody{attempt}", WRONG, forwarded_for=f"203.0.113.{attempt}")

    _assert_locked_out(response)
    _assert_locked_out(await _login(user.username, password, forwarded_for="198.51.100.1"))


async def test_failures_from_many_forwarded_ips_lock_the_username(settings: Any, user: User, password: str) -> None:
    """Credential stuffing: each attempt through the trusted proxy from another client IP."""
    settings.TRUSTED_PROXY_IPS = ["127.0.0.1"]
    statuses = []
    for attempt in range(LIMIT + 2):
        response = await _login(user.username, WRONG, forwarded_for=f"203.0.113.{attempt}")
        statuses.append(response.status_code)

    assert statuses == [401] * (LIMIT - 1) + [429] * 3
    _assert_locked_out(await _login(user.username, password, forwarded_for="198.51.100.1"))
    # Only that username: another user logs in through the same proxy.
    other = await sync_to_async(UserFactory)()
    assert (await _login(other.username, password, forwarded_for="198.51.100.2")).status_code == 200


async def test_a_trusted_proxys_forwarded_ips_have_their_own_budgets(
    settings: Any, user: User, password: str, caplog: Any
) -> None:
    settings.TRUSTED_PROXY_IPS = ["127.0.0.0/8"]
    caplog.set_level(logging.INFO, logger="axes")
    for attempt in range(LIMIT):
        response = await _login(f"nobody{attempt}", WRONG, forwarded_for="198.51.100.7")

    _assert_locked_out(response)
    _assert_locked_out(await _login(user.username, password, forwarded_for="198.51.100.7"))
    assert (await _login(user.username, password, forwarded_for="198.51.100.8")).status_code == 200
    # What is logged is the forwarded client, never the proxy.
    assert "198.51.100.7" in _axes_lines(caplog)
    assert "127.0.0.1" not in _axes_lines(caplog)


async def test_a_login_under_the_limit_succeeds(user: User, password: str) -> None:
    for _ in range(LIMIT - 1):
        assert (await _login(user.username, WRONG)).status_code == 401

    response = await _login(user.username, password)

    assert response.status_code == 200, response.content
    assert set(json.loads(response.content)) == {"access", "refresh"}


def test_registration_rate_ignores_a_spoofed_forwarded_for(api_client: Any, settings: Any) -> None:
    """DRF's throttles read the resolved client IP, not X-Forwarded-For (``NUM_PROXIES = 0``)."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth_register": "2/minute"}}
    statuses = []
    for attempt in range(3):
        body = {"username": f"spoofer{attempt}", "password": "a-long-passphrase-42"}
        response = api_client.post(REGISTER, body, format="json", HTTP_X_FORWARDED_FOR=f"203.0.113.{attempt}")
        statuses.append(response.status_code)

    assert statuses == [201, 201, 429]
    assert_error(response, 429, code="throttled")
    assert "Retry-After" in response


def test_the_admin_login_form_is_locked_out_too(client: Any, superuser: User, password: str) -> None:
    for _ in range(LIMIT):
        response = client.post("/admin/login/", {"username": superuser.username, "password": WRONG})

    assert_error(response, 429, code="login_locked_out")
    assert response["Retry-After"] == "900"
    response = client.post("/admin/login/", {"username": superuser.username, "password": password})
    assert response.status_code == 429
