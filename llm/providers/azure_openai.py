"""Adapter for Azure OpenAI's chat completions: the OpenAI-compatible adapter on Azure's deployment URLs.

Wire format: https://learn.microsoft.com/en-us/azure/ai-services/openai/reference#chat-completions —
``POST {base_url}/openai/deployments/{deployment-id}/chat/completions?api-version={version}`` with
the key in an ``api-key`` header (not ``Authorization: Bearer``); request body, SSE chunks,
``[DONE]``, usage and errors are OpenAI's, so everything but the URL and the key header is
``OpenAICompatibleProvider``'s (status mapping, redaction, batches, cancellation; its CPU per
chunk is that adapter's).

Configuration: ``Provider.base_url`` is the resource's endpoint, ``https://{resource}.openai.azure.com``
(no ``/openai`` path); the deployment is the model's upstream id (``LLMModel.upstream_model``), and
the ``api-version`` is ``settings.LLM_AZURE_OPENAI_API_VERSION`` (environment variable of the same
name; default ``2024-10-21``, the latest GA version of the data-plane inference API that has
``stream_options``), one for all Azure providers: a version is a property of the API surface the
server speaks, not of a resource.
"""

from __future__ import annotations

from urllib.parse import quote

from django.conf import settings

from .base import ChatRequest
from .openai_compatible import OpenAICompatibleProvider

__all__ = ["AzureOpenAIProvider"]


class AzureOpenAIProvider(OpenAICompatibleProvider):
    """Stream chat completions from an Azure OpenAI deployment (``request.model`` is the deployment)."""

    def _url(self, request: ChatRequest) -> str:
        """Return ``{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...``."""
        deployment = quote(request.model, safe="")
        version = quote(settings.LLM_AZURE_OPENAI_API_VERSION, safe="")
        return (
            f"{self.config.base_url.rstrip('/')}/openai/deployments/{deployment}/chat/completions?api-version={version}"
        )

    def _auth_headers(self) -> dict[str, str]:
        """Return ``api-key: <key>`` (none without a key)."""
        return {"api-key": self.config.api_key} if self.config.api_key else {}
