"""Reads for models and providers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, TypeVar

from django.db.models import Q, QuerySet

from accounts.metering import MeteringSubject, RateLimits
from accounts.model_access import ModelAccess
from chatbackend.asyncdb import run_sync
from chatbackend.errors import ApplicationError
from chatbackend.lookup_cache import LookupCache
from chatbackend.text import NUL, holds_nul

from .models import Deployment, LLMModel, ModelAlias, Provider, deployment_name
from .providers import ProviderConfig
from .routing import DeploymentConfig, ModelRoute
from .tokens import Tokenizer, tokenizer_for


def model_not_found_error(name: str) -> ApplicationError:
    """Return the 404 ``model_not_found`` for ``name``: no such model or alias, or not the caller's to use."""
    return ApplicationError(f"The model '{name}' does not exist.", code="model_not_found", status=404, param="model")


def llm_model_list_enabled() -> QuerySet[LLMModel]:
    """Return the models users may pick: enabled, on an enabled provider, ordered by name."""
    return LLMModel.objects.filter(enabled=True, provider__enabled=True).select_related("provider")


def llm_model_list_for(*, access: ModelAccess) -> QuerySet[LLMModel]:
    """Return the enabled models (``llm_model_list_enabled``) a caller with ``access`` may pick.

    ``access`` (``accounts.model_access``: the organization's, teams' and key's allowlists): the
    models named in every list; every enabled model when none applies. A model reached only
    through an allowed alias is not listed by its own name, which the caller may not send
    (``model_check_allowed``).
    """
    models = llm_model_list_enabled()
    for allowed in access.lists:
        models = models.filter(name__in=allowed)
    return models


def model_alias_list_for(*, access: ModelAccess) -> QuerySet[ModelAlias]:
    """Return the enabled aliases (``model_alias_list_enabled``) a caller with ``access`` may send.

    Those that every list names, by their own name or by their model's.
    """
    aliases = model_alias_list_enabled()
    for allowed in access.lists:
        aliases = aliases.filter(Q(name__in=allowed) | Q(model__name__in=allowed))
    return aliases


def llm_model_get_enabled(*, name: str) -> LLMModel:
    """Return the enabled model called ``name``, or named by the alias ``name``, with its provider loaded.

    A name that is no model's but an alias's (``ModelAlias``) resolves to the alias's target model:
    the model returned is the target, so a reply and its usage row name the model that served it.
    Raises ``ApplicationError`` 404 ``model_not_found`` when no model or alias has that name, and
    400 ``model_disabled`` when the model, its provider or the alias is disabled — OpenAI's
    statuses for the cases. A name with a NUL character is no model's (404, without a query).
    """
    if holds_nul(name):  # no name holds one, and PostgreSQL cannot compare text with it (a 500)
        raise model_not_found_error(name.replace(NUL, ""))
    try:
        model = LLMModel.objects.select_related("provider").get(name=name)
    except LLMModel.DoesNotExist:
        alias = ModelAlias.objects.select_related("model__provider").filter(name=name).first()
        if alias is None:
            raise model_not_found_error(name) from None
        if not alias.enabled:
            raise ApplicationError(
                f"The model '{name}' is disabled.", code="model_disabled", status=400, param="model"
            ) from None
        model = alias.model
    if not model.enabled or not model.provider.enabled:
        raise ApplicationError(f"The model '{name}' is disabled.", code="model_disabled", status=400, param="model")
    return model


def model_alias_list_enabled() -> QuerySet[ModelAlias]:
    """Return the aliases users may send: enabled, to an enabled model on an enabled provider, by name."""
    return ModelAlias.objects.filter(enabled=True, model__enabled=True, model__provider__enabled=True).select_related(
        "model__provider"
    )


ModelT = TypeVar("ModelT", LLMModel, "EnabledModel")


