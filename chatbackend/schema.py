"""drf-spectacular hooks: document the plain async views that drf-spectacular cannot see.

drf-spectacular only walks DRF views. The OpenAI-compatible API (``llm.openai``) and the Anthropic
Messages API (``llm.anthropic``) are plain async Django views, so ``add_async_endpoints``
documents each of them through a documentation-only ``APIView`` below, run through
drf-spectacular's own ``AutoSchema``: request and response bodies come from the serializers that
validate or document them (``llm.openai.chat_serializers`` and ``.serializers``,
``llm.anthropic.serializers``), components are registered in the generator's registry, and the
security requirements come from the authentication classes' extensions (``accounts.apis``),
exactly as for a DRF view. Nothing here is routed.

The health probes (``chatbackend.health``) are documented the same way, without authentication.

``POST /api/conversations/{id}/messages/`` (``conversations.sse``) is documented by its DRF
twin ``ConversationMessageListApi``; the hook adds it from the same serializers only if that
operation is missing.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.settings import spectacular_settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

from accounts.authentication import APIKeyAuthentication, JWTAuthentication
from accounts.serializers import ErrorOutputSerializer
from chatbackend.http import sse_event_schema
from conversations.apis import REPLY_EVENT_SCHEMA
from conversations.serializers import MessageSendInputSerializer, MessageSendOutputSerializer
from conversations.stored_completions.apis import DEFAULT_LIMIT, MAX_LIMIT
from conversations.stored_completions.serializers import (
    StoredCompletionDeletedOutputSerializer,
    StoredCompletionListOutputSerializer,
    StoredCompletionMessageListOutputSerializer,
    StoredCompletionOutputSerializer,
    StoredCompletionUpdateInputSerializer,
)
from llm.anthropic import (
    AnthropicErrorOutputSerializer,
    AnthropicMessageOutputSerializer,
    AnthropicModelListOutputSerializer,
    AnthropicModelListQuerySerializer,
    AnthropicModelOutputSerializer,
    MessageCountTokensInputSerializer,
    MessageCountTokensOutputSerializer,
    MessageCreateInputSerializer,
)
from llm.openai import (
    BillingSubscriptionOutputSerializer,
    BillingUsageOutputSerializer,
    BillingUsageQuerySerializer,
    ChatCompletionChunkOutputSerializer,
    ChatCompletionCreateInputSerializer,
    ChatCompletionOutputSerializer,
    OpenAIModelListOutputSerializer,
    OpenAIModelOutputSerializer,
    ResponseCreateInputSerializer,
    ResponseOutputSerializer,
)

_ERRORS = {
    400: "Invalid request: malformed JSON or a field of the wrong type or value (`error.param` names it), "
    "or a disabled model.",
    401: "Missing, unknown, revoked or expired API key or token.",
    404: "No such model (`model_not_found`; also a model outside the API key's `allowed_models`), or an unknown URL.",
    405: "Wrong method for this URL (see `Allow`).",
    413: "The body is larger than the server accepts.",
    429: "A rate limit (`rate_limit_exceeded`, with `Retry-After`) or a budget (`insufficient_quota`) refused "
    "the request before any stream started, or the upstream's rate limit, passed through.",
    502: "The upstream failed (5xx, refused our credentials, unreachable, or dropped the stream).",
    504: "The upstream timed out.",
    503: "Rate limits or budgets cannot be checked (`metering_unavailable`: Redis is unreachable), or the "
    "server is shutting down.",
}


def _errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(ErrorOutputSerializer, description=_ERRORS[status]) for status in statuses}


_SSE_EXAMPLE = (
    'data: {"id":"chatcmpl-1a2b","object":"chat.completion.chunk","created":1767225600,"model":"gpt-4o-mini",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"logprobs":null,"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-1a2b","object":"chat.completion.chunk","created":1767225600,"model":"gpt-4o-mini",'
    '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
    "data: [DONE]\n\n"
)


class _OpenAIDocView(APIView):
    """Base of the documentation-only views: bearer API key or JWT, as ``/v1`` authenticates."""

    authentication_classes = (APIKeyAuthentication, JWTAuthentication)


class ChatCompletionsDocView(_OpenAIDocView):
    # The stream's chunks: each event's ``data`` is one, which OpenAPI 3.0 can only say in prose.
    extra_components = (ChatCompletionChunkOutputSerializer,)

    @extend_schema(
        operation_id="openai_chat_completions_create",
        tags=["openai"],
        summary="Create a chat completion (OpenAI-compatible), streamed or whole",
        description=(
            "OpenAI's `POST /v1/chat/completions`. With `stream: true` the answer is `text/event-stream`: "
            "one `data: {chat.completion.chunk}` line per chunk (the schema below is one chunk), the usage "
            "chunk (`choices: []`) only with `stream_options.include_usage`, then `data: [DONE]`. Errors "
            "found before the first chunk (including the upstream's) come as a plain error status; a later "
            'upstream failure is sent as a `data: {"error": ...}` line and ends the stream. '
            "Only `n: 1` is supported; fields not listed are passed to the upstream as they are. "
            "Also authenticated by `x-api-key` / `api-key` headers."
        ),
        request={"application/json": ChatCompletionCreateInputSerializer},
        examples=[
            OpenApiExample(
                "streamed",
                request_only=True,
                value={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hello!"}]},
            ),
            OpenApiExample(
                "whole",
                request_only=True,
                value={
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "Hello!"},
                    ],
                    "max_tokens": 64,
                },
            ),
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                ChatCompletionOutputSerializer, description="`stream` false: the whole chat completion."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                sse_event_schema(
                    "One server-sent event of the stream (`event` is always `message`).",
                    events=("message",),
                    data="The JSON of one `ChatCompletionChunkOutput` (see components), or `[DONE]` last.",
                ),
                description="`stream` true: server-sent events, each `data:` line one chunk.",
                examples=[OpenApiExample("stream", value=_SSE_EXAMPLE, media_type="text/event-stream")],
            ),
            **_errors(400, 401, 404, 405, 413, 429, 502, 503, 504),
        },
    )
    def post(self, request: Request) -> None: ...  # never dispatched: documents ``llm.openai.apis.chat_completions``


_STORED_ERRORS = {
    400: "A query parameter or a body field of the wrong type or value (`error.param` names it).",
    401: _ERRORS[401],
    404: "No stored completion of the caller with this id (`completion_not_found`: also another user's or "
    "another organization's), or an `after` that names none (`message_not_found` for a message id).",
    405: _ERRORS[405],
    413: _ERRORS[413],
}


def _stored_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(ErrorOutputSerializer, description=_STORED_ERRORS[status]) for status in statuses}


_COMPLETION_ID = OpenApiParameter(
    "completion_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The stored completion's `chatcmpl-...` id."
)


def _page_parameters(what: str) -> list[OpenApiParameter]:
    return [
        OpenApiParameter("after", OpenApiTypes.STR, description=f"The id of the last {what} of the previous page."),
        OpenApiParameter(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
            description=f"How many {what}s per page (1-{MAX_LIMIT}, default {DEFAULT_LIMIT}).",
        ),
        OpenApiParameter(
            "order", OpenApiTypes.STR, enum=["asc", "desc"], description="By creation time; `asc` by default."
        ),
    ]


class StoredCompletionListDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_chat_completions_list",
        tags=["openai"],
        summary="List the caller's stored chat completions (OpenAI-compatible)",
        description=(
            "OpenAI's `GET /v1/chat/completions`: the completions the caller created with `store: true` in the "
            "organization the request acts in (nobody else's), oldest first unless `order=desc`. Filters: `model` "
            "(the model the request named), `metadata[key]=value` (every pair must match). Needs an API key's "
            "`read` scope."
        ),
        parameters=[
            *_page_parameters("completion"),
            OpenApiParameter("model", OpenApiTypes.STR, description="Only completions of this model."),
            OpenApiParameter(
                "metadata",
                {"type": "object", "additionalProperties": {"type": "string"}},
                style="deepObject",
                explode=True,
                description="`metadata[key]=value`: only completions whose metadata has every pair.",
            ),
        ],
        responses={200: StoredCompletionListOutputSerializer, **_stored_errors(400, 401, 404)},
    )
    def get(self, request: Request) -> None: ...  # never dispatched: documents ``conversations.stored_completions``


class StoredCompletionDetailDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_chat_completions_retrieve",
        tags=["openai"],
        summary="Retrieve a stored chat completion (OpenAI-compatible)",
        description="OpenAI's `GET /v1/chat/completions/{completion_id}`. Needs an API key's `read` scope.",
        parameters=[_COMPLETION_ID],
        responses={200: StoredCompletionOutputSerializer, **_stored_errors(401, 404)},
    )
    def get(self, request: Request, completion_id: str) -> None: ...  # never dispatched (see the list's)

    @extend_schema(
        operation_id="openai_chat_completions_update",
        tags=["openai"],
        summary="Replace a stored chat completion's metadata (OpenAI-compatible)",
        description=(
            "OpenAI's `POST /v1/chat/completions/{completion_id}`: `metadata` replaces the completion's (null "
            "clears it; at most 16 pairs, keys up to 64 characters, values up to 512). Needs the `chat` scope."
        ),
        parameters=[_COMPLETION_ID],
        request={"application/json": StoredCompletionUpdateInputSerializer},
        responses={200: StoredCompletionOutputSerializer, **_stored_errors(400, 401, 404, 413)},
    )
    def post(self, request: Request, completion_id: str) -> None: ...  # never dispatched (see the list's)

    @extend_schema(
        operation_id="openai_chat_completions_delete",
        tags=["openai"],
        summary="Delete a stored chat completion (OpenAI-compatible)",
        description=(
            "OpenAI's `DELETE /v1/chat/completions/{completion_id}`: the completion and its conversation are "
            "deleted (usage records stay). Needs the `chat` scope."
        ),
        parameters=[_COMPLETION_ID],
        responses={200: StoredCompletionDeletedOutputSerializer, **_stored_errors(401, 404)},
    )
    def delete(self, request: Request, completion_id: str) -> None: ...  # never dispatched (see the list's)


class StoredCompletionMessageListDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_chat_completions_messages_list",
        tags=["openai"],
        summary="List a stored chat completion's request messages (OpenAI-compatible)",
        description=(
            "OpenAI's `GET /v1/chat/completions/{completion_id}/messages`: the messages the request sent, in "
            "order (the reply is the completion's `choices`). Ids are `<completion_id>-<index>`. Needs the "
            "`read` scope."
        ),
        parameters=[_COMPLETION_ID, *_page_parameters("message")],
        responses={200: StoredCompletionMessageListOutputSerializer, **_stored_errors(400, 401, 404)},
    )
    def get(self, request: Request, completion_id: str) -> None: ...  # never dispatched (see the list's)


def _anthropic_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(AnthropicErrorOutputSerializer, description=_ERRORS[status]) for status in statuses}


_ANTHROPIC_SSE_EXAMPLE = (
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"msg_1a2b","type":"message","role":"assistant",'
    '"model":"gpt-4o-mini","content":[],"stop_reason":null,"stop_sequence":null,'
    '"usage":{"input_tokens":9,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0}}}\n\n'
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":0}\n\n'
    "event: message_delta\n"
    'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    '"usage":{"input_tokens":9,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}\n\n'
    "event: message_stop\n"
    'data: {"type":"message_stop"}\n\n'
)
_ANTHROPIC_EVENTS = (
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
)


class MessagesDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="anthropic_messages_create",
        tags=["anthropic"],
        summary="Create a message (Anthropic Messages API), streamed or whole, with any model",
        description=(
            "Anthropic's `POST /v1/messages`, so the official `anthropic` SDK works pointed at this server, "
            "for every model here whatever its provider: the request is translated into a chat completion "
            "and goes through the same engine (rate limits, budgets, stop, usage). Authenticated by "
            "`x-api-key: sk-...` (the SDK's) or `Authorization: Bearer`; `anthropic-version` is accepted, "
            "not required. With `stream: true` the answer is `text/event-stream` with Anthropic's events "
            "(`message_start`, `content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`, "
            "`ping`); a failure after the headers is an `error` event. Errors are Anthropic's shape "
            '(`{"type": "error", "error": {"type", "message"}}`). `top_k` is accepted and not sent upstream; '
            "`thinking` and `output_config.effort` become `reasoning_effort`; server tools, `container`, "
            "`mcp_servers` and `context_management` are a 400. See `llm/anthropic/translate.py`."
        ),
        request={"application/json": MessageCreateInputSerializer},
        examples=[
            OpenApiExample(
                "whole",
                request_only=True,
                value={
                    "model": "gpt-4o-mini",
                    "max_tokens": 256,
                    "system": "Answer briefly.",
                    "messages": [{"role": "user", "content": "Hello!"}],
                },
            ),
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                AnthropicMessageOutputSerializer, description="`stream` false: the whole message."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                sse_event_schema(
                    "One server-sent event of the stream; `data` is a JSON object whose `type` is the event's name.",
                    events=_ANTHROPIC_EVENTS,
                    data="The JSON of the event (Anthropic's streaming events).",
                ),
                description="`stream` true: Anthropic's server-sent events.",
                examples=[OpenApiExample("stream", value=_ANTHROPIC_SSE_EXAMPLE, media_type="text/event-stream")],
            ),
            **_anthropic_errors(400, 401, 404, 405, 413, 429, 502, 503, 504),
        },
    )
    def post(self, request: Request) -> None: ...  # never dispatched: documents ``llm.anthropic.apis.messages_create``


class MessagesCountTokensDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="anthropic_messages_count_tokens",
        tags=["anthropic"],
        summary="Count the input tokens of a message request (Anthropic Messages API)",
        description=(
            "Anthropic's `POST /v1/messages/count_tokens`: the prompt's tokens by the model's tokenizer, "
            "with the chat framing, tool definitions counted as their JSON text. Free: not metered."
        ),
        request={"application/json": MessageCountTokensInputSerializer},
        responses={200: MessageCountTokensOutputSerializer, **_anthropic_errors(400, 401, 404, 405, 413, 503)},
    )
    def post(
        self, request: Request
    ) -> None: ...  # never dispatched: documents ``llm.anthropic.apis.messages_count_tokens``


RESPONSE_EVENTS = (
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
    "response.incomplete",
    "error",
    "response.failed",
)


class ResponsesDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_responses_create",
        tags=["openai"],
        summary="Create a model response (OpenAI's Responses API, stateless core), streamed or whole",
        description=(
            "OpenAI's `POST /v1/responses`, translated into a chat completion on the same path as "
            "`/v1/chat/completions`. With `stream: true` the answer is `text/event-stream` with OpenAI's "
            "Responses events (`event:` names the type, `data:` is its JSON with a `sequence_number`). "
            "Fields that need stored state or built-in tools (`previous_response_id`, `conversation`, "
            "`store: true`, `background`, `web_search` tools, ...) are a 400 naming the field; the supported "
            "input items and fields are listed in docs/api.md."
        ),
        request={"application/json": ResponseCreateInputSerializer},
        examples=[
            OpenApiExample(
                "whole",
                request_only=True,
                value={"model": "gpt-4o-mini", "input": "Hello!", "instructions": "Answer briefly."},
            ),
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                ResponseOutputSerializer, description="`stream` false: the whole `response` object."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                sse_event_schema(
                    "One server-sent event of the stream.",
                    events=RESPONSE_EVENTS,
                    data="The JSON of one OpenAI Responses stream event (`ResponseStreamEvent`).",
                ),
                description="`stream` true: server-sent events.",
            ),
            **_errors(400, 401, 404, 405, 413, 429, 502, 503, 504),
        },
    )
    def post(self, request: Request) -> None: ...  # never dispatched: documents ``llm.openai.responses_apis``


# /v1/models answers both SDKs, each in its own shape (llm.anthropic.wire): with ``anthropic-version``
# Anthropic's, else OpenAI's. OpenAPI 3.0 cannot tie a body to a header, so each answer is a ``oneOf``.
_ANTHROPIC_VERSION = OpenApiParameter(
    "anthropic-version",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Sent by the `anthropic` SDK (e.g. `2023-06-01`): the answer, errors included, is then in "
    "Anthropic's shape (`ModelInfo`, Anthropic's error JSON, a `request-id` header); without it, OpenAI's.",
)


def _either(name: str, openai: type[serializers.Serializer], anthropic: type[serializers.Serializer]) -> Any:
    return PolymorphicProxySerializer(
        component_name=name, serializers=[openai, anthropic], resource_type_field_name=None
    )


def _models_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    either = _either("ModelsErrorOutput", ErrorOutputSerializer, AnthropicErrorOutputSerializer)
    return {status: OpenApiResponse(either, description=_ERRORS[status]) for status in statuses}


class ModelListDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_models_list",
        description=(
            "OpenAI's `GET /v1/models`: the models this server serves, by the `id` clients send. With "
            "`anthropic-version` (the `anthropic` SDK), Anthropic's `GET /v1/models` instead: a page of "
            "`ModelInfo` (`type`, `id`, `display_name`, `created_at`) by `id`, with `has_more`, `first_id`, "
            "`last_id`, paged by `after_id` / `before_id` and `limit` (1 to 1000, default 20; a bad one is a "
            "400). OpenAI's shape has no pages and ignores those parameters."
        ),
        tags=["openai", "anthropic"],
        summary="List the enabled models (OpenAI-compatible, or Anthropic's with anthropic-version)",
        parameters=[_ANTHROPIC_VERSION, AnthropicModelListQuerySerializer],
        responses={
            200: _either("ModelListOutput", OpenAIModelListOutputSerializer, AnthropicModelListOutputSerializer),
            **_models_errors(400, 401),
        },
    )
    def get(self, request: Request) -> None: ...  # never dispatched: documents ``llm.openai.models_apis.model_list``


class ModelRetrieveDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_models_retrieve",
        description=(
            "OpenAI's `GET /v1/models/{model}`. 404 `model_not_found`, 400 `model_disabled`. With "
            "`anthropic-version`, Anthropic's `GET /v1/models/{model_id}`: one `ModelInfo`, 404 `not_found_error`."
        ),
        tags=["openai", "anthropic"],
        summary="Retrieve one enabled model (OpenAI-compatible, or Anthropic's with anthropic-version)",
        parameters=[
            OpenApiParameter(
                "model", OpenApiTypes.STR, OpenApiParameter.PATH, description="The model id; may contain `/`."
            ),
            _ANTHROPIC_VERSION,
        ],
        responses={
            200: _either("ModelOutput", OpenAIModelOutputSerializer, AnthropicModelOutputSerializer),
            **_models_errors(400, 401, 404),
        },
    )
    def get(
        self, request: Request, model: str
    ) -> None: ...  # never dispatched: documents ``llm.openai.models_apis.model_retrieve``


class BillingUsageDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_billing_usage",
        description=(
            "`{object: list, total_usage}`: the cost of the caller's usage records from `start_date` "
            "(inclusive) to `end_date` (exclusive; NextChat sends tomorrow), in US cents, days in the "
            "server's `TIME_ZONE`. Either date may be left out: `start_date` defaults to the first day "
            "of the current month, `end_date` to the first day of the next month, so a request without "
            "a query string (NextChat's server mode) gets this month's usage. "
            "400 for a malformed date, or when `end_date` is before `start_date`."
        ),
        tags=["openai"],
        summary="The caller's spending in a date range, in US cents (NextChat's usage display)",
        parameters=[BillingUsageQuerySerializer],
        responses={200: BillingUsageOutputSerializer, **_errors(400, 401)},
    )
    def get(
        self, request: Request
    ) -> None: ...  # never dispatched: documents ``llm.openai.billing_apis.billing_usage``


class BillingSubscriptionDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="openai_billing_subscription",
        description=(
            "`hard_limit_usd` (and `soft_limit_usd`, `system_hard_limit_usd`: the same number) is the "
            "caller's monthly budget in US dollars: the tightest enabled monthly budget of the API key "
            "used and of its user. Without one, the setting `OPENAI_BILLING_HARD_LIMIT_USD` "
            "(default 1000000, meaning no monthly limit)."
        ),
        tags=["openai"],
        summary="The caller's monthly spending limit in US dollars (NextChat's usage display)",
        responses={200: BillingSubscriptionOutputSerializer, **_errors(401)},
    )
    def get(
        self, request: Request
    ) -> None: ...  # never dispatched: documents ``llm.openai.billing_apis.billing_subscription``


class MessageSendDocView(_OpenAIDocView):
    @extend_schema(
        operation_id="conversations_messages_send",
        tags=["conversations"],
        summary="Send a message and get the reply, streamed (SSE) or whole",
        description=(
            "With `Accept: text/event-stream`: events `reply.start`, `reply.delta`, then `reply.done` or "
            "`error` (docs/api.md). Otherwise 201 with both messages once the reply ends."
        ),
        parameters=[OpenApiParameter("conversation_id", OpenApiTypes.INT, OpenApiParameter.PATH)],
        request={"application/json": MessageSendInputSerializer},
        responses={
            (201, "application/json"): MessageSendOutputSerializer,
            (200, "text/event-stream"): OpenApiResponse(REPLY_EVENT_SCHEMA, description="The reply as SSE events."),
            **_errors(400, 401, 404, 429, 502, 503),
        },
    )
    def post(
        self, request: Request, conversation_id: int
    ) -> None: ...  # never dispatched: documents ``conversations.sse.message_send``


class HealthLiveOutputSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok"])


class HealthCheckOutputSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unavailable", "skipped"])
    time_ms = serializers.FloatField(help_text="How long the check took, in milliseconds.")
    error = serializers.CharField(required=False, help_text="Why it is unavailable (no host or port).")
    reason = serializers.CharField(required=False, help_text="Why it is skipped (an in-process service).")


class HealthChecksOutputSerializer(serializers.Serializer):
    database = HealthCheckOutputSerializer()
    cache = HealthCheckOutputSerializer()
    channel_layer = HealthCheckOutputSerializer()
    broker = HealthCheckOutputSerializer(help_text="The Celery broker.")


class HealthReadyOutputSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unavailable"])
    checks = HealthChecksOutputSerializer()


class _HealthDocView(APIView):
    """Base of the health probes' documentation views: no authentication."""

    authentication_classes = ()
    permission_classes = ()


