"""Provider adapters and the registry that picks one by ``Provider.kind``."""

from __future__ import annotations

from functools import cache

from django.conf import settings
from django.utils.module_loading import import_string

from chatbackend.errors import ApplicationError

from .base import ChatChunk, ChatProvider, ChatRequest, ProviderConfig, UpstreamError, Usage

__all__ = [
    "ChatChunk",
    "ChatProvider",
    "ChatRequest",
    "ProviderConfig",
    "UpstreamError",
    "Usage",
    "get_provider",
]


@cache
def _provider_class(kind: str) -> type[ChatProvider]:
    try:
        path = settings.LLM_PROVIDER_BACKENDS[kind]
    except KeyError:
        raise ApplicationError(
            f"Provider kind {kind!r} is not configured.", code="provider_kind_unknown", status=502
        ) from None
    return import_string(path)


def get_provider(config: ProviderConfig) -> ChatProvider:
    """Return the adapter for ``config.kind`` (from ``settings.LLM_PROVIDER_BACKENDS``).

    Raises ``ApplicationError`` (502) for an unknown kind.
    """
    return _provider_class(config.kind)(config)
