"""Every bad input is a 4xx JSON error in the documented shape, on every endpoint family.

Each request goes through the project's ASGI application as a server runs it
(``tests.kit.asgi_request``): both handler chains (the full ``MIDDLEWARE`` one for DRF, the lean
one for ``/v1``, ``/dashboard`` and the message POST), Django's own error views and DRF's. A row
of a table is one bad input; each is sent to each endpoint it applies to, and the answer must be
the documented error (``docs/api.md``, "Errors"): the status, ``application/json``, OpenAI's error
object with the expected ``code`` and a message saying what is wrong, and an ``X-Request-ID``.
The WebSocket's frames get the same error objects in ``error`` frames.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client, RequestFactory
from rest_framework.exceptions import ValidationError

from accounts.models import APIKey, User
from chatbackend.asgi import application
from chatbackend.errors import as_application_error
from chatbackend.exception_handlers import server_error
from chatbackend.parsers import MAX_JSON_DEPTH
from conversations.models import Conversation, Message
from conversations.services import MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS
from tests.factories import ConversationFactory
from tests.kit import access_token, asgi_request, assert_error, bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("provider_clients"),
]

TIMEOUT = 10
TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """One endpoint that takes a JSON body: a valid body, and where its text fields are.

    ``path`` may hold ``{conversation}``. ``auth``: ``"jwt"``, ``"key"`` (an API key) or None.
    ``text``: functions that put a string into the body's text fields, one per field.
    ``drf``: DRF's parser and validation (codes ``parse_error`` / ``invalid``), else the async views'
    (``invalid_json``, and the field's own code for a NUL character).
    """

    name: str
    method: str
    path: str
    body: dict[str, Any]
    text: tuple[Callable[[dict[str, Any], str], None], ...]
    auth: str | None
    drf: bool
    nul_code: str = "invalid"
    accept: str = "application/json"


def _field(name: str) -> Callable[[dict[str, Any], str], None]:
    def put(body: dict[str, Any], value: str) -> None:
        body[name] = value

    put.__name__ = name
    return put


def _message_content(body: dict[str, Any], value: str) -> None:
    body["messages"][0]["content"] = value


def _message_text_part(body: dict[str, Any], value: str) -> None:
    body["messages"][0]["content"] = [{"type": "text", "text": value}]


CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
ENDPOINTS = [
    Endpoint(
        "register",
        "POST",
        "/api/auth/register/",
        {"username": "newcomer", "password": "a-long-Passphrase-42"},
        (_field("username"), _field("password")),
        None,
        True,
    ),
    Endpoint(
        "token",
        "POST",
        "/api/auth/token/",
        {"username": "someone", "password": "a-long-Passphrase-42"},
        (_field("username"), _field("password")),
        None,
        True,
    ),
    Endpoint(
        "conversation-create",
        "POST",
        "/api/conversations/",
        {"model": "sim-model", "title": "t", "system_prompt": "s"},
        (_field("model"), _field("title"), _field("system_prompt")),
        "jwt",
        True,
    ),
    Endpoint(
        "conversation-update",
        "PATCH",
        "/api/conversations/{conversation}/",
        {"title": "t", "system_prompt": "s"},
        (_field("title"), _field("system_prompt")),
        "jwt",
        True,
    ),
    Endpoint("api-key-create", "POST", "/api/api-keys/", {"name": "k"}, (_field("name"),), "jwt", True),
    Endpoint(
        "message-send",
        "POST",
        "/api/conversations/{conversation}/messages/",
        {"content": "hi"},
        (_field("content"),),
        "jwt",
        False,
        nul_code="null_characters_not_allowed",
    ),
    Endpoint(
        "message-send-sse",
        "POST",
        "/api/conversations/{conversation}/messages/",
        {"content": "hi"},
        (_field("content"),),
        "jwt",
        False,
        nul_code="null_characters_not_allowed",
        accept="text/event-stream",
    ),
    Endpoint(
        "chat-whole",
        "POST",
        "/v1/chat/completions",
        CHAT,
        (_message_content, _message_text_part, _field("user")),
        "key",
        False,
    ),
    Endpoint(
        "chat-stream",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        (_message_content, _message_text_part, _field("user")),
        "key",
        False,
    ),
]


def _with_extra(body: dict[str, Any], raw_value: str) -> bytes:
    """``body`` as JSON with one more member, ``"x": <raw_value>`` (JSON text, not encoded again)."""
    text = json.dumps(body)
    return f'{text[:-1]}, "x": {raw_value}}}'.encode()


@dataclass(frozen=True)
class BadBody:
    """A bad body made from an endpoint's valid one: the status, code (per parser) and message words."""

    name: str
    make: Callable[[dict[str, Any]], bytes]
    status: int
    drf_code: str
    async_code: str
    words: str


DEEP = "[" * 5000 + "]" * 5000
BAD_BODIES = [
    BadBody("nan", lambda b: _with_extra(b, "NaN"), 400, "parse_error", "invalid_json", "NaN and Infinity"),
    BadBody("infinity", lambda b: _with_extra(b, "Infinity"), 400, "parse_error", "invalid_json", "NaN and Infinity"),
    BadBody(
        "minus-infinity",
        lambda b: _with_extra(b, "[-Infinity]"),
        400,
        "parse_error",
        "invalid_json",
        "NaN and Infinity",
    ),
    BadBody("nested-5000", lambda b: _with_extra(b, DEEP), 400, "parse_error", "invalid_json", "deeper than"),
    BadBody(
        "nested-just-too-deep",
        lambda b: _with_extra(b, "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH),
        400,
        "parse_error",
        "invalid_json",
        "deeper than",
    ),
    BadBody("lone-surrogate", lambda b: _with_extra(b, '"\\ud800"'), 400, "parse_error", "invalid_json", "surrogate"),
    BadBody("not-json", lambda b: b"{not json", 400, "parse_error", "invalid_json", "JSON"),
    BadBody(
        "ten-megabytes",
        lambda b: _with_extra(b, json.dumps("a" * TEN_MB)),
        413,
        "request_too_large",
        "request_too_large",
        "larger than",
    ),
]


@pytest.fixture
def world(user, sim_model, api_key_secret) -> dict[str, Any]:
    """The caller's credentials and a conversation of theirs (the sim model, a quick reply)."""
    conversation = ConversationFactory(owner=user, model=sim_model, title="Chat")
    return {"jwt": access_token(user), "key": api_key_secret, "conversation": conversation}


async def send(endpoint: Endpoint, world: dict[str, Any], body: bytes, **extra_headers: str) -> Any:
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),  # DRF reads no body without one
        "Accept": endpoint.accept,
        **extra_headers,
    }
    if endpoint.auth is not None:
        headers.update(bearer(world[endpoint.auth]))
    path = endpoint.path.format(conversation=world["conversation"].pk)
    return await asgi_request(endpoint.method, path, headers=headers, body=body)


