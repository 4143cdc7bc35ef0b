"""Google Gemini's ``generateContent`` wire format, as the simulator writes it: requests, bodies, SSE frames.

Spec: https://ai.google.dev/api/generate-content (``GenerateContentRequest``,
``GenerateContentResponse``, ``UsageMetadata``, ``FinishReason``), errors
https://ai.google.dev/gemini-api/docs/troubleshooting (``{"error": {"code", "message", "status"}}``
with the google.rpc status names), streaming https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent
(``?alt=sse``: each SSE event's ``data`` is a whole ``GenerateContentResponse``; the body simply
ends after the last one, there is no ``[DONE]``; Google separates events with ``\\r\\n\\r\\n``).

What the simulator makes of a request (deterministic, see ``llm.simulator``):

- The reply's words are ``replies.reply_word_indexes`` of the request's ``contents`` read as chat
  messages (``systemInstruction`` first, each content's text parts joined), so a request an
  adapter translated from OpenAI messages gets the same words and ``promptTokenCount`` as the
  OpenAI route gives those messages.
- A model whose id contains ``think`` thinks: ``THOUGHT_TOKENS`` words counted in
  ``thoughtsTokenCount``, and sent as ``{"text": ..., "thought": true}`` parts before the answer
  when ``generationConfig.thinkingConfig.includeThoughts`` is true (as Gemini 2.5+ does).
- ``tools[].functionDeclarations``: when the last content is not a ``functionResponse`` (and
  ``toolConfig.functionCallingConfig.mode`` is not ``NONE``), the reply is one ``functionCall``
  part calling the first declared function, with arguments made from its parameter schema
  (``tool_call_arguments``) and a ``thoughtSignature``; ``finishReason`` is ``STOP`` (Gemini has
  no finish reason of its own for function calls). After a ``functionResponse``, a text reply.
- ``generationConfig.maxOutputTokens`` below the reply length cuts it: ``finishReason: MAX_TOKENS``.
- ``generationConfig.responseLogprobs: true`` puts a ``logprobsResult`` on the candidate of every
  event with a reply word (``logprobs_result``: the numbers ``wire.logprob_entry`` gives the OpenAI
  route, ``generationConfig.logprobs`` alternatives per step), and one for all the words (with
  ``avgLogprobs``) on the whole response; JSON-mode text, thoughts and calls get none.
  ``logprobs`` outside 0..``MAX_LOGPROBS``, or without ``responseLogprobs: true``, is a 400.
- ``generationConfig.responseMimeType: application/json`` (JSON mode) makes the text reply a JSON
  value: with a ``responseJsonSchema`` (or ``responseSchema``) of an object with ``properties``,
  an object with one value per property (``tool_call_arguments``), else ``{"reply": <the reply's
  words>}``; streamed in ``JSON_PIECE_CHARS``-character pieces, one per event, each counted as a
  token (``maxOutputTokens`` does not cut it).
- ``generationConfig`` is checked as Google checks it (https://ai.google.dev/api/generate-content#generationconfig):
  a field it does not have is a 400 (``Unknown name ... Cannot find field``), as are more than
  ``MAX_STOP_SEQUENCES`` ``stopSequences`` or ones that are not strings, a ``responseMimeType`` other than
  ``text/plain``, ``application/json`` or ``text/x.enum``, both ``responseSchema`` and
  ``responseJsonSchema``, and a schema without a JSON ``responseMimeType``; so an adapter's bad
  translation fails in tests as it would against Google.
- A ``systemInstruction`` of at least ``CACHE_MIN_WORDS`` words is "implicitly cached": its tokens
  are reported as ``cachedContentTokenCount`` (included in ``promptTokenCount``, as Gemini does).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .replies import WORDS, count_prompt_tokens, reply_word_indexes
from .wire import logprob_entry

THOUGHT_TOKENS = 4
JSON_PIECE_CHARS = 8
MAX_STOP_SEQUENCES = 5
MAX_LOGPROBS = 20  # generationConfig.logprobs: "in the range of [0, 20]"
# GenerationConfig's fields (https://ai.google.dev/api/generate-content#generationconfig).
GENERATION_CONFIG_FIELDS = frozenset(
    (
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "imageConfig",
        "mediaResolution",
    )
)
_RESPONSE_MIME_TYPES = ("text/plain", "application/json", "text/x.enum")
CACHE_MIN_WORDS = 32
THOUGHT_SIGNATURE = base64.b64encode(b"llm-simulator-thought-signature").decode()
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
MALFORMED_EVENT = b'data: {"candidates": [\r\n\r\n'  # a ``data:`` line that is not JSON

# google.rpc.Code names by HTTP status (https://cloud.google.com/apis/design/errors#handling_errors).
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ID_PREFIX = f"sim{os.getpid():x}{int(time.time()):x}"
_ids = itertools.count(1)


def error_response(
    status: int, message: str, *, details: Sequence[Mapping[str, Any]] = (), headers: Mapping[str, str] | None = None
) -> web.Response:
    """Return Google's error response ``{"error": {"code", "message", "status"[, "details"]}}``."""
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = list(details)
    return web.json_response({"error": error}, status=status, headers=headers)


