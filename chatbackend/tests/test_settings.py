"""Settings come from the environment and a bad value stops start-up with a clear message."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.kit import run_python

ROOT = Path(__file__).resolve().parents[2]


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py check`` with ``env`` on the embedded defaults (no DATABASE_URL/REDIS_URL)."""
    return run_python("manage.py", "check", env=env, unset=("DATABASE_URL", "REDIS_URL"))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DB_POOL_MAX_SIZE", "lots"),
        ("DJANGO_DEBUG", "maybe"),
        ("DATABASE_URL", "mysql-ish://nowhere"),
        ("REDIS_URL", "localhost:6379"),
        ("LOG_LEVEL", "LOUD"),
        ("SSE_KEEPALIVE_SECONDS", "-1"),
        ("LOOKUP_CACHE_SECONDS", "-1"),
        ("LOOKUP_CACHE_SECONDS", "a minute"),
        ("TRUSTED_PROXY_IPS", "10.0.0.1,nginx.internal"),
        ("TRUSTED_PROXY_IPS", "10.0.0.0/33"),
        ("AUTH_LOGIN_FAILURE_LIMIT", "0"),
        ("AUTH_LOGIN_RATE", "many"),
        ("AUTH_PASSWORD_RATE", "0/minute"),
        ("EMAIL_URL", "carrier-pigeon://coop"),
        ("PASSWORD_RESET_URL", "chat.example.com/reset"),
        ("EMAIL_VERIFICATION_URL", "https://chat.example.com/verify?x=1"),
        ("PASSWORD_RESET_TIMEOUT", "0"),
        ("EMAIL_VERIFICATION_REQUIRED", "sometimes"),
        ("CONTEXT_OUTPUT_RESERVE_TOKENS", "-1"),
        ("CONTEXT_OUTPUT_RESERVE_TOKENS", "a few"),
        ("DATA_UPLOAD_MAX_MEMORY_SIZE", "big"),
        ("REQUEST_BODY_MAX_BYTES", "0"),
    ],
)
def test_bad_value_stops_startup_naming_the_variable(name: str, value: str) -> None:
    result = _start({name: value})

    assert result.returncode == 1, result.stderr  # an uncaught ImproperlyConfigured, not a crash elsewhere
    assert f"Environment variable {name}=" in result.stderr
    assert "is invalid" in result.stderr


def test_embedded_defaults_start() -> None:
    result = _start({})

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_every_variable_is_documented() -> None:
    source = (ROOT / "chatbackend" / "settings.py").read_text()
    readers = r"(?:_get|_bool|_positive|_rate|_seconds|_link_base|env\.\w+)"
    names = set(re.findall(readers + r'\(\s*"([A-Z][A-Z0-9_]+)"', source))
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()

    assert {"DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY"} <= names
    assert not {name for name in names if name not in example}, "missing from .env.example"
    assert not {name for name in names if name not in readme}, "missing from README.md"


_PRINT_BODY_BOUND = (
    "import os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'chatbackend.settings'); django.setup(); "
    "from django.conf import settings; print(settings.REQUEST_BODY_MAX_BYTES)"
)


@pytest.mark.parametrize(
    ("env", "bound"),
    [
        ({}, "20000000"),  # SYNC_MAX_DOCUMENT_BYTES's default: the import and the sync take that much
        ({"SYNC_MAX_DOCUMENT_BYTES": "1000000"}, "2621440"),  # then Django's DATA_UPLOAD_MAX_MEMORY_SIZE
        ({"DATA_UPLOAD_MAX_MEMORY_SIZE": "30000000"}, "30000000"),
        ({"REQUEST_BODY_MAX_BYTES": "5000"}, "5000"),
    ],
)
def test_the_server_takes_in_at_most_the_largest_body_a_view_takes(env: dict[str, str], bound: str) -> None:
    names = ("REQUEST_BODY_MAX_BYTES", "DATA_UPLOAD_MAX_MEMORY_SIZE", "SYNC_MAX_DOCUMENT_BYTES")
    result = run_python("-c", _PRINT_BODY_BOUND, env=env, unset=("DATABASE_URL", "REDIS_URL", *names))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == bound