class HealthLiveDocView(_HealthDocView):
    @extend_schema(
        operation_id="health_live",
        tags=["health"],
        summary="Liveness: the process answers (no dependency is checked)",
        responses={200: HealthLiveOutputSerializer},
    )
    def get(self, request: Request) -> None: ...  # never dispatched: documents ``chatbackend.health.live``


class HealthReadyDocView(_HealthDocView):
    @extend_schema(
        operation_id="health_ready",
        tags=["health"],
        summary="Readiness: the database, Redis and the Celery broker answer",
        description=(
            "Every check runs at once within `HEALTH_CHECK_TIMEOUT_SECONDS`. 200 when each is `ok` or "
            "`skipped` (an in-process service on the embedded defaults), 503 with the same body when one "
            "is `unavailable`."
        ),
        responses={
            200: HealthReadyOutputSerializer,
            503: OpenApiResponse(HealthReadyOutputSerializer, description="A dependency is unavailable."),
        },
    )
    def get(self, request: Request) -> None: ...  # never dispatched: documents ``chatbackend.health.ready``


# (path as drf-spectacular writes it from the URLconf, method, documentation view).
ASYNC_ENDPOINTS: list[tuple[str, str, type[APIView]]] = [
    ("/v1/chat/completions", "POST", ChatCompletionsDocView),
    ("/v1/chat/completions", "GET", StoredCompletionListDocView),
    ("/v1/chat/completions/{completion_id}", "GET", StoredCompletionDetailDocView),
    ("/v1/chat/completions/{completion_id}", "POST", StoredCompletionDetailDocView),
    ("/v1/chat/completions/{completion_id}", "DELETE", StoredCompletionDetailDocView),
    ("/v1/chat/completions/{completion_id}/messages", "GET", StoredCompletionMessageListDocView),
    ("/v1/messages", "POST", MessagesDocView),
    ("/v1/messages/count_tokens", "POST", MessagesCountTokensDocView),
    ("/v1/responses", "POST", ResponsesDocView),
    ("/v1/models", "GET", ModelListDocView),
    ("/v1/models/{model}", "GET", ModelRetrieveDocView),
    ("/dashboard/billing/usage", "GET", BillingUsageDocView),
    ("/dashboard/billing/subscription", "GET", BillingSubscriptionDocView),
    ("/api/conversations/{conversation_id}/messages/", "POST", MessageSendDocView),
    ("/health/live", "GET", HealthLiveDocView),
    ("/health/ready", "GET", HealthReadyDocView),
]