def simulated_error(status: int, model: str, *, retry_after: int = 1) -> web.Response:
    """Return the error Gemini would send with ``status`` (messages modelled on Google's own).

    A 429 carries a ``google.rpc.RetryInfo`` detail with ``retryDelay: "<retry_after>s"`` (Gemini
    sends no ``Retry-After`` header).
    """
    if status == 429:
        message = (
            "You exceeded your current quota, please check your plan and billing details. "
            f"Please retry in {retry_after}s."
        )
        retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}
        return error_response(429, message, details=[retry])
    if status == 404:
        message = f"models/{model} is not found for API version v1beta, or is not supported for generateContent."
        return error_response(404, message)
    if status == 503:
        return error_response(503, "The model is overloaded. Please try again later.")
    if status >= 500:
        return error_response(status, "An internal error has occurred. Please retry or report in the forum.")
    return error_response(status, f"Simulated error {status} for model {model}.")


def unauthorized(request: web.Request, api_key: str) -> web.Response | None:
    """Return Google's answer to a missing or wrong API key (``x-goog-api-key`` or ``?key=``), or None.

    Google answers a missing key with 403 ``PERMISSION_DENIED`` and a wrong one with **400**
    ``INVALID_ARGUMENT`` (reason ``API_KEY_INVALID``): adapters must not take that 400 for the
    client's fault.
    """
    if not api_key:
        return None
    given = request.headers.get("x-goog-api-key") or request.query.get("key") or ""
    if given == api_key:
        return None
    if not given:
        message = (
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API."
        )
        return error_response(403, message)
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    return error_response(400, "API key not valid. Please pass a valid API key.", details=[info])


@dataclass(frozen=True, slots=True)
class GeminiRequest:
    """A validated ``GenerateContentRequest``, reduced to what decides the simulator's reply.

    ``messages``: the contents as OpenAI-like chat messages (for the reply words and token count);
    ``function``: the declaration to call (``{"name", "parameters"...}``), or None for a text reply;
    ``max_output_tokens``: ``generationConfig.maxOutputTokens`` (None: unset);
    ``system_words``: words of the ``systemInstruction`` (for the implicit cache);
    ``json_mode``: ``responseMimeType`` is ``application/json``, with ``json_schema`` its schema (or None);
    ``logprobs``: with ``responseLogprobs``, the number of alternatives per step (``logprobs``, 0
    when unset); None without.
    """

    model: str
    messages: list[dict[str, Any]]
    include_thoughts: bool
    max_output_tokens: int | None
    function: dict[str, Any] | None = None
    system_words: int = 0
    thinks: bool = field(default=False)
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    logprobs: int | None = None


def _field(obj: Mapping[str, Any], name: str) -> Any:
    """Return the field ``name`` (lowerCamelCase) of a request object, or its snake_case spelling.

    Google's JSON mapping of protobuf accepts both (https://protobuf.dev/programming-guides/json/),
    and the google-genai SDK sends some nested fields in snake_case (``inlineData.mime_type``,
    ``thinkingConfig.include_thoughts``).
    """
    value = obj.get(name)
    if value is None:
        value = obj.get(re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name))
    return value


