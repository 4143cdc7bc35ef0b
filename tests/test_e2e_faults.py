"""The fault matrix: every upstream failure, on every interface, ends clearly and is saved and billed once.

The upstream is the end-to-end stack's simulator, told how to fail by its ``X-Simulator-Fault``
header, which each test's provider sends as one of its configured extra headers (the product
feature operators use for OpenRouter-style headers; no test-only path). For each fault, one
reply on each interface — the conversation SSE stream, the WebSocket, ``/v1`` streamed and
``/v1`` whole — against the real server process, then:

- the client gets a clear error in its wire format: an SSE ``error`` event, a WebSocket
  ``error`` frame, a ``/v1`` error status with OpenAI's error JSON when nothing was streamed yet,
  else a ``data: {"error": ...}`` frame (streamed) or the error JSON (whole); the code names the
  failure, and a stall or first token later than the provider's read timeout is
  ``upstream_timeout`` (504);
- the conversation's assistant message is ``failed`` with the text its client received;
- the Celery worker writes exactly one usage row per reply (``failed``): estimated tokens for a
  reply that produced output, 0 tokens and cost 0 for one the upstream refused before any token
  (``accounts.usage``: a failed reply is billed only for output);
- and, in its own test, no upstream detail (internal host or port, library text such as
  aiohttp's exception names) reaches a client.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from websockets.sync.client import connect

from accounts.models import UsageRecord, User
from accounts.services import api_key_create
from conversations.models import Message
from llm.tests.openai_schema import validate_against
from tests.conftest import E2EModels, E2EStack
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import bearer, conversation_sse, poll_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TOKENS_BEFORE_FAILURE = 5
INTERFACES = ("sse", "websocket", "v1 stream", "v1 whole")


@dataclass(frozen=True)
class Fault:
    """One upstream failure and what a client must see of it.

    ``header``: the ``X-Simulator-Fault`` value (None: the provider points at a closed port).
    ``read_timeout``: the provider's, in seconds. ``status``: the ``/v1`` status of the error;
    ``code``: its code; ``output``: whether tokens reach the client before it.
    """

    header: str | None
    status: int
    code: str
    output: bool
    read_timeout: float = 30.0


FAULTS = {
    "status-429": Fault("status=429", 429, "upstream_rate_limited", output=False),
    "status-500": Fault("status=500", 502, "upstream_error", output=False),
    "status-503": Fault("status=503", 502, "upstream_error", output=False),
    "drop-after": Fault(f"drop-after={TOKENS_BEFORE_FAILURE}", 502, "upstream_disconnected", output=True),
    "malformed-line": Fault(f"malformed-line={TOKENS_BEFORE_FAILURE}", 502, "upstream_bad_response", output=True),
    # Silences longer than the provider's read timeout: a timeout, never a hang.
    "stall": Fault(
        f"stall=30, stall-after={TOKENS_BEFORE_FAILURE}", 504, "upstream_timeout", output=True, read_timeout=1
    ),
    "ttft": Fault("ttft=30", 504, "upstream_timeout", output=False, read_timeout=1),
    "unreachable": Fault(None, 502, "upstream_unreachable", output=False),
}


@dataclass
class Observed:
    """What one interface's client saw: the ``text`` received, the ``error`` object, the HTTP
    ``status`` (``/v1``; None elsewhere), the assistant ``message_id`` (conversations)."""

    text: str = ""
    error: dict[str, Any] | None = None
    status: int | None = None
    message_id: int | None = None
    raw: list[str] = field(default_factory=list)  # every body, event and frame, as received


@dataclass
class FaultRun:
    """One fault's replies on every interface, and the rows they are checked against."""

    model_name: str
    observed: dict[str, Observed]
    conversations: dict[str, int]
    owner: User
    upstream_hosts: tuple[str, ...]

    def received(self) -> list[str]:
        """Everything the clients received, conversation listings included."""
        return [text for seen in self.observed.values() for text in seen.raw]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed on return: nothing listens there


def _sse(url: str, key: str, conversation_id: int) -> Observed:
    seen = Observed()
    with (
        httpx.Client(base_url=url, timeout=60, trust_env=False) as http,
        conversation_sse(http, conversation_id, key, "Tell me a story") as source,
    ):
        seen.status = source.response.status_code
        for sse in source.iter_sse():
            seen.raw.append(sse.data)
            event, payload = sse.event, json.loads(sse.data)
            if event == "reply.start":
                seen.message_id = payload["message_id"]
            elif event == "reply.delta":
                seen.text += payload.get("content", "")
            elif event == "error":
                seen.error = payload["error"]
                assert payload["message"]["status"] == "failed", payload
                assert payload["message"]["content"] == seen.text, payload
            elif event == "reply.done":
                raise AssertionError(f"the reply completed despite the fault: {payload}")
    return seen


