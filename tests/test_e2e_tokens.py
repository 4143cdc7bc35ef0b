"""End to end: token counts a usage row can be trusted for, and where they came from.

Real server, worker and simulator processes (tests/conftest.py). A reply stopped after k chunks
is billed for the tokens of the text it kept, counted by the model's tokenizer (``counted``); a
completed one carries the provider's usage (``provider``); a model without a known tokenizer is
estimated (``estimated``). Issue 8, item 4, and its acceptance point "a stream stopped after k
chunks".
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx
import pytest

from accounts.models import UsageRecord
from llm.tokens import tokenizer_for
from tests.factories import LLMModelFactory, ProviderFactory
from tests.kit import bearer, chunk_text, poll_until_sync, sse_data
from tests.test_e2e import (
    DEADLINE_SECONDS,
    assistant_messages,
    create_conversation,
    recorded_sse_events,
    send_over_sse,
    usage_records,
    ws_connect,
    ws_receive,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

O200K = tokenizer_for(setting="o200k_base", model_name="")


@pytest.fixture
def token_models(e2e_stack: Any, e2e_models: Any) -> None:
    """``tok-4o``: upstream ``gpt-4o-mini`` (tokenizer auto: o200k_base); ``tok-estimate``: the same,
    set to the estimate; ``tok-cut``: a provider whose streams the simulator drops after 5 words."""
    provider = ProviderFactory(
        name="simulator-tokens", base_url=e2e_stack.simulator.base_url, api_key=e2e_stack.provider_api_key
    )
    LLMModelFactory(name="tok-4o", provider=provider, upstream_model="gpt-4o-mini")
    LLMModelFactory(name="tok-estimate", provider=provider, upstream_model="gpt-4o-mini", tokenizer="estimate")
    cut = ProviderFactory(
        name="simulator-cut",
        base_url=e2e_stack.simulator.base_url,
        api_key=e2e_stack.provider_api_key,
        extra_headers={"X-Simulator-Fault": "drop-after=5"},
    )
    LLMModelFactory(name="tok-cut", provider=cut, upstream_model="gpt-4o-mini")


def stop_over_websocket(stack: Any, user: Any, conversation_id: int, content: str, k: int) -> int:
    """Send ``content``, send ``reply.stop`` after ``k`` deltas; return the reply's message id once it ended."""
    with ws_connect(stack, conversation_id, user.access) as ws:
        ws.send(json.dumps({"type": "message.send", "content": content}))
        start = ws_receive(stack, ws)
        assert start["type"] == "reply.start", start
        for _ in range(k):
            frame = ws_receive(stack, ws)
            assert frame["type"] == "reply.delta", frame
        ws.send(json.dumps({"type": "reply.stop"}))
        frame = ws_receive(stack, ws)
        while frame["type"] == "reply.delta":
            frame = ws_receive(stack, ws)
    assert frame["type"] == "reply.done", frame
    assert frame["message"]["status"] == "cancelled"
    return start["message_id"]


def saved_message(http: httpx.Client, user: Any, conversation_id: int, message_id: int) -> dict[str, Any]:
    return poll_until_sync(
        lambda: {m["id"]: m for m in assistant_messages(http, user, conversation_id)}.get(message_id),
        lambda m: m is not None and m["status"] != "streaming",
        within=DEADLINE_SECONDS,
        what=f"message {message_id} to be saved",
    )


def test_a_reply_stopped_after_k_chunks_is_billed_for_the_tokenizers_count_of_its_saved_text(
    e2e_stack: Any, token_models: None, e2e_user: Any, http: httpx.Client
) -> None:
    conversation_id = create_conversation(http, e2e_user, model="tok-4o")
    prompt = f"Tell me a long story {secrets.token_hex(4)}"
    stopped_id = stop_over_websocket(e2e_stack, e2e_user, conversation_id, prompt, k=3)
    stopped = saved_message(http, e2e_user, conversation_id, stopped_id)

    follow_up = f"And another one {secrets.token_hex(4)}"
    with send_over_sse(http, e2e_user, conversation_id, follow_up) as source:
        events = list(recorded_sse_events(e2e_stack, source))
    assert events[-1][0] == "reply.done" and events[-1][1]["message"]["status"] == "completed"
    completed_id = events[0][1]["message_id"]

    records = {r.message_id: r for r in usage_records(e2e_stack, e2e_user.username, expected=2)}
    partial = records[stopped_id]
    assert stopped["content"]
    assert partial.token_source == UsageRecord.TokenSource.COUNTED
    assert partial.completion_tokens == O200K.count_text(stopped["content"])
    assert partial.prompt_tokens == O200K.count_prompt([{"role": "user", "content": prompt}])
    assert partial.finish_status == "cancelled"
    assert records[completed_id].token_source == UsageRecord.TokenSource.PROVIDER


def test_a_cut_v1_stream_is_counted_and_a_model_without_a_tokenizer_is_estimated(
    e2e_stack: Any, token_models: None, e2e_user: Any, http: httpx.Client
) -> None:
    body = {"model": "tok-cut", "stream": True, "messages": [{"role": "user", "content": "Count me"}]}
    response = http.post("/v1/chat/completions", json=body, headers=bearer(e2e_user.api_key))
    assert response.status_code == 200
    *payloads, last = sse_data(response.read())
    assert json.loads(last)["error"]["code"] == "upstream_disconnected"  # dropped after 5 words
    received = chunk_text(json.loads(payload) for payload in payloads)
    assert len(received.split()) == 5

    conversation_id = create_conversation(http, e2e_user, model="tok-estimate")
    stopped_id = stop_over_websocket(e2e_stack, e2e_user, conversation_id, f"Estimate me {secrets.token_hex(4)}", k=2)

    records = usage_records(e2e_stack, e2e_user.username, expected=2)
    [cut] = [r for r in records if r.model_name == "tok-cut"]
    assert (cut.finish_status, cut.token_source) == ("failed", UsageRecord.TokenSource.COUNTED)
    assert cut.completion_tokens == O200K.count_text(received)
    [estimated] = [r for r in records if r.message_id == stopped_id]
    assert estimated.token_source == UsageRecord.TokenSource.ESTIMATED
