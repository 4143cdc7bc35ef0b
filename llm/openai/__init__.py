"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/responses``, ``/v1/models``, ``/dashboard/billing``.

Plain ``async def`` Django views, not DRF (FIELD-NOTES, "DRF and async"), each wrapped by
``accounts.endpoints.async_endpoint`` (methods, authentication, OpenAI error JSON); every error,
including unknown URLs and methods, is OpenAI's JSON (``{"error": {"message", "type", "param",
"code"}}``), never Django's HTML. It lives in ``llm`` because it stores nothing of its own: it
plans replies for the streaming engine (``llm.streaming``) and encodes their events.

Modules:

- ``apis``: ``POST /v1/chat/completions`` and the whole, non-streamed reply; unknown URLs.
- ``frames``: the streamed reply, ``chat.completion.chunk`` frames over SSE.
- ``responses_apis``, ``responses_serializers``, ``responses_translate``, ``responses_frames``:
  ``POST /v1/responses`` (the Responses API's stateless core) on the same plan and engine: the
  request translated into chat messages and parameters, the events encoded as Responses events.
- ``models_apis``: ``GET /v1/models`` and ``/v1/models/{model}``.
- ``billing_apis``: ``GET /dashboard/billing/usage`` and ``/subscription`` (NextChat).
- ``fields``, ``chat_serializers``, ``serializers``: request validation and OpenAPI documentation.
- ``services``: the plan of a ``/v1`` reply (``ChatCompletionPlan``).
- ``urls``: the URL patterns, mounted at the site root.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and
https://platform.openai.com/docs/api-reference/chat/streaming; what NextChat reads of it is in
``/work/shared/nextchat.md``.
"""

from .chat_serializers import (
    ChatCompletionChunkOutputSerializer,
    ChatCompletionCreateInputSerializer,
    ChatCompletionOutputSerializer,
)
from .responses_serializers import ResponseCreateInputSerializer, ResponseOutputSerializer
from .serializers import (
    BillingSubscriptionOutputSerializer,
    BillingUsageOutputSerializer,
    BillingUsageQuerySerializer,
    OpenAIModelListOutputSerializer,
    OpenAIModelOutputSerializer,
)

__all__ = [
    "BillingSubscriptionOutputSerializer",
    "BillingUsageOutputSerializer",
    "BillingUsageQuerySerializer",
    "ChatCompletionChunkOutputSerializer",
    "ChatCompletionCreateInputSerializer",
    "ChatCompletionOutputSerializer",
    "OpenAIModelListOutputSerializer",
    "OpenAIModelOutputSerializer",
    "ResponseCreateInputSerializer",
    "ResponseOutputSerializer",
]