def model_check_allowed(*, access: ModelAccess, name: str, model_name: str) -> None:
    """Refuse ``name`` (resolving to the model ``model_name``) unless a caller with ``access`` may use it.

    Allowed when every allowlist that applies (``accounts.model_access``: the organization's, the
    teams', the key's) holds ``name`` or ``model_name`` (a model's name allows its aliases).
    Raises ``model_not_found_error(name)``: a model the caller may not use answers exactly as one
    that does not exist (404 ``model_not_found``).
    """
    if not access.allows(name, model_name):
        raise model_not_found_error(name)


def _get_for(access: ModelAccess, name: str, model: ModelT | ApplicationError) -> ModelT:
    """Return ``model`` (or raise the lookup's error) as a caller with ``access`` may see it.

    A lookup error for a name outside the caller's allowlists is the 404 of a model that does
    not exist: a disabled model the caller may not use is not told apart from a missing one.
    """
    if isinstance(model, ApplicationError):
        if not access.allows(name):
            raise model_not_found_error(name) from None
        raise model
    model_check_allowed(access=access, name=name, model_name=model.name)
    return model


def _fallbacks_within(access: ModelAccess, model: EnabledModel) -> EnabledModel:
    """Return ``model`` with only the fallbacks ``access`` allows: a caller limited to some models
    (a key's allowlist, a team's or an organization's list) is never served by another one when
    the model it asked for fails. The shared snapshot is not changed."""
    if not access.restricted or not model.fallbacks:
        return model
    allowed = tuple(route for route in model.fallbacks if access.allows(route.name))
    return model if len(allowed) == len(model.fallbacks) else replace(model, fallbacks=allowed)


@dataclass(frozen=True, slots=True)
class ListedModel:
    """A name ``GET /v1/models`` lists: an enabled model, or an enabled alias to one.

    ``id``: the name clients send; ``created_at``: when the model or alias row was made;
    ``model``: the model itself, or the alias's target (its provider loaded).
    """

    id: str
    created_at: dt.datetime
    model: LLMModel


def listed_model_list_for(*, access: ModelAccess) -> list[ListedModel]:
    """Return the models and aliases a caller with ``access`` may send, by ``id`` (two queries)."""
    listed = [ListedModel(model.name, model.created_at, model) for model in llm_model_list_for(access=access)]
    listed += [ListedModel(alias.name, alias.created_at, alias.model) for alias in model_alias_list_for(access=access)]
    return sorted(listed, key=lambda entry: entry.id)


def listed_model_get_for(*, access: ModelAccess, name: str) -> ListedModel:
    """Return the model or alias ``name`` as ``listed_model_list_for`` lists it.

    Raises ``ApplicationError`` as ``llm_model_get_enabled_for`` does: 404 ``model_not_found`` for a
    name that is neither, or is outside ``access``; 400 ``model_disabled``.
    """
    model = llm_model_get_enabled_for(access=access, name=name)
    if model.name == name:
        return ListedModel(model.name, model.created_at, model)
    alias = model_alias_list_enabled().filter(name=name).first()
    if alias is None:  # disabled or deleted since the line above
        raise model_not_found_error(name)
    return ListedModel(alias.name, alias.created_at, alias.model)


def llm_model_get_enabled_for(*, access: ModelAccess, name: str) -> LLMModel:
    """``llm_model_get_enabled`` for a caller with ``access``: 404 ``model_not_found`` outside it."""
    try:
        model: LLMModel | ApplicationError = llm_model_get_enabled(name=name)
    except ApplicationError as error:
        model = error
    return _get_for(access, name, model)


def provider_config_for(*, model: LLMModel) -> ProviderConfig:
    """Return the plain ``ProviderConfig`` (with the decrypted key) for ``model``'s provider."""
    return provider_config(provider=model.provider)


def provider_config(*, provider: Provider) -> ProviderConfig:
    """Return the plain ``ProviderConfig`` (with the decrypted key) of ``provider``."""
    return ProviderConfig(
        kind=provider.kind,
        base_url=provider.base_url,
        api_key=provider.api_key or "",
        connect_timeout=provider.connect_timeout,
        read_timeout=provider.read_timeout,
        first_token_timeout=provider.first_token_timeout,
        extra_headers=tuple((provider.extra_headers or {}).items()),
        stream_usage=provider.stream_usage,
    )


