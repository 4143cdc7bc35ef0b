"""Helpers for tests that drive the ASGI application directly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def http_scope(method: str, path: str, headers: Iterable[tuple[str, str]], *, port: int = 80) -> dict[str, Any]:
    """Return an ASGI 3.0 HTTP scope for ``method path`` on localhost with ``headers`` (name, value).

    Spec: https://asgi.readthedocs.io/en/latest/specs/www.html#http-connection-scope
    """
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode("latin1"), value.encode("latin1")) for name, value in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", port),
    }