def check(response: Any, status: int, code: str, words: str) -> dict[str, Any]:
    """Assert the documented JSON error with ``status`` and ``code`` that says ``words``.

    In its message, or for a validation error in one of its fields' messages (the message names
    the first problem only).
    """
    error = assert_error(response, status, code=code)
    said = error["message"] + json.dumps(error.get("fields") or {})
    assert words.lower() in said.lower(), error
    assert response.headers.get("X-Request-ID"), response.headers
    return error


async def nothing_written(world: dict[str, Any]) -> None:
    """The bad request changed nothing: no message, no new conversation, key, user; the title as it was."""
    assert not await Message.objects.filter(conversation=world["conversation"]).aexists()
    assert await Conversation.objects.acount() == 1
    assert (await Conversation.objects.aget()).title == "Chat"
    assert await APIKey.objects.acount() == 1
    assert await User.objects.acount() == 1


@pytest.mark.parametrize("bad", BAD_BODIES, ids=lambda bad: bad.name)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda endpoint: endpoint.name)
async def test_a_bad_json_body_is_a_json_error(endpoint, bad, world):
    response = await send(endpoint, world, bad.make(json.loads(json.dumps(endpoint.body))))

    check(response, bad.status, bad.drf_code if endpoint.drf else bad.async_code, bad.words)
    await nothing_written(world)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda endpoint: endpoint.name)
async def test_a_nul_character_in_any_text_field_is_a_400(endpoint, world):
    for put in endpoint.text:
        body = json.loads(json.dumps(endpoint.body))
        put(body, "before\x00after")

        response = await send(endpoint, world, json.dumps(body).encode())

        error = check(response, 400, endpoint.nul_code, "null characters")
        assert error["param"] and error["param"].split(".")[0].split("[")[0] in json.dumps(endpoint.body), error
    await nothing_written(world)