def add_async_endpoints(
    result: dict[str, Any], generator: SchemaGenerator, request: Any, public: bool
) -> dict[str, Any]:
    """Add the operations of the async views in ``ASYNC_ENDPOINTS`` to the OpenAPI ``result``.

    An operation already present (documented by a DRF view) is left as it is. Components the new
    operations use are added to ``result["components"]``.
    """
    paths = result.setdefault("paths", {})
    for path, method, view_class in ASYNC_ENDPOINTS:
        if method.lower() in paths.get(path, {}):
            continue
        view = generator.create_view(view_class.as_view(), method)
        view.request = spectacular_settings.GET_MOCK_REQUEST(method, path, view, request)
        operation = view.schema.get_operation(path, "", "^/", method, generator.registry)
        paths.setdefault(path, {})[method.lower()] = operation
        for serializer in getattr(view_class, "extra_components", ()):  # named in prose, not by $ref
            view.schema.resolve_serializer(serializer, "response")
    components = result.setdefault("components", {})
    for section, entries in generator.registry.build({}).items():
        merged = components.setdefault(section, {})
        for name, schema in entries.items():
            merged.setdefault(name, schema)
    return result


_PAGE_ERRORS = {
    "400": "Invalid request: a field or query parameter failed validation (see error.param, error.fields); "
    "`page` that is not a whole number from 1.",
    "404": "Not found: a `page` past the last one.",
}


