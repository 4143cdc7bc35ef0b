"""A REST (DRF) body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a 413 ``request_too_large`` in the project's
JSON error shape, as on the plain async views, whether its ``Content-Length`` said so or understated it;
it is never read past the limit. A body within the limit is taken. ``chatbackend.parsers`` does it.

Requests go through the project's ASGI application (``tests.kit.asgi_request``), as uvicorn runs it:
the server hands Django the whole body, whatever ``Content-Length`` said. The conversation import's own
larger limit is tested in ``conversations/tests/test_transfer.py``, the sync's in ``test_sync.py``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.test import override_settings

from chatbackend.errors import ApplicationError
from chatbackend.parsers import DEFAULT_BODY_LIMIT, read_body
from conversations.conversation_templates.models import ConversationTemplate
from conversations.models import Conversation
from tests.factories import LLMModelFactory
from tests.kit import access_token, asgi_request, assert_error, bearer

LIMIT = 1000  # bytes: DATA_UPLOAD_MAX_MEMORY_SIZE in these tests

CONVERSATIONS = "/api/conversations/"
TEMPLATE_IMPORT = "/api/templates/import/"
MASK = {"id": "m1", "name": "Translator", "context": [{"role": "system", "content": "Translate."}]}


def _conversation(size: int) -> bytes:
    """A valid conversation-create body of exactly ``size`` bytes (its system prompt pads it)."""
    body = {"model": "gpt-test", "title": "t", "system_prompt": ""}
    padding = size - len(json.dumps(body).encode())
    return json.dumps({**body, "system_prompt": "x" * padding}).encode()


def _masks(size: int) -> bytes:
    """A valid template import (one NextChat mask) of exactly ``size`` bytes."""
    mask = json.loads(json.dumps(MASK))
    padding = size - len(json.dumps(mask).encode())
    mask["context"][0]["content"] += "x" * padding
    return json.dumps(mask).encode()


ENDPOINTS = [(CONVERSATIONS, _conversation, Conversation), (TEMPLATE_IMPORT, _masks, ConversationTemplate)]


@pytest.fixture
def headers(user) -> dict[str, str]:
    LLMModelFactory(name="gpt-test")
    return {"Content-Type": "application/json", **bearer(access_token(user))}


async def post(path: str, headers: dict[str, str], body: bytes, content_length: int | None) -> Any:
    told = {} if content_length is None else {"Content-Length": str(content_length)}
    return await asgi_request("POST", path, headers={**headers, **told}, body=body)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "make", "model"), ENDPOINTS, ids=["conversation-create", "template-import"])
@pytest.mark.parametrize("told", ["declared", "understated"])
async def test_a_body_over_the_limit_is_a_413_json_error(headers, path, make, model, told):
    body = make(LIMIT + 1)
    content_length = len(body) if told == "declared" else 100  # under ASGI the server passes the whole body

    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = await post(path, headers, body, content_length)

    error = assert_error(response, 413, code="request_too_large", type="invalid_request_error")
    assert f"larger than this server accepts ({LIMIT} bytes)" in error["message"], error
    assert (str(len(body)) in error["message"]) is (told == "declared"), error  # the declared size is named
    assert response.headers.get("X-Request-ID")
    assert not await model.objects.aexists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "make", "model"), ENDPOINTS, ids=["conversation-create", "template-import"])
async def test_a_body_at_the_limit_is_taken(headers, path, make, model):
    body = make(LIMIT)
    assert len(body) == LIMIT

    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = await post(path, headers, body, len(body))

    assert response.status_code == 201, response.content[:300]
    assert await model.objects.acount() == 1


# --- read_body: what the parser and the sync views read ------------------------------------------


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT)
def test_a_body_without_content_length_is_read_one_byte_past_the_limit_and_no_further():
    stream = io.BytesIO(b"x" * 10 * LIMIT)

    with pytest.raises(ApplicationError) as raised:
        read_body(stream, content_length=None, limit=DEFAULT_BODY_LIMIT)

    assert (raised.value.status, raised.value.code) == (413, "request_too_large")
    assert stream.tell() == LIMIT + 1


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT)
def test_a_declared_size_over_the_limit_is_refused_before_reading():
    stream = io.BytesIO(b"x" * 10 * LIMIT)

    with pytest.raises(ApplicationError) as raised:
        read_body(stream, content_length=str(10 * LIMIT), limit=DEFAULT_BODY_LIMIT)

    assert (raised.value.status, raised.value.code) == (413, "request_too_large")
    assert stream.tell() == 0


def test_bodies_within_the_limit_or_without_one_are_read_whole():
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        assert read_body(io.BytesIO(b"x" * LIMIT), content_length=None, limit=DEFAULT_BODY_LIMIT) == b"x" * LIMIT
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=None):  # Django's "no limit"
        big = b"x" * 10 * LIMIT
        assert read_body(io.BytesIO(big), content_length=len(big), limit=DEFAULT_BODY_LIMIT) == big
    assert read_body(None, content_length=None, limit=DEFAULT_BODY_LIMIT) == b""


# --- the ASGI handlers: bodies bounded while they arrive, chunked bodies sized --------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "make", "model"), ENDPOINTS, ids=["conversation-create", "template-import"])
async def test_a_chunked_body_without_content_length_is_taken(headers, path, make, model):
    # Transfer-Encoding: chunked (Node's fetch with a stream body, curl -T -): no Content-Length.
    # DRF took such a request for one without a body: a misleading 400 "field required".
    body = make(LIMIT)
    parts = [body[:10], body[10:500], body[500:]]

    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = await asgi_request("POST", path, headers={**headers, "Transfer-Encoding": "chunked"}, body=parts)

    assert response.status_code == 201, response.content[:300]
    assert await model.objects.acount() == 1


@pytest.mark.django_db(transaction=True)
async def test_a_chunked_body_over_the_rest_limit_is_a_413(headers):
    body = _conversation(LIMIT + 1)

    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=LIMIT):
        response = await asgi_request("POST", CONVERSATIONS, headers=headers, body=[body[:100], body[100:]])

    error = assert_error(response, 413, code="request_too_large", type="invalid_request_error")
    assert f"({LIMIT} bytes)" in error["message"], error
    assert not await Conversation.objects.aexists()


class _Client:
    """An ASGI client sending a body in ``parts``; counts what the application read of it."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.read = 0
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        if self.read >= len(self.parts):
            return {"type": "http.disconnect"}
        self.read += 1
        return {"type": "http.request", "body": self.parts[self.read - 1], "more_body": self.read < len(self.parts)}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {name.lower(): value for name, value in message["headers"]}
        else:
            self.body += message.get("body", b"")


