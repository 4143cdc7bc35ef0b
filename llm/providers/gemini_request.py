"""Translate an OpenAI-shaped ``ChatRequest`` into Gemini's ``GenerateContentRequest`` body.

Spec: https://ai.google.dev/api/generate-content#request-body (``contents``, ``systemInstruction``,
``tools``, ``toolConfig``, ``generationConfig``), https://ai.google.dev/api/caching#Content (parts),
https://ai.google.dev/gemini-api/docs/function-calling, https://ai.google.dev/gemini-api/docs/thinking.

Messages:

- ``system`` / ``developer`` → ``systemInstruction`` (their text parts, in order);
- ``user`` → a ``user`` content: text parts, ``image_url`` with a ``data:`` URL → ``inlineData``
  (``mimeType``, base64 ``data``), ``input_audio`` → ``inlineData`` (``audio/<format>``). An
  ``https://`` image URL is **refused with a 400** (``unsupported_image_url``): Gemini's
  ``fileData`` takes Files API / Cloud Storage URIs and needs a MIME type we would have to guess,
  and fetching arbitrary URLs server-side is an SSRF risk; clients (NextChat included) send
  uploads as data URLs;
- ``assistant`` → a ``model`` content: its text, then one ``functionCall`` part per OpenAI
  ``tool_calls`` entry (arguments parsed from their JSON). Gemini 3 requires the call's
  ``thoughtSignature`` back: the adapter hands it to clients as the tool call's
  ``extra_content.google.thought_signature`` (the field Google's own OpenAI-compatible endpoint
  uses) and it is sent back from there; a call without one (written by another provider or by
  hand) gets Google's documented placeholder ``skip_thought_signature_validator`` on the first call
  of the turn;
- ``tool`` → a ``user`` content with a ``functionResponse`` part named after the call its
  ``tool_call_id`` answers; the result is the content parsed as a JSON object when it is one, else
  ``{"result": <content>}``.

Consecutive contents of one role are merged (parallel calls' responses must share one turn).

Parameters: ``max_completion_tokens`` (else ``max_tokens``) → ``maxOutputTokens``, ``temperature``,
``top_p`` → ``topP``, ``stop`` → ``stopSequences``, ``seed``, ``presence_penalty``,
``frequency_penalty``, ``logprobs: true`` → ``responseLogprobs: true`` and ``top_logprobs`` →
``logprobs`` (Gemini's count of alternatives per step; its ``logprobsResult`` comes back in
OpenAI's shape, see ``gemini``; a model that offers none answers Google's 400, passed through),
``response_format`` (``json_object`` → ``responseMimeType:
application/json``; ``json_schema`` → plus ``responseJsonSchema``), ``tools`` →
``functionDeclarations`` (``parameters`` as ``parametersJsonSchema``), ``tool_choice`` →
``functionCallingConfig`` (none → NONE, auto → AUTO, required → ANY, a named function → ANY with
``allowedFunctionNames``; a choice of another shape, naming a function not in ``tools``, or
``required``/named without ``tools`` is a 400 on ``tool_choice``), ``reasoning_effort`` →
``thinkingConfig`` as Google's OpenAI compatibility maps it
(https://ai.google.dev/gemini-api/docs/openai#thinking): ``none`` → budget 0; ``minimal``/``low`` →
1024, ``medium`` → 8192, ``high`` (and ``xhigh``/``max``, newer than that mapping) → 24576, with
``includeThoughts`` so the thoughts stream back as ``reasoning_content``; a value outside OpenAI's
is a 400 on ``reasoning_effort``.

``parallel_tool_calls: false`` has no Gemini field (``functionCallingConfig`` has a ``mode`` and
``allowedFunctionNames`` only): the adapter keeps it on the reply (``gemini``: only the first
``functionCall`` is handed on).

Fields whose effect the client relies on and that this translation does not give are a 400
``unsupported_parameter`` naming the field, before any request (``base.refuse_unsupported``):
a non-empty ``logit_bias`` (OpenAI token ids), ``modalities`` other than text and ``audio``
(text replies only), ``web_search_options``. Other OpenAI fields (``n`` of 1, ``user``,
``service_tier``, ``prediction``, ``response_format: {"type": "text"}``, ...) have no Gemini
equivalent, change nothing the client can count on, and are not sent.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chatbackend.errors import ApplicationError

from .base import reasoning_effort, refuse_unsupported, tool_choice_function

__all__ = ["GEMINI_UNSUPPORTED", "SKIP_THOUGHT_SIGNATURE", "THINKING_BUDGETS", "gemini_request_body"]

# https://ai.google.dev/gemini-api/docs/thought-signatures#faqs: for function calls not made by the model.
SKIP_THOUGHT_SIGNATURE = "skip_thought_signature_validator"
# OpenAI fields a client relies on that this translation does not give: a 400, not a silent drop.
GEMINI_UNSUPPORTED = ("logit_bias", "modalities", "audio", "web_search_options")
# xhigh and max, which Google's mapping predates: high's budget, Gemini 2.5 Flash's largest.
THINKING_BUDGETS = {
    "none": 0,
    "minimal": 1024,
    "low": 1024,
    "medium": 8192,
    "high": 24576,
    "xhigh": 24576,
    "max": 24576,
}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[\w=.+-]+)*;base64,(?P<data>.*)", re.DOTALL)


def _invalid(message: str, code: str = "invalid_request") -> ApplicationError:
    return ApplicationError(message, code=code, status=400, param="messages")


def _text_parts(content: Any, role: str) -> list[dict[str, Any]]:
    """Return the text parts of a system, developer or assistant ``content`` (a string or text parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                text = part.get("text") or part.get("refusal") or ""
                if text:
                    parts.append({"text": text})
            else:
                raise _invalid(f"A {role} message's content may only hold text parts for this model.")
        return parts
    raise _invalid(f"A {role} message's content must be a string or a list of parts.")


def _image_part(image_url: Any) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise _invalid("An image_url part needs image_url.url.")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _invalid(
            "This model's provider (Gemini) accepts images as base64 data: URLs only "
            "(data:image/png;base64,...), not links.",
            code="unsupported_image_url",
        )
    return {"inlineData": {"mimeType": match["mime"], "data": match["data"]}}


def _user_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise _invalid("A user message's content must be a string or a list of parts.")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_image_part(part.get("image_url")))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not (
                isinstance(audio, dict)
                and isinstance(audio.get("data"), str)
                and isinstance(audio.get("format", "wav"), str)
            ):
                raise _invalid("An input_audio part needs an input_audio object with string data and format.")
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format', 'wav')}", "data": audio["data"]}})
        else:
            raise _invalid(f"Content parts of type {kind!r} are not supported for this model.")
    return parts


