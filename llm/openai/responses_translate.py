"""Translate a ``POST /v1/responses`` request into the chat messages and parameters every adapter takes.

Responses API: https://platform.openai.com/docs/api-reference/responses/create (``CreateResponse``,
``InputItem``, ``FunctionTool``, ``ToolChoiceParam`` in /work/shared/specs/openai-openapi.yaml).
The engine streams chat completions (``llm.providers.ChatRequest``: OpenAI chat messages and
parameters, issue 9's contract), so the stateless core of the Responses API maps onto it:

- ``instructions`` -> a leading ``system`` message;
- ``input`` string -> one ``user`` message; ``input`` items: ``message`` (roles user / system /
  developer / assistant; parts ``input_text`` -> ``text``, ``input_image`` -> ``image_url``,
  ``output_text`` / ``refusal`` of an assistant message -> its text), ``function_call`` -> an
  assistant message's ``tool_calls`` (consecutive calls join one message), ``function_call_output``
  -> a ``tool`` message; ``reasoning`` items (a previous reply's, sent back by stateless clients)
  are left out, as chat completions has no place for them;
- ``max_output_tokens`` -> ``max_completion_tokens``; ``reasoning.effort`` -> ``reasoning_effort``;
  ``text.format`` ``json_schema`` / ``json_object`` -> ``response_format``; function ``tools`` and
  ``tool_choice`` -> chat's nested ``function`` shapes; ``temperature``, ``top_p``,
  ``parallel_tool_calls``, ``user``, ``safety_identifier``, ``prompt_cache_key``, ``service_tier``
  pass as they are.

What needs state we do not keep or tools we do not run is refused with OpenAI's 400 naming the
field (``param``), never dropped: ``previous_response_id``, ``conversation``, ``background``,
``store: true``, ``prompt``, built-in tools (``web_search``, ``file_search``, ...), ``item_reference``
items, file inputs, ``include`` values but ``reasoning.encrypted_content``, ``top_logprobs``,
``truncation: auto``. A field OpenAI does not
define is its 400 ``unknown_parameter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatbackend.errors import ApplicationError
from llm.providers.base import REASONING_EFFORTS as PROVIDER_REASONING_EFFORTS

# Fields we take (their meaning below), and fields OpenAI defines that we refuse, with why.
SUPPORTED_FIELDS = frozenset(
    (
        "model",
        "input",
        "instructions",
        "stream",
        "stream_options",
        "max_output_tokens",
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "store",
        "background",
        "metadata",
        "reasoning",
        "text",
        "tools",
        "tool_choice",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
        "truncation",
        "previous_response_id",
        "include",
        "max_tool_calls",
    )
)
UNSUPPORTED_FIELDS = {
    "conversation": "this server keeps no conversations for the Responses API; send the whole context in 'input'",
    "prompt": "stored prompt templates are not supported; send 'instructions' and 'input'",
    "top_logprobs": "log probabilities are not supported on /v1/responses; use /v1/chat/completions",
    "context_management": "server-side context management is not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_options": "prompt cache options are not supported",
    "prompt_cache_retention": "prompt cache retention is not supported",
}
STATELESS_HINT = (
    "This server does not store responses (stateless Responses API): send the whole context in 'input' "
    "and set 'store' to false."
)
# ``include`` values accepted: stateless clients (e.g. Codex) ask for encrypted reasoning to send it
# back next turn; chat upstreams take no reasoning input, so reasoning items simply carry none.
ACCEPTED_INCLUDES = frozenset(("reasoning.encrypted_content",))
# Parameters passed to the upstream as the client wrote them (same meaning in chat completions).
PASSED_PARAMETERS = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "prompt_cache_key")
# OpenAI's ReasoningEffort, which Reasoning.effort takes too (max included).
REASONING_EFFORTS = frozenset(PROVIDER_REASONING_EFFORTS)
# ``summary`` is accepted and echoed: reasoning comes back as ``reasoning_text`` (what chat
# upstreams stream as ``reasoning_content``), never as a generated summary.
REASONING_FIELDS = frozenset(("effort", "summary", "generate_summary"))
# Their values as OpenAI's ``Reasoning`` and ``ResponseTextParam`` define them: the response echoes
# them, and its schema allows no others.
REASONING_SUMMARIES = frozenset(("auto", "concise", "detailed"))
VERBOSITIES = frozenset(("low", "medium", "high"))


@dataclass
class ResponsesRequest:
    """A Responses request as the engine takes it.

    ``messages`` / ``parameters``: OpenAI chat messages and parameters (``llm.providers.ChatRequest``).
    ``echo``: the request's fields that the ``response`` object reports back (``instructions``,
    ``tools``, ``tool_choice``, ``temperature``, ...), in the Responses shapes.
    """

    model: str
    stream: bool
    messages: list[dict[str, Any]]
    parameters: dict[str, Any]
    echo: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str, code: str = "invalid_value") -> ApplicationError:
    return ApplicationError(message, code=code, param=param, type="invalid_request_error")


def _check_choice(value: Any, allowed: frozenset[str], param: str) -> None:
    """Raise a 400 naming ``param`` unless ``value`` is None or one of ``allowed``."""
    if value is not None and (not isinstance(value, str) or value not in allowed):
        raise _bad(f"'{param}' must be one of {', '.join(sorted(allowed))}.", param)


def _unsupported(message: str, param: str) -> ApplicationError:
    return _bad(message, param, code="unsupported_parameter")


def _check_request(body: dict[str, Any]) -> None:
    """Raise OpenAI's 400 for a field we refuse or do not know (``param`` names it)."""
    for name, value in body.items():
        if name in UNSUPPORTED_FIELDS:
            if value is None:
                continue
            raise _unsupported(f"'{name}' is not supported: {UNSUPPORTED_FIELDS[name]}.", name)
        if name not in SUPPORTED_FIELDS:
            raise _bad(f"Unknown parameter: '{name}'.", name, code="unknown_parameter")
    if body.get("previous_response_id"):
        raise _unsupported(f"'previous_response_id' is not supported. {STATELESS_HINT}", "previous_response_id")
    if body.get("background"):
        raise _unsupported(
            "'background' responses are not supported: use 'stream' or wait for the reply.", "background"
        )
    if body.get("store") is True:
        raise _unsupported(f"'store': true is not supported. {STATELESS_HINT}", "store")
    for index, value in enumerate(body.get("include") or ()):
        if value not in ACCEPTED_INCLUDES:
            raise _unsupported(
                f"'include' value {value!r} is not supported; only {', '.join(sorted(ACCEPTED_INCLUDES))}.",
                f"include[{index}]",
            )
    if body.get("truncation") not in (None, "disabled"):
        raise _unsupported("Only 'truncation': 'disabled' is supported.", "truncation")


