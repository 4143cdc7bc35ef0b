"""A revoked credential ends what it has open, in another server process, within a second.

Server A streams; the revocation goes through server B. A WebSocket closes with 4401 and its
reply ends ``cancelled``; an SSE or ``/v1`` stream of a revoked key stops; a logout closes the
WebSockets of that login session only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from accounts.models import APIKey, UsageRecord, User
from conversations.models import Message
from llm.tests.simulator_process import SimulatorProcess
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory
from tests.kit import bearer, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REVOCATION_SECONDS = 1.0


@pytest.fixture
def cross_process(e2e_stack: Any) -> None:
    if not e2e_stack.shares_state:
        pytest.skip("the two servers share a channel layer only with REDIS_URL (CI)")


@pytest.fixture
def slow_model(e2e_stack: Any, slow_simulator: SimulatorProcess) -> Any:
    """A model whose replies take 10 s (``slow_simulator``), committed for the servers."""
    provider = ProviderFactory(base_url=slow_simulator.base_url, api_key="", read_timeout=30)
    return LLMModelFactory(provider=provider, upstream_model="sim-1")


def _ws(url: str, conversation_id: int, token: str) -> ClientConnection:
    return connect(
        "ws" + url.removeprefix("http") + f"/ws/conversations/{conversation_id}/?token={token}", open_timeout=10
    )


def _stream_until_revoked(socket: ClientConnection, revoke: Any) -> tuple[str, int, float, int | None]:
    """Send a message, revoke after a few deltas; return (text received, close code, seconds to close, message id)."""
    socket.send(json.dumps({"type": "message.send", "content": "Tell me a long story"}))
    text, message_id, revoked_at = "", None, None
    try:
        while True:
            frame = json.loads(socket.recv(timeout=15))
            if frame["type"] == "reply.start":
                message_id = frame["message_id"]
            elif frame["type"] == "reply.delta":
                text += frame["content"]
                if revoked_at is None and len(text.split()) >= 3:
                    revoke()
                    revoked_at = time.monotonic()
    except ConnectionClosed:
        pass
    assert revoked_at is not None, text
    return text, socket.close_code or 0, time.monotonic() - revoked_at, message_id


def test_a_key_revoked_on_another_server_closes_its_websocket_and_cancels_the_reply(
    cross_process: None, e2e_stack: Any, e2e_user: Any, slow_model: Any, http_b: httpx.Client
) -> None:
    owner = User.objects.get(username=e2e_user.username)
    conversation = ConversationFactory(owner=owner, model=slow_model)
    key = APIKey.objects.get(user=owner, name="e2e")

    def revoke() -> None:
        response = http_b.delete(f"/api/api-keys/{key.pk}/", headers=bearer(e2e_user.access))
        assert response.status_code == 204, response.text

    with _ws(e2e_stack.server_urls[0], conversation.pk, e2e_user.api_key) as socket:
        text, code, seconds, message_id = _stream_until_revoked(socket, revoke)

    assert code == 4401
    assert seconds <= REVOCATION_SECONDS + 0.5  # the DELETE's own round trip comes on top
    message = poll_until_sync(
        lambda: Message.objects.get(pk=message_id), lambda m: m.status != Message.Status.STREAMING
    )
    assert message.status == Message.Status.CANCELLED
    assert message.content.startswith(text)
    poll_until_sync(lambda: UsageRecord.objects.filter(message_id=message_id).count(), lambda n: n == 1)


def test_a_logout_closes_the_websockets_of_that_session_only(
    cross_process: None, e2e_stack: Any, e2e_user: Any, slow_model: Any, http: httpx.Client, http_b: httpx.Client
) -> None:
    owner = User.objects.get(username=e2e_user.username)
    conversation = ConversationFactory(owner=owner, model=slow_model)
    other_login = http.post("/api/auth/token/", json={"username": e2e_user.username, "password": e2e_user.password})
    assert other_login.status_code == 200
    first_login = http.post("/api/auth/token/", json={"username": e2e_user.username, "password": e2e_user.password})
    assert first_login.status_code == 200
    access, refresh = first_login.json()["access"], first_login.json()["refresh"]

    def log_out() -> None:
        response = http_b.post("/api/auth/logout/", json={"refresh": refresh})
        assert response.status_code == 204, response.text

    with _ws(e2e_stack.server_urls[0], conversation.pk, other_login.json()["access"]) as other:
        with _ws(e2e_stack.server_urls[0], conversation.pk, access) as socket:
            _text, code, seconds, _message_id = _stream_until_revoked(socket, log_out)
        assert code == 4401
        assert seconds <= REVOCATION_SECONDS + 0.5
        # The other login's socket is still open and answers.
        other.send(json.dumps({"type": "ping"}))
        assert json.loads(other.recv(timeout=5)) == {"type": "pong"}
    # The ended login's access token has not expired, but neither server takes it any more: the
    # client cannot reconnect with it, nor go on calling the API.
    with _ws(e2e_stack.server_urls[0], conversation.pk, access) as again:
        with pytest.raises(ConnectionClosed):
            again.recv(timeout=5)
        assert again.close_code == 4401
    for server in e2e_stack.server_urls:
        with httpx.Client(base_url=server, timeout=10, trust_env=False) as client:
            assert client.get("/api/auth/me/", headers=bearer(access)).status_code == 401
            assert client.get("/api/auth/me/", headers=bearer(other_login.json()["access"])).status_code == 200


@pytest.mark.parametrize("path", ["sse", "v1", "v1-responses"])
def test_a_stream_of_a_key_revoked_on_another_server_stops(
    path: str, cross_process: None, e2e_stack: Any, e2e_user: Any, slow_model: Any, http_b: httpx.Client
) -> None:
    owner = User.objects.get(username=e2e_user.username)
    key = APIKey.objects.get(user=owner, name="e2e")
    conversation = ConversationFactory(owner=owner, model=slow_model)
    if path == "sse":
        url, body = f"/api/conversations/{conversation.pk}/messages/", {"content": "Tell me a long story"}
    elif path == "v1":
        url = "/v1/chat/completions"
        body = {"model": slow_model.name, "stream": True, "messages": [{"role": "user", "content": "A long story"}]}
    else:  # each Responses text delta names its "content_index"
        url, body = "/v1/responses", {"model": slow_model.name, "stream": True, "input": "A long story"}
    headers = {**bearer(e2e_user.api_key), "Accept": "text/event-stream"}
    received, revoked_at, ended_at = "", None, None
    with (
        httpx.Client(base_url=e2e_stack.server_urls[0], timeout=30, trust_env=False) as http_a,
        http_a.stream("POST", url, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            received += line + "\n"
            if revoked_at is None and received.count("content") >= 4:
                assert http_b.delete(f"/api/api-keys/{key.pk}/", headers=bearer(e2e_user.access)).status_code == 204
                revoked_at = time.monotonic()
        ended_at = time.monotonic()

    assert revoked_at is not None
    assert ended_at - revoked_at <= REVOCATION_SECONDS + 0.5
    assert "credential_revoked" in received or "credential of this reply was revoked" in received
    if path == "v1-responses":  # an ``error`` event, then ``response.failed``, last
        assert received.rstrip().splitlines()[-2] == "event: response.failed"
    if path == "sse":
        assert "event: reply.done" in received
        message = Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).get()
        assert message.status == Message.Status.CANCELLED