@dataclass(frozen=True, slots=True)
class EnabledModel:
    """What a reply's start needs of an enabled model: an immutable snapshot, safe to share.

    ``id`` / ``name``: the ``LLMModel`` row and its public name; ``upstream_model``: the name sent
    to the provider; ``default_parameters``: OpenAI request fields (read-only mapping; copy it to
    change it); prices in US dollars per million tokens (cache prices None: the input price); ``context_window`` and
    ``max_output_tokens`` (None: the rest of the window) in tokens; ``limits``: the model's rate limits;
    ``provider``: how to reach the upstream, its API key decrypted. ``tokenizer``: counts its
    tokens (``LLMModel.tokenizer`` resolved for ``upstream_model``: ``llm.tokens.tokenizer_for``).
    ``deployments``: where replies may be sent, never empty (``deployments_for``), in priority
    order; ``routing_strategy``: how a reply picks among them (``LLMModel.RoutingStrategy``);
    ``fallbacks``: the enabled models of ``LLMModel.fallbacks``, in order, tried when every
    deployment failed (their own fallbacks are not followed).
    """

    id: int
    name: str
    upstream_model: str
    default_parameters: Mapping[str, Any]
    input_price_per_million: Decimal
    output_price_per_million: Decimal
    cached_input_price_per_million: Decimal | None
    cache_write_price_per_million: Decimal | None
    context_window: int
    max_output_tokens: int | None
    limits: RateLimits
    provider: ProviderConfig
    tokenizer: Tokenizer
    deployments: tuple[DeploymentConfig, ...] = ()
    routing_strategy: str = LLMModel.RoutingStrategy.WEIGHTED.value
    fallbacks: tuple[ModelRoute, ...] = ()

    @property
    def route(self) -> ModelRoute:
        """Return the model as ``llm.routing`` routes it (priced at this snapshot when it serves)."""
        return ModelRoute(
            name=self.name,
            deployments=self.deployments,
            strategy=self.routing_strategy,
            context_window=self.context_window,
            model=self,
            subject=MeteringSubject("model", self.id, self.limits, self.name),
        )

    @property
    def pk(self) -> int:
        """The ``LLMModel`` row's primary key (what accounting reads: ``accounts.usage.PricedModel``)."""
        return self.id


# Enabled models by the name a request sent (a model's or an alias's: an alias's entry holds its
# target's snapshot). Cleared in every process when an LLMModel, a Provider or a ModelAlias changes
# (``LlmConfig.ready``). Caching the snapshot also saves decrypting the provider key (Fernet) per
# request.
enabled_model_cache: LookupCache[str, EnabledModel] = LookupCache("llm.enabled_models", maxsize=1_000)


def deployments_for(*, model: LLMModel) -> tuple[DeploymentConfig, ...]:
    """Return the snapshots of where ``model``'s replies may go, by priority then id; never empty.

    Its enabled deployments on enabled providers; a model without any is its own one deployment
    (its ``provider`` and ``upstream_model``, ``id`` None), so it works as it did before routing.
    """
    rows = (
        Deployment.objects.filter(model=model, enabled=True, provider__enabled=True)
        .select_related("provider")
        .order_by("priority", "id")
    )
    deployments = tuple(
        DeploymentConfig(
            id=row.pk,
            key=f"deployment-{row.pk}",
            name=deployment_name(provider_name=row.provider.name, upstream_model=row.upstream_model),
            provider=provider_config(provider=row.provider),
            upstream_model=row.upstream_model,
            weight=row.weight,
            priority=row.priority,
            limits=row.rate_limits,
        )
        for row in rows
    )
    if deployments:
        return deployments
    return (
        DeploymentConfig(
            id=None,
            key=f"model-{model.pk}",
            name=deployment_name(provider_name=model.provider.name, upstream_model=model.upstream_model),
            provider=provider_config_for(model=model),
            upstream_model=model.upstream_model,
            weight=1,
            priority=0,
            limits=RateLimits(),
        ),
    )