# --- Input ------------------------------------------------------------------------------------


def _text_of_parts(parts: Any, param: str, allowed: tuple[str, ...]) -> str:
    """Join the ``text`` of a list of text parts of types ``allowed``; raise 400 for any other part."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise _bad(f"'{param}' must be a string or a list of content parts.", param, code="invalid_type")
    texts = []
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        if not isinstance(part, dict) or part.get("type") not in allowed:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _unsupported(f"Content part type {kind!r} is not supported here; use {', '.join(allowed)}.", where)
        if not isinstance(part.get("text"), str):
            raise _bad(f"'{where}.text' must be a string.", f"{where}.text", code="invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def _user_content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """Return chat ``content`` of an input message: a string, or ``text`` / ``image_url`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or a list of content parts.", param, code="invalid_type")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"'{where}.text' must be a string.", f"{where}.text", code="invalid_type")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if part.get("file_id") or not isinstance(url, str) or not url:
                raise _unsupported(
                    "An 'input_image' needs an 'image_url' (https:// or data: URL); 'file_id' is not supported.",
                    f"{where}.image_url",
                )
            image: dict[str, Any] = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind in ("input_file", "input_audio"):
            raise _unsupported(f"'{kind}' content is not supported; send text or images.", f"{where}.type")
        else:
            raise _bad(f"Content part type {kind!r} is not valid in an input message.", f"{where}.type")
    return parts


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    content = item.get("content")
    if role == "assistant":
        if isinstance(content, list):  # a refusal part holds its text under "refusal"
            refusals = [part for part in content if isinstance(part, dict) and part.get("type") == "refusal"]
            if refusals and len(refusals) == len(content):
                return {"role": "assistant", "content": "".join(str(part.get("refusal") or "") for part in refusals)}
        return {
            "role": "assistant",
            "content": _text_of_parts(content, f"{param}.content", ("output_text", "input_text")),
        }
    if role in ("user", "system", "developer"):
        if content is None:
            raise _bad(f"'{param}.content' is required.", f"{param}.content", code="missing_required_parameter")
        return {"role": role, "content": _user_content(content, f"{param}.content")}
    raise _bad(
        f"'{param}.role' must be one of user, assistant, system, developer; got {role!r}.",
        f"{param}.role",
    )


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise _bad(f"'{param}.{name}' must be a string.", f"{param}.{name}", code="missing_required_parameter")
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }


def _function_call_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(item.get("call_id"), str) or not item["call_id"]:
        raise _bad(f"'{param}.call_id' must be a string.", f"{param}.call_id", code="missing_required_parameter")
    output = _text_of_parts(item.get("output"), f"{param}.output", ("input_text", "output_text"))
    return {"role": "tool", "tool_call_id": item["call_id"], "content": output}


def input_messages(value: Any, instructions: str | None) -> list[dict[str, Any]]:
    """Return the chat messages of ``instructions`` and ``input`` (a string or a list of input items).

    Raises ``ApplicationError`` 400 naming the item at fault (``input[2].content[0].type``).
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string or a non-empty list of input items.", "input", code="invalid_type")
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise _bad(f"'{param}' must be an object.", param, code="invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_call_output(item, param))
        elif kind == "reasoning":
            continue  # a previous reply's reasoning, sent back: chat completions takes none
        elif kind == "item_reference":
            raise _unsupported(f"'item_reference' items are not supported. {STATELESS_HINT}", f"{param}.type")
        else:
            raise _unsupported(
                f"Input items of type {kind!r} are not supported; use message, function_call or function_call_output.",
                f"{param}.type",
            )
    if not messages:  # only reasoning items, and no instructions: nothing to send a model
        raise _bad("'input' holds no message: reasoning items alone cannot be answered.", "input")
    return messages


# --- Tools and output format ------------------------------------------------------------------


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return chat ``tools`` for Responses function tools; 400 for built-in tools (we run none)."""
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise _unsupported(
                f"Tool type {kind!r} is not supported: this server runs no built-in tools; only 'function' tools.",
                f"tools[{index}].type",
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(
                f"'tools[{index}].name' must be a string.", f"tools[{index}].name", code="missing_required_parameter"
            )
        function: dict[str, Any] = {"name": tool["name"]}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    if choice in ("none", "auto", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported(
        "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}.", "tool_choice"
    )


def _response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    """Return chat's ``response_format`` for ``text.format`` (None for plain text)."""
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)  # noqa: S101 - kind came from it
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format' json_schema needs a 'name' and a 'schema' object.", "text.format")
        schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _unsupported("'text.format.type' must be text, json_object or json_schema.", "text.format.type")


def responses_request(body: dict[str, Any], data: dict[str, Any]) -> ResponsesRequest:
    """Return the engine's view of a Responses request.

    ``body``: the JSON object the client sent; ``data``: its top-level fields as
    ``ResponseCreateInputSerializer`` validated them. Raises ``ApplicationError`` 400 (OpenAI's
    ``invalid_request_error``, ``param`` naming the field) for anything refused (module docstring).
    """
    _check_request(body)
    if "input" not in body or body["input"] is None:
        raise _bad("'input' is required.", "input", code="missing_required_parameter")
    instructions = data.get("instructions")
    messages = input_messages(body["input"], instructions)
    parameters: dict[str, Any] = {name: data[name] for name in PASSED_PARAMETERS if data.get(name) is not None}
    if not data.get("tools"):
        parameters.pop("parallel_tool_calls", None)  # OpenAI's chat API refuses it without tools
    if data.get("service_tier") is not None:
        parameters["service_tier"] = data["service_tier"]
    if data.get("max_output_tokens") is not None:
        parameters["max_completion_tokens"] = data["max_output_tokens"]
    reasoning = data.get("reasoning") or {}
    for key, value in reasoning.items():
        if key not in REASONING_FIELDS and value is not None:
            raise _unsupported(
                f"'reasoning.{key}' is not supported; only 'effort' (and 'summary').", f"reasoning.{key}"
            )
    effort = reasoning.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in REASONING_EFFORTS:
            raise _bad(f"'reasoning.effort' must be one of {', '.join(sorted(REASONING_EFFORTS))}.", "reasoning.effort")
        parameters["reasoning_effort"] = effort
    for key in ("summary", "generate_summary"):
        _check_choice(reasoning.get(key), REASONING_SUMMARIES, f"reasoning.{key}")
    text = data.get("text") or {}
    for key, value in text.items():
        if key not in ("format", "verbosity") and value is not None:
            raise _unsupported(f"'text.{key}' is not supported; only 'format' and 'verbosity'.", f"text.{key}")
    response_format = _response_format(text)
    if response_format is not None:
        parameters["response_format"] = response_format
    _check_choice(text.get("verbosity"), VERBOSITIES, "text.verbosity")
    if text.get("verbosity") is not None:
        parameters["verbosity"] = text["verbosity"]
    tools = data.get("tools") or []
    if tools:
        parameters["tools"] = _tools(tools)
    tool_choice = data.get("tool_choice")
    if tool_choice is not None:
        choice = _tool_choice(tool_choice)
        if tools:  # chat completions refuse a tool_choice without tools; the Responses API takes it
            parameters["tool_choice"] = choice
    metadata = data.get("metadata")  # its limits: ResponseCreateInputSerializer (MetadataField)
    max_tool_calls = body.get("max_tool_calls")  # of built-in tools, which run none here: only checked
    if max_tool_calls is not None and (type(max_tool_calls) is not int or max_tool_calls < 0):
        raise _bad("'max_tool_calls' must be a whole number, 0 or more.", "max_tool_calls", code="invalid_type")
    echo = {
        "instructions": instructions,
        "tools": [
            {
                "type": "function",
                "name": tool["name"],
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            }
            for tool in tools
        ],
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "max_output_tokens": data.get("max_output_tokens"),
        "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "metadata": metadata or {},
        "reasoning": {"effort": effort, "summary": reasoning.get("summary")},
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
        "previous_response_id": None,
        "store": False,
        "truncation": "disabled",
        "background": False,
    }
    return ResponsesRequest(
        model=data["model"], stream=bool(data.get("stream")), messages=messages, parameters=parameters, echo=echo
    )


__all__ = ["ResponsesRequest", "input_messages", "responses_request"]
