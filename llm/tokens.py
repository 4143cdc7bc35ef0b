"""Token estimates for when a provider does not report usage (a stream cut off, a failure).

The counts are honest estimates and are stored with ``estimated=True``; tiktoken is not used
because it downloads its vocabularies at run time, which fails air-gapped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# OpenAI's rule of thumb: one token is about four characters of English text
# (https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them).
CHARS_PER_TOKEN = 4
# Per-message framing overhead of OpenAI's chat format (the "tokens_per_message = 3" of
# https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken), plus 3 to prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts are estimated
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def estimate_text_tokens(text: str) -> int:
    """Return the estimated token count of ``text`` (ceil(chars / 4))."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """Return the estimated prompt tokens of OpenAI chat ``messages``."""
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + estimate_text_tokens(_text_of(message.get("content")))
    return total