def _websocket(ws_url: str, key: str, conversation_id: int) -> Observed:
    seen = Observed()
    with connect(f"{ws_url}/ws/conversations/{conversation_id}/?token={key}", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "message.send", "content": "Tell me a story"}))
        while seen.error is None:
            raw = ws.recv(timeout=60)
            assert isinstance(raw, str)
            seen.raw.append(raw)
            frame = json.loads(raw)
            if frame["type"] == "reply.start":
                seen.message_id = frame["message_id"]
            elif frame["type"] == "reply.delta":
                seen.text += frame.get("content", "")
            elif frame["type"] == "error":
                seen.error = frame["error"]
                assert frame["message"]["status"] == "failed", frame
                assert frame["message"]["content"] == seen.text, frame
            else:
                assert frame["type"] != "reply.done", f"the reply completed despite the fault: {frame}"
    return seen


def _v1_stream(url: str, key: str, model: str) -> Observed:
    seen = Observed()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Tell me a story"}]}
    with (
        httpx.Client(base_url=url, timeout=60, trust_env=False) as http,
        connect_sse(http, "POST", "/v1/chat/completions", json=body, headers=bearer(key)) as source,
    ):
        response = source.response
        seen.status = response.status_code
        if response.status_code != 200:  # failed before any chunk: an error status, OpenAI's error JSON
            response.read()
            seen.raw.append(response.text)
            assert response.headers["content-type"] == "application/json"
            validate_against("ErrorResponse", response.json())
            seen.error = response.json()["error"]
            return seen
        for sse in source.iter_sse():
            seen.raw.append(sse.data)
            assert sse.data != "[DONE]", "the stream ended as if completed"
            payload = json.loads(sse.data)
            if "error" in payload:
                validate_against("ErrorResponse", payload)
                seen.error = payload["error"]
                continue
            validate_against("CreateChatCompletionStreamResponse", payload)
            if payload["choices"]:
                seen.text += payload["choices"][0]["delta"].get("content") or ""
    return seen


def _v1_whole(url: str, key: str, model: str) -> Observed:
    seen = Observed()
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}]}
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        response = http.post("/v1/chat/completions", json=body, headers=bearer(key))
    seen.status = response.status_code
    seen.raw.append(response.text)
    assert response.headers["content-type"] == "application/json", response.text[:500]
    if response.status_code != 200:
        validate_against("ErrorResponse", response.json())
        seen.error = response.json()["error"]
    return seen


def run_fault(stack: E2EStack, user: FaultUser, name: str) -> FaultRun:
    """Send one reply per interface through a provider that asks the simulator for fault ``name``."""
    fault = FAULTS[name]
    if fault.header is None:
        port = _closed_port()
        base_url, extra_headers = f"http://127.0.0.1:{port}/v1", {}
        hosts: tuple[str, ...] = (f"127.0.0.1:{port}",)
    else:
        base_url, extra_headers = stack.simulator.base_url, {"X-Simulator-Fault": fault.header}
        hosts = (stack.simulator.root_url.removeprefix("http://"),)
    provider = ProviderFactory(
        name=f"fault-{name}-{secrets.token_hex(3)}",
        base_url=base_url,
        api_key=stack.provider_api_key,
        read_timeout=fault.read_timeout,
        extra_headers=extra_headers,
    )
    model = LLMModelFactory(name=provider.name, provider=provider, upstream_model="sim-1")
    owner = User.objects.get(username=user.username)
    conversations = {kind: ConversationFactory(owner=owner, model=model).pk for kind in ("sse", "websocket")}
    url, key = stack.server_url, user.api_key
    observed = {
        "sse": _sse(url, key, conversations["sse"]),
        "websocket": _websocket(stack.ws_url, key, conversations["websocket"]),
        "v1 stream": _v1_stream(url, key, model.name),
        "v1 whole": _v1_whole(url, key, model.name),
    }
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        for kind, conversation_id in conversations.items():  # what a client reads back later
            listing = http.get(f"/api/conversations/{conversation_id}/messages/", headers=bearer(key))
            observed[kind].raw.append(listing.text)
    return FaultRun(model.name, observed, conversations, owner, hosts)


# Each fault's run, kept for the leak check so the matrix is not sent twice.
_runs: dict[str, FaultRun] = {}


@dataclass(frozen=True)
class FaultUser:
    """The user whose replies fail, and the ``sk-...`` API key the clients present."""

    username: str
    api_key: str