def _enabled_model_read(name: str) -> EnabledModel:
    model = llm_model_get_enabled(name=name)
    fallbacks = []
    for fallback_name in model.fallbacks or ():
        try:
            fallback = llm_model_get_enabled(name=fallback_name)
        except ApplicationError:  # deleted or disabled since: the chain goes on without it
            continue
        fallbacks.append(_snapshot(fallback).route)
    return _snapshot(model, fallbacks=tuple(fallbacks))


def _snapshot(model: LLMModel, *, fallbacks: tuple[ModelRoute, ...] = ()) -> EnabledModel:
    tokenizer = tokenizer_for(setting=model.tokenizer, model_name=model.upstream_model)
    # Its vocabulary loads here (a worker thread on the async path), not on the event loop when the
    # first prompt is counted, and only for the families of models actually used.
    tokenizer.load()
    return EnabledModel(
        id=model.pk,
        name=model.name,
        upstream_model=model.upstream_model,
        default_parameters=MappingProxyType(dict(model.default_parameters)),
        input_price_per_million=model.input_price_per_million,
        output_price_per_million=model.output_price_per_million,
        cached_input_price_per_million=model.cached_input_price_per_million,
        cache_write_price_per_million=model.cache_write_price_per_million,
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        limits=model.rate_limits,
        provider=provider_config_for(model=model),
        tokenizer=tokenizer,
        deployments=deployments_for(model=model),
        routing_strategy=model.routing_strategy,
        fallbacks=fallbacks,
    )


def enabled_model_get(*, name: str) -> EnabledModel:
    """Return the enabled model ``name`` (a model's or an alias's) from this process's cache, else the database. Sync.

    Raises what ``llm_model_get_enabled`` raises (404 ``model_not_found``, 400 ``model_disabled``);
    failures are not cached. A value read is cached only once this process listens to the
    broadcasts that invalidate it (``chatbackend.lookup_cache``).
    """
    model = enabled_model_cache.get(name)
    if model is None:
        ticket = enabled_model_cache.fill_ticket()  # before the read: see lookup_cache
        model = _enabled_model_read(name)
        enabled_model_cache.put(name, model, ticket)
    return model


def enabled_model_get_for(*, access: ModelAccess, name: str) -> EnabledModel:
    """``enabled_model_get`` for a caller with ``access`` (``accounts.model_access.model_access_for``):
    404 ``model_not_found`` outside it.

    Sync. The allowlists are compared on every call (the model snapshot is shared): ``model_check_allowed``;
    the fallbacks outside them are left out of the model returned.
    """
    try:
        model: EnabledModel | ApplicationError = enabled_model_get(name=name)
    except ApplicationError as error:
        model = error
    return _fallbacks_within(access, _get_for(access, name, model))


async def enabled_model_get_for_async(*, access: ModelAccess, name: str) -> EnabledModel:
    """``enabled_model_get_for`` on the event loop (``enabled_model_get_async``): what ``/v1`` calls,
    with ``access`` from ``accounts.model_access.model_access_for_async``."""
    try:
        model: EnabledModel | ApplicationError = await enabled_model_get_async(name=name)
    except ApplicationError as error:
        model = error
    return _fallbacks_within(access, _get_for(access, name, model))


async def enabled_model_get_async(*, name: str) -> EnabledModel:
    """``enabled_model_get`` for the event loop: a hit answers at once, a miss reads in one hop."""
    model = enabled_model_cache.get(name)
    if model is None:
        ticket = await enabled_model_cache.fill_ticket_async()
        model = await run_sync(_enabled_model_read, name)
        enabled_model_cache.put(name, model, ticket)
    return model