# --- /v1 specifics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": {}, "content": "hi"}, "role"),
        ({"role": ["user"], "content": "hi"}, "role"),
        ({"role": None, "content": "hi"}, "role"),
        ({"role": "user", "content": {"text": "hi"}}, "content"),
        ("just text", "messages.0"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_messages_of_the_wrong_shape_are_a_400(world, message, param, stream):
    endpoint = ENDPOINTS[-1] if stream else ENDPOINTS[-2]
    body = {**endpoint.body, "messages": [message]}

    response = await send(endpoint, world, json.dumps(body).encode())

    error = assert_error(response, 400, code="invalid", type="invalid_request_error")
    assert error["param"].startswith("messages") and error["param"].endswith(param), error


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_token_limit_above_the_context_window_is_a_400(world, sim_model, name, stream):
    endpoint = ENDPOINTS[-1] if stream else ENDPOINTS[-2]
    window = sim_model.context_window

    too_many = await send(endpoint, world, json.dumps({**endpoint.body, name: window + 1}).encode())
    error = check(too_many, 400, "max_tokens_too_large", str(window))
    assert error["param"] == name

    fits = await send(endpoint, world, json.dumps({**endpoint.body, name: window}).encode())
    assert fits.status_code == 200, fits.content[:300]


# --- Size limits of conversations ---------------------------------------------------------------


@pytest.mark.parametrize(("field", "limit"), [("title", MAX_TITLE_CHARS), ("system_prompt", MAX_SYSTEM_PROMPT_CHARS)])
@pytest.mark.parametrize("endpoint", [ENDPOINTS[2], ENDPOINTS[3]], ids=lambda endpoint: endpoint.name)
async def test_titles_and_system_prompts_have_a_size_limit(endpoint, world, field, limit):
    too_long = await send(endpoint, world, json.dumps({**endpoint.body, field: "x" * (limit + 1)}).encode())
    error = check(too_long, 400, "invalid", str(limit))
    assert error["param"] == field

    at_limit = await send(endpoint, world, json.dumps({**endpoint.body, field: "x" * limit}).encode())
    assert at_limit.status_code in (200, 201), at_limit.content[:300]


# --- URLs and methods: 404 and 405 are JSON, never Django's HTML pages ---------------------------


@pytest.mark.parametrize(
    ("method", "path", "auth", "status", "code"),
    [
        ("GET", "/api/nothing-here/", "jwt", 404, "unknown_url"),
        ("GET", "/api/nothing-here/", None, 404, "unknown_url"),
        ("GET", "/api/conversations/abc/", "jwt", 404, "unknown_url"),
        ("GET", "/api/conversations/99999999/", "jwt", 404, "not_found"),
        ("POST", "/api/conversations/abc/messages/", "jwt", 404, "unknown_url"),
        ("GET", "/api/conversations/{conversation}/messages/abc/stop/", "jwt", 404, "unknown_url"),
        ("DELETE", "/api/api-keys/abc/", "jwt", 404, "unknown_url"),
        ("GET", "/api/conversations", "jwt", 301, None),  # APPEND_SLASH: a redirect, no page
        ("GET", "/v1/nothing-here", "key", 404, "unknown_url"),
        ("GET", "/dashboard/nothing-here", "key", 404, "unknown_url"),
        ("PUT", "/api/auth/me/", "jwt", 405, "method_not_allowed"),
        ("GET", "/api/auth/token/", None, 405, "method_not_allowed"),
        ("PUT", "/api/conversations/{conversation}/", "jwt", 405, "method_not_allowed"),
        ("PUT", "/api/conversations/{conversation}/messages/", "jwt", 405, "method_not_allowed"),
        ("PUT", "/v1/chat/completions", "key", 405, "method_not_allowed"),
        ("PATCH", "/v1/chat/completions/chatcmpl-1", "key", 405, "method_not_allowed"),
        ("GET", "/v1/chat/completions/chatcmpl-1", "key", 404, "completion_not_found"),
        ("GET", "/v1/chat/completions/chatcmpl-1/messages/x", "key", 404, "unknown_url"),
        ("POST", "/dashboard/billing/usage", "key", 405, "method_not_allowed"),
        ("POST", "/dashboard/billing/subscription", "key", 405, "method_not_allowed"),
    ],
)
async def test_unknown_urls_and_methods_are_json_errors(world, method, path, auth, status, code):
    headers = bearer(world[auth]) if auth else {}
    response = await asgi_request(method, path.format(conversation=world["conversation"].pk), headers=headers)

    if status == 301:
        assert response.status_code == 301 and response.content == b"", response.content[:300]
        return
    assert_error(response, status, code=code)
    assert response.headers.get("X-Request-ID")


def _digits(number: int, zero: str) -> str:
    """``number`` written with the Unicode digits that start at ``zero`` (``"０"``: fullwidth)."""
    return "".join(chr(ord(zero) + int(digit)) for digit in str(number))


@pytest.mark.parametrize("zero", ["\uff10", "\u0660"])  # fullwidth, Arabic-Indic: Python's \d and int() take them
@pytest.mark.parametrize("path", ["/api/conversations/{id}/", "/api/templates/{id}/", "/api/budgets/{id}/"])
async def test_a_path_id_in_other_than_ascii_digits_is_an_unknown_url(world, zero, path):
    """docs/api.md: a path id that is not a number is 404 ``unknown_url``, never an alias of an object's URL."""
    conversation_id = world["conversation"].pk
    ascii_url = await asgi_request("GET", f"/api/conversations/{conversation_id}/", headers=bearer(world["jwt"]))
    assert ascii_url.status_code == 200  # the caller's own conversation, at its URL

    response = await asgi_request("GET", path.format(id=_digits(conversation_id, zero)), headers=bearer(world["jwt"]))
    assert_error(response, 404, code="unknown_url")


@pytest.mark.parametrize(
    "query", ["start_date=NaN&end_date=2026-01-01", "start_date=2026-01-01&end_date=%00", "start_date=2026-13-01"]
)
async def test_billing_usage_rejects_bad_dates_with_a_400(world, query):
    response = await asgi_request("GET", f"/dashboard/billing/usage?{query}", headers=bearer(world["key"]))

    assert_error(response, 400, type="invalid_request_error")
    assert response.headers.get("X-Request-ID")


def test_a_bug_under_the_api_is_a_json_500_and_a_page_elsewhere():
    api = server_error(RequestFactory().get("/api/conversations/"))
    page = server_error(RequestFactory().get("/"))

    assert api.status_code == 500 and api["Content-Type"] == "application/json"
    assert json.loads(api.content)["error"]["code"] == "internal_error"
    assert page.status_code == 500 and page["Content-Type"].startswith("text/html")


# --- WebSocket frames ---------------------------------------------------------------------------

WS_FRAMES = [
    ('{"type": "message.send", "content": "hi", "x": NaN}', "invalid_json", "NaN and Infinity"),
    ('{"type": "message.send", "content": "hi", "x": -Infinity}', "invalid_json", "NaN and Infinity"),
    ('{"type": "message.send", "content": "hi", "x": ' + DEEP + "}", "invalid_json", "deeper than"),
    ('{"type": "message.send", "content": "\\ud800"}', "invalid_json", "surrogate"),
    ('{"type": "message.send", "content": "a\\u0000b"}', "null_characters_not_allowed", "null characters"),
]


@pytest.mark.parametrize(("frame", "code", "words"), WS_FRAMES)
async def test_bad_websocket_frames_get_an_error_frame(world, frame, code, words):
    path = f"/ws/conversations/{world['conversation'].pk}/?token={world['jwt']}"
    socket = WebsocketCommunicator(application, path)
    connected, _ = await socket.connect(timeout=TIMEOUT)
    assert connected
    try:
        await socket.send_to(text_data=frame)
        reply = await socket.receive_json_from(timeout=TIMEOUT)

        assert reply["type"] == "error" and reply["message"] is None, reply
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["type"] == "invalid_request_error"
        assert words.lower() in reply["error"]["message"].lower(), reply
        await socket.send_json_to({"type": "ping"})  # the socket stays usable
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"type": "pong"}
    finally:
        await socket.disconnect(timeout=TIMEOUT)
    await nothing_written(world)


