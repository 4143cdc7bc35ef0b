"""Logging helpers: keep secrets out of every log line."""

from __future__ import annotations

import logging
import re

# Our API keys (sk-...), OpenAI-style keys, bearer credentials of any kind, the ``token`` query
# parameter WebSocket clients authenticate with, and a share link's token in its path
# (``/share/<token>``, ``/api/share/<token>/``: whoever holds it reads the conversation, which is
# why only its hash is stored); the last two show in access logs.
_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._\-]{8,}|(?<=[?&]token=)[^&\s\"']+|(?<=/share/)[^/?#\s\"']+)"
)


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


# The health probes (chatbackend.health): polled every few seconds by orchestrators.
_HEALTH_PATH = re.compile(r"^/health/(?:live|ready)/?(?:\?|$)")


class QuietHealthProbesFilter(logging.Filter):
    """Drop the ASGI server's access line of a health probe answered 2xx; keep its failures (503).

    Reads uvicorn's access record, whose arguments are ``(client, method, path, http_version,
    status)`` (``uvicorn.protocols.http``); any other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and isinstance(args[4], int):
            return not (_HEALTH_PATH.match(args[2]) and 200 <= args[4] < 300)
        return True