def _invalid(message: str) -> web.Response:
    return error_response(400, message)


def _parts_text(content: Mapping[str, Any]) -> str:
    parts = content.get("parts") or []
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


def parse_request(body: bytes, model: str) -> GeminiRequest | web.Response:
    """Return the request for ``model``, or the 400 Google would answer for it."""
    try:
        data = json.loads(body)
    except ValueError:
        return _invalid("Invalid JSON payload received. Unexpected token.")
    if not isinstance(data, dict):
        return _invalid("Invalid JSON payload received. Expected an object.")
    contents = data.get("contents")
    if not isinstance(contents, list) or not contents or not all(isinstance(c, dict) for c in contents):
        return _invalid("* GenerateContentRequest.contents: contents is not specified")
    messages: list[dict[str, Any]] = []
    system_words = 0
    system = _field(data, "systemInstruction")
    if isinstance(system, dict):
        text = _parts_text(system)
        system_words = len(text.split())
        messages.append({"role": "system", "content": text})
    for content in contents:
        role = content.get("role", "user")
        if role not in ("user", "model"):
            return _invalid(f"Please use a valid role: user, model. Got {role!r}.")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return _invalid("* GenerateContentRequest.contents.parts: contents.parts must not be empty.")
        for part in parts:
            if not isinstance(part, dict):
                return _invalid("* GenerateContentRequest.contents.parts: a part must be an object.")
            inline = _field(part, "inlineData")
            if inline is not None:
                if (
                    not isinstance(inline, dict)
                    or not _field(inline, "mimeType")
                    or not isinstance(inline.get("data"), str)
                ):
                    return _invalid("* GenerateContentRequest.contents.parts.inline_data: mimeType and data required.")
                try:
                    # Protobuf's JSON bytes: standard or URL-safe base64, padding optional (the SDK sends URL-safe).
                    encoded = inline["data"].replace("-", "+").replace("_", "/")
                    base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
                except ValueError:
                    return _invalid(
                        "Invalid value at 'contents.parts.inline_data.data' (TYPE_BYTES), Base64 decoding failed."
                    )
        messages.append({"role": "user" if role == "user" else "assistant", "content": _parts_text(content)})
    config = _field(data, "generationConfig") or {}
    if not isinstance(config, dict):
        return _invalid("Invalid JSON payload received. 'generationConfig' must be an object.")
    max_output_tokens = _field(config, "maxOutputTokens")
    if max_output_tokens is not None and (
        isinstance(max_output_tokens, bool) or not isinstance(max_output_tokens, int) or max_output_tokens < 1
    ):
        return _invalid(f"* GenerateContentRequest.generation_config.max_output_tokens: invalid {max_output_tokens!r}")
    checked = _checked_generation_config(config)
    if isinstance(checked, web.Response):
        return checked
    json_mode, json_schema = checked
    logprobs = _logprobs(config)
    if isinstance(logprobs, web.Response):
        return logprobs
    thinking = _field(config, "thinkingConfig") or {}
    include_thoughts = isinstance(thinking, dict) and _field(thinking, "includeThoughts") is True
    function = _function_to_call(data, contents)
    if isinstance(function, web.Response):
        return function
    return GeminiRequest(
        model=model,
        messages=messages,
        include_thoughts=include_thoughts,
        max_output_tokens=max_output_tokens,
        function=function,
        system_words=system_words,
        thinks="think" in model,
        json_mode=json_mode,
        json_schema=json_schema,
        logprobs=logprobs,
    )


def _logprobs(config: Mapping[str, Any]) -> int | None | web.Response:
    """Return ``GeminiRequest.logprobs`` of ``generationConfig``, or Google's 400 for its logprobs fields."""
    wanted, top = _field(config, "responseLogprobs"), _field(config, "logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        return _invalid(f"* GenerateContentRequest.generation_config.response_logprobs: invalid {wanted!r}")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            return _invalid(
                f"* GenerateContentRequest.generation_config.logprobs: must be in the range of [0, {MAX_LOGPROBS}]."
            )
        if wanted is not True:
            return _invalid(
                "* GenerateContentRequest.generation_config.logprobs: only valid if response_logprobs is true."
            )
    return (top or 0) if wanted else None


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


