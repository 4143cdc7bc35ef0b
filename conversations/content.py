"""Text of chat message content as a conversation stores it.

PostgreSQL's ``text`` cannot hold the null character (U+0000): content that arrives from elsewhere
(a NextChat document, a stored ``/v1`` completion, a model's reply) drops it rather than fail the
write; what a user types is refused instead (``services.message_append``: 400).
"""

from __future__ import annotations

from typing import Any


def storable_text(value: str) -> str:
    """Return ``value`` without null characters, which PostgreSQL's ``text`` cannot hold."""
    return value.replace("\x00", "")


def storable_tool_calls(tool_calls: Any) -> list[Any] | None:
    """Return OpenAI ``tool_calls`` (a message's list, as sent or answered) storable in a JSON column:
    None for no list or an empty one; its strings without null characters, which PostgreSQL's
    ``jsonb`` cannot hold (``storable_text``)."""
    if not isinstance(tool_calls, list | tuple) or not tool_calls:
        return None
    return [_storable_json(call) for call in tool_calls]


def _storable_json(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(key)): _storable_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(item) for item in value]
    return value


def content_text(content: Any, *, separator: str) -> str:
    """Return the text of an OpenAI-shaped message ``content``, storable (``storable_text``).

    ``content``: a string; or an array of parts, whose ``text`` parts are joined with ``separator``
    (images and other parts dropped); anything else (``null``: an assistant message of tool calls)
    is ``""``.
    """
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = separator.join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    else:
        text = ""
    return storable_text(text)
