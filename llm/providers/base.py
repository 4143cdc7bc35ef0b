"""The provider contract: plain dataclasses in, plain dataclasses out, no ORM.

A provider adapter turns a ``ChatRequest`` into a stream of ``ChatChunk`` batches from one
upstream API. Adapters are chosen by ``Provider.kind`` through ``llm.providers.get_provider``,
the way Django chooses cache and email backends.
"""

from __future__ import annotations

import abc
import base64
import math
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from chatbackend.errors import ApplicationError
from chatbackend.logging import redact


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """How to reach one upstream: adapter ``kind``, API root ``base_url`` (its meaning per kind:
    ``Provider.Kind``; OpenAI-compatible with ``/v1``, Anthropic without), secret
    ``api_key`` (may be empty), timeouts in seconds (``connect_timeout``: to open a connection;
    ``read_timeout``: the longest silence between chunks; ``first_token_timeout``: the longest wait
    for a reply's first chunk, enforced by ``llm.routing``), and ``extra_headers`` sent with every request
    (``(name, value)`` pairs, none that the adapter sets itself). ``stream_usage``: ask the
    upstream to report usage at the end of a stream (OpenAI's ``stream_options.include_usage``);
    off for servers that reject the option."""

    kind: str
    base_url: str
    api_key: str = field(default="", repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    first_token_timeout: float = 60.0
    # Not in the repr either: an operator may put a gateway's key there despite the admin's advice.
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    stream_usage: bool = True

    def secrets(self) -> list[str]:
        """Return the secrets an upstream may echo back in an error: ``api_key`` and the password of
        ``base_url``'s user info (``https://user:password@host/...``: sent as HTTP Basic), or its user
        name when it has no password (a token, as ``accounts.audit`` reads it too), as written in the
        URL, percent-decoded and as the ``Authorization: Basic`` value carries it (RFC 7617)."""
        found = [self.api_key] if self.api_key else []
        try:
            parts = urlsplit(self.base_url)
            username, password = parts.username, parts.password
        except ValueError:  # a URL Provider's validation would refuse: it cannot reach an upstream
            username = password = None
        secret = password or username
        if secret:
            user, decoded = unquote(username or ""), unquote(password or "")
            basic = base64.b64encode(f"{user}:{decoded}".encode()).decode()
            found += [secret, unquote(secret), basic]
        return sorted(set(found), key=len, reverse=True)  # longest first: none is left half-replaced

    def redacted(self, text: str) -> str:
        """Return ``text`` (an upstream's error message, an exception's text) with ``secrets()``
        and anything key-shaped (``chatbackend.logging.redact``) replaced by ``[REDACTED]``."""
        for secret in self.secrets():
            text = text.replace(secret, "[REDACTED]")
        return redact(text)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion request.

    ``model``: the upstream model id. ``messages``: OpenAI chat message objects
    (``{"role": ..., "content": ...}``, content a string or a list of parts).
    ``parameters``: other OpenAI request fields (``temperature``, ``max_tokens``, ``tools``, ...),
    never ``model``, ``messages``, ``stream`` or ``stream_options``, which the adapter owns.
    """

    model: str
    messages: list[dict[str, Any]]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for one reply, in OpenAI's ``usage`` terms whatever the provider.

    ``prompt_tokens`` counts every input token, cached or not, and ``completion_tokens`` every
    output token, reasoning included (OpenAI's convention; an adapter for a provider that reports
    them apart, e.g. Anthropic's ``input_tokens`` without its cache tokens or Gemini's
    ``candidatesTokenCount`` without ``thoughtsTokenCount``, adds them up). The breakdown:
    ``cached_tokens`` of the prompt read from the provider's prompt cache (OpenAI
    ``prompt_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``, Gemini
    ``cachedContentTokenCount``), ``cache_creation_tokens`` of the prompt written to it (Anthropic
    ``cache_creation_input_tokens``), ``reasoning_tokens`` of the completion spent thinking (OpenAI
    ``completion_tokens_details.reasoning_tokens``, Gemini ``thoughtsTokenCount``); 0 when unreported.
    ``prompt_only``: a report of the prompt alone, sent before the reply (Anthropic's ``message_start``):
    its prompt counts and breakdown are the provider's, its ``completion_tokens`` not yet known. A
    later report replaces it; a stream that ends without one keeps its prompt and counts the completion.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_only: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ChatChunk:
    """One piece of a streamed reply.

    ``content`` / ``reasoning_content``: text added by this chunk (may be empty).
    ``tool_calls``: OpenAI ``delta.tool_calls`` entries as OpenAI streams them: a call's first entry has its
    ``index``, ``id``, ``type`` and ``function.name``, later ones its ``index`` and an ``arguments`` fragment.
    ``finish_reason``: set on the chunk that ends the reply (``stop``, ``length``, ``tool_calls``, ...);
    OpenAI sends it with an empty delta, so that chunk often carries nothing else.
    ``usage``: set on the chunk that carries the provider's usage report.
    ``logprobs``: the choice's OpenAI ``logprobs`` object (``{"content": [ChatCompletionTokenLogprob,
    ...], "refusal": [...] | null}``) when the upstream sent token log probabilities (the client
    asked for ``logprobs``), passed through untouched; else None.
    ``refusal``: text the model added to its refusal (OpenAI's ``delta.refusal``: the model declined,
    and says so here instead of in ``content``); may be empty.
    ``annotations``: OpenAI's ``delta.annotations`` entries (``url_citation`` objects of web-search
    models), passed through untouched; else None.
    ``system_fingerprint``: the upstream's ``system_fingerprint`` (OpenAI's backend configuration),
    set on the first chunk handed on after the upstream first sent it or changed it; else None. It
    describes the whole reply, so interfaces read it from the first chunk of a batch only.
    ``stop_sequence``: on the chunk with ``finish_reason`` ``stop``, the stop sequence that ended the
    reply, when the upstream says which (Anthropic's ``stop_sequence``; OpenAI's wire does not); else None.
    """

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: dict[str, Any] | None = None
    refusal: str = ""
    annotations: list[dict[str, Any]] | None = None
    system_fingerprint: str | None = None
    stop_sequence: str | None = None


def tool_calls_merged(deltas: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the whole tool calls that streamed ``delta.tool_calls`` entries (``ChatChunk.tool_calls``) make.

    Each: ``{"id", "type", "function": {"name", "arguments"}}`` (OpenAI's ``ChatCompletionMessageToolCall``),
    plus the ``extra_content`` an entry carried (Gemini's ``{"google": {"thought_signature"}}``, as
    Google's OpenAI-compatible endpoint puts it on the call), in ``index`` order. The first entry of
    an ``index`` starts its call; later ones append their ``function.arguments`` and fill an ``id``,
    ``name`` or ``extra_content`` it lacked
    (https://platform.openai.com/docs/api-reference/chat-streaming, ``choices[].delta.tool_calls``).
    """
    calls: dict[int, dict[str, Any]] = {}
    for entry in deltas:
        function = entry.get("function") or {}
        index = entry.get("index", 0)
        call = calls.get(index)
        if call is None:
            call = calls[index] = {
                "id": entry.get("id") or "",
                "type": entry.get("type") or "function",
                "function": {"name": function.get("name") or "", "arguments": function.get("arguments") or ""},
            }
        else:
            if entry.get("id") and not call["id"]:
                call["id"] = entry["id"]
            if function.get("name") and not call["function"]["name"]:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
        # Kept so that a client sending the call back returns Gemini its signature: without one the adapter
        # sends Google's skip placeholder (Gemini 3 refuses a call with none), and the model's reasoning is lost.
        if entry.get("extra_content") and "extra_content" not in call:
            call["extra_content"] = entry["extra_content"]
    return [calls[index] for index in sorted(calls)]