def _checked_generation_config(config: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None] | web.Response:
    """Return ``(json_mode, json_schema)`` of ``generationConfig``, or Google's 400 for it (see the module doc)."""
    for name in config:
        if _camel(name) not in GENERATION_CONFIG_FIELDS:
            return _invalid(
                f"Invalid JSON payload received. Unknown name \"{name}\" at 'generation_config': Cannot find field."
            )
    stops = _field(config, "stopSequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
            return _invalid("* GenerateContentRequest.generation_config.stop_sequences: must be a list of strings.")
        if len(stops) > MAX_STOP_SEQUENCES:
            return _invalid(
                f"* GenerateContentRequest.generation_config.stop_sequences: at most {MAX_STOP_SEQUENCES} "
                f"stop sequences are allowed, got {len(stops)}."
            )
    mime_type = _field(config, "responseMimeType") or "text/plain"
    if mime_type not in _RESPONSE_MIME_TYPES:
        return _invalid(
            f"* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
            f"{', '.join(_RESPONSE_MIME_TYPES)}, but got {mime_type!r}."
        )
    schema, json_schema = _field(config, "responseSchema"), _field(config, "responseJsonSchema")
    if schema is not None and json_schema is not None:
        return _invalid(
            "* GenerateContentRequest.generation_config.response_json_schema: "
            "response_schema and response_json_schema cannot both be set."
        )
    if (schema is not None or json_schema is not None) and mime_type == "text/plain":
        return _invalid(
            "* GenerateContentRequest.generation_config.response_mime_type: "
            "a response schema needs response_mime_type application/json."
        )
    given = json_schema if json_schema is not None else schema
    return mime_type == "application/json", given if isinstance(given, dict) else None


def _function_to_call(
    data: Mapping[str, Any], contents: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None | web.Response:
    """Return the first declared function when the reply should call it (see the module doc)."""
    tools = data.get("tools") or []
    if not isinstance(tools, list):
        return _invalid("* GenerateContentRequest.tools: must be a list.")
    declarations = [d for t in tools if isinstance(t, dict) for d in _field(t, "functionDeclarations") or []]
    for declaration in declarations:
        if not isinstance(declaration, dict) or not isinstance(declaration.get("name"), str):
            return _invalid("* GenerateContentRequest.tools[0].function_declarations[0].name: name is required.")
    mode = (_field(_field(data, "toolConfig") or {}, "functionCallingConfig") or {}).get("mode", "AUTO")
    last_parts = contents[-1].get("parts") or []
    answered = any(isinstance(p, dict) and _field(p, "functionResponse") is not None for p in last_parts)
    if not declarations or mode == "NONE" or answered:
        return None
    return declarations[0]


def tool_call_arguments(declaration: Mapping[str, Any]) -> dict[str, Any]:
    """Return the arguments the simulator calls ``declaration`` with: one value per declared property.

    From ``parameters`` (or ``parametersJsonSchema``) ``properties``: a string property gets
    ``"<name> value"``, an integer ``1``, a number ``1.5``, a boolean ``true``, an array ``[]``, an
    object ``{}``; other types ``null``.
    """
    schema = declaration.get("parameters") or _field(declaration, "parametersJsonSchema") or {}
    properties = schema.get("properties") or {} if isinstance(schema, dict) else {}
    samples: dict[str, Any] = {"string": None, "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    arguments: dict[str, Any] = {}
    for name, prop in properties.items():
        kind = str((prop or {}).get("type", "")).lower() if isinstance(prop, dict) else ""
        arguments[name] = f"{name} value" if kind == "string" else samples.get(kind)
    return arguments


@dataclass(frozen=True, slots=True)
class GeminiReply:
    """What the simulator answers one request with: ``thoughts`` and ``words`` (word indexes into
    ``replies.WORDS``; thoughts only when sent), or a ``function_call`` (``{"name", "args"}``);
    ``finish_reason``; and the ``usage_metadata`` object. In JSON mode ``json_text`` is the reply's
    text (``words`` empty). ``logprobs``: ``GeminiRequest.logprobs`` (the words' ``logprobsResult``
    is sent when not None)."""

    thoughts: list[int]
    words: list[int]
    function_call: dict[str, Any] | None
    finish_reason: str
    usage_metadata: dict[str, Any]
    json_text: str | None = None
    logprobs: int | None = None

    def text_pieces(self) -> list[str]:
        """Return the reply's text as streamed, one piece per event: its words, or ``json_text`` in pieces."""
        if self.json_text is not None:
            return [self.json_text[i : i + JSON_PIECE_CHARS] for i in range(0, len(self.json_text), JSON_PIECE_CHARS)]
        return [_word(index, n == 0) for n, index in enumerate(self.words)]


def plan_reply(request: GeminiRequest, reply_tokens: int) -> GeminiReply:
    """Return the reply to ``request`` for a simulator configured with ``reply_tokens`` words per reply."""
    tokens, finish_reason = reply_tokens, "STOP"
    if request.max_output_tokens is not None and request.max_output_tokens < tokens:
        tokens, finish_reason = request.max_output_tokens, "MAX_TOKENS"
    thought_count = THOUGHT_TOKENS if request.thinks else 0
    # Thoughts: words of the reversed prompt, so they differ from the answer's.
    thoughts = reply_word_indexes([*request.messages, {"role": "user", "content": "thinking"}], thought_count)
    function_call, json_text = None, None
    if request.function is not None:
        function_call = {"name": request.function["name"], "args": tool_call_arguments(request.function)}
        words: list[int] = []
        candidates = 1 + len(function_call["args"])
        finish_reason = "STOP"
    elif request.json_mode:
        words, finish_reason = [], "STOP"
        schema = request.json_schema or {}
        value = tool_call_arguments({"parameters": schema}) if schema.get("properties") else None
        if value is None:
            value = {"reply": " ".join(WORDS[i] for i in reply_word_indexes(request.messages, reply_tokens))}
        json_text = json.dumps(value)
        candidates = -(-len(json_text) // JSON_PIECE_CHARS)
    else:
        words = reply_word_indexes(request.messages, tokens)
        candidates = len(words)
    prompt = count_prompt_tokens(request.messages)
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if request.system_words >= CACHE_MIN_WORDS:
        usage["cachedContentTokenCount"] = request.system_words + 3
    usage["candidatesTokenCount"] = candidates
    if thought_count:
        usage["thoughtsTokenCount"] = thought_count
    usage["totalTokenCount"] = prompt + candidates + thought_count
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    return GeminiReply(
        thoughts=thoughts if request.include_thoughts else [],
        words=words,
        function_call=function_call,
        finish_reason=finish_reason,
        usage_metadata=usage,
        json_text=json_text,
        logprobs=request.logprobs,
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _word(index: int, first: bool) -> str:
    return WORDS[index] if first else " " + WORDS[index]


def new_response_id() -> str:
    """Return a new ``responseId``, unique within this process and across processes."""
    return f"{_ID_PREFIX}{next(_ids)}"


def _response(parts: list[dict[str, Any]], *, model: str, response_id: str, finish: str | None,
              usage: dict[str, Any], logprobs: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    if logprobs is not None:
        candidate["logprobsResult"] = logprobs
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id}


def _logprob_candidate(entry: dict[str, Any]) -> dict[str, Any]:
    """Return the ``LogprobsResult.Candidate`` of an OpenAI ``logprob_entry`` (``tokenId``: the word's index)."""
    return {"token": entry["token"], "tokenId": WORDS.index(entry["token"].strip()), "logProbability": entry["logprob"]}


def logprobs_result(words: Sequence[int], top: int, *, first: int = 0) -> dict[str, Any]:
    """Return the ``logprobsResult`` of ``words`` (word indexes, the reply's from position ``first``).

    Each step is ``wire.logprob_entry`` of its word (the numbers the OpenAI route gives the same
    word): ``chosenCandidates`` the words, ``topCandidates`` (when ``top`` > 0) ``top`` alternatives
    per step, most likely first; ``logProbabilitySum`` their sum
    (https://ai.google.dev/api/generate-content#LogprobsResult).
    """
    entries = [logprob_entry(index, first=first + n == 0, top=top) for n, index in enumerate(words)]
    result: dict[str, Any] = {}
    if top:
        result["topCandidates"] = [
            {"candidates": [_logprob_candidate(alternative) for alternative in entry["top_logprobs"]]}
            for entry in entries
        ]
    result["chosenCandidates"] = [_logprob_candidate(entry) for entry in entries]
    result["logProbabilitySum"] = round(sum(entry["logprob"] for entry in entries), 6)
    return result


def _function_part(call: dict[str, Any]) -> dict[str, Any]:
    return {"functionCall": call, "thoughtSignature": THOUGHT_SIGNATURE}


def stream_events(reply: GeminiReply, *, model: str) -> list[bytes]:
    """Return the SSE events of the streamed reply, one per thought word, word or function call.

    Every event is a whole ``GenerateContentResponse``: ``usageMetadata`` with only
    ``promptTokenCount`` and ``totalTokenCount`` until the last event, which carries the
    ``finishReason`` and the full ``usageMetadata`` (what Gemini sends).
    """
    response_id = new_response_id()
    prompt = reply.usage_metadata["promptTokenCount"]
    running = {"promptTokenCount": prompt, "totalTokenCount": prompt}
    parts: list[dict[str, Any]] = [{"text": _word(i, n == 0), "thought": True} for n, i in enumerate(reply.thoughts)]
    parts += [{"text": piece} for piece in reply.text_pieces()]
    if reply.function_call is not None:
        parts.append(_function_part(reply.function_call))
    if not parts:
        parts = [{"text": ""}]
    events = []
    last = len(parts) - 1
    first_word = len(reply.thoughts)  # the parts of reply.words follow the thoughts
    for n, part in enumerate(parts):
        final = n == last
        word = n - first_word
        with_logprobs = reply.logprobs is not None and 0 <= word < len(reply.words)
        response = _response(
            [part],
            model=model,
            response_id=response_id,
            finish=reply.finish_reason if final else None,
            usage=reply.usage_metadata if final else running,
            logprobs=logprobs_result([reply.words[word]], reply.logprobs or 0, first=word) if with_logprobs else None,
        )
        events.append(b"data: " + _dumps(response) + b"\r\n\r\n")
    return events


def whole_body(reply: GeminiReply, *, model: str) -> dict[str, Any]:
    """Return the whole ``GenerateContentResponse`` (``:generateContent``): one part per kind."""
    parts: list[dict[str, Any]] = []
    if reply.thoughts:
        parts.append({"text": " ".join(WORDS[i] for i in reply.thoughts), "thought": True})
    if reply.words or reply.json_text is not None:
        parts.append({"text": "".join(reply.text_pieces())})
    if reply.function_call is not None:
        parts.append(_function_part(reply.function_call))
    response = _response(
        parts or [{"text": ""}],
        model=model,
        response_id=new_response_id(),
        finish=reply.finish_reason,
        usage=reply.usage_metadata,
        logprobs=logprobs_result(reply.words, reply.logprobs) if reply.logprobs is not None and reply.words else None,
    )
    if reply.logprobs is not None and reply.words:
        candidate = response["candidates"][0]
        candidate["avgLogprobs"] = candidate["logprobsResult"]["logProbabilitySum"] / len(reply.words)
    return response


__all__ = [
    "CACHE_MIN_WORDS",
    "GENERATION_CONFIG_FIELDS",
    "JSON_PIECE_CHARS",
    "MAX_LOGPROBS",
    "MAX_STOP_SEQUENCES",
    "MALFORMED_EVENT",
    "SSE_HEADERS",
    "THOUGHT_SIGNATURE",
    "THOUGHT_TOKENS",
    "GeminiReply",
    "GeminiRequest",
    "error_response",
    "logprobs_result",
    "new_response_id",
    "parse_request",
    "plan_reply",
    "simulated_error",
    "stream_events",
    "tool_call_arguments",
    "unauthorized",
    "whole_body",
]