@pytest.fixture
def fault_user(e2e_stack: E2EStack, e2e_models: E2EModels) -> FaultUser:
    """A user with an API key, made in the database: registering over HTTP once per test would
    hit the registration throttle, which on the embedded defaults lives in each server's memory."""
    user = UserFactory()
    secret = api_key_create(user=user, name="faults").secret
    e2e_stack.secrets.add(secret)
    return FaultUser(username=user.username, api_key=secret)


@pytest.fixture
def fault_run(e2e_stack: E2EStack, fault_user: FaultUser) -> Callable[[str], FaultRun]:
    def run(name: str) -> FaultRun:
        _runs[name] = run_fault(e2e_stack, fault_user, name)
        return _runs[name]

    return run


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_matrix_ends_every_reply_clearly_saved_and_billed_once(
    name: str, e2e_stack: E2EStack, fault_user: FaultUser, fault_run: Callable[[str], FaultRun]
) -> None:
    fault = FAULTS[name]
    run = fault_run(name)

    for interface, seen in run.observed.items():
        where = (name, interface, seen)
        assert seen.error is not None, where
        assert seen.error["code"] == fault.code and seen.error["message"], where
        streamed = fault.output and interface != "v1 whole"  # a whole answer shows no partial text
        assert len(seen.text.split()) == (TOKENS_BEFORE_FAILURE if streamed else 0), where
    # /v1 answers an error status unless the stream had begun: then the error is its last frame.
    assert run.observed["v1 whole"].status == fault.status
    assert run.observed["v1 stream"].status == (200 if fault.output else fault.status)
    for interface in ("sse", "websocket"):  # the conversation's stream starts before the upstream answers
        assert run.observed[interface].status in (None, 200)

    # The assistant messages are failed, with the text their clients received.
    for interface, conversation_id in run.conversations.items():
        message = Message.objects.get(conversation_id=conversation_id, role=Message.Role.ASSISTANT)
        seen = run.observed[interface]
        assert message.pk == seen.message_id
        assert (message.status, message.error_code) == (Message.Status.FAILED, fault.code), (interface, message)
        assert message.content == seen.text, interface

    # One usage row per reply; tokens only for those that produced output.
    if not e2e_stack.worker_running:
        pytest.skip("usage rows are written by the Celery worker, which runs with REDIS_URL (CI)")
    # A completed reply queued after the faulty ones is a barrier: each server process sends its
    # records in order and the worker (one solo process) writes them in order, so once its row
    # exists every record the faulty replies queued is written too.
    barrier = httpx.post(
        f"{e2e_stack.server_url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "barrier"}]},
        headers=bearer(fault_user.api_key),
        timeout=30,
        trust_env=False,
    )
    assert barrier.status_code == 200, barrier.text
    barrier_id = barrier.json()["id"]
    poll_until_sync(lambda: UsageRecord.objects.filter(request_id=barrier_id).exists(), within=30, what="barrier row")
    poll_until_sync(e2e_stack.accounting_idle, within=30, what="the worker to be idle")

    records = list(UsageRecord.objects.filter(user=run.owner, model_name=run.model_name))
    assert len(records) == len(INTERFACES), [(r.request_id, r.finish_status, r.message_id) for r in records]
    assert len({r.request_id for r in records}) == len(INTERFACES)
    assert {r.finish_status for r in records} == {"failed"}
    assert {r.message_id for r in records if r.message_id is not None} == {
        run.observed[interface].message_id for interface in ("sse", "websocket")
    }
    if fault.output:
        assert all(r.completion_tokens >= TOKENS_BEFORE_FAILURE for r in records), [
            r.completion_tokens for r in records
        ]
    else:
        assert [(r.total_tokens, r.cost) for r in records] == [(0, 0)] * len(INTERFACES)


# Library text that must never reach a client: aiohttp's (and Python's) exception names and messages.
_LIBRARY_TEXT = re.compile(
    r"aiohttp|httpx|asyncio|Traceback|ssl:default|Cannot connect to host|Connect call failed|"
    r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)


@pytest.mark.parametrize("name", list(FAULTS))
def test_no_upstream_detail_reaches_a_client(name: str, request: pytest.FixtureRequest) -> None:
    run = _runs.get(name)  # the matrix's run, when it ran first
    if run is None:
        run = request.getfixturevalue("fault_run")(name)
    leaks = []
    for text in run.received():
        for host in run.upstream_hosts:
            if host in text or host.partition(":")[2] in re.findall(r"\d+", text):
                leaks.append((host, text[:300]))
        leaks.extend((match, text[:300]) for match in _LIBRARY_TEXT.findall(text))
    assert leaks == [], leaks
