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


def test_redact_removes_token_query_parameter() -> None:
    line = '127.0.0.1:5000 - "WebSocket /ws/conversations/1/?token=eyJabc.def.ghi&x=1" [accepted]'

    cleaned = redact(line)

    assert "eyJabc.def.ghi" not in cleaned
    assert "?token=[REDACTED]&x=1" in cleaned


def test_redact_removes_a_share_links_token_from_its_path() -> None:
    # uvicorn's access line of a share link's page and of its JSON: the token alone reads the
    # conversation (its hash is all the database keeps), so it must not sit in the log either.
    token = "H_P7UcY213olYkTAy1JZhrO3nKNxG6flGvdieF7ii8Y"
    for path in (f"/share/{token}", f"/api/share/{token}/", f"/share/{token}?x=1"):
        record = logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", "GET", path, "1.1", 200),
            None,
        )

        assert RedactSecretsFilter().filter(record) is True
        assert token not in record.getMessage()
        assert "/share/[REDACTED]" in record.getMessage()
    assert (
        redact("GET /api/shares/12/ and /api/conversations/3/shares/")
        == "GET /api/shares/12/ and /api/conversations/3/shares/"
    )


def _uvicorn_records() -> tuple[logging.LogRecord, logging.LogRecord]:
    """uvicorn's two records when its graceful shutdown times out: the count, then one per task cut."""
    import asyncio

    cut = asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")
    count = logging.LogRecord(
        "uvicorn.error", logging.ERROR, __file__, 1, "Cancel %s running task(s), timeout graceful shutdown exceeded",
        (3,), None,
    )  # fmt: skip
    task = logging.LogRecord(
        "uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n", None, (type(cut), cut, None)
    )
    return count, task


def test_uvicorn_cutting_requests_at_shutdown_is_a_line_each_not_an_error_with_a_traceback() -> None:
    from chatbackend.logging import QuietShutdownCancelFilter
    from chatbackend.stopping import server_stopping_set

    count, task = _uvicorn_records()
    logger = logging.getLogger("uvicorn.error")
    level = logger.level
    logger.setLevel(logging.INFO)  # the INFO line is dropped below INFO: the test must not hang on LOG_LEVEL
    server_stopping_set(True)
    try:
        assert QuietShutdownCancelFilter().filter(count) and QuietShutdownCancelFilter().filter(task)
    finally:
        server_stopping_set(False)
        logger.setLevel(level)

    assert (count.levelname, count.getMessage()) == (
        "WARNING",
        "Cancel 3 running task(s), timeout graceful shutdown exceeded",
    )
    assert task.levelname == "INFO" and task.exc_info is None and "\n" not in task.getMessage()
    assert "cut by the server's shutdown" in task.getMessage()
    assert "Traceback" not in logging.Formatter().format(task)


def test_a_cancelled_task_while_serving_stays_uvicorns_error() -> None:
    from chatbackend.logging import QuietShutdownCancelFilter

    count, task = _uvicorn_records()

    assert QuietShutdownCancelFilter().filter(count) and QuietShutdownCancelFilter().filter(task)
    assert (count.levelno, task.levelno) == (logging.ERROR, logging.ERROR)
    assert task.exc_info is not None
