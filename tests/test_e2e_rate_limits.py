"""Rate limits hold across two server processes: requests, tokens and concurrent streams per API key.

The stack's two server processes share one Redis; each test gives a fresh API key its limits,
then sends requests at once, split between both processes, to ``/v1/chat/completions``. Exactly
the limit's worth are served; every other one is OpenAI's 429 ``rate_limit_exceeded`` with
``Retry-After``, answered before any upstream call. Sequential requests see
``x-ratelimit-remaining-*`` count down, whichever process serves them.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from websockets.sync.client import connect

from accounts.metering.ratelimits import KEY_PREFIX
from accounts.models import APIKey, UsageRecord
from accounts.services import api_key_create
from conversations.models import Message
from llm.models import LLMModel
from tests.conftest import E2EModels, E2EStack
from tests.factories import ConversationFactory, LLMModelFactory, ProviderFactory, UserFactory
from tests.kit import assert_error, bearer, chat_body, conversation_sse, poll_until_sync

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL,
        reason="without REDIS_URL (the embedded defaults) each server process counts in its own memory: one "
        "process is the whole deployment there. CI sets REDIS_URL, so these run there.",
    ),
]

CHAT = "/v1/chat/completions"
# OpenAI's reset values: Go durations such as "20ms", "1s", "1.5s", "6m0s".
RESET = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def _key(**limits: int) -> tuple[str, APIKey]:
    """Return a new API key of a new user, with ``limits`` (``requests_per_minute=...``): its secret and row."""
    created = api_key_create(user=UserFactory(), name="rate-limited")
    APIKey.objects.filter(pk=created.api_key.pk).update(**limits)
    _forget_counts(created.api_key.pk)
    return created.secret, created.api_key


def _forget_counts(api_key_id: int) -> None:
    """Delete what Redis still counts for API key ``api_key_id``: a key of an earlier run's test database.

    Each run's test database numbers its rows from 1 again, while the counts live on in Redis for up
    to two minutes (stream leases: one).
    """
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        counters = list(client.scan_iter(f"{KEY_PREFIX}:{{*:api_key:{api_key_id}}}*"))
        client.delete(f"{KEY_PREFIX}:streams:api_key:{api_key_id}", *counters)


def _wait_accounted(stack: E2EStack, api_key: APIKey, *, total: int, refused: int) -> None:
    """Wait for the worker to write ``api_key``'s usage rows; check there are ``total``, ``refused`` of them refused.

    A refused request is recorded once, with no tokens and no cost. Waiting also keeps the worker
    from writing while the test database is flushed.
    """
    rows = poll_until_sync(
        lambda: list(UsageRecord.objects.filter(api_key=api_key).values_list("finish_status", "cost")),
        lambda rows: len(rows) >= total,
        within=30,
        what=f"{total} usage rows",
    )
    assert len(rows) == total, rows
    assert sorted(cost for status, cost in rows if status == "refused") == [0] * refused, rows
    poll_until_sync(stack.accounting_idle, within=30, what="the worker to be idle")


def _post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{CHAT}", json=body, headers=bearer(key), timeout=60, trust_env=False)


def _at_once(stack: E2EStack, key: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    """Send ``count`` requests at once, alternately to each server process; return their responses."""
    urls = [stack.server_urls[i % 2] for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda url: _post(url, key, body), urls))


def _assert_refused(response: httpx.Response, type_: str) -> None:
    error = assert_error(response, 429, code="rate_limit_exceeded", type=type_)
    assert "API key" in error["message"], error
    assert int(response.headers["Retry-After"]) >= 1


def _slow_model(stack: E2EStack, seconds: int) -> str:
    """Return a model whose upstream sends its first token after ``seconds``: its replies stay open that long."""
    provider = ProviderFactory(
        name=f"slow-{secrets.token_hex(3)}",
        base_url=stack.simulator.base_url,
        api_key=stack.provider_api_key,
        read_timeout=30,
        extra_headers={"X-Simulator-Fault": f"ttft={seconds}"},
    )
    return LLMModelFactory(name=provider.name, provider=provider, upstream_model="sim-1").name


def test_requests_per_minute_hold_across_processes(e2e_stack: E2EStack, e2e_models: E2EModels) -> None:
    key, api_key = _key(requests_per_minute=10)
    responses = _at_once(e2e_stack, key, chat_body(e2e_models.names[0], max_tokens=4), 30)

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: 10, 429: 20}, [r.text[:200] for r in responses if r.status_code not in (200, 429)]
    for response in responses:
        if response.status_code == 429:
            _assert_refused(response, "requests")
            assert response.headers["x-ratelimit-limit-requests"] == "10"
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
    _wait_accounted(e2e_stack, api_key, total=30, refused=20)


def test_remaining_requests_count_down_on_either_process(
    e2e_stack: E2EStack, e2e_models: E2EModels, http: httpx.Client, http_b: httpx.Client
) -> None:
    key, api_key = _key(requests_per_minute=5, tokens_per_minute=100_000)
    seen = []
    for client, stream in ((http, False), (http_b, True), (http, True), (http_b, False)):
        body = chat_body(e2e_models.names[0], max_tokens=4, stream=stream)
        with client.stream("POST", CHAT, json=body, headers=bearer(key)) as response:
            response.read()
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert RESET.match(response.headers["x-ratelimit-reset-requests"]), response.headers
        assert RESET.match(response.headers["x-ratelimit-reset-tokens"]), response.headers
        seen.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert 0 < int(response.headers["x-ratelimit-remaining-tokens"]) < 100_000
    assert seen == [4, 3, 2, 1]

    assert _post(e2e_stack.server_urls[0], key, chat_body(e2e_models.names[0], max_tokens=4)).status_code == 200
    _assert_refused(_post(e2e_stack.server_urls[1], key, chat_body(e2e_models.names[0], max_tokens=4)), "requests")
    _wait_accounted(e2e_stack, api_key, total=6, refused=1)


def test_remaining_counts_down_on_either_process_when_each_admits_on_its_view(
    e2e_stack: E2EStack, e2e_models: E2EModels, http: httpx.Client, http_b: httpx.Client
) -> None:
    """Far from its limits, a caller's requests are admitted on each process's view of the counters,
    which lacks the other process's latest requests (accounts.metering.headroom); the headers still
    count every one of them (two processes taking turns answered 99, 98, 98, 97, ... before)."""
    key, api_key = _key(requests_per_minute=100, tokens_per_minute=1_000_000)
    seen = []
    for turn in range(8):
        body = chat_body(e2e_models.names[0], max_tokens=4, stream=turn % 4 in (1, 2))
        with (http, http_b)[turn % 2].stream("POST", CHAT, json=body, headers=bearer(key)) as response:
            response.read()
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        assert RESET.match(response.headers["x-ratelimit-reset-requests"]), response.headers
        seen.append(
            (
                int(response.headers["x-ratelimit-remaining-requests"]),
                int(response.headers["x-ratelimit-remaining-tokens"]),
            )
        )
    assert [requests for requests, _ in seen] == list(range(99, 91, -1)), seen
    tokens = [tokens for _, tokens in seen]
    assert tokens == sorted(set(tokens), reverse=True), seen  # each request's tokens counted once more
    _wait_accounted(e2e_stack, api_key, total=8, refused=0)


def test_tokens_per_minute_hold_across_processes(e2e_stack: E2EStack, e2e_models: E2EModels) -> None:
    body = chat_body(_slow_model(e2e_stack, 6), "Tell me about rate limits, please.", max_tokens=4)
    # The prompt's token count, as the server counts it: what one admission takes from a large limit.
    probe_key, probe_api_key = _key(tokens_per_minute=1_000_000)
    probe = _post(e2e_stack.server_urls[0], probe_key, body)
    assert probe.status_code == 200, probe.text
    prompt_tokens = 1_000_000 - int(probe.headers["x-ratelimit-remaining-tokens"])
    assert prompt_tokens > 0

    # Ten prompts fit, not eleven. The replies take 6 s to start, so no completion tokens are
    # added before every request has been admitted or refused.
    key, api_key = _key(tokens_per_minute=10 * prompt_tokens + prompt_tokens // 2)
    responses = _at_once(e2e_stack, key, body, 30)

    assert Counter(response.status_code for response in responses) == {200: 10, 429: 20}
    for response in responses:
        if response.status_code == 429:
            _assert_refused(response, "tokens")
            assert f"Requested {prompt_tokens}" in response.json()["error"]["message"]
    _wait_accounted(e2e_stack, probe_api_key, total=1, refused=0)
    _wait_accounted(e2e_stack, api_key, total=30, refused=20)


def test_concurrent_streams_hold_across_processes(e2e_stack: E2EStack, e2e_models: E2EModels) -> None:
    key, api_key = _key(concurrent_streams=3)
    # Each admitted reply stays open 6 s (its first token's wait): the others arrive meanwhile.
    body = chat_body(_slow_model(e2e_stack, 6), max_tokens=4)
    responses = _at_once(e2e_stack, key, body, 12)

    assert Counter(response.status_code for response in responses) == {200: 3, 429: 9}
    for response in responses:
        if response.status_code == 429:
            _assert_refused(response, "requests")
            assert "Concurrent stream limit reached" in response.json()["error"]["message"]

    # The slots were given back when those replies ended: a new one is served.
    fast = chat_body(e2e_models.names[0], max_tokens=4)
    tries: list[int] = []
    poll_until_sync(
        lambda: tries.append(_post(e2e_stack.server_urls[1], key, fast).status_code) or tries[-1],
        lambda status: status == 200,
        what="a stream slot freed",
    )
    _wait_accounted(e2e_stack, api_key, total=12 + len(tries), refused=9 + len(tries) - 1)


def _websocket_reply(ws_url: str, key: str, conversation_id: int) -> dict[str, Any]:
    """Send a message over the WebSocket; return the frame that ended its reply (``reply.done`` or ``error``)."""
    with connect(f"{ws_url}/ws/conversations/{conversation_id}/?token={key}", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "message.send", "content": "Say hello"}))
        while True:
            frame = json.loads(ws.recv(timeout=60))
            if frame["type"] in ("reply.done", "error"):
                return frame


def test_one_limit_counts_every_interface(e2e_stack: E2EStack, e2e_models: E2EModels) -> None:
    """/v1, conversation SSE and WebSocket replies of one key count against its one RPM, on either process."""
    secret, api_key = _key(requests_per_minute=3)
    model = LLMModel.objects.get(name=e2e_models.names[0])
    conversation = ConversationFactory(owner=api_key.user, model=model)
    url_a, url_b = e2e_stack.server_urls

    assert _post(url_a, secret, chat_body(model.name, max_tokens=4)).status_code == 200
    with httpx.Client(base_url=url_b, timeout=60, trust_env=False) as http_b:
        with conversation_sse(http_b, conversation.pk, secret, "Say hello") as source:
            events = [sse.event for sse in source.iter_sse()]
        assert events[-1] == "reply.done", events
        assert _websocket_reply(e2e_stack.ws_url, secret, conversation.pk)["type"] == "reply.done"
        messages = Message.objects.filter(conversation=conversation).count()

        # The fourth, on any interface, is refused before any reply starts, and leaves no message.
        with conversation_sse(http_b, conversation.pk, secret, "Say hello") as source:
            assert source.response.status_code == 429
            assert int(source.response.headers["Retry-After"]) >= 1
            refusals = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
    assert [event for event, _ in refusals] == ["error"], refusals
    assert refusals[0][1]["error"]["code"] == "rate_limit_exceeded"
    frame = _websocket_reply(e2e_stack.ws_url, secret, conversation.pk)
    assert frame["type"] == "error", frame
    assert (frame["error"]["code"], frame["error"]["type"]) == ("rate_limit_exceeded", "requests")
    _assert_refused(_post(url_b, secret, chat_body(model.name, max_tokens=4)), "requests")
    assert Message.objects.filter(conversation=conversation).count() == messages
    _wait_accounted(e2e_stack, api_key, total=6, refused=3)
