"""Logging helpers: keep secrets out of every log line."""

from __future__ import annotations

import logging
import re

# Our API keys (sk-...), OpenAI-style keys, bearer credentials of any kind, and the ``token``
# query parameter WebSocket clients authenticate with (it shows in access logs).
_SECRET_PATTERNS = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._\-]{8,}|(?<=[?&]token=)[^&\s\"']+)")


def redact(text: str) -> str:
    """Return ``text`` with API keys and bearer tokens replaced by ``[REDACTED]``."""
    return _SECRET_PATTERNS.sub("[REDACTED]", text)


class RedactSecretsFilter(logging.Filter):
    """Rewrite each record's message so no API key or bearer token reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
