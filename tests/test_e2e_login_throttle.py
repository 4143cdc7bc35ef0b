"""Login lockouts and registration races against real server processes, as production runs them.

Each test starts its own server processes (``start_server``) with low login limits, on the e2e
stack's database and Redis; clients connect from 127.0.0.1.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import pytest
from django.conf import settings

from accounts.models import User
from tests.factories import PASSWORD, UserFactory
from tests.kit import assert_error

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TOKEN = "/api/auth/token/"
REGISTER = "/api/auth/register/"
LIMIT = 4
LOCKOUT_SECONDS = 120
# The per-IP attempt rate is raised out of the way: these tests are about the lockout.
LOW_LIMITS = {
    "AUTH_LOGIN_FAILURE_LIMIT": str(LIMIT),
    "AUTH_LOGIN_LOCKOUT_SECONDS": str(LOCKOUT_SECONDS),
    "AUTH_LOGIN_RATE": "1000/minute",
}
WRONG = "not-the-password"


def _login(url: str, username: str, password: str, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    body = {"username": username, "password": password}
    return httpx.post(f"{url}{TOKEN}", json=body, headers=headers, timeout=30, trust_env=False)


def _assert_locked_out(response: httpx.Response) -> None:
    assert_error(response, 429, code="login_locked_out", type="rate_limit_error")
    assert response.headers["Retry-After"] == str(LOCKOUT_SECONDS)
    assert "access" not in response.json()["error"]


def test_spoofed_forwarded_for_does_not_bypass_login_throttling(start_server: Any) -> None:
    """The issue's case: 60 wrong passwords, each with a new X-Forwarded-For, then the right one."""
    server, url = start_server(env=LOW_LIMITS)  # no TRUSTED_PROXY_IPS: no header is believed
    user = UserFactory()

    statuses = Counter(
        _login(url, user.username, WRONG, forwarded_for=f"203.0.113.{attempt}").status_code for attempt in range(60)
    )

    assert statuses == {401: LIMIT - 1, 429: 60 - (LIMIT - 1)}
    _assert_locked_out(_login(url, user.username, PASSWORD, forwarded_for="198.51.100.1"))
    # The server saw, counted and logged the real peer only.
    output = server.output()
    assert "203.0.113." not in output
    assert 'ip_address: "127.0.0.1"' in output  # django-axes' failure log


def test_a_trusted_proxys_forwarded_ip_is_the_one_throttled_and_logged(start_server: Any) -> None:
    server, url = start_server(env={**LOW_LIMITS, "TRUSTED_PROXY_IPS": "127.0.0.1"})
    user = UserFactory()

    for attempt in range(LIMIT):  # different usernames: only the forwarded IP's budget runs out
        response = _login(url, f"nobody-{attempt}", WRONG, forwarded_for="198.51.100.7")

    _assert_locked_out(response)
    _assert_locked_out(_login(url, user.username, PASSWORD, forwarded_for="198.51.100.7"))
    other_ip = _login(url, user.username, PASSWORD, forwarded_for="198.51.100.8")
    assert other_ip.status_code == 200, other_ip.text
    output = server.output()
    assert '198.51.100.7:0 - "POST /api/auth/token/ HTTP/1.1" 429' in output  # uvicorn's access log
    assert '198.51.100.8:0 - "POST /api/auth/token/ HTTP/1.1" 200' in output
    assert 'ip_address: "198.51.100.7"' in output  # django-axes' failure log
    assert '127.0.0.1:0 - "POST' not in output


@pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="without REDIS_URL (the embedded defaults) each server process counts in its own memory: "
    "one process is the whole deployment there. CI sets REDIS_URL, so this runs there.",
)
def test_a_lockout_holds_across_server_processes(start_server: Any) -> None:
    """Credential stuffing through a trusted proxy: every failure from another IP, spread over two servers."""
    env = {**LOW_LIMITS, "TRUSTED_PROXY_IPS": "127.0.0.1"}
    urls = [start_server(env=env)[1], start_server(env=env)[1]]
    user = UserFactory()

    statuses = [
        _login(urls[attempt % 2], user.username, WRONG, forwarded_for=f"203.0.113.{attempt}").status_code
        for attempt in range(LIMIT + 2)
    ]

    assert statuses == [401] * (LIMIT - 1) + [429] * 3
    for index, url in enumerate(urls):
        _assert_locked_out(_login(url, user.username, PASSWORD, forwarded_for=f"198.51.100.{index}"))


def test_concurrent_registrations_of_one_username_create_one_user(start_server: Any) -> None:
    """20 registrations of one name at once: one 201, the others a 400 naming the field (never a 500)."""
    _, url = start_server(env={"AUTH_REGISTER_RATE": "1000/minute"})
    count = 20
    barrier = threading.Barrier(count)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def register(index: int) -> None:
        body = {"username": "race-winner", "password": "a-long-passphrase-42", "email": f"r{index}@example.com"}
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            barrier.wait(timeout=30)
            response = client.post(REGISTER, json=body)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=register, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)

    assert Counter(response.status_code for response in responses) == {201: 1, 400: count - 1}
    for response in responses:
        if response.status_code == 400:
            error = assert_error(response, 400, code="invalid", param="username", type="invalid_request_error")
            assert error["fields"] == {"username": ["A user with that username already exists."]}
    assert User.objects.filter(username="race-winner").count() == 1