# Upstream statuses our client gets as they are: its request can be fixed or retried.
PASSED_THROUGH_STATUSES = frozenset((400, 404, 413, 422, 429))

# What a client is told for each upstream failure code (the server log has the detail).
UPSTREAM_MESSAGES = {
    "upstream_unreachable": "The model provider could not be reached.",
    "upstream_timeout": "The model provider did not answer in time.",
    "upstream_disconnected": "The model provider's response was cut off.",
    "upstream_bad_response": "The model provider sent a response this server could not read.",
    "upstream_auth_failed": "The model provider rejected this server's credentials.",
    "upstream_error": "The model provider failed to answer.",
}


class UpstreamError(ApplicationError):
    """The upstream failed: it answered an error status, sent garbage, timed out or was unreachable.

    ``status`` is what *our* client should get (OpenAI's convention): the upstream's 400/404/413/422
    and 429 pass through as they are (the client can fix or retry them); an upstream 401/403 is
    our configuration's fault and becomes 502, like any upstream 5xx or bad body; a timeout is 504.
    ``upstream_status`` keeps the upstream's own status (``None`` when no response arrived);
    ``retry_after`` the seconds the upstream asked to wait before retrying (OpenAI's
    ``retry-after-ms`` or the ``Retry-After`` header on a 429/503/529, Gemini's
    ``RetryInfo.retryDelay``), for routing to honour; None when it said nothing.

    ``message`` is what clients see and what a conversation's message stores: it never names the
    upstream's host or port, nor quotes a library's error text (``UPSTREAM_MESSAGES`` has the
    wording for each ``code``); an upstream's own error message is quoted only for the statuses
    passed through, which the client can act on. ``detail`` holds the rest, for the server log.
    """

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        code: str = "upstream_error",
        status: int | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        if status is None:
            status = upstream_status if upstream_status in PASSED_THROUGH_STATUSES else 502
        # A client told 429 waits as long as the upstream asked (whole seconds, RFC 9110 section 10.2.3).
        headers = (
            {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None and status == 429 else None
        )
        super().__init__(message, code=code, status=status, type=None, detail=detail, headers=headers)
        self.upstream_status = upstream_status
        self.retry_after = retry_after


# What a provider's request translation raises for messages or parameters of a shape it did not
# expect (the OpenAI-shaped input is validated loosely, so unknown part types reach the adapters).
TRANSLATION_ERRORS: tuple[type[Exception], ...] = (TypeError, AttributeError, KeyError, IndexError, ValueError)


def untranslatable(exc: Exception) -> ApplicationError:
    """Return the 400 for a request an adapter could not translate to its provider's format (``exc``: why)."""
    return ApplicationError(
        f"The request's messages or parameters have a shape this model's provider cannot take ({type(exc).__name__}).",
        code="invalid_request",
        status=400,
        param="messages",
    )


# OpenAI request fields whose effect a client relies on, with what a value that asks for something
# looks like and what the client would lose if an adapter dropped it. An adapter whose provider has
# no equivalent refuses them (``refuse_unsupported``) instead of answering without what was asked
# (https://platform.openai.com/docs/api-reference/chat/create for the fields).
_RELIED_ON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logprobs": (lambda value: value is True, "returns no token log probabilities through this server"),
    "top_logprobs": (lambda value: value is not None, "returns no token log probabilities through this server"),
    "logit_bias": (lambda value: bool(value), "takes no token biases (and its tokens are not OpenAI's)"),
    "modalities": (
        lambda value: isinstance(value, list) and any(modality != "text" for modality in value),
        "answers in text only",
    ),
    "audio": (lambda value: value is not None, "answers in text only"),
    "web_search_options": (lambda value: value is not None, "offers no web search through this API"),
}


