"""Services behind the OpenAI-compatible API (``/v1`` and NextChat's ``/dashboard/billing``).

A ``/v1/chat/completions`` request has no conversation: every request carries its whole context
and nothing but its usage is stored. ``openai_chat_start`` is the ``begin`` and
``openai_chat_finish`` the ``finish`` of the one streaming path (``conversations.streaming``).

The two reads at the end (models, billing usage) serve only this API's shapes, so they live
here rather than in the apps' selectors.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from functools import partial
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from accounts.authentication import Principal
from accounts.models import UsageRecord, User
from llm.models import LLMModel
from llm.providers import ChatRequest
from llm.selectors import llm_model_get_enabled, llm_model_list_enabled, provider_config_for

from ..services import new_request_id, reply_usage_enqueue
from ..streaming import ReplyOutcome, ReplyPlan

logger = logging.getLogger(__name__)

# Request fields the adapter or this service owns; never taken from a model's defaults or the client.
RESERVED_PARAMETERS = frozenset(("model", "messages", "stream", "stream_options", "n"))


def openai_chat_start(
    *, principal: Principal, model_name: str, messages: list[dict[str, Any]], parameters: dict[str, Any]
) -> ReplyPlan:
    """Resolve ``model_name`` and return the plan for one ``/v1/chat/completions`` reply.

    ``messages``: OpenAI message objects, sent upstream as they are. ``parameters``: the other
    request fields the client sent; the model's ``default_parameters`` fill in the ones it did
    not send (``RESERVED_PARAMETERS`` are dropped from both). ``plan.info`` holds ``id`` (the
    ``chatcmpl-...`` id, also the usage record's ``request_id``), ``created`` (Unix seconds)
    and ``model`` (the public model name). Writes nothing. Raises ``ApplicationError`` 404
    ``model_not_found`` / 400 ``model_disabled``.
    """
    model = llm_model_get_enabled(name=model_name)
    merged = {key: value for key, value in model.default_parameters.items() if key not in RESERVED_PARAMETERS}
    merged.update((key, value) for key, value in parameters.items() if key not in RESERVED_PARAMETERS)
    request_id = new_request_id()
    return ReplyPlan(
        provider=provider_config_for(model=model),
        request=ChatRequest(model=model.upstream_model, messages=messages, parameters=merged),
        model_name=model.name,
        finish=partial(
            openai_chat_finish,
            request_id=request_id,
            user_id=principal.user.pk,
            api_key_id=principal.api_key.pk if principal.api_key else None,
            model_id=model.pk,
            model_name=model.name,
        ),
        info={"id": request_id, "created": int(timezone.now().timestamp()), "model": model.name},
    )


def openai_chat_finish(
    outcome: ReplyOutcome, *, request_id: str, user_id: int, api_key_id: int | None, model_id: int, model_name: str
) -> None:
    """Queue the one usage record of a ``/v1`` reply, when it consumed tokens (``should_account``).

    Keyed by ``request_id`` (the ``chatcmpl-...`` id), so a redelivered task writes nothing twice.
    """
    if outcome.error is not None:
        logger.warning("%s on %s ended %s: %s", request_id, model_name, outcome.status, outcome.error.message)
    reply_usage_enqueue(
        outcome,
        request_id=request_id,
        source=UsageRecord.Source.OPENAI_API,
        user_id=user_id,
        api_key_id=api_key_id,
        model_id=model_id,
        model_name=model_name,
    )


# --- Reads ------------------------------------------------------------------------------------


def openai_model_list() -> list[LLMModel]:
    """Return the enabled models (on enabled providers), ordered by name, providers loaded."""
    return list(llm_model_list_enabled().order_by("name"))


def openai_model_get(*, name: str) -> LLMModel:
    """Return the enabled model ``name``. Raises ``ApplicationError`` 404 / 400 like ``llm_model_get_enabled``."""
    return llm_model_get_enabled(name=name)


def openai_billing_usage_cents(*, user: User, start_date: dt.date, end_date: dt.date) -> Decimal:
    """Return what ``user`` spent from ``start_date`` (inclusive) to ``end_date`` (exclusive), in US cents.

    Days are midnights in ``settings.TIME_ZONE``; the sum is of ``UsageRecord.cost`` (US dollars)
    times 100. NextChat asks for the first of the month to tomorrow.
    """
    tz = timezone.get_default_timezone()
    start = dt.datetime.combine(start_date, dt.time.min, tzinfo=tz)
    end = dt.datetime.combine(end_date, dt.time.min, tzinfo=tz)
    records = UsageRecord.objects.filter(user=user, created_at__gte=start, created_at__lt=end)
    total = records.aggregate(total=Sum("cost"))["total"] or Decimal(0)
    return total * 100


__all__ = [
    "RESERVED_PARAMETERS",
    "openai_billing_usage_cents",
    "openai_chat_finish",
    "openai_chat_start",
    "openai_model_get",
    "openai_model_list",
]
