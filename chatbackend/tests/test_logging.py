"""No log line carries an API key or a bearer token."""

from __future__ import annotations

import logging

from chatbackend.logging import RedactSecretsFilter, redact


def test_redact_removes_api_keys_and_bearer_tokens() -> None:
    text = "auth Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig and key sk-abcdefghijklmnop1234 done"

    cleaned = redact(text)

    assert "sk-abcdefghijklmnop1234" not in cleaned
    assert "eyJhbGciOiJIUzI1NiJ9" not in cleaned
    assert cleaned.count("[REDACTED]") == 2
    assert cleaned.startswith("auth ") and cleaned.endswith(" done")


def test_filter_rewrites_formatted_message() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "using %s", ("sk-secretsecretsecret99",), None)

    assert RedactSecretsFilter().filter(record) is True
    assert record.getMessage() == "using [REDACTED]"
