"""Provider adapters and the registry that picks one by ``Provider.kind``.

``settings.LLM_PROVIDER_BACKENDS`` maps each kind to the dotted path of a ``ChatProvider``
subclass, the way Django maps cache aliases to backends. The map is loaded and checked once, at
start-up (``LlmConfig.ready``): a path that does not import, a class that is not a
``ChatProvider``, or a ``Provider.Kind`` without a backend stops start-up with
``ImproperlyConfigured`` instead of failing requests later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .base import ChatChunk, ChatProvider, ChatRequest, ProviderConfig, UpstreamError, Usage, tool_calls_merged

__all__ = [
    "ChatChunk",
    "ChatProvider",
    "ChatRequest",
    "ProviderConfig",
    "UpstreamError",
    "Usage",
    "get_provider",
    "load_provider_backends",
    "tool_calls_merged",
]

_backends: dict[str, type[ChatProvider]] = {}


def load_provider_backends(
    backends: Mapping[str, str] | None = None, *, required_kinds: Iterable[str] = ()
) -> dict[str, type[ChatProvider]]:
    """Import every backend of ``backends`` (default ``settings.LLM_PROVIDER_BACKENDS``) and make it the registry.

    Returns ``{kind: adapter class}``. Raises ``ImproperlyConfigured`` for a path that does not
    import, a class that is not a ``ChatProvider`` subclass, or a kind of ``required_kinds``
    without a backend.
    """
    configured = settings.LLM_PROVIDER_BACKENDS if backends is None else backends
    loaded: dict[str, type[ChatProvider]] = {}
    for kind, path in configured.items():
        try:
            backend = import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(f"LLM_PROVIDER_BACKENDS[{kind!r}] = {path!r} does not import: {exc}") from exc
        if not (isinstance(backend, type) and issubclass(backend, ChatProvider)):
            raise ImproperlyConfigured(
                f"LLM_PROVIDER_BACKENDS[{kind!r}] = {path!r} is not a subclass of llm.providers.ChatProvider."
            )
        loaded[kind] = backend
    missing = [kind for kind in required_kinds if kind not in loaded]
    if missing:
        raise ImproperlyConfigured(
            f"LLM_PROVIDER_BACKENDS has no backend for the provider kind(s) {', '.join(map(repr, missing))}."
        )
    _backends.clear()
    _backends.update(loaded)
    return loaded


def get_provider(config: ProviderConfig) -> ChatProvider:
    """Return the adapter for ``config.kind``, from the registry loaded at start-up.

    A kind outside the registry cannot be saved (``Provider.kind`` is validated against it), so a
    ``KeyError`` here means the registry was not loaded: a bug, not a request's fault.
    """
    return _backends[config.kind](config)
