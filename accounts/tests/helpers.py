"""Assertions shared by the API tests."""

from __future__ import annotations

from typing import Any


def assert_error(response: Any, status: int, *, param: str | None = None) -> dict[str, Any]:
    """Assert ``response`` is the project's JSON error with ``status``; return its error object."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys()
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error