def document_pagination_errors(
    result: dict[str, Any], generator: SchemaGenerator, request: Any, public: bool
) -> dict[str, Any]:
    """Document the 400 and 404 of ``chatbackend.pagination`` on every operation with a ``page`` parameter.

    An operation that already documents the status keeps its own description. The body is the
    project's error object (``ErrorOutput``), as everywhere.
    """
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOutput"}}}
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            parameters = operation.get("parameters", [])
            if not any(p.get("in") == "query" and p.get("name") == "page" for p in parameters):
                continue
            responses = operation.setdefault("responses", {})
            for status, description in _PAGE_ERRORS.items():
                responses.setdefault(status, {"content": error, "description": description})
    return result


_SCOPE_ERROR = (
    "An API key without the scope this endpoint needs (`insufficient_permissions`; the message names the "
    "missing scope: `chat`, `read` or `admin`), or not allowed for the caller."
)


def document_scope_errors(
    result: dict[str, Any], generator: SchemaGenerator, request: Any, public: bool
) -> dict[str, Any]:
    """Document a 403 on every operation an API key may call: a key lacks the operation's scope.

    ``accounts.scopes`` refuses it before the view runs, in the operation's own error shape (the body
    of its documented 401: OpenAI's, or Anthropic's on ``/v1/messages``). An operation that already
    documents a 403 keeps its own description.
    """
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if not any("apiKeyAuth" in requirement for requirement in operation.get("security", ())):
                continue
            responses = operation.setdefault("responses", {})
            unauthenticated = responses.get("401", {})
            content = unauthenticated.get("content") or {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOutput"}}
            }
            responses.setdefault("403", {"content": content, "description": _SCOPE_ERROR})
    return result


