"""Anthropic's Messages API, inbound: ``POST /v1/messages``, ``/v1/messages/count_tokens``, and its Models API.

So that the official ``anthropic`` SDK (``Anthropic(base_url=<this server>, api_key="sk-...")``)
works unmodified with any model configured here, whatever its provider. The request is
translated into OpenAI chat messages and parameters and goes through the one streaming engine
(``llm.streaming``) exactly as ``/v1/chat/completions`` does; only the wire format differs.

Modules:

- ``apis``: the two views (authentication and errors by ``accounts.endpoints.async_endpoint``).
- ``models_apis``: ``GET /v1/models`` and ``/v1/models/{model_id}`` in Anthropic's shape, for a
  request with ``anthropic-version`` (OpenAI's shape otherwise, ``llm.openai.models_apis``).
- ``wire``: which requests are Anthropic's (that rule), and the ``request-id`` header on every answer to one.
- ``serializers``: request validation and OpenAPI documentation.
- ``translate``: Anthropic request → OpenAI messages and parameters (what maps to what, what is refused).
- ``frames``: the engine's events → Anthropic SSE events, or one ``message`` object.
- ``errors``: Anthropic's error shape and types by HTTP status.
- ``urls``: the URL patterns, mounted at the site root before ``llm.openai.urls``.

Spec: https://docs.anthropic.com/en/api/messages and
https://docs.anthropic.com/en/docs/build-with-claude/streaming.
"""

from .serializers import (
    AnthropicErrorOutputSerializer,
    AnthropicMessageOutputSerializer,
    AnthropicModelListOutputSerializer,
    AnthropicModelListQuerySerializer,
    AnthropicModelOutputSerializer,
    MessageCountTokensInputSerializer,
    MessageCountTokensOutputSerializer,
    MessageCreateInputSerializer,
)

__all__ = [
    "AnthropicErrorOutputSerializer",
    "AnthropicMessageOutputSerializer",
    "AnthropicModelListOutputSerializer",
    "AnthropicModelListQuerySerializer",
    "AnthropicModelOutputSerializer",
    "MessageCountTokensInputSerializer",
    "MessageCountTokensOutputSerializer",
    "MessageCreateInputSerializer",
]