def refuse_unsupported(parameters: Mapping[str, Any], names: Iterable[str], provider: str) -> None:
    """Raise the 400 for the first of ``names`` that ``parameters`` (OpenAI request fields) ask for.

    ``names``: fields of ``_RELIED_ON`` that ``provider`` (its name, for the message) cannot honour;
    a value that asks for nothing (``logprobs: false``, ``modalities: ["text"]``, null) passes.
    Raises ``ApplicationError`` 400 ``unsupported_parameter`` naming the field in ``param``, as
    OpenAI answers a parameter a model does not support.
    """
    for name in names:
        asks, loss = _RELIED_ON[name]
        if asks(parameters.get(name)):
            raise ApplicationError(
                f"Unsupported parameter: '{name}' is not supported with this model: its provider ({provider}) {loss}.",
                code="unsupported_parameter",
                status=400,
                param=name,
            )


# OpenAI's ReasoningEffort values (/work/shared/specs/openai-openapi.yaml, components.schemas.ReasoningEffort).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def reasoning_effort(parameters: Mapping[str, Any]) -> str | None:
    """Return the request's ``reasoning_effort`` (one of ``REASONING_EFFORTS``), or None when not sent.

    For adapters that turn it into a thinking budget: a value they do not know would otherwise ask
    for no thinking at all without a word. Raises ``ApplicationError`` 400 ``invalid_value``
    (``param`` ``reasoning_effort``) for a value outside OpenAI's.
    """
    effort = parameters.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ApplicationError(
            f"Invalid value for 'reasoning_effort': {effort!r}; supported values are "
            + ", ".join(f"'{value}'" for value in REASONING_EFFORTS)
            + ".",
            code="invalid_value",
            status=400,
            param="reasoning_effort",
        )
    return effort


