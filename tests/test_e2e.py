"""End to end: real server, worker and simulator processes, driven over HTTP and WebSocket.

What a user does — register, log in, create an API key, chat through the openai SDK, SSE and a
WebSocket, stop replies, point NextChat at the server — checked by what a user sees (frames,
statuses, persisted messages), plus what an operator needs: one usage record per reply,
upstream connections closed on stop, and no secret in any response or log line. Two server
processes run: what must hold across processes (a stop request, a revoked API key) is checked by
sending it to the one that does not hold the stream or did not do the revoking.
Contract: docs/api.md and /work/shared/nextchat.md. Fixtures (``e2e_stack``, ``e2e_models``,
``e2e_user``, ``http``): tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings
from httpx_sse import connect_sse
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from websockets.sync.client import ClientConnection, connect

from accounts.models import UsageRecord
from llm.simulator import reply_text
from tests.kit import (
    E2E_REPLY_TOKENS,
    NEXTCHAT_ORIGIN,
    assert_error,
    bearer,
    chunk_objects,
    chunk_text,
    nextchat_browser_headers,
    nextchat_chat_request,
    nextchat_server_headers,
    poll_until_sync,
    sse_data,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DEADLINE_SECONDS = 20.0


# --- helpers ----------------------------------------------------------------------------------


def expected_reply(content: str) -> str:
    """Return the simulator's full reply to a conversation whose last user message is ``content``."""
    return reply_text([{"role": "user", "content": content}], E2E_REPLY_TOKENS)


def usage_records(stack: Any, username: str, expected: int) -> list[UsageRecord]:
    """Wait until ``username`` has ``expected`` usage records and accounting is idle; return them all.

    Idle: the worker (when there is one) has finished every task it received and none waits in
    the broker, so a record written once too often would be in the database by now.
    """
    poll_until_sync(
        lambda: UsageRecord.objects.filter(user__username=username).count(),
        lambda n: n >= expected,
        within=DEADLINE_SECONDS,
        what=f"{expected} usage records",
    )
    if stack.worker_running:
        poll_until_sync(stack.accounting_idle, within=DEADLINE_SECONDS, what="the worker to finish its usage tasks")
    return list(UsageRecord.objects.filter(user__username=username))


def assert_stopped_part(content: str, prompt: str) -> None:
    """Assert ``content`` is what a reply to ``prompt`` streamed before it was stopped: a start, not all."""
    full = expected_reply(prompt)
    assert content, "the text streamed before the stop was lost"
    assert full.startswith(content), (content, full)
    assert len(content) < len(full), "the reply ran to its end: the stop did not land"


def assert_upstream_closed(stack: Any, disconnected_before: int, count: int) -> None:
    """Wait until the simulator streams nothing; assert it saw exactly ``count`` more connections closed early."""
    stats = poll_until_sync(
        stack.simulator.stats,
        lambda s: s["requests_disconnected"] >= disconnected_before + count and s["active_streams"] == 0,
        within=DEADLINE_SECONDS,
        what=f"the simulator to see {count} upstream connection(s) closed",
    )
    assert stats["requests_disconnected"] == disconnected_before + count


def create_conversation(http: httpx.Client, user: Any, model: str = "sim-model") -> int:
    response = http.post("/api/conversations/", json={"model": model, "title": "e2e"}, headers=bearer(user.access))
    assert response.status_code == 201, response.text
    assert response.json()["model"] == model
    return response.json()["id"]


def assistant_messages(http: httpx.Client, user: Any, conversation_id: int) -> list[dict[str, Any]]:
    response = http.get(
        f"/api/conversations/{conversation_id}/messages/", params={"role": "assistant"}, headers=bearer(user.access)
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]


def send_over_sse(http: httpx.Client, user: Any, conversation_id: int, content: str) -> Any:
    """Send ``content`` to the conversation asking for SSE; return httpx-sse's ``EventSource`` context."""
    url = f"/api/conversations/{conversation_id}/messages/"
    return connect_sse(http, "POST", url, json={"content": content}, headers=bearer(user.access))


