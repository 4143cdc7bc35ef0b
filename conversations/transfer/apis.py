"""Export and import over REST.

- ``GET /api/conversations/{id}/export/?format=json|markdown``: one conversation (whoever may read it).
- ``GET /api/conversations/export/?format=json``: every conversation the caller owns in the
  organization it acts in.
- ``POST /api/conversations/import/``: our JSON export (one or many) or NextChat's ``backup.json``,
  at most ``SYNC_MAX_DOCUMENT_BYTES`` (a NextChat state is often larger than
  ``DATA_UPLOAD_MAX_MEMORY_SIZE``, the limit elsewhere: the same limit as a synced one).
"""

from __future__ import annotations

from django.conf import settings
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, PolymorphicProxySerializer, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotAcceptable
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import request_principal
from accounts.models import APIKey
from accounts.serializers import ErrorOutputSerializer
from chatbackend.errors import ApplicationError
from chatbackend.parsers import BodyLimit

from ..apis import _errors
from ..serializers import ConversationOutputSerializer
from .renderers import MarkdownRenderer
from .selectors import conversation_export, conversation_export_all
from .serializers import (
    ImportOutputSerializer,
    NextChatBackupInputSerializer,
    TransferDocumentSerializer,
)
from .services import conversations_import

_FILENAME_EXTENSION = {"json": "json", "markdown": "md"}


class _ExportApi(APIView):
    """An export: the renderer is the format (``?format=`` or ``Accept``); another format is a 400."""

    renderer_classes: tuple[type[BaseRenderer], ...] = (JSONRenderer,)

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[BaseRenderer, str]:
        formats = [str(renderer.format) for renderer in self.renderer_classes]
        error = ApplicationError(
            f"'format' must be one of: {', '.join(formats)}.", code="invalid_format", param="format"
        )
        # DRF reads an empty ?format= as none given; the schema's enum has no empty value.
        if not force and request.query_params.get("format", formats[0]) not in formats:
            raise error
        try:
            return super().perform_content_negotiation(request, force)
        except (Http404, NotAcceptable):  # DRF's answers to an unknown ?format= and Accept
            raise error from None

    def attachment(self, response: Response, name: str) -> Response:
        extension = _FILENAME_EXTENSION.get(getattr(self.request.accepted_renderer, "format", "json"), "json")
        response["Content-Disposition"] = f'attachment; filename="{name}.{extension}"'
        return response


_EXPORT_DESCRIPTION = (
    'JSON: the lossless document, `{format: "chatbackend.conversations", format_version: 1, exported_at, '
    "conversations: [{id, title, model, system_prompt, metadata, parameters, pinned, archived_at, active_leaf, "
    "created_at, updated_at, "
    "messages: [{id, parent_id, role, content, status, model, finish_reason, prompt_tokens, completion_tokens, "
    "time_to_first_token_ms, duration_ms, error, error_code, created_at, updated_at}]}]}`, every branch "
    "included; `POST /api/conversations/import/` reads it back."
)


class ConversationExportApi(_ExportApi):
    """One conversation, as JSON or Markdown."""

    renderer_classes = (JSONRenderer, MarkdownRenderer)

    @extend_schema(
        tags=["conversations"],
        summary="Export a conversation: JSON (every branch) or Markdown (the active branch)",
        description=_EXPORT_DESCRIPTION + " Markdown: the title, model and system prompt, then the active "
        "branch's messages under `### Role` headings. Whoever may read the conversation may export it.",
        operation_id="conversations_export",
        parameters=[
            OpenApiParameter(
                "format", OpenApiTypes.STR, enum=["json", "markdown"], description="Default: json (or by Accept)."
            )
        ],
        responses={
            (200, "application/json"): TransferDocumentSerializer,
            (200, "text/markdown"): OpenApiResponse(OpenApiTypes.STR, description="The active branch as Markdown."),
            **_errors(400, 401, 404),
        },
    )
    def get(self, request: Request, conversation_id: int) -> Response:
        document = conversation_export(actor=request_principal(request), conversation_id=conversation_id)
        return self.attachment(Response(document), f"conversation-{conversation_id}")


class ConversationExportAllApi(_ExportApi):
    """Every conversation of the caller, as JSON."""

    @extend_schema(
        tags=["conversations"],
        summary="Export every conversation the caller owns in the organization it acts in (JSON)",
        description=_EXPORT_DESCRIPTION + " Only the caller's own conversations, whatever its role.",
        operation_id="conversations_export_all",
        parameters=[OpenApiParameter("format", OpenApiTypes.STR, enum=["json"], description="Only json.")],
        responses={200: TransferDocumentSerializer, **_errors(400, 401)},
    )
    def get(self, request: Request) -> Response:
        return self.attachment(Response(conversation_export_all(actor=request_principal(request))), "conversations")


def import_too_large_error(size: int | None = None) -> ApplicationError:
    """Return the 413 ``import_too_large`` for a body over ``SYNC_MAX_DOCUMENT_BYTES`` (``size``: its
    declared size in bytes, when known)."""
    limit = settings.SYNC_MAX_DOCUMENT_BYTES
    told = f" ({size} bytes)" if size is not None else ""
    return ApplicationError(
        f"The document{told} is larger than this server imports ({limit} bytes, SYNC_MAX_DOCUMENT_BYTES).",
        code="import_too_large",
        status=413,
    )


class ConversationImportApi(APIView):
    """Import conversations: our export, or NextChat's ``backup.json``."""

    # Read by chatbackend.parsers.JSONParser instead of DATA_UPLOAD_MAX_MEMORY_SIZE.
    request_body_limit = BodyLimit("SYNC_MAX_DOCUMENT_BYTES", import_too_large_error)
    api_key_scopes = {"POST": APIKey.Scope.CHAT}  # accounts.scopes: it writes conversations

    @extend_schema(
        tags=["conversations"],
        summary="Import conversations: this server's JSON export (one or many) or NextChat's backup.json",
        description="Told apart by shape. An export makes new conversations, each tree recreated with new ids "
        "(parents and `active_leaf` mapped; times kept; a `streaming` message becomes `cancelled`). A model "
        "the caller may not use is replaced by the first it may use by name (listed in `models_replaced`). "
        "NextChat's backup.json (its app state, as its sync stores it) is imported as a synced document: "
        "idempotent by NextChat's ids, so importing it again updates and never duplicates; its masks become "
        "templates (`templates_imported`), idempotently too. All or nothing. "
        "At most `SYNC_MAX_DOCUMENT_BYTES` (413 `import_too_large`).",
        operation_id="conversations_import",
        request=PolymorphicProxySerializer(
            component_name="ConversationImportInput",
            serializers=[TransferDocumentSerializer, NextChatBackupInputSerializer],
            resource_type_field_name=None,
        ),
        responses={
            201: ImportOutputSerializer,
            **_errors(400, 401, 403),
            413: OpenApiResponse(ErrorOutputSerializer, description="Larger than SYNC_MAX_DOCUMENT_BYTES."),
        },
    )
    def post(self, request: Request) -> Response:
        result = conversations_import(actor=request_principal(request), data=request.data)
        conversations = ConversationOutputSerializer(result.conversations, many=True).data
        return Response(
            {
                "imported_from": result.source,
                "conversations": conversations,
                "models_replaced": result.models_replaced,
                "templates_imported": len(result.templates),
            },
            status=status.HTTP_201_CREATED,
        )
