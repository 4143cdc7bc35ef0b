"""Upstream transport failures reach clients as generic errors; the server log has the detail.

A server process of its own (``start_server``) logging JSON, and two broken upstreams: a provider
whose port nothing listens on (the adapter's "Cannot connect to host 127.0.0.1:<port> ..."), and
the simulator's ``sim-fail-midstream`` model, whose connection drops mid-reply (aiohttp's
``TransferEncodingError``). Every client-facing error — ``/v1`` whole and streamed, the
conversation POST and SSE stream, and the ``error`` stored on the message the API shows — names
no host, port or library; the response's ``X-Request-ID`` is the one the client sent (a UUID) and
finds the server's JSON log record that holds the detail.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import httpx
import pytest

from accounts.models import User
from llm.models import LLMModel
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory
from tests.kit import bearer, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

INTERNALS = (
    "127.0.0.1",
    "localhost",
    "ssl",
    "aiohttp",
    "TransferEncodingError",
    "ClientPayloadError",
    "Cannot connect",
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: nothing listens there


def _log_records(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line another library printed itself
        if isinstance(record, dict):
            records.append(record)
    return records


def _assert_no_internals(text: str, port: int) -> None:
    for internal in (*INTERNALS, str(port)):
        assert internal not in text, (internal, text)


def _sse_error(response: httpx.Response) -> dict[str, Any]:
    event, data = "", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "error":
            data = line[6:]
    assert data, "the stream ended without an error event"
    return json.loads(data)


@pytest.fixture
def broken_models(e2e_stack: Any) -> tuple[int, str, str]:
    """``(closed port, unreachable model, cut-off model)`` in the test database."""
    port = _closed_port()
    unreachable = ProviderFactory(name="nowhere", base_url=f"http://127.0.0.1:{port}/v1", api_key="", connect_timeout=2)
    LLMModelFactory(name="unreachable-model", provider=unreachable, upstream_model="sim-1")
    simulator = ProviderFactory(
        name="simulator-cut", base_url=e2e_stack.simulator.base_url, api_key=e2e_stack.provider_api_key
    )
    LLMModelFactory(name="cut-off-model", provider=simulator, upstream_model="sim-fail-midstream")
    return port, "unreachable-model", "cut-off-model"


@pytest.mark.parametrize(
    ("which", "code", "message", "detail"),
    [
        ("unreachable", "upstream_unreachable", "The model provider could not be reached.", "unreachable"),
        ("cut-off", "upstream_disconnected", "The model provider's response was cut off.", "TransferEncodingError"),
    ],
)
def test_transport_failures_are_generic_for_clients_and_detailed_in_the_log(
    e2e_stack: Any, e2e_user: Any, start_server: Any, broken_models: tuple[int, str, str], which, code, message, detail
) -> None:
    port, unreachable_model, cut_off_model = broken_models
    model = unreachable_model if which == "unreachable" else cut_off_model
    server, url = start_server(env={"LOG_FORMAT": "json"})
    owner = User.objects.get(username=e2e_user.username)
    conversation = ConversationFactory(owner=owner, model=LLMModel.objects.get(name=model))
    request_ids: list[str] = []

    def headers(credential: str) -> dict[str, str]:
        request_ids.append(uuid.uuid4().hex)
        return {**bearer(credential), "X-Request-ID": request_ids[-1]}

    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        for stream in (False, True):
            answers.append(
                client.post("/v1/chat/completions", json={**chat, "stream": stream}, headers=headers(e2e_user.api_key))
            )
        messages_url = f"/api/conversations/{conversation.pk}/messages/"
        answers.append(client.post(messages_url, json={"content": "hi"}, headers=headers(e2e_user.access)))
        with client.stream(
            "POST",
            messages_url,
            json={"content": "hi"},
            headers={**headers(e2e_user.access), "Accept": "text/event-stream"},
        ) as sse:
            sse_error = _sse_error(sse)
            sse_request_id = sse.headers["X-Request-ID"]
        listed = client.get(messages_url, headers=bearer(e2e_user.access)).json()["results"]

    # Each answer carries the id its request sent, and says only the generic message.
    for response, request_id in zip(answers, request_ids, strict=False):
        assert response.headers["X-Request-ID"] == request_id
        _assert_no_internals(response.text, port)
        if response.status_code != 200:  # /v1 streamed may have sent its headers before the failure
            assert response.json()["error"] == {"message": message, "type": "api_error", "param": None, "code": code}
        else:
            assert f'"code":"{code}"' in response.text.replace(" ", "")
    assert sse_request_id == request_ids[-1]
    assert sse_error["error"]["message"] == message and sse_error["error"]["code"] == code
    _assert_no_internals(json.dumps(sse_error), port)
    # What the conversation stored, and the API shows, is the same generic text.
    failed = [m for m in listed if m["role"] == "assistant"]
    assert len(failed) == 2 and {(m["status"], m["error"], m["error_code"]) for m in failed} == {
        ("failed", message, code)
    }

    # The server's JSON log has, under each request's id, the record with the detail.
    def records_for_every_request() -> list[dict[str, Any]]:
        records = _log_records(server.output())
        found = [
            r
            for r in records
            if r.get("request_id") in request_ids and detail in r.get("message", "") and code in r.get("message", "")
        ]
        return found if {r["request_id"] for r in found} >= set(request_ids) else []

    found = poll_until_sync(records_for_every_request, what="a log record with the detail for every request id")
    if which == "unreachable":
        assert all(f"127.0.0.1:{port}" in record["message"] for record in found)


def test_an_unsafe_incoming_request_id_is_replaced(e2e_stack: Any, e2e_user: Any, http: httpx.Client) -> None:
    mine = str(uuid.uuid4())
    kept = http.get(
        "/api/auth/me/",
        headers={**bearer(e2e_user.access), "X-Request-ID": mine, "Origin": "https://chat.example.com"},
    )
    replaced = http.get(
        "/api/auth/me/", headers={**bearer(e2e_user.access), "X-Request-ID": "<script>alert(1)</script>"}
    )
    made = http.get("/v1/models", headers=bearer(e2e_user.api_key))

    assert kept.headers["X-Request-ID"] == mine
    assert "script" not in replaced.headers["X-Request-ID"]
    for response in (replaced, made):
        assert len(response.headers["X-Request-ID"]) == 32 and int(response.headers["X-Request-ID"], 16) >= 0
    assert "X-Request-ID" in kept.headers["Access-Control-Expose-Headers"]
