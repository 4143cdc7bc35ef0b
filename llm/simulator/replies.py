"""The simulator's deterministic replies and token counts.

Word ``i`` of a reply is picked from a fixed 64-word list by a CRC32 of the last user message;
``prompt_tokens`` is the number of words in all messages plus 3 per message, and
``completion_tokens`` the number of words (one per content chunk) of the reply.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

# A fixed vocabulary; 64 entries so that any odd stride visits every word (see _word_indexes).
WORDS = (
    "the quick brown fox jumps over lazy dog while seven bright stars watch quiet river "
    "flow past old stone bridges under silver moonlight and gentle winds carry soft songs "
    "from distant hills where green fields meet tall pine forests near small wooden houses "
    "with warm fires glowing through open windows on long winter nights as calm blue "
    "waves touch golden sand beneath clear skies"
).split()
assert len(WORDS) == 64  # noqa: S101 - a module invariant, checked once at import


def _text_of(content: Any) -> str:
    """Return the text of a message ``content`` (a string, or a list of ``{"type": "text"}`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _word_indexes(prompt: str, tokens: int) -> list[int]:
    """Return ``tokens`` indexes into the word list, a pure function of ``prompt``."""
    seed = zlib.crc32(prompt.encode())
    start, stride = seed % 64, 2 * ((seed >> 6) % 32) + 1  # odd stride: a full cycle over 64 words
    return [(start + i * stride) % 64 for i in range(tokens)]


def reply_word_indexes(messages: Sequence[Mapping[str, Any]], tokens: int) -> list[int]:
    """Return the indexes into ``WORDS`` of the reply (``tokens`` words) to ``messages``."""
    return _word_indexes(_last_user_text(messages), tokens)


def words_text(indexes: Sequence[int]) -> str:
    """Return the words at ``indexes`` of ``WORDS``, joined by single spaces."""
    return " ".join(WORDS[i] for i in indexes)


def reply_text(messages: Sequence[Mapping[str, Any]], tokens: int) -> str:
    """Return the simulator's reply (``tokens`` words) to ``messages`` (OpenAI message objects)."""
    return words_text(reply_word_indexes(messages, tokens))


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Return the simulator's ``prompt_tokens``: words in all messages plus 3 per message."""
    return sum(len(_text_of(m.get("content")).split()) + 3 for m in messages)


__all__ = ["WORDS", "count_prompt_tokens", "reply_text", "reply_word_indexes", "words_text"]
