"""The benchmark's load generator reads the streams real upstreams and this backend send.

A token is a frame with non-empty content: the framing around the tokens (a role-only first
chunk, an empty-delta finish chunk, the usage chunk) must not count, in both the framing where
the first chunk carries the role and the first token together and the one where it carries the
role alone (what OpenAI sends). Frames may arrive split over reads or several in one read.
The byte streams below are written out as the simulator and OpenAI frame them
(https://platform.openai.com/docs/api-reference/chat/streaming), Anthropic's Messages events as
its streaming guide shows them (https://docs.anthropic.com/en/docs/build-with-claude/streaming,
with a thinking block, a ping and a tool call around the text) and the Responses events as
OpenAI's reference does (https://platform.openai.com/docs/api-reference/responses-streaming,
with a reasoning item before the message).
"""

from __future__ import annotations

import json

import pytest

from bench.loadgen import SseTokenReader, chat_completion_body, messages_body, responses_body

WORDS = ["Hello", " there", ",", ' \\"quoted\\"', " friend"]
HEAD = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"sim-1",'
    '"service_tier":"default","system_fingerprint":"fp_sim","choices":[{"index":0,"delta":{'
)
USAGE = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"sim-1","choices":[],'
    '"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}\n\n'
)


def _chunk(delta: str, finish_reason: str | None = None) -> str:
    finish = "null" if finish_reason is None else f'"{finish_reason}"'
    return f'{HEAD}{delta}}},"logprobs":null,"finish_reason":{finish}}}],"usage":null}}\n\n'


def _role_with_first_token() -> bytes:
    """The framing of this tree's simulator: role and first token together, finish_reason on the last token."""
    frames = [_chunk(f'"role":"assistant","content":"{WORDS[0]}","refusal":null')]
    frames += [_chunk(f'"content":"{w}"') for w in WORDS[1:-1]]
    frames.append(_chunk(f'"content":"{WORDS[-1]}"', "stop"))
    return "".join([*frames, USAGE, "data: [DONE]\n\n"]).encode()


def _role_only_first() -> bytes:
    """OpenAI's framing: a role-only first chunk, one chunk per token, an empty-delta finish chunk."""
    frames = [_chunk('"role":"assistant","content":"","refusal":null')]
    frames += [_chunk(f'"content":"{w}"') for w in WORDS]
    frames.append(_chunk("", "stop"))
    return "".join([*frames, USAGE, "data: [DONE]\n\n"]).encode()