def _scope(path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
    }


HANDLER_PATHS = [("/v1/chat/completions", "streaming"), ("/api/conversations/", "full")]


@override_settings(REQUEST_BODY_MAX_BYTES=LIMIT)
@pytest.mark.parametrize(("path", "chain"), HANDLER_PATHS)
async def test_a_body_past_the_server_bound_is_not_read_further(path, chain):
    from chatbackend.asgi import django_asgi_app, streaming_asgi_app

    handler = streaming_asgi_app if chain == "streaming" else django_asgi_app
    client = _Client([b"x" * 600] * 10)  # 6,000 bytes, no Content-Length

    await handler(_scope(path, {"Content-Type": "application/json"}), client.receive, client.send)

    assert client.read == 2  # the part that went past the bound was the last one read
    assert client.status == 413
    assert client.headers[b"connection"] == b"close"
    error = json.loads(client.body)["error"]
    assert error["code"] == "request_too_large", error
    assert f"larger than this server accepts ({LIMIT} bytes)" in error["message"], error


@override_settings(REQUEST_BODY_MAX_BYTES=LIMIT)
@pytest.mark.parametrize(("path", "chain"), HANDLER_PATHS)
async def test_a_declared_size_past_the_server_bound_is_refused_before_reading(path, chain):
    from chatbackend.asgi import django_asgi_app, streaming_asgi_app

    handler = streaming_asgi_app if chain == "streaming" else django_asgi_app
    client = _Client([b"x" * 5000])

    await handler(_scope(path, {"Content-Length": "5000"}), client.receive, client.send)

    assert client.read == 0
    error = json.loads(client.body)["error"]
    assert (client.status, error["code"]) == (413, "request_too_large")
    assert "(5000 bytes) is larger than this server accepts (1000 bytes)" in error["message"], error


ANTHROPIC_REQUESTS = [
    ("/v1/messages", {}),
    ("/v1/messages/count_tokens", {}),
    ("/v1/chat/completions", {"anthropic-version": "2023-06-01"}),  # the SDK's header: its shape anywhere
]


@override_settings(REQUEST_BODY_MAX_BYTES=LIMIT)
@pytest.mark.parametrize(("path", "headers"), ANTHROPIC_REQUESTS, ids=["messages", "count-tokens", "header"])
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "streamed"])
async def test_an_anthropic_request_past_the_server_bound_gets_anthropics_413(path, headers, declared):
    # The anthropic SDK reads Anthropic's error JSON, {"type": "error", "error": {"type", "message"}}.
    from chatbackend.asgi import streaming_asgi_app

    client = _Client([b"x" * 600] * 10)
    sent = {**headers, "Content-Length": "6000"} if declared else headers

    await streaming_asgi_app(_scope(path, sent), client.receive, client.send)

    assert (client.status, client.headers[b"connection"]) == (413, b"close")
    body = json.loads(client.body)
    assert (body["type"], body["error"]["type"]) == ("error", "request_too_large"), body
    assert f"larger than this server accepts ({LIMIT} bytes)" in body["error"]["message"], body


@override_settings(REQUEST_BODY_MAX_BYTES=LIMIT)
async def test_a_page_past_the_server_bound_gets_a_plain_413():
    from chatbackend.asgi import django_asgi_app

    client = _Client([b"x" * 5000])

    await django_asgi_app(_scope("/accounts/login/", {}), client.receive, client.send)

    assert client.status == 413
    assert client.headers[b"content-type"].startswith(b"text/plain")
    assert client.body == b"Request body larger than 1000 bytes."
