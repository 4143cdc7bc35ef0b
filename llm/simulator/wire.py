"""OpenAI's chat-completions wire format, as the simulator writes it: requests, bodies, SSE frames.

Specs: https://platform.openai.com/docs/api-reference/chat/streaming (chunk objects and SSE
framing), https://platform.openai.com/docs/api-reference/chat/create, and the OpenAPI file
/work/shared/specs/openai-openapi.yaml (``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``ListModelsResponse``, ``ErrorResponse``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .replies import WORDS, words_text

# JSON string literals, encoded once: the first token has no leading space, later ones do.
_FIRST_TOKEN_JSON = tuple(json.dumps(word).encode() for word in WORDS)
_NEXT_TOKEN_JSON = tuple(json.dumps(" " + word).encode() for word in WORDS)

# What a refusal says (``X-Simulator-Fault: refusal``), one word per chunk, as OpenAI's models word it.
REFUSAL_WORDS = tuple("I'm sorry, but I can't help with that.".split())
REFUSAL_TEXT = " ".join(REFUSAL_WORDS)
_REFUSAL_TOKEN_JSON = tuple(json.dumps(word if i == 0 else " " + word).encode() for i, word in enumerate(REFUSAL_WORDS))
# The source a reply cites with ``X-Simulator-Fault: annotations`` (an address that never resolves).
CITATION_URL = "https://simulator.invalid/sources/1"

SYSTEM_FINGERPRINT = "fp_llm_simulator"
_SYSTEM_FINGERPRINT = SYSTEM_FINGERPRINT
_MODEL_CREATED = 1_700_000_000
# Process-unique id prefix plus a counter: cheaper than random ids per request, still unique.
_ID_PREFIX = f"chatcmpl-sim{os.getpid():x}{int(time.time()):x}"
_ids = itertools.count(1)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
MALFORMED_CHUNK = b'data: {"id": "broken", "choices": [\n\n'  # a ``data:`` line that is not JSON
_DETAILS = {  # the usage breakdowns OpenAI sends, all zero here
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def new_completion_id() -> str:
    """Return a new ``chatcmpl-...`` id, unique within this process and across processes."""
    return f"{_ID_PREFIX}{next(_ids)}"


def error_response(
    status: int, message: str, *, type_: str, code: str | None = None, param: str | None = None
) -> web.Response:
    """Return OpenAI's error response ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


def simulated_error(status: int, model: str, *, retry_after: int = 1) -> web.Response:
    """Return the error OpenAI would send with ``status`` (messages modelled on OpenAI's own).

    A 429 carries ``Retry-After: <retry_after>`` (seconds), as OpenAI's rate limits do, and the
    ``retry-after-ms`` header the openai SDKs read first.
    """
    if status == 429:
        message = (
            f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1. "
            f"Please try again in {retry_after}s."
        )
        response = error_response(429, message, type_="requests", code="rate_limit_exceeded")
        response.headers["Retry-After"] = str(retry_after)
        response.headers["retry-after-ms"] = str(retry_after * 1000)
        return response
    if status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_response(404, message, type_="invalid_request_error", code="model_not_found")
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return error_response(status, message, type_="server_error")
    return error_response(status, f"Simulated error {status} for model {model}.", type_="invalid_request_error")


FAULT_HEADER = "X-Simulator-Fault"


