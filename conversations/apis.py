"""Conversations REST API (DRF): conversation CRUD, the message list and tree, switching branches,
and stopping a reply.

Sending, editing and regenerating a message stream, so they are plain async views
(``conversations.sse``); DRF only documents them here. Every lookup goes through
``conversations.selectors``, so another user's conversation is a 404 and admins see all. Errors
leave as ``{"error": {...}}`` through ``chatbackend.exception_handlers``.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db.models import Q, QuerySet
from django.http import Http404
from django_filters.widgets import BooleanWidget
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import MethodNotAllowed
from rest_framework.filters import OrderingFilter
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.audit import audit_access_denied
from accounts.authentication import request_principal
from accounts.model_access import model_access_for
from accounts.models import APIKey
from accounts.serializers import ErrorOutputSerializer
from chatbackend.errors import ApplicationError
from chatbackend.fields import ID_LOOKUP_REGEX, ID_MAX, ID_SCHEMA
from chatbackend.filters import AnyChoiceFilter, SearchFilter, UTCIsoDateTimeFilter
from chatbackend.http import sse_event_schema
from chatbackend.text import holds_nul

from .models import Conversation, Message
from .search import MAX_QUERY_CHARS, conversation_search, conversation_search_scope, search_snippets
from .selectors import (
    conversation_get_for,
    conversation_list,
    conversation_trash_list,
    message_list,
    message_sibling_ids,
    message_tree,
)
from .serializers import (
    ConversationCreateInputSerializer,
    ConversationOutputSerializer,
    ConversationSearchResultOutputSerializer,
    ConversationUpdateInputSerializer,
    MessageOutputSerializer,
    MessageSendInputSerializer,
    MessageSendOutputSerializer,
    MessageStopOutputSerializer,
    MessageTreeOutputSerializer,
)
from .services import (
    conversation_branch_activate,
    conversation_create,
    conversation_purge,
    conversation_restore,
    conversation_trash,
    conversation_update,
    reply_stop,
)

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON or a field failed validation (see error.param, error.fields).",
    401: "Missing, invalid, expired or revoked credentials.",
    403: (
        "Not allowed: an API key without the scope, an organization's viewer chatting, or an admin changing "
        "(or chatting in) a member's conversation, which only its owner may do."
    ),
    404: "Not found, or not yours (another user's conversation is a 404).",
    409: "A reply is still streaming (error.code reply_in_progress).",
}


def _errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Return OpenAPI responses documenting the project's error body for each of ``statuses``."""
    return {code: OpenApiResponse(ErrorOutputSerializer, description=_ERROR_DESCRIPTIONS[code]) for code in statuses}


# The filters whose empty or malformed value is a 400: django-filter would ignore it (no filter),
# answering another question than the client asked, and the schema (boolean, date-time) refuses it.
_BOOLEAN_FILTERS = ("pinned", "archived")
_DATE_FILTERS = ("created_from", "created_to", "updated_from", "updated_to")


