"""Translate an Anthropic Messages request into the OpenAI chat messages and parameters of the engine.

Every provider adapter takes OpenAI-shaped ``ChatRequest``s (``llm.providers.base``), so an
inbound ``POST /v1/messages`` is translated once, here, and then planned exactly like a
``/v1/chat/completions`` request (``llm.openai.services.openai_chat_start``).

Spec: https://docs.anthropic.com/en/api/messages (request), OpenAI's side:
https://platform.openai.com/docs/api-reference/chat/create.

What maps to what:

- ``system`` (a string or ``text`` blocks) → a first ``system`` message (the blocks' texts joined
  by a blank line; ``cache_control`` is dropped: OpenAI-compatible APIs cache by themselves).
- ``user`` content: ``text`` → a text part; ``image`` with a ``base64`` source → an ``image_url``
  part with a ``data:<media_type>;base64,...`` URL, with a ``url`` source → that URL;
  ``tool_result`` → a ``tool`` message (``tool_call_id`` = ``tool_use_id``; its content's texts
  joined; ``is_error: true`` prefixes ``"Error: "``, since OpenAI has no such flag) placed before
  the user's other blocks, as OpenAI wants tool answers right after the assistant's calls.
  ``document``, ``search_result`` and other block types are a 400, as is an image inside a
  ``tool_result`` (an OpenAI tool message holds text only).
- ``assistant`` content: ``text`` → the message's content; ``tool_use`` → ``tool_calls`` (``input``
  as JSON ``arguments``); ``thinking`` / ``redacted_thinking`` blocks are dropped (OpenAI-compatible
  APIs take no reasoning back).
- ``tools`` → ``{"type": "function", "function": {name, description, parameters: input_schema}}``;
  server tools (a ``type`` other than ``custom``) are a 400. ``tool_choice`` ``auto`` / ``any`` /
  ``none`` / ``tool`` → ``"auto"`` / ``"required"`` / ``"none"`` / ``{"type": "function", ...}``;
  ``disable_parallel_tool_use: true`` → ``parallel_tool_calls: false``.
- ``max_tokens`` → ``max_tokens``; ``stop_sequences`` → ``stop``; ``temperature`` / ``top_p`` as
  they are (Anthropic's range 0..1 is within OpenAI's). ``top_k`` is not sent: OpenAI's API has
  no such field and refuses unknown ones. ``metadata.user_id`` → ``user``.
- ``thinking: {"type": "enabled", "budget_tokens": n}`` → ``reasoning_effort``: ``low`` below
  ``REASONING_MEDIUM_BUDGET`` tokens, ``medium`` below ``REASONING_HIGH_BUDGET``, else ``high``
  (a model that does not reason may refuse the field: the upstream's 400 is passed through).
  ``adaptive``, ``between_tools`` and ``disabled`` send nothing (the model's own default);
  ``output_config.effort`` → ``reasoning_effort`` of the same name (OpenAI's ``ReasoningEffort``
  has all five, ``xhigh`` and ``max`` included), and wins
  over a thinking budget; ``output_config.format`` (a JSON schema) → ``response_format``
  ``json_schema`` (strict). A tool's ``strict`` → the function's ``strict``.
- ``IGNORED_FIELDS`` are accepted and not sent: they steer Anthropic's own servers (caching,
  region, speed, workspaces, cache diagnostics), which an OpenAI-compatible upstream has no use for.
- ``UNSUPPORTED_FIELDS`` are a 400 that says why: they need Anthropic's servers to run something.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from chatbackend.errors import ApplicationError

# ``thinking.budget_tokens`` thresholds of ``reasoning_effort`` (tokens); Anthropic's minimum
# budget is 1024, and OpenAI's "medium" is its default.
REASONING_MEDIUM_BUDGET = 4_096
REASONING_HIGH_BUDGET = 16_384

# Top-level fields accepted and ignored (see the module docstring); the serializers have them.
IGNORED_FIELDS = frozenset(
    ("service_tier", "cache_control", "inference_geo", "speed", "user_profile_id", "workspace_id", "diagnostics")
)
# Anthropic fields that need Anthropic's own servers; a clear 400 rather than a silent drop.
UNSUPPORTED_FIELDS = {
    "container": "code-execution containers are Anthropic's servers' own",
    "mcp_servers": "remote MCP servers are called by Anthropic's servers",
    "context_management": "server-side context editing is Anthropic's servers' own",
}
# ``output_config.effort`` -> OpenAI's ``reasoning_effort``: the same five words, all in OpenAI's
# ``ReasoningEffort`` (none, minimal, low, medium, high, xhigh, max: /work/shared/specs/openai-openapi.yaml),
# so a client asking Claude's way for the most effort is not answered with ``high``'s.
OUTPUT_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "max"}
IMAGE_MEDIA_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))


def _invalid(message: str, param: str) -> ApplicationError:
    return ApplicationError(f"{param}: {message}", code="invalid_request", param=param)


def check_fields(body: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Raise a 400 naming the first top-level field of ``body`` not in ``allowed`` (a serializer's fields).

    Anthropic refuses unknown fields too ("Extra inputs are not permitted"); a field that needs
    Anthropic's servers (``UNSUPPORTED_FIELDS``) is told why.
    """
    for name in body:
        if name in allowed:
            continue
        reason = UNSUPPORTED_FIELDS.get(name)
        if reason is not None:
            raise _invalid(f"Not supported by this server ({reason}).", name)
        raise _invalid("Extra inputs are not permitted.", name)