def _conversation_events() -> bytes:
    events = ['event: reply.start\ndata: {"message_id":7}\n\n', ": keep-alive\n\n"]
    events.append('event: reply.delta\ndata: {"content":""}\n\n')
    events += [f'event: reply.delta\ndata: {{"content":"{w}"}}\n\n' for w in WORDS]
    events.append('event: reply.done\ndata: {"message":{"id":8,"content":"..."}}\n\n')
    return "".join(events).encode()


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _anthropic_message() -> bytes:
    """A Messages stream: a thinking block, then text (one delta per word), then a tool_use block."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "bench-sim"}
    events = [_event("message_start", {"type": "message_start", "message": message})]
    thinking = {"type": "thinking", "thinking": "", "signature": ""}
    events.append(_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": thinking}))
    for delta in (
        {"type": "thinking_delta", "thinking": "Let me think"},
        {"type": "signature_delta", "signature": "E"},
    ):
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    text = {"type": "text", "text": ""}
    events.append(_event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": text}))
    events.append('event: ping\ndata: {"type": "ping"}\n\n')
    for word in WORDS:
        delta = {"type": "text_delta", "text": json.loads(f'"{word}"')}
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": delta}))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 1}))
    tool = {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}
    events.append(_event("content_block_start", {"type": "content_block_start", "index": 2, "content_block": tool}))
    delta = {"type": "input_json_delta", "partial_json": '{"text": "a query"}'}
    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": delta}))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 2}))
    usage = {"output_tokens": 7}
    stop = {"stop_reason": "tool_use", "stop_sequence": None}
    events.append(_event("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return "".join(events).encode()


def _responses_stream(end: str = "response.completed") -> bytes:
    """A Responses stream: a reasoning item, then a message item (one text delta per word), then ``end``."""
    counter = iter(range(100))

    def event(kind: str, **fields: object) -> str:
        return _event(kind, {"type": kind, **fields, "sequence_number": next(counter)})

    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    events = [event("response.created", response=response), event("response.in_progress", response=response)]
    events.append(event("response.output_item.added", output_index=0, item={"id": "rs_1", "type": "reasoning"}))
    events.append(event("response.reasoning_text.delta", item_id="rs_1", output_index=0, content_index=0, delta="Hm"))
    events.append(event("response.output_item.done", output_index=0, item={"id": "rs_1", "type": "reasoning"}))
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    events.append(event("response.output_item.added", output_index=1, item=item))
    part = {"type": "output_text", "text": "", "annotations": []}
    events.append(event("response.content_part.added", item_id="msg_1", output_index=1, content_index=0, part=part))
    events.append(": keep-alive\n\n")
    for word in WORDS:
        text = json.loads(f'"{word}"')
        events.append(
            event(
                "response.output_text.delta", item_id="msg_1", output_index=1, content_index=0, delta=text, logprobs=[]
            )
        )
    whole = "".join(json.loads(f'"{w}"') for w in WORDS)
    events.append(event("response.output_text.done", item_id="msg_1", output_index=1, content_index=0, text=whole))
    events.append(event(end, response={**response, "status": end.removeprefix("response.")}))
    return "".join(events).encode()


def _partial_reply() -> bytes:
    """The role-only chunk and the first token: a reply that fails after its first token."""
    return b"\n\n".join(_role_only_first().split(b"\n\n")[:2]) + b"\n\n"


def _reads(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("body", [_role_with_first_token(), _role_only_first()], ids=["role+token", "role-only"])
@pytest.mark.parametrize("read_size", [1, 7, 64, 100_000])
def test_openai_frames_count_only_content(body: bytes, read_size: int) -> None:
    for line in body.decode().split("\n\n")[:-2]:
        json.loads(line.removeprefix("data: "))  # the fixtures are well-formed chunks
    reader = SseTokenReader(api="chat_completions")
    for moment, data in enumerate(_reads(body, read_size)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == len(WORDS)
    assert reader.done
    assert reader.error is None


def test_ttft_is_the_first_non_empty_content_and_one_read_may_carry_several_frames() -> None:
    frames = _role_only_first().split(b"\n\n")
    role, tokens, rest = frames[0] + b"\n\n", [f + b"\n\n" for f in frames[1:6]], b"\n\n".join(frames[6:])
    reader = SseTokenReader(api="chat_completions")
    reader.feed(role, 1.0)
    reader.feed(tokens[0][:10], 1.5)  # a frame split over two reads counts when it is complete
    reader.feed(tokens[0][10:] + tokens[1], 2.0)
    reader.feed(b"".join(tokens[2:]) + rest, 3.0)  # three tokens, the finish, usage and [DONE] at once

    assert reader.token_times == [2.0, 2.0, 3.0, 3.0, 3.0]
    assert reader.done


def test_conversation_events_count_non_empty_deltas() -> None:
    reader = SseTokenReader(api="conversation")
    for moment, data in enumerate(_reads(_conversation_events(), 13)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == len(WORDS)
    assert reader.done
    assert reader.error is None


def test_a_conversation_reply_counts_the_tokens_its_reply_done_reports() -> None:
    # The server joins the tokens that arrived together into one reply.delta: two frames, 5 tokens.
    body = (
        b'event: reply.delta\ndata: {"content":"Hello there,"}\n\n'
        b'event: reply.delta\ndata: {"content":" \\"quoted\\" friend"}\n\n'
        b'event: reply.done\ndata: {"message":{"id":1,"content":"...","completion_tokens":5}}\n\n'
    )
    reader = SseTokenReader(api="conversation")
    for moment, data in enumerate(_reads(body, 7)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == 2
    assert reader.tokens == 5
    assert reader.done


@pytest.mark.parametrize("read_size", [1, 7, 64, 100_000])
def test_anthropic_messages_count_only_text_deltas(read_size: int) -> None:
    # Not the thinking, signature or tool-input deltas (whose JSON holds a "text" key, escaped),
    # nor the empty text of content_block_start; message_stop ends the reply.
    reader = SseTokenReader(api="messages")
    for moment, data in enumerate(_reads(_anthropic_message(), read_size)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == len(WORDS)
    assert reader.done
    assert reader.error is None
    assert reader.tokens is None


@pytest.mark.parametrize("read_size", [1, 7, 64, 100_000])
def test_responses_count_only_output_text_deltas(read_size: int) -> None:
    # Not the reasoning delta, the created/added events' empty texts or output_text.done's whole text.
    reader = SseTokenReader(api="responses")
    for moment, data in enumerate(_reads(_responses_stream(), read_size)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == len(WORDS)
    assert reader.done
    assert reader.error is None


@pytest.mark.parametrize("api", ["messages", "responses"])
def test_ttft_is_the_first_text_delta_of_an_evented_api(api: str) -> None:
    body = _anthropic_message() if api == "messages" else _responses_stream()
    events = [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]
    first = next(i for i, e in enumerate(events) if f'"{WORDS[0]}"'.encode() in e)
    reader = SseTokenReader(api=api)
    reader.feed(b"".join(events[:first]), 1.0)  # the framing and the reasoning: no token yet
    reader.feed(events[first][:20], 1.5)  # the event line alone
    reader.feed(events[first][20:], 2.0)
    reader.feed(b"".join(events[first + 1 :]), 3.0)

    assert reader.token_times == [2.0, 3.0, 3.0, 3.0, 3.0]
    assert reader.done


def test_an_event_type_lasts_until_the_blank_line_that_ends_its_event() -> None:
    # A data line without its own event line is a "message" event (the SSE spec's default), not the
    # previous event's type: it must not count as a text delta.
    body = (
        b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'data: {"delta":{"type":"text_delta","text":"not an event of that type"}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    reader = SseTokenReader(api="messages")
    reader.feed(body, 0.0)

    assert reader.token_times == [0.0]
    assert reader.done


def test_an_unknown_api_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown api 'gemini'"):
        SseTokenReader(api="gemini")


_ANTHROPIC_ERROR = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)
_RESPONSES_ERROR = (
    b'event: error\ndata: {"type":"error","code":"server_error","message":"upstream failed","param":null,'
    b'"sequence_number":9}\n\n'
    b'event: response.failed\ndata: {"type":"response.failed","response":{"status":"failed"},"sequence_number":10}\n\n'
)


def _first_token_of(body: bytes, marker: bytes) -> bytes:
    """``body`` up to and including its first event that contains ``marker``."""
    events = body.split(b"\n\n")
    index = next(i for i, e in enumerate(events) if marker in e)
    return b"\n\n".join(events[: index + 1]) + b"\n\n"


@pytest.mark.parametrize(
    ("api", "body", "kind", "tokens"),
    [
        ("chat_completions", _partial_reply() + b'data: {"error":{"message":"upstream failed"}}\n\n', "error frame", 1),
        ("conversation", b'event: error\ndata: {"error":{"message":"no such model"}}\n\n', "error event", 0),
        ("messages", _first_token_of(_anthropic_message(), b'"Hello"') + _ANTHROPIC_ERROR, "error event", 1),
        ("messages", _ANTHROPIC_ERROR, "error event", 0),
        ("responses", _first_token_of(_responses_stream(), b'"Hello"') + _RESPONSES_ERROR, "error event", 1),
        ("responses", _responses_stream(end="response.incomplete"), "response.incomplete event", len(WORDS)),
    ],
    ids=["chat", "conversation", "messages-midstream", "messages-at-once", "responses-failed", "responses-incomplete"],
)
def test_errors_are_reported(api: str, body: bytes, kind: str, tokens: int) -> None:
    reader = SseTokenReader(api=api)
    reader.feed(body, 0.0)

    assert reader.error is not None and reader.error.startswith(kind), reader.error
    assert len(reader.token_times) == tokens
    assert not reader.done


def test_messages_and_responses_requests_carry_the_chat_requests_conversation() -> None:
    chat = json.loads(chat_completion_body(model="bench-sim", prompt="Tell me", max_tokens=256))
    messages = json.loads(messages_body(model="bench-sim", prompt="Tell me", max_tokens=256))
    responses = json.loads(responses_body(model="bench-sim", prompt="Tell me", max_tokens=256))

    system, user = (m["content"] for m in chat["messages"])
    assert messages == {
        "model": "bench-sim",
        "max_tokens": 256,
        "system": system,
        "messages": [{"role": "user", "content": user}],
        "stream": True,
        "temperature": chat["temperature"],
        "top_p": chat["top_p"],
    }
    assert responses == {
        "model": "bench-sim",
        "instructions": system,
        "input": user,
        "stream": True,
        "max_output_tokens": 256,
        "temperature": chat["temperature"],
        "top_p": chat["top_p"],
    }


def test_chat_completion_request_is_shaped_like_real_clients() -> None:
    body = json.loads(chat_completion_body(model="bench-sim", prompt="Tell me", max_tokens=256))

    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == "Tell me"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 256
    assert {k: body[k] for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty")} == {
        "temperature": 0.5,
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
    }
