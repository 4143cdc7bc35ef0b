"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/models``, NextChat's ``/dashboard/billing``.

Plain ``async def`` Django views, not DRF (FIELD-NOTES, "DRF and async": a DRF view costs a
thread hop per request). Each view makes one ``run_sync`` call that authenticates and does the
request's database work, so errors come in OpenAI's order: 401, then 400 for the body, then
404/400 for the model. Every error, including unknown URLs and methods, is OpenAI's JSON
(``{"error": {"message", "type", "param", "code"}}``), never Django's HTML.

Modules:

- ``apis``: ``POST /v1/chat/completions`` (``chat_completions``) and the whole, non-streamed reply.
- ``frames``: the streamed reply, ``chat.completion.chunk`` frames over SSE.
- ``models_apis``: ``GET /v1/models`` and ``/v1/models/{model}``.
- ``billing_apis``: ``GET /dashboard/billing/usage`` and ``/subscription`` (NextChat).
- ``endpoint``: the ``openai_endpoint`` decorator, OpenAI error JSON, request parsing, unknown URLs.
- ``fields``, ``chat_serializers``, ``serializers``: request validation and OpenAPI documentation.
- ``services``: the ``begin``/``finish`` of the one streaming path, and this API's reads.
- ``urls``: the URL patterns, mounted at the site root.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and
https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads of it is in
``/work/shared/nextchat.md``.
"""

from .apis import chat_completions
from .billing_apis import billing_subscription, billing_usage
from .chat_serializers import (
    ChatCompletionChunkOutputSerializer,
    ChatCompletionCreateInputSerializer,
    ChatCompletionOutputSerializer,
)
from .endpoint import openai_endpoint, unknown_url
from .frames import ChatCompletionStreamingResponse
from .models_apis import model_list, model_retrieve
from .serializers import (
    BillingSubscriptionOutputSerializer,
    BillingUsageOutputSerializer,
    BillingUsageQuerySerializer,
    OpenAIModelListOutputSerializer,
    OpenAIModelOutputSerializer,
)
from .services import (
    RESERVED_PARAMETERS,
    openai_billing_usage_cents,
    openai_chat_finish,
    openai_chat_start,
    openai_model_get,
    openai_model_list,
)

__all__ = [
    "RESERVED_PARAMETERS",
    "BillingSubscriptionOutputSerializer",
    "BillingUsageOutputSerializer",
    "BillingUsageQuerySerializer",
    "ChatCompletionChunkOutputSerializer",
    "ChatCompletionCreateInputSerializer",
    "ChatCompletionOutputSerializer",
    "ChatCompletionStreamingResponse",
    "OpenAIModelListOutputSerializer",
    "OpenAIModelOutputSerializer",
    "billing_subscription",
    "billing_usage",
    "chat_completions",
    "model_list",
    "model_retrieve",
    "openai_billing_usage_cents",
    "openai_chat_finish",
    "openai_chat_start",
    "openai_endpoint",
    "openai_model_get",
    "openai_model_list",
    "unknown_url",
]
