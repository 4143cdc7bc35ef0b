"""Anthropic content blocks from OpenAI chunks, for what the upstreams in the HTTP tests do not send:
several tool calls, numbered by ``index`` or all at index 0 with their own ids, and arguments
that are not a JSON object. The streamed events are folded by the official SDK's own accumulator
(the code behind ``messages.stream().get_final_message()``), so both paths are held to one result.
"""

from __future__ import annotations

import json
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from llm.anthropic.frames import MessageCollector, _StreamBlocks, stop_reason
from llm.openai.services import ChatCompletionPlan
from llm.providers import ChatChunk, ChatRequest, ProviderConfig, Usage
from llm.streaming import ReplyOutcome, ReplyStatus

_EVENT = TypeAdapter(RawMessageStreamEvent)


def _call(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name:
        function["name"] = name
    entry: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        entry.update(id=call_id, type="function")
    return entry


PARALLEL = [  # two calls, OpenAI's numbering
    ChatChunk(content="Checking."),
    ChatChunk(tool_calls=[_call(0, "call_a", "get_weather", "")]),
    ChatChunk(tool_calls=[_call(0, None, None, '{"city":"Paris"}')]),
    ChatChunk(tool_calls=[_call(1, "call_b", "get_time", '{"tz":')]),
    ChatChunk(tool_calls=[_call(1, None, None, '"CET"}')], finish_reason="tool_calls"),
]
SAME_INDEX = [  # two calls, both at index 0 (some servers), each whole in one delta
    ChatChunk(tool_calls=[_call(0, "call_a", "get_weather", '{"city":"Paris"}')]),
    ChatChunk(tool_calls=[_call(0, "call_b", "get_time", '{"tz":"CET"}')], finish_reason="tool_calls"),
]
EXPECTED_CALLS = [
    {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
    {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "CET"}},
]


def _plan() -> ChatCompletionPlan:
    return ChatCompletionPlan(
        provider=ProviderConfig(kind="openai_compatible", base_url="http://127.0.0.1:9/v1"),
        request=ChatRequest(model="m", messages=[]),
        model_name="m",
        reply_id="msg_test",
        created=0,
        stream=False,
        include_usage=False,
    )


def _outcome() -> ReplyOutcome:
    return ReplyOutcome(
        status=ReplyStatus.COMPLETED,
        model_name="m",
        content="",
        reasoning_content="",
        finish_reason="tool_calls",
        usage=Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=3),
        usage_source="provider",
        time_to_first_token_ms=1.0,
        duration_ms=2.0,
    )


def _streamed_blocks(chunks: list[ChatChunk]) -> list[dict[str, Any]]:
    """Return the content the SDK's accumulator builds from our streamed events for ``chunks``."""
    blocks = _StreamBlocks()
    body = b"".join(blocks.chunk(chunk) for chunk in chunks) + blocks.finish()
    start = {"type": "message_start", "message": {**_message_stub(), "content": []}}
    json_bufs: dict[int, bytes] = {}  # the SDK's buffers of partial tool inputs, by block index
    snapshot = accumulate_event(event=_EVENT.validate_python(start), current_snapshot=None, json_bufs=json_bufs)
    for frame in body.decode().split("\n\n"):
        if not frame:
            continue
        kind, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        snapshot = accumulate_event(event=_EVENT.validate_python(event), current_snapshot=snapshot, json_bufs=json_bufs)
    return [block.model_dump(exclude_none=True) for block in snapshot.content]


def _message_stub() -> dict[str, Any]:
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    }


def _whole_blocks(chunks: list[ChatChunk]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    collector = MessageCollector()
    for chunk in chunks:
        collector.add(chunk)
    message = collector.message(_plan(), _outcome())
    return message["content"], message


def test_parallel_tool_calls_become_one_tool_use_block_each_streamed_and_whole():
    content, message = _whole_blocks(PARALLEL)
    assert content == [{"type": "text", "text": "Checking."}, *EXPECTED_CALLS]
    assert message["stop_reason"] == "tool_use"
    # Anthropic's input_tokens leave out the cache's tokens, which are reported apart.
    assert message["usage"] == {
        "input_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
        "output_tokens": 4,
    }
    streamed = _streamed_blocks(PARALLEL)
    assert [block["type"] for block in streamed] == ["text", "tool_use", "tool_use"]
    assert [(b["id"], b["name"], b["input"]) for b in streamed[1:]] == [
        (c["id"], c["name"], c["input"]) for c in EXPECTED_CALLS
    ]


def test_calls_that_share_index_0_are_told_apart_by_their_ids():
    content, _ = _whole_blocks(SAME_INDEX)
    assert content == EXPECTED_CALLS
    streamed = _streamed_blocks(SAME_INDEX)
    assert [(b["id"], b["input"]) for b in streamed] == [(c["id"], c["input"]) for c in EXPECTED_CALLS]


def test_text_and_calls_begun_while_a_call_streams_wait_for_its_late_fragments():
    """Text, then another call, begin before the first call's arguments are whole: its block stays
    open for them, and the others follow it whole, in the order they began (as in a whole reply)."""
    chunks = [
        ChatChunk(tool_calls=[_call(0, "call_a", "get_weather", '{"city":')]),
        ChatChunk(content="Also the time."),
        ChatChunk(tool_calls=[_call(1, "call_b", "get_time", '{"tz":')]),
        ChatChunk(tool_calls=[_call(0, None, None, '"Paris"}')]),
        ChatChunk(content=" Done."),
        ChatChunk(tool_calls=[_call(1, None, None, '"CET"}')], finish_reason="tool_calls"),
    ]
    expected = [EXPECTED_CALLS[0], {"type": "text", "text": "Also the time."}, EXPECTED_CALLS[1]]
    expected.append({"type": "text", "text": " Done."})
    assert _whole_blocks(chunks)[0] == expected
    assert _streamed_blocks(chunks) == expected


def test_arguments_that_are_not_an_object_are_kept_not_lost():
    content, _ = _whole_blocks([ChatChunk(tool_calls=[_call(0, "call_x", "f", "[1, 2")])])
    assert content == [{"type": "tool_use", "id": "call_x", "name": "f", "input": {"arguments": "[1, 2"}}]


def test_stop_reasons():
    assert stop_reason("stop", used_tools=False) == "end_turn"
    assert stop_reason("length", used_tools=False) == "max_tokens"
    assert stop_reason("tool_calls", used_tools=True) == "tool_use"
    assert stop_reason("content_filter", used_tools=False) == "refusal"
    assert stop_reason(None, used_tools=True) == "tool_use"
    assert stop_reason(None, used_tools=False) == "end_turn"
