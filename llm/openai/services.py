"""Services behind the OpenAI-compatible API (``/v1`` and NextChat's ``/dashboard/billing``).

A ``/v1/chat/completions`` request has no conversation: every request carries its whole context
and nothing but its usage is stored, unless it says ``store: true``: then its plan is a
``StoredChatCompletionPlan``, whose end hands the exchange to the completion store
(``OPENAI_COMPLETION_STORE``, the conversations app's: this app may not import it).
``openai_chat_start`` plans the reply for the streaming engine (``llm.streaming``), which accounts
the usage when the reply ends. Planning reads nothing: the caller passes the model (cached in the
process: ``llm.selectors.enabled_model_get``), so a request whose principal and model are cached
starts on the event loop, without a thread hop.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from accounts.authentication import Principal
from accounts.models import UsageRecord

from ..metering import TOKEN_LIMIT_PARAMETERS, max_tokens_check
from ..plans import model_reply_plan
from ..selectors import EnabledModel
from ..streaming import ReplyOutcome, ReplyPlan

# Request fields the adapter or this service owns; never taken from a model's defaults or the client.
# ``store`` and ``metadata`` are ours: a stored completion is kept here, never at the upstream.
RESERVED_PARAMETERS = frozenset(("model", "messages", "stream", "stream_options", "n", "store", "metadata"))


@dataclass(kw_only=True)
class ChatCompletionPlan(ReplyPlan):
    """A ``/v1/chat/completions`` reply: ``reply_id`` is its ``chatcmpl-...`` id (and usage request id).

    ``created``: Unix seconds. ``stream`` / ``include_usage``: what the client asked for.
    """

    created: int
    stream: bool
    include_usage: bool


@dataclass(kw_only=True)
class StoredChatCompletionPlan(ChatCompletionPlan):
    """A ``/v1/chat/completions`` reply sent with ``store: true``: its end is kept (``completion_store``).

    ``user_id`` / ``organization_id``: the owner and the organization the request acted in.
    ``metadata``: the request's ``metadata`` (string keys and values). A plan of its own, so that
    only replies to store pay for the end's worker-thread hop: the engine calls ``finish`` only
    for plans that override it (``llm.streaming.Reply._persist``).
    """

    user_id: int
    organization_id: int
    metadata: dict[str, str] = field(default_factory=dict)

    def finish(self, outcome: ReplyOutcome) -> None:
        """Keep the exchange (the request's messages and the reply) with the completion store."""
        completion_store()(plan=self, outcome=outcome)


CompletionStore = Callable[..., None]


@functools.cache
def completion_store() -> CompletionStore:
    """Return the function that keeps stored completions: ``settings.OPENAI_COMPLETION_STORE``, imported.

    Called as ``store(plan=StoredChatCompletionPlan, outcome=ReplyOutcome)`` in a worker thread when a
    stored reply ends (the ORM is allowed). Raises ``ImproperlyConfigured`` when the path does not
    import (``LlmConfig.ready`` calls this at start-up).
    """
    path = settings.OPENAI_COMPLETION_STORE
    try:
        store: CompletionStore = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"OPENAI_COMPLETION_STORE {path!r} does not import: {exc}") from exc
    return store


def new_completion_id() -> str:
    """Return a fresh chat completion id: ``chatcmpl-`` + 32 hex digits."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def openai_chat_start(
    *,
    principal: Principal,
    model: EnabledModel,
    messages: list[dict[str, Any]],
    parameters: dict[str, Any],
    stream: bool,
    include_usage: bool,
    reply_id: str | None = None,
    source: UsageRecord.Source = UsageRecord.Source.OPENAI_API,
    store: bool = False,
    metadata: dict[str, str] | None = None,
) -> ChatCompletionPlan:
    """Return the plan of one ``/v1/chat/completions`` reply to ``model``.

    ``model``: the enabled model the client named (``llm.selectors.enabled_model_get``).
    ``messages``: OpenAI message objects, sent upstream as they are. ``parameters``: the other
    request fields the client sent; the model's ``default_parameters`` fill in the ones it did
    not send (``RESERVED_PARAMETERS`` are dropped from both). ``reply_id``: the reply's id in its
    inbound API's words (``msg_...``, ``resp_...``; at most 64 characters), else a fresh
    ``chatcmpl-...``; unique, it is the usage record's ``request_id``. ``source``: the inbound API,
    as the usage record names it (another inbound API translated its request into these OpenAI
    messages and parameters). ``store``: keep the exchange when the reply ends (a
    ``StoredChatCompletionPlan``, with ``metadata``). Writes nothing and reads nothing: pure CPU,
    fine on the event loop.
    Raises ``ApplicationError`` 400 ``max_tokens_too_large`` when the client's ``max_tokens`` or
    ``max_completion_tokens`` exceeds the model's ``context_window`` (tokens): no reply could be
    that long.
    """
    max_tokens_check(model=model, parameters=parameters)
    merged = {key: value for key, value in model.default_parameters.items() if key not in RESERVED_PARAMETERS}
    merged.update((key, value) for key, value in parameters.items() if key not in RESERVED_PARAMETERS)
    completion_id = reply_id or new_completion_id()
    plan_class: type[ChatCompletionPlan] = ChatCompletionPlan
    stored: dict[str, Any] = {}
    if store:
        plan_class = StoredChatCompletionPlan
        stored = {
            "user_id": principal.user.pk,
            "organization_id": principal.organization.pk,
            "metadata": dict(metadata or {}),
        }
    return model_reply_plan(
        plan_class,
        model=model,
        messages=messages,
        parameters=merged,
        reply_id=completion_id,
        source=source,
        user=principal.user,
        api_key=principal.api_key,
        organization=principal.organization,
        created=int(time.time()),
        stream=stream,
        include_usage=include_usage,
        **stored,
    )


__all__ = [
    "RESERVED_PARAMETERS",
    "TOKEN_LIMIT_PARAMETERS",
    "ChatCompletionPlan",
    "CompletionStore",
    "StoredChatCompletionPlan",
    "completion_store",
    "new_completion_id",
    "openai_chat_start",
]
