"""The engine's events as Anthropic Messages: SSE events for a stream, a ``message`` object for a whole reply.

Spec: https://docs.anthropic.com/en/docs/build-with-claude/streaming and
https://docs.anthropic.com/en/api/messages (the ``Message`` object). Each SSE event is
``event: <type>\\ndata: <JSON with the same "type">\\n\\n``, in this order::

    message_start                      (the message, empty content, usage.input_tokens)
    content_block_start  index i       (a thinking, text or tool_use block)
    content_block_delta  index i  ...  (thinking_delta, text_delta, input_json_delta)
    content_block_stop   index i
    ...                                (the next block)
    message_delta                      (stop_reason, usage)
    message_stop

``message_start`` goes out with the first chunks (or the end of a reply without any): its
``message.model`` is the model that served the reply (``Reply.model_name``: a fallback's name when
one did), which is known only then. So the ``ping`` events that flow while the upstream is silent
before its first chunk (proxies drop idle reads) may come before it: Anthropic's streams may carry
pings anywhere, and its SDKs drop them before they read the event order. An upstream failure
after the headers, or a reply the server stopped (its key revoked, a shutdown), is an ``error``
event and ends the stream, as Anthropic sends one.

From OpenAI chunks (``llm.providers.ChatChunk``): ``reasoning_content`` → a ``thinking`` block
(with an empty ``signature``: there is none to give), ``content`` → a ``text`` block, each
``tool_calls`` entry that opens a call (a new ``index``) → a ``tool_use`` block whose ``input``
streams as the call's ``arguments`` fragments (``input_json_delta``). A change of kind closes the
open block, except a ``tool_use`` block's: it stays open to the end of the reply, for fragments of
its call that an upstream interleaves with the next calls, which are held and sent whole after it
(``_StreamBlocks``). A call that the output limit cuts off streams the fragments that came, as
Anthropic streams one (the SDK folds the unfinished JSON as it can; the whole ``message`` has an
empty ``input``: ``MessageCollector.message``). ``finish_reason`` → ``stop_reason``: ``stop`` →
``end_turn``, or ``stop_sequence`` with the sequence when the upstream said which one matched
(``ChatChunk.stop_sequence``: an Anthropic upstream does; OpenAI's wire does not, so
``stop_sequence`` is null after one), ``length`` → ``max_tokens``, ``tool_calls`` /
``function_call`` → ``tool_use``, ``content_filter`` → ``refusal``.
An OpenAI ``refusal`` (the model declined, in words, with ``finish_reason`` ``stop``) → its text
in a ``text`` block, and ``stop_reason`` ``refusal``: Anthropic's Messages has no refusal block,
and its own refusals are exactly that, a ``refusal`` stop with whatever text came before it; the
text is kept because it is what the model said, and an Anthropic client shows text blocks.
Usage in Anthropic's terms: ``input_tokens`` excludes the cache's tokens, which are
``cache_read_input_tokens`` / ``cache_creation_input_tokens``; ``message_start`` carries the
prompt's tokens as counted before the call (``plan.metering``), ``message_delta`` the final count.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..openai.services import ChatCompletionPlan
from ..providers import ChatChunk, Usage
from ..streaming import KEEPALIVE, Reply, ReplyDelta, ReplyDone, ReplyFailed, ReplyOutcome
from .errors import anthropic_error_body

logger = logging.getLogger(__name__)

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def new_message_id() -> str:
    """Return a fresh message id: ``msg_`` + 32 hex digits (also the usage record's request id)."""
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(
    finish_reason: str | None, *, used_tools: bool, refused: bool = False, stop_sequence: str | None = None
) -> str:
    """Return Anthropic's ``stop_reason`` for OpenAI's ``finish_reason`` (None: ``end_turn``, or ``tool_use``).

    ``refused``: the reply carried an OpenAI ``refusal``; a reply that ended by itself (``stop`` or
    no reason) is then a ``refusal`` stop. ``stop_sequence``: the sequence the upstream said ended a
    ``stop`` (``ChatChunk.stop_sequence``): ``stop_sequence``.
    """
    if refused and finish_reason in (None, "stop"):
        return "refusal"
    if stop_sequence is not None and finish_reason == "stop":
        return "stop_sequence"
    if finish_reason is None:
        return "tool_use" if used_tools else "end_turn"
    return STOP_REASONS.get(finish_reason, "end_turn")


def usage_object(usage: Usage) -> dict[str, int]:
    """Return Anthropic's ``usage`` for the engine's ``Usage`` (whose ``prompt_tokens`` counts the cache's too)."""
    return {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens - usage.cache_creation_tokens, 0),
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {_encode(body)}\n\n".encode()


def _tool_use_block(entry: dict[str, Any]) -> dict[str, Any]:
    """Return the ``tool_use`` block (empty ``input``) opened by an OpenAI ``tool_calls`` entry.

    The call's id is kept (``call_...`` from OpenAI: the client sends it back in its
    ``tool_result``, and the upstream recognises it); a call without one gets a ``toolu_`` id.
    """
    call_id = entry.get("id")
    if not (isinstance(call_id, str) and call_id):
        call_id = f"toolu_{uuid.uuid4().hex[:24]}"
    name = (entry.get("function") or {}).get("name") or ""
    return {"type": "tool_use", "id": call_id, "name": name, "input": {}}


def _starts_another_call(entry: dict[str, Any], current_id: str | None) -> bool:
    """Return True when ``entry`` opens a new call at an index already used (some servers number every call 0)."""
    call_id = entry.get("id")
    return bool(call_id) and current_id is not None and call_id != current_id


def _message(plan: ChatCompletionPlan, model_name: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": plan.reply_id,
        "type": "message",
        "role": "assistant",
        "model": model_name,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
    }


class _HeldBlock:
    """A content block held back while a ``tool_use`` block is open: its empty block and its parts."""

    __slots__ = ("block", "parts")

    def __init__(self, block: dict[str, Any]) -> None:
        self.block = block  # as its content_block_start carries it
        self.parts: list[str] = []  # its text, thinking or arguments fragments

    def frames(self, index: int) -> bytes:
        """Return its start, one delta with its whole content (none when empty) and its stop, at ``index``."""
        kind = self.block["type"]
        frames = _event(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": self.block}
        )
        content = "".join(self.parts)
        if content:
            if kind == "tool_use":
                delta = {"type": "input_json_delta", "partial_json": content}
            elif kind == "thinking":
                delta = {"type": "thinking_delta", "thinking": content}
            else:
                delta = {"type": "text_delta", "text": content}
            frames += _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        return frames + _event("content_block_stop", {"type": "content_block_stop", "index": index})


class _StreamBlocks:
    """The open content block of a stream, and the frames that open, extend and close blocks.

    A ``tool_use`` block stays open until the reply ends (``finish``): an upstream may still send
    fragments of a call's arguments after another call (or text) began, and Anthropic's stream
    cannot reopen a closed block. What begins while one is open (another call, text, thinking) is
    held, in order, and goes out at the end as whole blocks (start, one delta, stop), so every
    block's content is complete and blocks still follow each other. OpenAI and most servers send
    one call after another, the last at the end of the reply: the held calls then come out a few
    tokens later than they would have.
    """

    __slots__ = (
        "_calls",
        "_held",
        "index",
        "kind",
        "refused",
        "text_head",
        "thinking_head",
        "used_tools",
    )

    def __init__(self) -> None:
        self.index = -1  # of the open block
        self.kind: str | None = None  # "text", "thinking", "tool_use" or None (none open)
        # OpenAI tool call index -> its call: its id, and its held block (None: the open block).
        self._calls: dict[int, tuple[str, _HeldBlock | None]] = {}
        self._held: list[_HeldBlock] = []  # blocks begun while a tool_use block was open, in order
        self.used_tools = False
        self.refused = False
        self.text_head = b""
        self.thinking_head = b""

    def close(self) -> bytes:
        if self.kind is None:
            return b""
        self.kind = None
        return f'event: content_block_stop\ndata: {{"type":"content_block_stop","index":{self.index}}}\n\n'.encode()

    def finish(self) -> bytes:
        """Return the frames that close the open block and send the held ones, at the reply's end."""
        frames = self.close()
        for held in self._held:
            frames += held.frames(self.index + 1)
            self.index += 1
        self._held = []
        self._calls = {}
        return frames

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        frames = self.close()
        self.index += 1
        self.kind = kind
        head = f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":{self.index},"delta":'
        if kind == "text":
            self.text_head = (head + '{"type":"text_delta","text":').encode()
        elif kind == "thinking":
            self.thinking_head = (head + '{"type":"thinking_delta","thinking":').encode()
        return frames + _event(
            "content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}
        )

    def _hold(self, block: dict[str, Any]) -> _HeldBlock:
        """Return the held block of ``block``'s kind to extend: the last held one, or a new one."""
        if self._held and block["type"] != "tool_use" and self._held[-1].block["type"] == block["type"]:
            return self._held[-1]
        held = _HeldBlock(block)
        self._held.append(held)
        return held

    def text(self, text: str) -> bytes:
        if self.kind == "tool_use":
            self._hold({"type": "text", "text": ""}).parts.append(text)
            return b""
        frames = b"" if self.kind == "text" else self._open("text", {"type": "text", "text": ""})
        return frames + self.text_head + _encode_str(text).encode() + b"}}\n\n"

    def thinking(self, text: str) -> bytes:
        if self.kind == "tool_use":
            self._hold({"type": "thinking", "thinking": "", "signature": ""}).parts.append(text)
            return b""
        frames = (
            b""
            if self.kind == "thinking"
            else self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        )
        return frames + self.thinking_head + _encode_str(text).encode() + b"}}\n\n"

    def tool_calls(self, entries: list[dict[str, Any]]) -> bytes:
        frames = b""
        for entry in entries:
            call_index = entry.get("index", 0)
            function = entry.get("function") or {}
            call = self._calls.get(call_index)
            if call is None or _starts_another_call(entry, call[0]):
                block = _tool_use_block(entry)
                self.used_tools = True
                if self.kind == "tool_use":  # kept open for its late fragments: this call waits
                    call = (block["id"], self._hold(block))
                else:
                    frames += self._open("tool_use", block)
                    call = (block["id"], None)
                self._calls[call_index] = call
            held = call[1]
            arguments = function.get("arguments")
            if held is not None:
                if function.get("name") and not held.block["name"]:
                    held.block["name"] = function["name"]
                if arguments:
                    held.parts.append(arguments)
            elif arguments:
                delta = {"type": "input_json_delta", "partial_json": arguments}
                frames += _event(
                    "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}
                )
        return frames

    def chunk(self, chunk: ChatChunk) -> bytes:
        frames = b""
        if chunk.reasoning_content:
            frames += self.thinking(chunk.reasoning_content)
        if chunk.content:
            frames += self.text(chunk.content)
        if chunk.refusal:
            self.refused = True
            frames += self.text(chunk.refusal)
        if chunk.tool_calls:
            frames += self.tool_calls(chunk.tool_calls)
        return frames


async def message_stream_frames(reply: Reply[ChatCompletionPlan], *, keepalive: float) -> AsyncIterator[bytes]:
    """Yield the SSE body of ``reply`` as UTF-8 bytes, Anthropic's events (see the module docstring).

    The chunks of one ``ReplyDelta`` go out as one part (one write); a plain text chunk (nearly
    every token) costs one JSON string escape.
    """
    plan = reply.plan
    blocks = _StreamBlocks()
    finish_reason: str | None = None
    matched: str | None = None  # the stop sequence that ended the reply, when the upstream said
    started = False

    def message_start() -> bytes:
        nonlocal started
        started = True
        prompt_tokens = plan.metering.prompt_tokens if plan.metering is not None else 0
        message = _message(plan, reply.model_name, [])
        message["usage"] = usage_object(Usage(prompt_tokens=prompt_tokens, completion_tokens=0))
        return _event("message_start", {"type": "message_start", "message": message})

    async for event in reply.events(keepalive=keepalive):
        if type(event) is ReplyDelta:
            parts = [] if started else [message_start()]  # once per reply, at its first chunks
            for chunk in event.chunks:
                if (
                    chunk.content
                    and not (chunk.reasoning_content or chunk.tool_calls or chunk.refusal)
                    and blocks.kind == "text"
                ):
                    parts.append(blocks.text_head + _encode_str(chunk.content).encode() + b"}}\n\n")
                else:
                    parts.append(blocks.chunk(chunk))
                if chunk.finish_reason:
                    finish_reason, matched = chunk.finish_reason, chunk.stop_sequence
            frames = parts[0] if len(parts) == 1 else b"".join(parts)
            if frames:  # a chunk of only a finish_reason has nothing to send yet
                yield frames
        elif event is KEEPALIVE:
            yield PING
        elif type(event) is ReplyDone or type(event) is ReplyFailed:
            start = b"" if started else message_start()
            # A failure, or a reply stopped by the server (a revoked key, a shutdown).
            error = event.error if type(event) is ReplyFailed else event.outcome.error
            if error is not None:
                yield start + blocks.finish() + _event("error", anthropic_error_body(error))
                continue
            reason = stop_reason(
                finish_reason, used_tools=blocks.used_tools, refused=blocks.refused, stop_sequence=matched
            )
            delta = {"stop_reason": reason, "stop_sequence": matched if reason == "stop_sequence" else None}
            body = {"type": "message_delta", "delta": delta, "usage": usage_object(event.outcome.usage)}
            yield start + blocks.finish() + _event("message_delta", body) + MESSAGE_STOP


class MessageCollector:
    """Fold a reply's chunks into the content blocks of a whole ``message`` (same rules as the stream)."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.refused = False
        self._tool_blocks: dict[int, dict[str, Any]] = {}  # OpenAI tool call index -> its open block
        self._arguments: dict[int, list[str]] = {}  # OpenAI tool call index -> its open call's fragments
        self._calls: list[tuple[dict[str, Any], list[str]]] = []  # every call: its block, its fragments

    def _append(self, kind: str, key: str, text: str) -> None:
        last = self.content[-1] if self.content else None
        if last is not None and last["type"] == kind:
            last[key] += text
        else:
            self.content.append(
                {"type": kind, key: text, "signature": ""} if kind == "thinking" else {"type": kind, key: text}
            )

    def add(self, chunk: ChatChunk) -> None:
        """Add one chunk's reasoning, text, refusal (as text), tool call fragments and ``finish_reason``."""
        if chunk.reasoning_content:
            self._append("thinking", "thinking", chunk.reasoning_content)
        if chunk.content:
            self._append("text", "text", chunk.content)
        if chunk.refusal:
            self.refused = True
            self._append("text", "text", chunk.refusal)
        for entry in chunk.tool_calls or ():
            call_index = entry.get("index", 0)
            function = entry.get("function") or {}
            block = self._tool_blocks.get(call_index)
            if block is None or _starts_another_call(entry, block["id"]):
                block = _tool_use_block(entry)
                self._tool_blocks[call_index] = block
                fragments: list[str] = []
                self._arguments[call_index] = fragments
                self._calls.append((block, fragments))
                self.content.append(block)
            elif function.get("name") and not block["name"]:
                block["name"] = function["name"]
            if function.get("arguments"):
                self._arguments[call_index].append(function["arguments"])
        if chunk.finish_reason:
            self.finish_reason, self.stop_sequence = chunk.finish_reason, chunk.stop_sequence

    def message(self, plan: ChatCompletionPlan, outcome: ReplyOutcome) -> dict[str, Any]:
        """Return Anthropic's ``Message`` object of the finished reply.

        A call's ``input`` is its arguments' JSON object; other arguments (not an object, or not
        JSON) are kept as ``{"arguments": <their text>}``. A call whose arguments the output limit cut
        off (``stop_reason`` ``max_tokens``, arguments that do not parse) has an empty ``input``, as
        Anthropic answers one: its unfinished text is not arguments the tool takes.
        """
        cut = self.finish_reason == "length"
        for block, fragments in self._calls:
            arguments = "".join(fragments)
            try:
                value = json.loads(arguments) if arguments else {}
            except ValueError:
                value = {} if cut else None
            if not isinstance(value, dict):
                # Anthropic's ``input`` is an object; keep what the model wrote rather than lose it.
                logger.warning(
                    "tool call %s of reply %s has arguments that are not a JSON object", block["id"], plan.reply_id
                )
                value = {"arguments": arguments}
            block["input"] = value
        message = _message(plan, outcome.model_name, self.content)
        message["stop_reason"] = reason = stop_reason(
            self.finish_reason, used_tools=bool(self._calls), refused=self.refused, stop_sequence=self.stop_sequence
        )
        if reason == "stop_sequence":
            message["stop_sequence"] = self.stop_sequence
        message["usage"] = usage_object(outcome.usage)
        return message


__all__ = ["MessageCollector", "message_stream_frames", "new_message_id", "stop_reason", "usage_object"]