class ConversationFilterForm(forms.Form):
    """Refuse an empty date and a boolean other than ``true``/``false`` (``1``/``0``)."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name in _BOOLEAN_FILTERS:
            if name in self.data and str(self.data[name]).lower() not in ("true", "false", "1", "0"):
                self.add_error(name, "Must be true or false.")
        for name in _DATE_FILTERS:
            if name in self.data and not str(self.data[name]).strip():
                self.add_error(name, "Must be a date and time (ISO 8601).")
        return cleaned


class ConversationFilter(django_filters.FilterSet):
    """``?model=<model name>``, ``?pinned=``, ``?archived=``, and created/updated date ranges."""

    model = django_filters.CharFilter(field_name="model__name", help_text="the model's name")
    # BooleanWidget reads what ConversationFilterForm lets through (true/false/1/0, any case); the
    # default widget (Django's NullBooleanSelect) reads "1", "0" and "TRUE" as "no filter".
    pinned = django_filters.BooleanFilter(
        widget=BooleanWidget, help_text="Only pinned (true) or unpinned (false) conversations."
    )
    archived = django_filters.BooleanFilter(
        widget=BooleanWidget,
        field_name="archived_at",
        lookup_expr="isnull",
        exclude=True,
        help_text="Only archived (true) or unarchived (false) conversations. The list shows only unarchived "
        "ones when this is absent; search shows both.",
    )
    created_from = UTCIsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Created at or after (ISO 8601)."
    )
    created_to = UTCIsoDateTimeFilter(
        field_name="created_at", lookup_expr="lte", help_text="Created at or before (ISO 8601)."
    )
    updated_from = UTCIsoDateTimeFilter(
        field_name="updated_at", lookup_expr="gte", help_text="Last updated at or after (ISO 8601)."
    )
    updated_to = UTCIsoDateTimeFilter(
        field_name="updated_at", lookup_expr="lte", help_text="Last updated at or before (ISO 8601)."
    )

    class Meta:
        model = Conversation
        fields = ["model", "pinned", "archived", "created_from", "created_to", "updated_from", "updated_to"]
        form = ConversationFilterForm


@extend_schema_view(
    list=extend_schema(
        summary="List the caller's conversations (admins: everyone's), pinned first, then most recently "
        "updated; archived ones only with ?archived=true, trashed ones never (see /trash/)",
        responses={200: ConversationOutputSerializer, **_errors(400, 401)},
    ),
    create=extend_schema(
        summary="Start a conversation with an enabled model",
        request=ConversationCreateInputSerializer,
        examples=[
            OpenApiExample(
                "conversation",
                request_only=True,
                value={"model": "gpt-4o-mini", "title": "Trip plans", "system_prompt": "Answer briefly."},
            )
        ],
        responses={201: ConversationOutputSerializer, **_errors(400, 401, 404)},
    ),
    retrieve=extend_schema(
        summary="Get a conversation", responses={200: ConversationOutputSerializer, **_errors(401, 404)}
    ),
    partial_update=extend_schema(
        summary="Rename a conversation, change its system prompt or model, switch branches (active_leaf), "
        "pin or archive it",
        request=ConversationUpdateInputSerializer,
        responses={200: ConversationOutputSerializer, **_errors(400, 401, 403, 404)},
    ),
    destroy=extend_schema(
        summary="Move a conversation to the trash (restore it with /restore/, delete it for good with /purge/)",
        description="A reply streaming in it is stopped (its client gets `conversation_deleted`). A trashed "
        "conversation is a 404 everywhere but the trash, and takes no message.",
        responses={204: OpenApiResponse(description="In the trash."), **_errors(401, 403, 404)},
    ),
)
@extend_schema(tags=["conversations"])
class ConversationViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Conversations of the caller: ``?model=``, ``?search=`` (title), ``?ordering=`` filters."""

    serializer_class = ConversationOutputSerializer
    filter_backends = (django_filters.rest_framework.DjangoFilterBackend, SearchFilter, OrderingFilter)
    filterset_class = ConversationFilter
    search_fields = ("title",)
    ordering_fields = ("updated_at", "created_at", "title", "id", "pinned")
    ordering = ("-pinned", "-updated_at", "-id")
    lookup_value_regex = ID_LOOKUP_REGEX
    http_method_names = ("get", "post", "patch", "delete", "head", "options")
    # accounts.scopes: reading needs ``read`` (the default), writing is part of chatting.
    api_key_scopes = {method: APIKey.Scope.CHAT for method in ("POST", "PATCH", "DELETE")}

    def get_queryset(self) -> QuerySet[Conversation]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular inspecting the view
            return Conversation.objects.none()
        return conversation_list(actor=request_principal(self.request))

    def filter_queryset(self, queryset: QuerySet[Any, Any]) -> QuerySet[Any, Any]:
        queryset = super().filter_queryset(queryset)
        if self.action == "list" and "archived" not in self.request.query_params:
            queryset = queryset.filter(archived_at__isnull=True)  # the default list leaves archived ones out
        return queryset

    def get_object(self) -> Conversation:
        """The conversation of the URL, to read (DRF's lookup in ``get_queryset``: 404 ``not_found``).

        Another organization's is also audited (``accounts.audit.audit_access_denied``), after the miss.
        """
        try:
            return super().get_object()
        except Http404:
            actor = request_principal(self.request)
            audit_access_denied(
                actor=actor.user, organization=actor.organization, model=Conversation, lookup=Q(pk=self.kwargs["pk"])
            )
            raise

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = ConversationCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        actor = request_principal(request)
        conversation = conversation_create(
            owner=actor.user,
            organization=actor.organization,
            model_name=data["model"],
            title=data["title"],
            system_prompt=data["system_prompt"],
            access=model_access_for(principal=actor),
        )
        return Response(ConversationOutputSerializer(conversation).data, status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # PUT is not offered (http_method_names): every update is partial.
        serializer = ConversationUpdateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        conversation = conversation_update(
            conversation=self._own_conversation(),
            data=serializer.validated_data,
            access=model_access_for(principal=request_principal(request)),
        )
        return Response(ConversationOutputSerializer(conversation).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        conversation_trash(conversation=self._own_conversation())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Search the caller's own conversations: titles and message content, best match first",
        description='PostgreSQL: full-text search (English stemming; `"a phrase"`, `or`, `-word` as a web '
        "search engine reads them), ranked, a title hit above a message hit. SQLite: every word or "
        '`"phrase"` must appear in the title or in one message (case-insensitive for ASCII), and no '
        "`-word`; `or` separates alternatives; ranked "
        "title and message hit, then title, then message; on PostgreSQL too for a query with a word of "
        "a script written without spaces (Chinese, Japanese, Korean, Thai...), matched as a substring. "
        "Then most recently updated first. Only the "
        "caller's own conversations, never the trash (admins too: search never shows a member's "
        "conversation). Archived ones are included unless `archived=false`. Paginated.",
        operation_id="conversations_search",
        parameters=[
            OpenApiParameter(
                "q",
                {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
                required=True,
                description="What to look for.",
            )
        ],
        responses={200: ConversationSearchResultOutputSerializer(many=True), **_errors(400, 401)},
    )
    @action(detail=False, methods=["get"], filter_backends=(django_filters.rest_framework.DjangoFilterBackend,))
    def search(self, request: Request) -> Response:
        query = _search_query(request)
        actor = request_principal(request)
        results = conversation_search(
            conversations=self.filter_queryset(conversation_search_scope(actor=actor)), query=query
        )
        page = self.paginate_queryset(results)
        assert page is not None  # noqa: S101 - the project's settings paginate every list
        found = [getattr(c, "search_message_id", None) for c in page]  # annotated by conversation_search
        snippets = search_snippets(message_ids=[pk for pk in found if pk], query=query)
        context = {**self.get_serializer_context(), "snippets": snippets}
        data = ConversationSearchResultOutputSerializer(page, many=True, context=context).data
        return self.get_paginated_response(data)

    @extend_schema(
        summary="List the caller's own conversations in the trash, most recently deleted first",
        operation_id="conversations_trash",
        responses={200: ConversationOutputSerializer(many=True), **_errors(401)},
    )
    @action(detail=False, methods=["get"], filter_backends=())
    def trash(self, request: Request) -> Response:
        page = self.paginate_queryset(conversation_trash_list(actor=request_principal(request)))
        assert page is not None  # noqa: S101
        return self.get_paginated_response(ConversationOutputSerializer(page, many=True).data)

    @extend_schema(
        summary="Take a conversation out of the trash",
        operation_id="conversations_restore",
        request=None,
        responses={200: ConversationOutputSerializer, **_errors(401, 403, 404)},
    )
    @action(detail=True, methods=["post"])
    def restore(self, request: Request, pk: str) -> Response:
        conversation = conversation_restore(actor=request_principal(request), conversation_id=int(pk))
        return Response(ConversationOutputSerializer(conversation).data)

    @extend_schema(
        summary="Delete a conversation for good, in the trash or not: its messages go, usage records stay",
        description="A reply streaming in it is stopped (its client gets `conversation_deleted`).",
        operation_id="conversations_purge",
        request=None,
        responses={204: OpenApiResponse(description="Deleted for good."), **_errors(401, 403, 404)},
    )
    @action(detail=True, methods=["delete"])
    def purge(self, request: Request, pk: str) -> Response:
        conversation_purge(actor=request_principal(request), conversation_id=int(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _own_conversation(self) -> Conversation:
        """The conversation of the URL, for a change: 404 when the caller may not see it, 403 when
        the caller sees it but is not its owner (``conversations.selectors.conversation_get_for``)."""
        return conversation_get_for(
            actor=request_principal(self.request), conversation_id=self.kwargs["pk"], to_change=True
        )


class MessageFilter(django_filters.FilterSet):
    """``?role=`` and ``?status=``."""

    role = AnyChoiceFilter(choices=Message.Role.choices, help_text="Only this role (empty: any).")
    status = AnyChoiceFilter(choices=Message.Status.choices, help_text="Only this status (empty: any).")

    class Meta:
        model = Message
        fields = ["role", "status"]


REPLY_EVENT_SCHEMA = sse_event_schema(
    'One server-sent event of the reply (docs/api.md, "SSE events").',
    events=("reply.start", "reply.delta", "reply.done", "error"),
    data="JSON: reply.start {conversation_id, user_message_id, message_id, model}; reply.delta {content, "
    "reasoning_content?}; reply.done {message}; error {error, message}.",
)

_SSE_EXAMPLE = (
    "event: reply.start\n"
    'data: {"conversation_id":1,"user_message_id":10,"message_id":11,"model":"gpt-4o-mini"}\n\n'
    "event: reply.delta\n"
    'data: {"content":" Hello"}\n\n'
    "event: reply.done\n"
    'data: {"message":{"id":11,"role":"assistant","status":"completed","...":"..."}}\n\n'
)


_REPLY_RESPONSES: dict[Any, Any] = {
    (201, "application/json"): OpenApiResponse(
        MessageSendOutputSerializer, description="The reply ended (completed, or stopped)."
    ),
    (200, "text/event-stream"): OpenApiResponse(
        REPLY_EVENT_SCHEMA,
        description="The reply as server-sent events.",
        examples=[OpenApiExample("reply", value=_SSE_EXAMPLE, media_type="text/event-stream")],
    ),
    **_errors(400, 401, 403, 404),
    409: OpenApiResponse(
        ErrorOutputSerializer,
        description="`reply_in_progress`: a reply in the history of the new one (the branch it continues) "
        "is still streaming; nothing is written. Wait for its `reply.done` (or stop it), then send. Replies "
        "on other branches (an edit, a regeneration: siblings) do not count; a reply whose server process "
        "died stops counting once it is recovered as `interrupted`.",
    ),
    429: OpenApiResponse(
        ErrorOutputSerializer,
        description="Refused before the reply started: a rate limit (`rate_limit_exceeded`, with "
        "`Retry-After`) or a budget (`insufficient_quota`).",
    ),
    502: OpenApiResponse(ErrorOutputSerializer, description="The upstream failed (non-streamed only)."),
    503: OpenApiResponse(
        ErrorOutputSerializer,
        description="Rate limits or budgets cannot be checked (`metering_unavailable`), or the server is "
        "shutting down.",
    ),
}


class ConversationMessageListApi(ListAPIView):
    """List the messages of a conversation's active branch, root first (``?branch=``, ``?role=``, ``?status=``)."""

    serializer_class = MessageOutputSerializer
    filter_backends = (django_filters.rest_framework.DjangoFilterBackend,)
    filterset_class = MessageFilter

    def get_queryset(self) -> QuerySet[Message]:
        if getattr(self, "swagger_fake_view", False):
            return Message.objects.none()
        return message_list(
            actor=request_principal(self.request),
            conversation_id=self.kwargs["conversation_id"],
            branch=_branch_param(self.request),
        )

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # A page costs the same queries whatever the conversation's size: the path is one subquery
        # (``selectors.message_path``), the page's siblings one more query.
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        assert page is not None  # noqa: S101 - the project's settings paginate every list
        context = {**self.get_serializer_context(), "sibling_ids": message_sibling_ids(messages=page)}
        return self.get_paginated_response(MessageOutputSerializer(page, many=True, context=context).data)

    @extend_schema(
        tags=["conversations"],
        summary="List the messages of a conversation's active branch (or of ?branch=), root first",
        parameters=[
            OpenApiParameter(
                "branch",
                ID_SCHEMA,
                description="Read the branch ending at this message (any message of the conversation: the "
                "path from the root to it). Default: the active branch (the conversation's active_leaf).",
            ),
        ],
        responses={200: MessageOutputSerializer, **_errors(400, 401, 404)},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        tags=["conversations"],
        summary="Send a message and get the reply, streamed (SSE) or whole",
        description=(
            "With `Accept: text/event-stream` the answer is an SSE stream: `reply.start`, "
            "`reply.delta` (`{content, reasoning_content?}`), then `reply.done` (`{message}`) or "
            "`error` (`{error, message}`), with `: keep-alive` comments while the upstream is slow. "
            "Closing the connection stops the reply; its text so far is kept as `cancelled`. "
            "Otherwise the answer comes when the reply ends: 201 with both messages, or the "
            "upstream's error status (the assistant message is then `failed`)."
        ),
        operation_id="conversations_messages_send",
        request={"application/json": MessageSendInputSerializer},
        # The async view reads bearer tokens only (no session cookie). OpenAPI security requirement
        # objects are what drf-spectacular expects here; its annotation (Sequence[str]) is narrower.
        auth=[{"apiKeyAuth": []}, {"jwtAuth": []}],  # type: ignore[list-item]
        responses=_REPLY_RESPONSES,
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Never dispatched: ``conversations.urls`` routes POST to ``conversations.sse.message_send``.

        It stays to document that async view (DRF views are sync and cannot stream).
        """
        raise MethodNotAllowed(request.method or "POST")


class ConversationMessageStopApi(APIView):
    """Stop a streaming reply, whichever server process streams it."""

    api_key_scopes = {"POST": APIKey.Scope.CHAT}  # accounts.scopes

    @extend_schema(
        tags=["conversations"],
        summary="Stop a streaming reply (it ends `cancelled`, keeping its text so far)",
        operation_id="conversations_messages_stop",
        request=None,
        responses={
            202: OpenApiResponse(MessageStopOutputSerializer, description="Stop requested."),
            **_errors(401, 403, 404),
        },
    )
    def post(self, request: Request, conversation_id: int, message_id: int) -> Response:
        reply_stop(actor=request_principal(request), conversation_id=conversation_id, message_id=message_id)
        return Response(
            MessageStopOutputSerializer({"message_id": message_id, "status": "stopping"}).data,
            status=status.HTTP_202_ACCEPTED,
        )


def _search_query(request: Request) -> str:
    """Return ``?q=``; 400 ``param: q`` when it is missing, blank, longer than ``MAX_QUERY_CHARS`` or
    holds a NUL character (PostgreSQL cannot take it)."""
    query = request.query_params.get("q", "")
    if not query.strip() or len(query) > MAX_QUERY_CHARS or holds_nul(query):
        raise ApplicationError(
            f"'q' must be 1 to {MAX_QUERY_CHARS} characters, not all whitespace, without NUL.",
            code="invalid_query",
            param="q",
        )
    return query


def _branch_param(request: Request) -> int | None:
    """Return ``?branch=`` as a message id, None when absent; 400 ``param: branch`` for anything but an
    integer from 1 to the largest id (an empty value too, as the schema says)."""
    raw = request.query_params.get("branch")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= ID_MAX:
        raise ApplicationError("'branch' must be a message id.", code="invalid_branch", param="branch")
    return int(raw)


_SIBLING_DESCRIPTION = (
    "Answers exactly as sending a message does (`POST /api/conversations/{id}/messages/`): with "
    "`Accept: text/event-stream` an SSE stream (`reply.start`, `reply.delta`, `reply.done` or `error`), "
    "otherwise 201 `{user_message, assistant_message}` once the reply ends. The new reply becomes the "
    "conversation's `active_leaf`; the other branch stays, listed in `sibling_ids`."
)


class ConversationMessageEditApi(APIView):
    """Documents ``conversations.sse.message_edit`` (an async view: DRF views cannot stream)."""

    @extend_schema(
        tags=["conversations"],
        summary="Edit a user message: a sibling with new content, and its reply, streamed (SSE) or whole",
        description="The edited message stays; a new user message with the same parent carries `content`, "
        "and the history sent upstream is the path to it. " + _SIBLING_DESCRIPTION,
        operation_id="conversations_messages_edit",
        request={"application/json": MessageSendInputSerializer},
        auth=[{"apiKeyAuth": []}, {"jwtAuth": []}],  # type: ignore[list-item]
        responses=_REPLY_RESPONSES,
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Never dispatched: ``conversations.urls`` routes to ``conversations.sse.message_edit``."""
        raise MethodNotAllowed(request.method or "POST")


class ConversationMessageRegenerateApi(APIView):
    """Documents ``conversations.sse.message_regenerate`` (an async view: DRF views cannot stream)."""

    @extend_schema(
        tags=["conversations"],
        summary="Regenerate an assistant message: a sibling reply to the same user message, streamed or whole",
        description="The history sent upstream is the path up to the user message the reply answers; "
        "`user_message` in the JSON answer is that message. " + _SIBLING_DESCRIPTION,
        operation_id="conversations_messages_regenerate",
        request=None,
        auth=[{"apiKeyAuth": []}, {"jwtAuth": []}],  # type: ignore[list-item]
        responses=_REPLY_RESPONSES,
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Never dispatched: ``conversations.urls`` routes to ``conversations.sse.message_regenerate``."""
        raise MethodNotAllowed(request.method or "POST")


class ConversationMessageActivateApi(APIView):
    """Switch to the branch through a message."""

    api_key_scopes = {"POST": APIKey.Scope.CHAT}  # accounts.scopes: a change, as PATCH is

    @extend_schema(
        tags=["conversations"],
        summary="Switch branches: the latest leaf below this message becomes the active leaf",
        description="Follows the latest child from the message down to a leaf (the alternative as it was "
        "last continued) and makes it the conversation's `active_leaf`. `PATCH` `{active_leaf}` sets "
        "the leaf exactly instead. Only the conversation's owner may switch.",
        operation_id="conversations_messages_activate",
        request=None,
        responses={200: ConversationOutputSerializer, **_errors(401, 403, 404)},
    )
    def post(self, request: Request, conversation_id: int, message_id: int) -> Response:
        conversation = conversation_branch_activate(
            actor=request_principal(request), conversation_id=conversation_id, message_id=message_id
        )
        return Response(ConversationOutputSerializer(conversation).data)


class ConversationTreeApi(APIView):
    """A conversation's whole message tree, compactly."""

    @extend_schema(
        tags=["conversations"],
        summary="A conversation's message tree: every message's id, parent, role, status and time, no content",
        description="In id order (a parent before its children), unpaginated: a client draws the branches "
        "from it and reads a branch's content with `GET .../messages/?branch=<id>`. Admins of the "
        "organization may read it, as they read the messages.",
        operation_id="conversations_tree",
        responses={200: MessageTreeOutputSerializer, **_errors(401, 404)},
    )
    def get(self, request: Request, conversation_id: int) -> Response:
        conversation, nodes = message_tree(actor=request_principal(request), conversation_id=conversation_id)
        return Response(
            MessageTreeOutputSerializer({"active_leaf": conversation.active_leaf_id, "messages": nodes}).data
        )