def _text(block: Mapping[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid("A text block needs a string 'text'.", f"{param}.text")
    return text


def system_text(system: str | list[dict[str, Any]], param: str = "system") -> str:
    """Return the ``system`` prompt as one string: the string, or its ``text`` blocks joined by a blank line."""
    if isinstance(system, str):
        return system
    texts = []
    for index, block in enumerate(system):
        if block.get("type") != "text":
            raise _invalid("The system prompt takes only text blocks.", f"{param}.{index}.type")
        texts.append(_text(block, f"{param}.{index}"))
    return "\n\n".join(texts)


def _image_part(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid("An image block needs a 'source' object.", f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or media_type not in IMAGE_MEDIA_TYPES:
            allowed = ", ".join(sorted(IMAGE_MEDIA_TYPES))
            raise _invalid(f"Expected one of {allowed}.", f"{param}.source.media_type")
        if not isinstance(data, str) or not data:
            raise _invalid("A base64 image source needs its 'data'.", f"{param}.source.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        link = source.get("url")
        if not isinstance(link, str) or not link.startswith(("https://", "http://")):
            raise _invalid("A url image source needs an http(s) 'url'.", f"{param}.source.url")
        url = link
    else:
        raise _invalid("Image sources are 'base64' or 'url' (Anthropic's 'file' needs its Files API).", param)
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_message(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise _invalid("A tool_result block needs the 'tool_use_id' it answers.", f"{param}.tool_use_id")
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            part_param = f"{param}.content.{index}"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid("Only text blocks are supported in a tool result.", part_param)
            texts.append(_text(part, part_param))
        text = "\n\n".join(texts)
    else:
        raise _invalid("Expected a string or a list of text blocks.", f"{param}.content")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise _invalid("Expected a boolean.", f"{param}.is_error")
    if is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _tool_call(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid("A tool_use block needs an 'id'.", f"{param}.id")
    if not isinstance(name, str) or not name:
        raise _invalid("A tool_use block needs a 'name'.", f"{param}.name")
    if not isinstance(arguments, dict):
        raise _invalid("A tool_use block needs its 'input' object.", f"{param}.input")
    encoded = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": encoded}}


def _user_messages(content: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        block_param = f"{param}.{index}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, block_param)})
        elif kind == "image":
            parts.append(_image_part(block, block_param))
        elif kind == "tool_result":
            tool_messages.append(_tool_result_message(block, block_param))
        else:
            raise _invalid(
                f"Block type {kind!r} is not supported in a user message (text, image, tool_result are).",
                f"{block_param}.type",
            )
    if parts:
        # A lone text part as a plain string: what every OpenAI-compatible server takes.
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        tool_messages.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return tool_messages


def _assistant_message(content: list[dict[str, Any]], param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        block_param = f"{param}.{index}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block, block_param))
        elif kind == "tool_use":
            calls.append(_tool_call(block, block_param))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _invalid(
                f"Block type {kind!r} is not supported in an assistant message (text, tool_use, thinking are).",
                f"{block_param}.type",
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def openai_messages(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return the OpenAI chat messages of a validated Anthropic request ``data`` (``system`` first).

    Raises ``ApplicationError`` 400 whose ``param`` is the path of the block at fault.
    """
    messages: list[dict[str, Any]] = []
    system = data.get("system")
    if system:
        messages.append({"role": "system", "content": system_text(system)})
    for index, message in enumerate(data["messages"]):
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif role == "user":
            messages.extend(_user_messages(content, f"messages.{index}.content"))
        else:
            messages.append(_assistant_message(content, f"messages.{index}.content"))
    return messages


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return OpenAI function tools for Anthropic client ``tools``; a server tool is a 400."""
    functions = []
    for index, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise _invalid(
                f"Server tool {tool['type']!r} runs on Anthropic's servers; only client tools are supported.",
                f"tools.{index}.type",
            )
        function: dict[str, Any] = {
            "name": tool["name"],
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is True:
            function["strict"] = True
        functions.append({"type": "function", "function": function})
    return functions


def openai_tool_choice(choice: Mapping[str, Any]) -> str | dict[str, Any]:
    """Return OpenAI's ``tool_choice`` for Anthropic's."""
    kind = choice["type"]
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def reasoning_effort(budget_tokens: int) -> str:
    """Return OpenAI's ``reasoning_effort`` for a thinking budget in tokens (see the module docstring)."""
    if budget_tokens < REASONING_MEDIUM_BUDGET:
        return "low"
    if budget_tokens < REASONING_HIGH_BUDGET:
        return "medium"
    return "high"


def openai_parameters(data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the OpenAI request fields (besides model, messages, stream) of validated Anthropic ``data``."""
    parameters: dict[str, Any] = {}
    if "max_tokens" in data:
        parameters["max_tokens"] = data["max_tokens"]
    if data.get("stop_sequences"):
        parameters["stop"] = data["stop_sequences"]
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            parameters[name] = data[name]
    tools, choice = data.get("tools"), data.get("tool_choice")
    if tools:
        parameters["tools"] = openai_tools(tools)
        if choice:
            parameters["tool_choice"] = openai_tool_choice(choice)
            if choice.get("disable_parallel_tool_use") is True and choice["type"] != "none":
                parameters["parallel_tool_calls"] = False
    thinking, output = data.get("thinking"), data.get("output_config") or {}
    if output.get("effort"):
        parameters["reasoning_effort"] = OUTPUT_EFFORTS[output["effort"]]
    elif thinking and thinking["type"] == "enabled":
        parameters["reasoning_effort"] = reasoning_effort(thinking["budget_tokens"])
    if output.get("format"):
        schema = {"name": "output", "schema": output["format"]["schema"], "strict": True}
        parameters["response_format"] = {"type": "json_schema", "json_schema": schema}
    user_id = (data.get("metadata") or {}).get("user_id")
    if user_id:
        parameters["user"] = user_id
    return parameters


__all__ = [
    "IGNORED_FIELDS",
    "UNSUPPORTED_FIELDS",
    "check_fields",
    "openai_messages",
    "openai_parameters",
    "openai_tool_choice",
    "openai_tools",
    "reasoning_effort",
    "system_text",
]
