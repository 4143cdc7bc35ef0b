"""Logging helpers: keep secrets out of every log line."""

from __future__ import annotations

import asyncio
import logging
import re

from .stopping import server_stopping

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


# uvicorn's record when its graceful shutdown times out (``uvicorn.server.Server.shutdown``).
_UVICORN_CANCEL_COUNT = "Cancel %s running task(s)"


class QuietShutdownCancelFilter(logging.Filter):
    """Make uvicorn's cut of the requests still running at the end of a graceful shutdown a line each.

    Past ``--timeout-graceful-shutdown`` uvicorn cancels the requests still running, logs "Cancel N
    running task(s), timeout graceful shutdown exceeded" at ERROR, and then, for each one, the
    ``CancelledError`` that ends its task as "Exception in ASGI application" at ERROR, with its
    traceback (``uvicorn.protocols.http``). That is the shutdown doing what it was configured to
    do: each reply cut is saved as ``cancelled`` with its text so far and says so in a WARNING of
    its own (``llm.streaming``), and uvicorn still closes each connection (a client sees it cut).
    While this process stops (``chatbackend.stopping``) the first becomes a WARNING and each of the
    others one INFO line without a traceback. Every other record passes as it was, a
    ``CancelledError`` while the process serves included: that one is a bug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not server_stopping():
            return True
        if isinstance(record.msg, str) and record.msg.startswith(_UVICORN_CANCEL_COUNT):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "a request still running at the end of the graceful shutdown was cut by the server's shutdown"
            record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True