@dataclass(frozen=True, slots=True)
class Fault:
    """The failures one request asked for (``X-Simulator-Fault``; see ``parse_fault``).

    ``status``: answer this status (400..599) with OpenAI's error body before anything streams
    (``retry_after`` seconds in ``Retry-After`` on a 429). ``drop_after``: close the TCP
    connection after that many content tokens (the chunked body left unterminated).
    ``malformed_after``: after that many tokens send a ``data:`` line that is not JSON, then
    ``[DONE]``. ``stall``: seconds of silence after ``stall_after`` tokens. ``ttft``: seconds
    before the first token, instead of the configured ``ttft_ms``. Token counts are of content
    tokens; the role chunk goes out with the first one.

    Not failures, but per-request usage reports on the same header: ``cached_tokens`` of the
    prompt reported as read from a prompt cache (at most the prompt's tokens) and
    ``reasoning_tokens`` reported as spent reasoning, added to ``completion_tokens`` as OpenAI's
    reasoning models do (no reasoning text is streamed for them, as OpenAI streams none).

    Not failures either, what a model may answer instead of plain text (OpenAI chat completions
    only): ``refusal``, the model declines — ``REFUSAL_TEXT`` streamed word by word as
    ``delta.refusal`` (the whole object's ``message.refusal``, its ``content`` null), no logprobs;
    ``annotations``, the reply cites a source — one ``url_citation`` annotation (``citation``)
    spanning the whole text, streamed in a chunk of its own (``"delta": {"annotations": [...]}``)
    before the finish chunk, and in the whole object's ``message.annotations``.
    """

    status: int | None = None
    retry_after: int = 1
    drop_after: int | None = None
    malformed_after: int | None = None
    stall: float = 0.0
    stall_after: int = 1
    ttft: float | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    refusal: bool = False
    annotations: bool = False

    @property
    def cut_after(self) -> int | None:
        """The token count after which the stream breaks (a drop or a malformed line), if it does."""
        cuts = [n for n in (self.drop_after, self.malformed_after) if n is not None]
        return min(cuts) if cuts else None

    @property
    def drops(self) -> bool:
        """Whether the stream ends with a dropped connection (it does when the drop comes first)."""
        return self.drop_after is not None and (self.malformed_after is None or self.drop_after < self.malformed_after)


NO_FAULT = Fault()

# name -> (Fault field, parser, default when the directive has no value; None: a value is required)
_FAULT_DIRECTIVES: dict[str, tuple[str, Callable[[str], Any], object]] = {
    "status": ("status", int, None),
    "retry-after": ("retry_after", int, None),
    "drop-after": ("drop_after", int, None),
    "malformed-line": ("malformed_after", int, 1),
    "stall": ("stall", float, None),
    "stall-after": ("stall_after", int, None),
    "ttft": ("ttft", float, None),
    "cached-tokens": ("cached_tokens", int, None),
    "reasoning-tokens": ("reasoning_tokens", int, None),
    "refusal": ("refusal", lambda raw: int(raw) != 0, True),
    "annotations": ("annotations", lambda raw: int(raw) != 0, True),
}


def parse_fault(header: str) -> Fault | web.Response:
    """Return the ``Fault`` an ``X-Simulator-Fault`` header value asks for, or OpenAI's 400 for a bad one.

    See ``read_fault`` for the syntax.
    """
    fault = read_fault(header)
    return _fault_error(fault) if isinstance(fault, str) else fault


def read_fault(header: str) -> Fault | str:
    """Return the ``Fault`` an ``X-Simulator-Fault`` header value asks for, or the problem with a bad one.

    Each wire format renders the problem as its own 400 (``parse_fault``: OpenAI's).

    The value is directives separated by commas (or semicolons), each ``name=value`` or a bare
    ``name``: ``status=NNN`` (400..599), ``retry-after=S`` (whole seconds, with ``status=429``),
    ``drop-after=K``, ``malformed-line`` (after 1 token) or ``malformed-line=K``, ``stall=S``
    (seconds, after 1 token) with ``stall-after=K``, ``ttft=S`` (seconds), the usage reports
    ``cached-tokens=K`` and ``reasoning-tokens=K``, and the answers ``refusal`` and ``annotations``
    (bare, or ``=1`` / ``=0``). Counts are whole numbers >= 0, seconds numbers
    >= 0. E.g. ``ttft=2, stall=3, stall-after=4, drop-after=10``.
    """
    values: dict[str, object] = {}
    for part in re.split(r"[,;]", header):
        name, has_value, raw = (piece.strip() for piece in part.partition("="))
        if not name:
            continue
        directive = _FAULT_DIRECTIVES.get(name.lower())
        if directive is None:
            return f"unknown directive {name!r}"
        field_name, parse, default = directive
        if not has_value:
            if default is None:
                return f"{name!r} needs a value ({name}=...)"
            values[field_name] = default
            continue
        try:
            value = parse(raw)
        except ValueError:
            return f"{name}={raw!r} is not a number"
        if not (value >= 0 and value != float("inf")) or (field_name == "status" and not 400 <= value <= 599):
            return f"{name}={raw!r} is out of range"
        values[field_name] = value
    return Fault(**values) if values else NO_FAULT  # type: ignore[arg-type]


