"""The admission-control request of a reply: who it counts against and how large it can be.

Built when a reply is planned (``/v1``: ``llm.openai.services``; conversations:
``conversations.services``) and checked by the streaming engine before the upstream call
(``accounts.metering.metering_admit``), so every interface is metered by the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings

from accounts.metering import MeteringRequest, MeteringSubject
from accounts.models import APIKey, Organization, User
from chatbackend.errors import ApplicationError

from .selectors import EnabledModel

# Request fields that bound the reply's length in tokens (OpenAI's current name and the older one).
TOKEN_LIMIT_PARAMETERS = ("max_completion_tokens", "max_tokens")


def output_reserve_for(*, model: EnabledModel, parameters: Mapping[str, Any]) -> int | None:
    """Return the tokens set aside for a reply's output: what its prompt must leave free (tokens).

    The client's ``max_completion_tokens`` (or the older ``max_tokens``) when it sent one, else the
    model's ``max_output_tokens``; None when neither bounds the reply (it may then use whatever the
    context window leaves). The one rule for the reservation: ``max_completion_tokens_for`` sizes
    admission with it and ``conversations`` trims the history sent upstream to leave it free
    (``prompt_budget_for``, which leaves ``CONTEXT_OUTPUT_RESERVE_TOKENS`` free for None).
    """
    for name in TOKEN_LIMIT_PARAMETERS:
        limit = parameters.get(name)
        if type(limit) is int and limit > 0:
            return limit
    return model.max_output_tokens


def max_completion_tokens_for(*, model: EnabledModel, parameters: Mapping[str, Any], prompt_tokens: int) -> int:
    """Return the most tokens a reply may generate (tokens).

    The output reserve (``output_reserve_for``: the client's limit, else the model's
    ``max_output_tokens``), else what the context window leaves after the prompt (at least 1),
    and never more than that remainder would allow the upstream to produce
    (https://platform.openai.com/docs/api-reference/chat/create#chat-create-max_completion_tokens).
    """
    remainder = max(model.context_window - prompt_tokens, 1)
    reserve = output_reserve_for(model=model, parameters=parameters)
    return remainder if reserve is None else min(reserve, remainder)


def max_tokens_check(*, model: EnabledModel, parameters: Mapping[str, Any], param_prefix: str = "") -> None:
    """Raise ``ApplicationError`` 400 ``max_tokens_too_large`` (``param``: ``param_prefix`` and the
    field's name) when ``parameters``' ``max_tokens`` or ``max_completion_tokens`` exceeds ``model``'s
    context window (tokens): no reply could be that long, and no prompt would fit beside it."""
    for name in TOKEN_LIMIT_PARAMETERS:
        limit = parameters.get(name)
        if type(limit) is int and limit > model.context_window:
            raise ApplicationError(
                f"'{name}' is {limit}, more than the context window of model '{model.name}' "
                f"({model.context_window} tokens).",
                code="max_tokens_too_large",
                param=param_prefix + name,
            )


def prompt_budget_for(*, model: EnabledModel, parameters: Mapping[str, Any]) -> int:
    """Return the most prompt tokens a request to ``model`` may carry (tokens): its ``context_window``
    minus the output reserve (``output_reserve_for``). May be 0 or less for a reserve as large as the
    window: then no prompt fits.

    When nothing bounds the reply (``output_reserve_for`` is None), ``CONTEXT_OUTPUT_RESERVE_TOKENS``
    (default 1024) is left free for it, at most a quarter of the window (``context_window // 4``),
    so that a fitted history never fills the window and a small window still takes a prompt. Only
    the prompt's budget: admission sizes the reply as before (``max_completion_tokens_for``).
    """
    reserve = output_reserve_for(model=model, parameters=parameters)
    if reserve is None:
        reserve = min(settings.CONTEXT_OUTPUT_RESERVE_TOKENS, model.context_window // 4)
    return model.context_window - reserve


def reply_metering(
    *,
    request_id: str,
    user: User,
    api_key: APIKey | None,
    model: EnabledModel,
    messages: list[dict[str, Any]],
    parameters: Mapping[str, Any],
    organization: Organization | None = None,
    prompt_tokens: int | None = None,
) -> MeteringRequest:
    """Return the ``MeteringRequest`` of a reply of ``model`` to ``messages`` with request fields ``parameters``.

    Subjects: the user, the API key used (if any), the key's team (if it has one: ``api_key.team``
    must be loaded, as ``accounts.selectors.api_key_authenticate`` does), the ``organization`` the
    request acts in, and the model, each with its rate limits. Budgets of any of them apply
    (``accounts.metering.budgets.budgets_for``: a dict lookup in the process cache, no query).
    Prompt tokens are counted before the call by the model's tokenizer (``llm.tokens``); CPU only,
    fine on the event loop. Size and prices: those of whichever of ``model`` and its fallbacks
    (``EnabledModel.fallbacks``, which may serve the reply) could cost the most, so that the budget
    reservation covers the reply whichever serves it — a prompt longer than ``model``'s context
    window goes to a fallback with a larger one, which may then generate far more.
    ``prompt_tokens``: the count of ``messages`` by ``model.tokenizer`` when the caller already made
    it (a conversation's history is counted while it is fitted to the window), else counted here.
    """
    subjects = [MeteringSubject("user", user.pk, user.rate_limits, user.username)]
    if api_key is not None:
        subjects.append(MeteringSubject("api_key", api_key.pk, api_key.rate_limits, api_key.name))
        if api_key.team_id is not None:
            assert api_key.team is not None  # noqa: S101 - team_id says so (loaded with the key)
            subjects.append(MeteringSubject("team", api_key.team_id, api_key.team.rate_limits, api_key.team.name))
    if organization is not None:
        subjects.append(MeteringSubject("organization", organization.pk, organization.rate_limits, organization.slug))
    subjects.append(MeteringSubject("model", model.id, model.limits, model.name))
    if prompt_tokens is None:
        prompt_tokens = model.tokenizer.count_prompt(messages)
    servers = [model, *(route.model for route in model.fallbacks if isinstance(route.model, EnabledModel))]
    candidates = [
        MeteringRequest(
            request_id=request_id,
            subjects=tuple(subjects),
            prompt_tokens=prompt_tokens,
            max_completion_tokens=max_completion_tokens_for(
                model=server, parameters=parameters, prompt_tokens=prompt_tokens
            ),
            input_price_per_million=server.input_price_per_million,
            output_price_per_million=server.output_price_per_million,
            cached_input_price_per_million=server.cached_input_price_per_million,
            cache_write_price_per_million=server.cache_write_price_per_million,
        )
        for server in servers
    ]
    return max(candidates, key=lambda candidate: candidate.max_cost) if len(candidates) > 1 else candidates[0]


__all__ = [
    "TOKEN_LIMIT_PARAMETERS",
    "max_tokens_check",
    "max_completion_tokens_for",
    "output_reserve_for",
    "prompt_budget_for",
    "reply_metering",
]