def recorded_sse_events(stack: Any, source: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(event, data)`` of an httpx-sse ``EventSource``, recording each event's data."""
    for sse in source.iter_sse():
        stack.received.append(sse.data)
        yield sse.event, json.loads(sse.data)


def ws_connect(stack: Any, conversation_id: int, token: str) -> ClientConnection:
    """Open the conversation's WebSocket the way a browser must: the token in the query string."""
    return connect(f"{stack.ws_url}/ws/conversations/{conversation_id}/?token={token}", open_timeout=10, proxy=None)


def ws_receive(stack: Any, ws: ClientConnection, seconds: float = DEADLINE_SECONDS) -> dict[str, Any]:
    raw = ws.recv(timeout=seconds)
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    stack.received.append(raw)
    return json.loads(raw)


def openai_chunks(stack: Any, response: httpx.Response) -> list[dict[str, Any]]:
    """Read a streamed ``/v1`` response to its ``[DONE]``, record it, and return its chunks (schema-checked)."""
    raw = response.read()
    stack.received.append(raw.decode())
    return chunk_objects(sse_data(raw))


def text_pieces(chunks: list[dict[str, Any]]) -> int:
    """Return how many chunks carried text: more than one means the reply was streamed."""
    return sum(1 for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


# --- tests ------------------------------------------------------------------------------------


def test_openai_sdk_streams_a_reply_with_an_api_key(
    e2e_stack: Any, e2e_models: Any, e2e_user: Any, http: httpx.Client
) -> None:
    response = http.get("/api/auth/me/", headers=bearer(e2e_user.api_key))
    assert response.status_code == 200, response.text
    assert response.json()["username"] == e2e_user.username
    response = http.get("/api/api-keys/", headers=bearer(e2e_user.access))
    assert response.status_code == 200, response.text
    [listed] = response.json()["results"]
    assert "key" not in listed and e2e_user.api_key.startswith(listed["prefix"])

    client = OpenAI(base_url=f"{e2e_stack.server_url}/v1", api_key=e2e_user.api_key, max_retries=0, timeout=30)
    assert {"gpt-4o-mini", "sim-model"} <= {model.id for model in client.models.list()}

    prompt = f"Tell me a story, {secrets.token_hex(4)}"
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    pieces = []
    for chunk in client.chat.completions.create(model="sim-model", messages=messages, stream=True):
        e2e_stack.received.append(chunk.model_dump_json())
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) > 1, "the reply arrived in one piece: it was not streamed"
    assert "".join(pieces) == expected_reply(prompt)

    completion = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    e2e_stack.received.append(completion.model_dump_json())
    assert completion.choices[0].message.content == expected_reply(prompt)
    assert completion.usage is not None and completion.usage.completion_tokens == E2E_REPLY_TOKENS

    records = usage_records(e2e_stack, e2e_user.username, expected=2)
    assert len(records) == 2
    assert {r.model_name for r in records} == {"sim-model", "gpt-4o-mini"}
    assert all(r.source == UsageRecord.Source.OPENAI_API and r.api_key is not None for r in records)
    if e2e_stack.worker_running:  # the records crossed processes: server -> Redis -> worker
        assert re.search(r"Task \S+\[[0-9a-f-]+\] succeeded", e2e_stack.logs()["worker"])


def test_conversation_reply_streams_over_sse_and_websocket(
    e2e_stack: Any, e2e_models: Any, e2e_user: Any, http: httpx.Client
) -> None:
    conversation_id = create_conversation(http, e2e_user)

    first = f"Hello over SSE {secrets.token_hex(4)}"
    with send_over_sse(http, e2e_user, conversation_id, first) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = list(recorded_sse_events(e2e_stack, source))
    names = [name for name, _ in events]
    assert names[0] == "reply.start" and names[-1] == "reply.done", names
    start, done = events[0][1], events[-1][1]
    assert start["conversation_id"] == conversation_id and start["model"] == "sim-model"
    deltas = [data["content"] for name, data in events if name == "reply.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == expected_reply(first)
    assert done["message"]["id"] == start["message_id"]
    assert done["message"]["status"] == "completed"
    assert done["message"]["content"] == expected_reply(first)

    second = f"And now over a WebSocket {secrets.token_hex(4)}"
    with ws_connect(e2e_stack, conversation_id, e2e_user.access) as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert ws_receive(e2e_stack, ws)["type"] == "pong"
        ws.send(json.dumps({"type": "message.send", "content": second}))
        frames = [ws_receive(e2e_stack, ws)]
        while frames[-1]["type"] not in {"reply.done", "error"}:
            frames.append(ws_receive(e2e_stack, ws))
    assert frames[0]["type"] == "reply.start", frames[0]
    ws_deltas = [frame["content"] for frame in frames if frame["type"] == "reply.delta"]
    assert len(ws_deltas) > 1
    assert "".join(ws_deltas) == expected_reply(second)
    assert frames[-1]["type"] == "reply.done", frames[-1]
    assert frames[-1]["message"]["status"] == "completed"

    response = http.get(f"/api/conversations/{conversation_id}/messages/", headers=bearer(e2e_user.access))
    assert response.status_code == 200, response.text
    history = [(m["role"], m["status"], m["content"]) for m in response.json()["results"]]
    assert history == [
        ("user", "completed", first),
        ("assistant", "completed", expected_reply(first)),
        ("user", "completed", second),
        ("assistant", "completed", expected_reply(second)),
    ]

    records = usage_records(e2e_stack, e2e_user.username, expected=2)
    assert Counter(r.message_id for r in records) == {start["message_id"]: 1, frames[0]["message_id"]: 1}
    assert all(r.source == UsageRecord.Source.CONVERSATION for r in records)


def test_stopping_a_reply_keeps_the_partial_text_and_closes_the_upstream(
    e2e_stack: Any, e2e_models: Any, e2e_user: Any, http: httpx.Client
) -> None:
    conversation_id = create_conversation(http, e2e_user)
    disconnected_before = e2e_stack.simulator.stats()["requests_disconnected"]

    # Over the WebSocket: a "reply.stop" frame after three deltas.
    over_ws = f"Stop me over the WebSocket {secrets.token_hex(4)}"
    with ws_connect(e2e_stack, conversation_id, e2e_user.api_key) as ws:
        ws.send(json.dumps({"type": "message.send", "content": over_ws}))
        start = ws_receive(e2e_stack, ws)
        assert start["type"] == "reply.start", start
        for _ in range(3):
            frame = ws_receive(e2e_stack, ws)
            assert frame["type"] == "reply.delta", frame
        ws.send(json.dumps({"type": "reply.stop"}))
        frames = [ws_receive(e2e_stack, ws)]  # deltas already on their way, then the end
        while frames[-1]["type"] == "reply.delta":
            frames.append(ws_receive(e2e_stack, ws))
    assert frames[-1]["type"] == "reply.done", frames[-1]
    assert frames[-1]["message"]["status"] == "cancelled"
    ws_message_id = start["message_id"]

    # Over SSE: the client closes the connection after three deltas.
    over_sse = f"Stop me by hanging up {secrets.token_hex(4)}"
    with send_over_sse(http, e2e_user, conversation_id, over_sse) as source:
        assert source.response.status_code == 200
        events = recorded_sse_events(e2e_stack, source)
        name, data = next(events)
        assert name == "reply.start", (name, data)
        sse_message_id = data["message_id"]
        for _ in range(3):
            name, _data = next(events)
            assert name == "reply.delta", name

    messages = poll_until_sync(
        lambda: {m["id"]: m for m in assistant_messages(http, e2e_user, conversation_id)},
        lambda found: len(found) == 2 and all(m["status"] != "streaming" for m in found.values()),
        within=DEADLINE_SECONDS,
        what="both stopped replies to be saved",
    )
    for message_id, prompt in ((ws_message_id, over_ws), (sse_message_id, over_sse)):
        assert messages[message_id]["status"] == "cancelled", messages[message_id]
        assert_stopped_part(messages[message_id]["content"], prompt)
    assert_upstream_closed(e2e_stack, disconnected_before, 2)

    records = usage_records(e2e_stack, e2e_user.username, expected=2)
    assert Counter(r.message_id for r in records) == {ws_message_id: 1, sse_message_id: 1}


def test_nextchat_requests_and_cors_preflight(
    e2e_stack: Any, e2e_models: Any, e2e_user: Any, http: httpx.Client, http_b: httpx.Client
) -> None:
    # Browser ("custom endpoint") mode: the preflight carries no credentials.
    response = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": NEXTCHAT_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers.get("access-control-allow-origin") in {"*", NEXTCHAT_ORIGIN}
    allowed_headers = response.headers.get("access-control-allow-headers", "").lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "POST" in response.headers.get("access-control-allow-methods", "")

    prompt = f"Hi from NextChat {secrets.token_hex(4)}"
    body = nextchat_chat_request(
        [{"role": "system", "content": "You are ChatGPT."}, {"role": "user", "content": prompt}]
    )
    browser_headers = nextchat_browser_headers(e2e_user.api_key, stream=True)
    with http.stream("POST", "/v1/chat/completions", content=json.dumps(body), headers=browser_headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("access-control-allow-origin") in {"*", NEXTCHAT_ORIGIN}
        chunks = openai_chunks(e2e_stack, response)
    assert text_pieces(chunks) > 1 and chunk_text(chunks) == expected_reply(prompt)

    # Server mode: NextChat's server relays the body chunked, without Content-Length.
    def chunked() -> Iterator[bytes]:
        raw = json.dumps(body).encode()
        yield raw[:20]
        yield raw[20:]

    server_headers = nextchat_server_headers(e2e_user.api_key)
    with http.stream("POST", "/v1/chat/completions", content=chunked(), headers=server_headers) as response:
        assert "content-length" not in response.request.headers
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = openai_chunks(e2e_stack, response)
    assert chunk_text(chunks) == expected_reply(prompt)

    # The title request: not streamed, Accept: application/json, kept only on a 200.
    title_body = {**body, "stream": False}
    response = http.post(
        "/v1/chat/completions",
        content=json.dumps(title_body),
        headers=nextchat_browser_headers(e2e_user.api_key, stream=False),
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected_reply(prompt)

    records = usage_records(e2e_stack, e2e_user.username, expected=3)
    assert len(records) == 3 and {r.model_name for r in records} == {"gpt-4o-mini"}

    # "Used this month $X of $Y": X in cents, the three replies' cost.
    response = http.get(
        "/dashboard/billing/usage",
        params={"start_date": "2020-01-01", "end_date": "2100-01-01"},
        headers=bearer(e2e_user.api_key),
    )
    assert response.status_code == 200, response.text
    assert response.json()["total_usage"] == pytest.approx(float(sum(r.cost for r in records) * 100))
    assert sum(r.cost for r in records) > 0
    response = http.get("/dashboard/billing/subscription", headers=bearer(e2e_user.api_key))
    assert response.status_code == 200, response.text
    assert response.json()["hard_limit_usd"] == float(settings.OPENAI_BILLING_HARD_LIMIT_USD)
    # Server mode relays both without a query string (to either server process): this month's usage.
    response = http_b.get("/dashboard/billing/usage", headers=server_headers)
    assert response.status_code == 200, response.text
    assert response.json()["total_usage"] == pytest.approx(float(sum(r.cost for r in records) * 100))
    response = http_b.get("/dashboard/billing/subscription", headers=server_headers)
    assert response.status_code == 200, response.text
    assert response.json()["hard_limit_usd"] == float(settings.OPENAI_BILLING_HARD_LIMIT_USD)


# --- Across server processes: state that must hold whichever process a request reaches ------

needs_shared_state = pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="without REDIS_URL (the embedded defaults) the two servers share no channel layer: a stop or "
    "a revocation cannot cross processes. CI sets REDIS_URL, so these run there.",
)


@needs_shared_state
def test_a_stop_sent_to_another_server_stops_the_reply(e2e_stack, e2e_models, e2e_user, http, http_b) -> None:
    assert e2e_stack.shares_state
    conversation_id = create_conversation(http, e2e_user)
    disconnected_before = e2e_stack.simulator.stats()["requests_disconnected"]
    prompt = f"Stop me from the other server {secrets.token_hex(4)}"
    stop_url = f"/api/conversations/{conversation_id}/messages/{{}}/stop/"

    events: list[tuple[str, dict[str, Any]]] = []
    with send_over_sse(http, e2e_user, conversation_id, prompt) as source:  # server A streams the reply ...
        assert source.response.status_code == 200
        for name, data in recorded_sse_events(e2e_stack, source):
            events.append((name, data))
            if name == "reply.delta" and sum(event == "reply.delta" for event, _ in events) == 3:
                message_id = events[0][1]["message_id"]
                stop = http_b.post(stop_url.format(message_id), headers=bearer(e2e_user.access))  # ... B stops it
                assert stop.status_code == 202, stop.text
                assert stop.json() == {"message_id": message_id, "status": "stopping"}

    names = [name for name, _ in events]
    assert names[0] == "reply.start" and names[-1] == "reply.done", names  # the stream ended on its own
    streamed = "".join(data["content"] for name, data in events if name == "reply.delta")
    done = events[-1][1]["message"]
    assert (done["id"], done["status"], done["content"]) == (message_id, "cancelled", streamed)
    assert_stopped_part(streamed, prompt)
    # Saved as the stream said, as either server reads it.
    [saved] = [m for m in assistant_messages(http_b, e2e_user, conversation_id) if m["id"] == message_id]
    assert (saved["status"], saved["content"]) == ("cancelled", streamed)
    assert_upstream_closed(e2e_stack, disconnected_before, 1)


@needs_shared_state
def test_a_turn_sent_to_another_server_while_the_branch_streams_is_409(
    e2e_stack, e2e_models, e2e_user, http, http_b
) -> None:
    conversation_id = create_conversation(http, e2e_user)
    messages_url = f"/api/conversations/{conversation_id}/messages/"
    stop_url = f"/api/conversations/{conversation_id}/messages/{{}}/stop/"

    events: list[tuple[str, dict[str, Any]]] = []
    with send_over_sse(http, e2e_user, conversation_id, "Tell me a long story") as source:  # A streams ...
        assert source.response.status_code == 200
        for name, data in recorded_sse_events(e2e_stack, source):
            events.append((name, data))
            if name == "reply.start":  # ... B is sent the next turn of that branch meanwhile
                message_id = data["message_id"]
                refused = http_b.post(messages_url, json={"content": "and then?"}, headers=bearer(e2e_user.access))
                stop = http_b.post(stop_url.format(message_id), headers=bearer(e2e_user.access))
                # Checked once stopped: the error's schema check loads the OpenAPI document (~1 s
                # the first time), longer than the reply has left.
                assert_error(refused, 409, code="reply_in_progress")
                assert stop.status_code == 202, stop.text

    done = events[-1][1]["message"]
    assert (events[-1][0], done["id"], done["status"]) == ("reply.done", message_id, "cancelled")
    # Ended: the branch takes its next turn, on either server, after the reply the model is sent.
    response = http_b.post(messages_url, json={"content": "and then?"}, headers=bearer(e2e_user.access))
    assert response.status_code == 201, response.text
    assert response.json()["user_message"]["parent_id"] == message_id
    listed = http.get(messages_url, headers=bearer(e2e_user.access)).json()["results"]
    assert [m["role"] for m in listed] == ["user", "assistant", "user", "assistant"]


@needs_shared_state
def test_an_api_key_revoked_on_one_server_is_refused_at_once_by_another(
    e2e_stack, e2e_models, e2e_user, http, http_b
) -> None:
    assert e2e_stack.shares_state
    response = http.post("/api/api-keys/", json={"name": "revoke me"}, headers=bearer(e2e_user.access))
    assert response.status_code == 201, response.text
    e2e_stack.received.remove(response.text)  # the one answer that shows the secret
    key_id, secret = response.json()["id"], response.json()["key"]
    e2e_stack.secrets.add(secret)
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
    # Server B has authenticated the key (and would have any cache of it warm) ...
    assert http_b.get("/v1/models", headers=bearer(secret)).status_code == 200
    assert http_b.post("/v1/chat/completions", json=chat, headers=bearer(secret)).status_code == 200

    response = http.delete(f"/api/api-keys/{key_id}/", headers=bearer(e2e_user.access))  # ... A revokes it
    assert response.status_code == 204, response.text

    # ... and B's very next requests are refused: no waiting, no retry.
    assert_error(http_b.post("/v1/chat/completions", json=chat, headers=bearer(secret)), 401, code="api_key_revoked")
    assert_error(http_b.get("/v1/models", headers=bearer(secret)), 401, code="api_key_revoked")
    assert_error(http.get("/v1/models", headers=bearer(secret)), 401, code="api_key_revoked")


def test_no_secret_in_any_response_or_log(e2e_stack: Any, e2e_models: Any, e2e_user: Any, http: httpx.Client) -> None:
    """Runs last: scans what every test in this module received, plus the server and worker logs."""
    # An upstream that rejects the provider's key: the simulator echoes the wrong key unmasked.
    response = http.post(
        "/v1/chat/completions",
        json={"model": e2e_models.wrong_key, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers=bearer(e2e_user.api_key),
    )
    assert_error(response, 502, code="upstream_auth_failed")
    conversation_id = create_conversation(http, e2e_user, model=e2e_models.wrong_key)
    response = http.post(
        f"/api/conversations/{conversation_id}/messages/", json={"content": "hi"}, headers=bearer(e2e_user.access)
    )
    assert_error(response, 502, code="upstream_auth_failed")
    # An API key in a WebSocket URL (the documented browser way) must not reach the access log.
    with ws_connect(e2e_stack, conversation_id, e2e_user.api_key) as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert ws_receive(e2e_stack, ws)["type"] == "pong"
    # The scan must cover the access log line of that WebSocket: wait until the server wrote it.
    poll_until_sync(
        lambda: e2e_stack.logs()["server-a"],
        lambda log: f'"WebSocket /ws/conversations/{conversation_id}/' in log,
        within=DEADLINE_SECONDS,
        what="the WebSocket's access log line",
    )

    assert e2e_stack.received, "nothing was recorded: the scan would prove nothing"
    secrets_ = {e2e_stack.provider_api_key, e2e_stack.wrong_provider_api_key, *e2e_stack.secrets}
    places = {"responses": "\n".join(e2e_stack.received), **e2e_stack.logs()}
    for server in ("server-a", "server-b"):
        assert places[server], f"{server} logged nothing: the scan would prove nothing"
    leaks = [
        f"{secret[:12]}... in {place}: {line.strip()[:300]}"
        for secret in sorted(secrets_)
        for place, text in places.items()
        for line in text.splitlines()
        if secret in line
    ]
    assert not leaks, leaks
