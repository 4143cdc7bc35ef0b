"""The plan of a reply of an enabled model: what every interface hands the streaming engine.

``model_reply_plan`` is the one place a ``llm.streaming.ReplyPlan`` takes its model's upstream
(provider, upstream model, tokenizer, route, fallbacks), its accounting context (``accounts.usage``:
who pays, the model's prices now) and its admission request (``llm.metering.reply_metering``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from accounts.models import APIKey, Organization, User
from accounts.usage import usage_context

from .metering import reply_metering
from .providers import ChatRequest
from .selectors import EnabledModel
from .streaming import ReplyPlan

PlanT = TypeVar("PlanT", bound=ReplyPlan)


def model_reply_plan(
    plan_class: type[PlanT],
    *,
    model: EnabledModel,
    messages: list[dict[str, Any]],
    parameters: dict[str, Any],
    reply_id: str,
    source: str,
    user: User,
    api_key: APIKey | None,
    organization: Organization,
    usage_message_id: int | None = None,
    prompt_tokens: int | None = None,
    **fields: Any,
) -> PlanT:
    """Return a ``plan_class`` (a ``ReplyPlan``) for a reply of ``model`` to ``messages`` (OpenAI chat
    messages) with request fields ``parameters``, paid by ``user`` with ``api_key`` (None: no key;
    a key's team pays too) in ``organization``.

    ``reply_id``: the reply's unique id, also its usage record's ``request_id``. ``source``: the
    ``UsageRecord.Source`` of the interface. ``usage_message_id``: the conversation message the
    usage record points at, if any. ``prompt_tokens``: the count of ``messages`` by ``model.tokenizer``
    when the caller already made it (else ``reply_metering`` counts). ``fields``: the plan class's
    own fields. Pure CPU: no query.
    """
    return plan_class(
        provider=model.provider,
        request=ChatRequest(model=model.upstream_model, messages=messages, parameters=parameters),
        model_name=model.name,
        reply_id=reply_id,
        tokenizer=model.tokenizer,
        route=model.route,
        fallbacks=model.fallbacks,
        usage=usage_context(
            request_id=reply_id,
            source=source,
            user_id=user.pk,
            api_key_id=api_key.pk if api_key else None,
            model=model,
            message_id=usage_message_id,
            organization_id=organization.pk,
            team_id=api_key.team_id if api_key else None,
        ),
        metering=reply_metering(
            request_id=reply_id,
            user=user,
            api_key=api_key,
            model=model,
            messages=messages,
            parameters=parameters,
            organization=organization,
            prompt_tokens=prompt_tokens,
        ),
        **fields,
    )
