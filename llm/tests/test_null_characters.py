"""A null character anywhere in a ``/v1`` body is a 400 naming where, on every inbound API.

PostgreSQL cannot store one, and docs/api.md promises the 400; ``/v1/responses`` and
``/v1/messages`` used to take one and stream a reply (found by schemathesis). Chat completions'
serializer checks its own fields (``chatbackend/tests/test_bad_input.py`` has more of its cases).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.kit import asgi_request, assert_error

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("provider_clients")]

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
USER = {"role": "user", "content": "Hello"}

CASES = [
    (CHAT, {"messages": [{"role": "user", "content": "a\x00b"}]}, "messages.0.content"),  # its serializer's path
    (CHAT, {"messages": [USER], "metadata": {"k\x00": "v"}, "store": True}, "metadata"),
    (RESPONSES, {"input": "a\x00b"}, "input"),
    (RESPONSES, {"input": [{"role": "user", "content": "a\x00b"}]}, "input[0].content"),
    (
        RESPONSES,
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x\x00"}]}]},
        "input[0].content[0].text",
    ),
    (RESPONSES, {"input": "hi", "metadata": {"k": "v\x00"}}, "metadata.k"),
    (RESPONSES, {"input": "hi", "instructions": "\x00"}, "instructions"),
    (MESSAGES, {"max_tokens": 10, "messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content"),
    (
        MESSAGES,
        {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\x00"}]}]},
        "messages[0].content[0].text",
    ),
    (MESSAGES, {"max_tokens": 10, "system": "a\x00", "messages": [USER]}, "system"),
    (COUNT, {"messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content"),
]


def _headers(path: str, secret: str) -> dict[str, str]:
    if path.startswith(MESSAGES):
        return {"content-type": "application/json", "x-api-key": secret, "anthropic-version": "2023-06-01"}
    return {"content-type": "application/json", "authorization": f"Bearer {secret}"}


@pytest.mark.parametrize(("path", "body", "param"), CASES)
async def test_a_null_character_is_a_400_naming_where_it_is(api_key_secret, sim_model, path, body, param):
    document: dict[str, Any] = {"model": sim_model.name, **body}

    result = await asgi_request(
        "POST", path, headers=_headers(path, api_key_secret), body=json.dumps(document).encode()
    )

    assert result.status_code == 400, result.content
    error = json.loads(result.content)
    if path.startswith(MESSAGES):  # Anthropic's shape, which names the field in the message
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert param in error["error"]["message"] and "Null characters" in error["error"]["message"]
    else:
        assert_error(result, 400, code="invalid", param=param)