# Rules between request fields that the serializers enforce, as JSON Schema (OpenAPI 3.0 ``anyOf``).
_REQUEST_RULES: dict[str, list[dict[str, Any]]] = {
    # top_logprobs needs logprobs: true (OpenAI's CreateChatCompletionRequest; llm.openai.chat_serializers).
    "ChatCompletionCreateInputRequest": [
        {"not": {"required": ["top_logprobs"]}},
        {"properties": {"top_logprobs": {"enum": [None]}}},
        {"properties": {"logprobs": {"enum": [True]}}, "required": ["logprobs"]},
    ],
    # A json_schema response format needs json_schema.name (OpenAI's ResponseFormatJsonSchema; chat_serializers).
    "ChatCompletionResponseFormatInputRequest": [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "required": ["json_schema"],
            "properties": {
                "json_schema": {
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "schema": {"type": "object"},
                    },
                }
            },
        },
    ],
    # Thinking ``enabled`` needs its budget; a ``tool`` tool_choice names the tool (llm.anthropic.serializers).
    "AnthropicThinkingInputRequest": [
        {"properties": {"type": {"enum": ["adaptive", "between_tools", "disabled"]}}},
        {"required": ["budget_tokens"]},
    ],
    "AnthropicToolChoiceInputRequest": [
        {"properties": {"type": {"enum": ["auto", "any", "none"]}}},
        {"required": ["name"]},
    ],
}
# Request bodies that refuse fields they do not list (a 400 naming the field, as Anthropic answers).
_CLOSED_REQUESTS = ("MessageCreateInputRequest", "MessageCountTokensInputRequest")
# Operations whose body is a raw JSON Schema (drf-spectacular marks those optional) but required:
# an empty body is a 400. Importing NextChat masks takes one mask or a list of them.
_REQUIRED_BODIES = ("templates_import_create",)


def document_request_rules(
    result: dict[str, Any], generator: SchemaGenerator, request: Any, public: bool
) -> dict[str, Any]:
    """Add ``_REQUEST_RULES`` to their request components as ``anyOf``: what a valid body must also
    satisfy; close ``_CLOSED_REQUESTS``; mark the bodies of ``_REQUIRED_BODIES`` required."""
    schemas = result.get("components", {}).get("schemas", {})
    for name, rule in _REQUEST_RULES.items():
        if name in schemas:
            schemas[name]["anyOf"] = rule
    for name in _CLOSED_REQUESTS:
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if operation.get("operationId") in _REQUIRED_BODIES and "requestBody" in operation:
                operation["requestBody"]["required"] = True
    return result