@pytest.mark.parametrize(
    ("detail", "param"),
    [
        # A ListField's errors: keyed by index, 0 included.
        ({"items": {0: ["Not a valid string."]}}, "items.0"),
        ({"items": {2: {"name": ["This field is required."]}}}, "items.2.name"),
        # A list serializer's (many=True): one entry per item, {} for the valid ones.
        ({"items": [{}, {}, {"name": ["This field is required."]}]}, "items.2.name"),
        ([{}, {"name": ["This field is required."]}], "1.name"),
        ({"name": ["Too long.", "Not allowed."]}, "name"),
        ({"non_field_errors": ["Pick one."]}, None),
    ],
)
def test_a_validation_error_names_the_item_at_fault(detail: Any, param: str | None) -> None:
    error = as_application_error(ValidationError(detail))

    assert error is not None and error.param == param, error and error.as_dict()
    assert "{}" not in error.message


@pytest.mark.parametrize("path", ["/share/any-token", "/"])
def test_an_unsafe_method_on_a_read_only_page_is_405_not_a_csrf_403(path):
    # CsrfViewMiddleware ran before the view's method check: a POST got 403 (CSRF), as if it could be
    # allowed with a token. The browser's own client, enforcing CSRF as a browser's would.
    client = Client(enforce_csrf_checks=True)

    for method in (client.post, client.put, client.delete):
        response = method(path)
        assert response.status_code == 405, (method, response.status_code)
        assert set(response["Allow"].replace(" ", "").split(",")) >= {"GET", "HEAD"}
