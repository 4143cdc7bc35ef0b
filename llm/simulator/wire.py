"""OpenAI's chat-completions wire format, as the simulator writes it: requests, bodies, SSE frames.

Specs: https://platform.openai.com/docs/api-reference/chat/streaming (chunk objects and SSE
framing), https://platform.openai.com/docs/api-reference/chat/create, and the OpenAPI file
/work/shared/specs/openai-openapi.yaml (``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``ListModelsResponse``, ``ErrorResponse``).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .replies import WORDS, words_text

# JSON string literals, encoded once: the first token has no leading space, later ones do.
_FIRST_TOKEN_JSON = tuple(json.dumps(word).encode() for word in WORDS)
_NEXT_TOKEN_JSON = tuple(json.dumps(" " + word).encode() for word in WORDS)

_SYSTEM_FINGERPRINT = "fp_llm_simulator"
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


def simulated_error(status: int, model: str) -> web.Response:
    """Return the error OpenAI would send with ``status`` (messages modelled on OpenAI's own)."""
    if status == 429:
        message = f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1."
        return error_response(429, message, type_="requests", code="rate_limit_exceeded")
    if status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_response(404, message, type_="invalid_request_error", code="model_not_found")
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return error_response(status, message, type_="server_error")
    return error_response(status, f"Simulated error {status} for model {model}.", type_="invalid_request_error")


@dataclass(frozen=True, slots=True)
class Completion:
    """A validated chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def parse_completion(body: bytes) -> Completion | web.Response:
    """Return the request, or the 400 error OpenAI would answer for it."""
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
    model, messages = data.get("model"), data.get("messages")
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
    return Completion(model, messages, stream, include_usage, max_tokens)


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Return OpenAI's ``usage`` object (``CompletionUsage``)."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total, **_DETAILS}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def completion_body(*, model: str, indexes: Sequence[int], finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
    """Return a whole ``chat.completion`` object whose content is the words at ``indexes``."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": words_text(indexes),
        "refusal": None,
        "annotations": [],
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
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
        )

    def token(self, index: int, *, first: bool) -> bytes:
        """Return the frame of word ``index`` (with a leading space unless it is the ``first``)."""
        word = _FIRST_TOKEN_JSON[index] if first else _NEXT_TOKEN_JSON[index]
        return self.content_head + word + self.tail

    def usage(self, usage: dict[str, Any]) -> bytes:
        """Return the usage chunk's frame: ``choices: []`` and the ``usage`` object."""
        return self.usage_head + _dumps(usage) + b"}\n\n"


__all__ = [
    "DONE",
    "MALFORMED_CHUNK",
    "SSE_HEADERS",
    "ChunkFrames",
    "Completion",
    "completion_body",
    "error_response",
    "model_list_body",
    "new_completion_id",
    "parse_completion",
    "simulated_error",
    "usage_object",
]