def fault_problem_message(problem: str) -> str:
    """Return the error message for a bad ``X-Simulator-Fault`` header (``problem``: ``read_fault``'s)."""
    return f"Invalid {FAULT_HEADER} header: {problem}. See llm.simulator's documentation."


def _fault_error(problem: str) -> web.Response:
    message = fault_problem_message(problem)
    return error_response(400, message, type_="invalid_request_error")


@dataclass(frozen=True, slots=True)
class Completion:
    """A validated chat completion request (``top_logprobs``: 0 when not asked for)."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    logprobs: bool = False
    top_logprobs: int = 0


def parse_completion(body: bytes, *, model: str | None = None) -> Completion | web.Response:
    """Return the request, or the 400 error OpenAI would answer for it.

    ``model``: the model the URL names (Azure's deployment), which replaces the body's.
    """
    try:
        data = json.loads(body)
    except ValueError:
        message = (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
        return error_response(400, message, type_="invalid_request_error")
    if not isinstance(data, dict):
        return error_response(400, "The request body must be a JSON object.", type_="invalid_request_error")
    model, messages = model or data.get("model"), data.get("messages")
    if not isinstance(model, str) or not model:
        return error_response(400, "you must provide a model parameter", type_="invalid_request_error")
    if messages is None:
        message, code = "Missing required parameter: 'messages'.", "missing_required_parameter"
        return error_response(400, message, type_="invalid_request_error", code=code, param="messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        message = "Invalid 'messages': expected a non-empty array of message objects."
        return error_response(400, message, type_="invalid_request_error", code="invalid_type", param="messages")
    stream = data.get("stream") is True
    stream_options = data.get("stream_options")
    if stream_options is not None and not stream:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        return error_response(400, message, type_="invalid_request_error", param="stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            message = f"Invalid '{name}': expected an integer of at least 1, got {value!r}."
            return error_response(400, message, type_="invalid_request_error", code="invalid_value", param=name)
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    logprobs, top_logprobs = data.get("logprobs"), data.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        message = f"Invalid type for 'logprobs': expected a boolean, but got {type(logprobs).__name__} instead."
        return error_response(400, message, type_="invalid_request_error", code="invalid_type", param="logprobs")
    if top_logprobs is not None:
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            message = f"Invalid 'top_logprobs': expected an integer between 0 and 20, got {top_logprobs!r}."
            return error_response(
                400, message, type_="invalid_request_error", code="invalid_value", param="top_logprobs"
            )
        if logprobs is not True:
            message = "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set."
            return error_response(
                400, message, type_="invalid_request_error", code="invalid_value", param="top_logprobs"
            )
    return Completion(model, messages, stream, include_usage, max_tokens, logprobs is True, top_logprobs or 0)


def usage_object(
    prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> dict[str, Any]:
    """Return OpenAI's ``usage`` object (``CompletionUsage``), its details included.

    ``completion_tokens`` are the reply's content tokens; ``reasoning_tokens`` are added to them
    (OpenAI counts reasoning in ``completion_tokens``); ``cached_tokens`` is capped at the prompt.
    """
    if not (cached_tokens or reasoning_tokens):
        total = prompt_tokens + completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
            **_DETAILS,
        }
    completion_tokens += reasoning_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {
            **_DETAILS["prompt_tokens_details"],
            "cached_tokens": min(cached_tokens, prompt_tokens),
        },
        "completion_tokens_details": {**_DETAILS["completion_tokens_details"], "reasoning_tokens": reasoning_tokens},
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def logprob_entry(index: int, *, first: bool, top: int) -> dict[str, Any]:
    """Return the ``ChatCompletionTokenLogprob`` of word ``index`` with ``top`` alternatives.

    Deterministic: the word's log probability is ``-0.05 * (1 + index % 7)``; the alternatives are
    the word itself, then other words of the list, each ``0.75`` less likely than the one before
    (OpenAI lists the sampled token among its ``top_logprobs`` when it is one of the most likely).
    ``bytes`` is the token's UTF-8. Schema: ``ChatCompletionTokenLogprob`` in openai-openapi.yaml.
    """
    return json.loads(_logprob_entry_json(index, first, top))


@functools.cache
def _logprob_entry_json(index: int, first: bool, top: int) -> bytes:
    """``logprob_entry`` as compact JSON bytes, built once per word, position and ``top``."""

    def alternative(word_index: int, rank: int) -> dict[str, Any]:
        token = WORDS[word_index] if first else " " + WORDS[word_index]
        logprob = round(-0.05 * (1 + index % 7) - 0.75 * rank, 6)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    entry = alternative(index, 0)
    # Rank 0 is the word itself; 5 is odd, so the others are distinct words while rank < 64.
    entry["top_logprobs"] = [alternative((index + 5 * rank) % len(WORDS), rank) for rank in range(top)]
    return _dumps(entry)


def citation(text: str) -> dict[str, Any]:
    """Return the ``url_citation`` annotation the simulator adds to ``text`` (``annotations``): all of it cited."""
    return {
        "type": "url_citation",
        "url_citation": {"start_index": 0, "end_index": len(text), "url": CITATION_URL, "title": "Simulated source"},
    }


def completion_body(
    *,
    model: str,
    indexes: Sequence[int],
    finish_reason: str,
    usage: dict[str, Any],
    top_logprobs: int | None = None,
    refusal: bool = False,
    annotations: bool = False,
) -> dict[str, Any]:
    """Return a whole ``chat.completion`` object whose content is the words at ``indexes``.

    ``top_logprobs``: None for ``"logprobs": null``, else the number of alternatives per token of
    ``logprobs.content`` (``logprob_entry``). ``refusal``: the model declined; ``indexes`` count
    the words of ``REFUSAL_TEXT`` it said, which is ``message.refusal`` (``content`` null, no
    logprobs). ``annotations``: the text cites one source (``citation``).
    """
    text = words_text(indexes)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if refusal else text,
        "refusal": " ".join(REFUSAL_WORDS[: len(indexes)]) if refusal else None,
        "annotations": [citation(text)] if annotations and not refusal else [],
    }
    logprobs = None
    if top_logprobs is not None and not refusal:
        content = [logprob_entry(index, first=i == 0, top=top_logprobs) for i, index in enumerate(indexes)]
        logprobs = {"content": content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }


def model_list_body(models: Sequence[str]) -> dict[str, Any]:
    """Return OpenAI's ``ListModelsResponse`` listing the model ids ``models``."""
    data = [{"id": m, "object": "model", "created": _MODEL_CREATED, "owned_by": "llm-simulator"} for m in models]
    return {"object": "list", "data": data}


@dataclass(frozen=True, slots=True)
class ChunkFrames:
    """The SSE frames (``data: {chat.completion.chunk}\\n\\n``) of one streamed reply, as bytes.

    The frames are OpenAI's, in OpenAI's order: ``role`` (``"delta": {"role": "assistant",
    "content": "", "refusal": null}``), one ``token`` frame per word (``"delta": {"content": ...}``),
    ``finish`` (``"delta": {}`` and the ``finish_reason``), then with ``include_usage`` the
    ``usage`` frame (``"choices": []``; every earlier frame carries ``"usage": null``). Everything
    but the word is fixed per request and built here once, so a token's frame is one bytes join:
    the per-token cost stays low with thousands of concurrent streams.
    """

    role: bytes
    finish: bytes
    content_head: bytes
    tail: bytes
    usage_head: bytes
    logprobs_tail: bytes
    refusal_head: bytes
    head: bytes

    @classmethod
    def for_reply(
        cls, *, completion_id: str, created: int, model: str, include_usage: bool, finish_reason: str
    ) -> ChunkFrames:
        """Return the frames of the reply ``completion_id`` that ends with ``finish_reason``."""
        envelope = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},"service_tier":"default","system_fingerprint":"{_SYSTEM_FINGERPRINT}",'
        ).encode()
        head = envelope + b'"choices":[{"index":0,"delta":{'
        tail = b'},"logprobs":null,"finish_reason":null}]' + (b',"usage":null}\n\n' if include_usage else b"}\n\n")
        finish_tail = tail.replace(b'"finish_reason":null', f'"finish_reason":{json.dumps(finish_reason)}'.encode())
        return cls(
            role=head + b'"role":"assistant","content":"","refusal":null' + tail,
            finish=head + finish_tail,
            content_head=head + b'"content":',
            tail=tail,
            usage_head=envelope + b'"choices":[],"usage":',
            logprobs_tail=b'],"refusal":null}' + tail[len(b'},"logprobs":null') :],
            refusal_head=head + b'"refusal":',
            head=head,
        )

    def token(self, index: int, *, first: bool) -> bytes:
        """Return the frame of word ``index`` (with a leading space unless it is the ``first``)."""
        word = _FIRST_TOKEN_JSON[index] if first else _NEXT_TOKEN_JSON[index]
        return self.content_head + word + self.tail

    def refusal_token(self, index: int, *, first: bool) -> bytes:
        """Return the frame of word ``index`` of ``REFUSAL_WORDS`` as ``"delta": {"refusal": ...}``."""
        return self.refusal_head + _REFUSAL_TOKEN_JSON[index] + self.tail

    def annotations(self, annotations: list[dict[str, Any]]) -> bytes:
        """Return a frame whose delta holds only ``annotations`` (``"delta": {"annotations": [...]}``)."""
        return self.head + b'"annotations":' + _dumps(annotations) + self.tail

    def token_with_logprobs(self, index: int, *, first: bool, top: int) -> bytes:
        """Return ``token``'s frame with ``"logprobs": {"content": [<the word's entry>], "refusal": null}``."""
        word = _FIRST_TOKEN_JSON[index] if first else _NEXT_TOKEN_JSON[index]
        entry = _logprob_entry_json(index, first, top)
        return self.content_head + word + b'},"logprobs":{"content":[' + entry + self.logprobs_tail

    def usage(self, usage: dict[str, Any]) -> bytes:
        """Return the usage chunk's frame: ``choices: []`` and the ``usage`` object."""
        return self.usage_head + _dumps(usage) + b"}\n\n"


__all__ = [
    "DONE",
    "FAULT_HEADER",
    "MALFORMED_CHUNK",
    "NO_FAULT",
    "SSE_HEADERS",
    "CITATION_URL",
    "REFUSAL_TEXT",
    "REFUSAL_WORDS",
    "SYSTEM_FINGERPRINT",
    "ChunkFrames",
    "Completion",
    "Fault",
    "citation",
    "completion_body",
    "error_response",
    "fault_problem_message",
    "logprob_entry",
    "model_list_body",
    "new_completion_id",
    "parse_completion",
    "parse_fault",
    "read_fault",
    "simulated_error",
    "usage_object",
]
