"""The benchmark's load generator reads the streams real upstreams and this backend send.

A token is a frame with non-empty content: the framing around the tokens (a role-only first
chunk, an empty-delta finish chunk, the usage chunk) must not count, in both the framing where
the first chunk carries the role and the first token together and the one where it carries the
role alone (what OpenAI sends). Frames may arrive split over reads or several in one read.
The byte streams below are written out as the simulator and OpenAI frame them
(https://platform.openai.com/docs/api-reference/chat/streaming).
"""

from __future__ import annotations

import json

import pytest

from bench.loadgen import SseTokenReader, chat_completion_body

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
    reader = SseTokenReader(conversation=False)
    for moment, data in enumerate(_reads(body, read_size)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == len(WORDS)
    assert reader.done
    assert reader.error is None


def test_ttft_is_the_first_non_empty_content_and_one_read_may_carry_several_frames() -> None:
    frames = _role_only_first().split(b"\n\n")
    role, tokens, rest = frames[0] + b"\n\n", [f + b"\n\n" for f in frames[1:6]], b"\n\n".join(frames[6:])
    reader = SseTokenReader(conversation=False)
    reader.feed(role, 1.0)
    reader.feed(tokens[0][:10], 1.5)  # a frame split over two reads counts when it is complete
    reader.feed(tokens[0][10:] + tokens[1], 2.0)
    reader.feed(b"".join(tokens[2:]) + rest, 3.0)  # three tokens, the finish, usage and [DONE] at once

    assert reader.token_times == [2.0, 2.0, 3.0, 3.0, 3.0]
    assert reader.done


def test_conversation_events_count_non_empty_deltas() -> None:
    reader = SseTokenReader(conversation=True)
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
    reader = SseTokenReader(conversation=True)
    for moment, data in enumerate(_reads(body, 7)):
        reader.feed(data, float(moment))

    assert len(reader.token_times) == 2
    assert reader.tokens == 5
    assert reader.done


@pytest.mark.parametrize(
    ("conversation", "body", "kind"),
    [
        (False, _partial_reply() + b'data: {"error":{"message":"upstream failed"}}\n\n', "error frame"),
        (True, b'event: error\ndata: {"error":{"message":"no such model"}}\n\n', "error event"),
    ],
)
def test_errors_are_reported(conversation: bool, body: bytes, kind: str) -> None:
    reader = SseTokenReader(conversation=conversation)
    reader.feed(body, 0.0)

    assert reader.error is not None and reader.error.startswith(kind)
    assert len(reader.token_times) == (0 if conversation else 1)
    assert not reader.done


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