def _function_call_parts(tool_calls: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    """Return the ``functionCall`` parts of an assistant's ``tool_calls``, recording each id's name in ``names``."""
    if not isinstance(tool_calls, list):
        raise _invalid("An assistant message's tool_calls must be a list.")
    parts = []
    for position, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid("Each tool call needs function.name.")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            raise _invalid(f"The arguments of tool call {call.get('id')!r} are not JSON.") from None
        if not isinstance(arguments, dict):
            raise _invalid(f"The arguments of tool call {call.get('id')!r} must be a JSON object.")
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
        part: dict[str, Any] = {"functionCall": {"name": function["name"], "args": arguments}}
        signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
        if isinstance(signature, str) and signature:
            part["thoughtSignature"] = signature
        elif position == 0:
            part["thoughtSignature"] = SKIP_THOUGHT_SIGNATURE
        parts.append(part)
    return parts


def _function_response_part(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    name = names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        raise _invalid(f"The tool message's tool_call_id {call_id!r} answers no earlier assistant tool call.")
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(p["text"] for p in _text_parts(content, "tool"))
    try:
        result = json.loads(text)
    except ValueError:
        result = None
    response = result if isinstance(result, dict) else {"result": text}
    return {"functionResponse": {"name": name, "response": response}}


def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return ``(system parts, contents)`` for OpenAI ``messages``."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), role))
        elif role == "user":
            add("user", _user_parts(message.get("content")))
        elif role == "assistant":
            parts = _text_parts(message.get("content"), "assistant")
            if message.get("tool_calls"):
                parts += _function_call_parts(message["tool_calls"], names)
            add("model", parts)
        elif role == "tool":
            add("user", [_function_response_part(message, names)])
        else:
            raise _invalid(f"Messages with role {role!r} are not supported for this model.")
    if not contents:
        raise _invalid("The messages need at least one user message with content for this model.")
    return system, contents


def _tool_config(tool_choice: Any, tools: Any) -> dict[str, Any] | None:
    """Return ``toolConfig`` for OpenAI's ``tool_choice``; raises 400 as ``base.tool_choice_function`` does."""
    name = tool_choice_function(tool_choice, tools)
    if name is not None:
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    if tool_choice in ("none", "auto", "required"):
        return {"functionCallingConfig": {"mode": {"none": "NONE", "auto": "AUTO", "required": "ANY"}[tool_choice]}}
    return None


def _generation_config(parameters: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    max_tokens = parameters.get("max_completion_tokens") or parameters.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if parameters.get(ours) is not None:
            config[theirs] = parameters[ours]
    stop = parameters.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if parameters.get("logprobs") is True:
        config["responseLogprobs"] = True
        if parameters.get("top_logprobs"):  # Gemini's logprobs: "only valid if responseLogprobs=True"
            config["logprobs"] = parameters["top_logprobs"]
    response_format = parameters.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is not None:
            config["responseJsonSchema"] = schema
    effort = reasoning_effort(parameters)
    if effort in THINKING_BUDGETS:
        budget = THINKING_BUDGETS[effort]
        config["thinkingConfig"] = (
            {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}
        )
    return config


def gemini_request_body(messages: list[dict[str, Any]], parameters: dict[str, Any]) -> dict[str, Any]:
    """Return the ``GenerateContentRequest`` JSON object for OpenAI ``messages`` and ``parameters``.

    Raises ``ApplicationError`` 400 for what Gemini cannot be sent (an image link, an unknown part
    type or role, a tool message that answers no call, tool call arguments that are not a JSON object)
    and ``unsupported_parameter`` for a field of ``GEMINI_UNSUPPORTED`` that asks for something, and
    ``invalid_value`` for a ``tool_choice`` it cannot name (``base.tool_choice_function``).
    """
    refuse_unsupported(parameters, GEMINI_UNSUPPORTED, "Gemini")
    system, contents = _contents(messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = parameters.get("tools")
    if tools:
        declarations = []
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ApplicationError(
                    "Only function tools are supported for this model.",
                    code="invalid_request",
                    status=400,
                    param="tools",
                )
            declaration: dict[str, Any] = {"name": function["name"]}
            if function.get("description"):
                declaration["description"] = function["description"]
            if function.get("parameters"):
                declaration["parametersJsonSchema"] = function["parameters"]
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
    tool_config = _tool_config(parameters.get("tool_choice"), tools)
    if tool_config is not None:
        body["toolConfig"] = tool_config
    config = _generation_config(parameters)
    if config:
        body["generationConfig"] = config
    return body