def tool_choice_function(tool_choice: Any, tools: Any) -> str | None:
    """Return the function a named OpenAI ``tool_choice`` (``{"type": "function", "function": {"name"}}``) forces.

    None for ``none``, ``auto``, ``required`` or no ``tool_choice``. ``tools``: the request's OpenAI
    ``tools``. For adapters whose provider names a forced tool its own way (Anthropic's ``tool``,
    Gemini's ``allowedFunctionNames``), so that what the provider would refuse with its own wording
    is our clear 400 before any request. Raises ``ApplicationError`` 400 ``invalid_value``
    (``param`` ``tool_choice``) for an object that names no function (OpenAI's ``custom`` and
    ``allowed_tools`` choices have no equivalent there), a function not among ``tools``, and
    ``required`` or a named function without ``tools`` (OpenAI's rule too: no tool could be called).
    """
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None

    def invalid(message: str) -> ApplicationError:
        return ApplicationError(message, code="invalid_value", status=400, param="tool_choice")

    names = [
        tool["function"].get("name")
        for tool in tools or ()
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
    ]
    if not tools:
        raise invalid("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.")
    if tool_choice == "required":
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str) or not name:
        raise invalid(
            "Invalid value for 'tool_choice': this model's provider takes 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}."
        )
    if name not in names:
        raise invalid(f"Invalid value for 'tool_choice': function {name!r} is not among 'tools'.")
    return name


class ChatProvider(abc.ABC):
    """Adapter base class: stream one chat completion from one upstream.

    Subclasses implement ``stream``. Instances are cheap; shared resources (HTTP client pools)
    live at module level, one per process.
    """

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def _safe(self, text: str) -> str:
        """Return ``text`` without this provider's secrets (``ProviderConfig.redacted``)."""
        return self.config.redacted(text)

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[list[ChatChunk], None]:
        """Yield the reply's chunks in batches, the last chunk carrying ``usage`` if the upstream reports it.

        A batch is every chunk parsed from what the upstream had sent by the time the adapter
        read: one or more, never an empty list, in order. Under load several events wait in the
        socket buffer; handing them on together lets the server write them to its client in one
        send instead of one per chunk. Must raise ``UpstreamError`` for any upstream failure
        (before or after the first chunk), after yielding the chunks that came before it.
        Cancellation (``asyncio.CancelledError``) or ``aclose()`` must close the upstream HTTP
        request at once, so the upstream stops generating.
        """
