"""``/api/templates/``: conversation templates (NextChat's masks), a conversation from one, and
NextChat mask JSON in and out.

Every lookup goes through ``selectors``: another organization's template, or another member's
private one, is a 404; a template the caller sees but may not change is a 403 on a write.
Reading needs an API key's ``read`` scope; writing (and starting a conversation) ``chat``, as
conversations do, so an organization's viewers only read (``accounts.scopes``).
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.filters import OrderingFilter
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.authentication import request_principal
from accounts.model_access import model_access_for
from accounts.models import APIKey
from accounts.serializers import ErrorOutputSerializer
from chatbackend.fields import ID_LOOKUP_REGEX
from chatbackend.filters import AnyChoiceFilter, SearchFilter
from conversations.serializers import ConversationOutputSerializer

from .models import ConversationTemplate
from .nextchat import template_mask
from .selectors import template_get_for, template_list
from .serializers import (
    NEXTCHAT_MASK_SCHEMA,
    ConversationTemplateInputSerializer,
    ConversationTemplateOutputSerializer,
    TemplateConversationCreateInputSerializer,
    TemplateImportOutputSerializer,
)
from .services import (
    template_conversation_create,
    template_create,
    template_delete,
    template_import,
    template_update,
)

_ERRORS = {
    400: "Invalid request: malformed JSON or a field failed validation (see error.param, error.fields).",
    401: "Missing, invalid, expired or revoked credentials.",
    403: "Not allowed: an API key without the scope, an organization's viewer writing, or a template the "
    "caller sees but may not change (only its owner, or for a shared one the organization's admins).",
    404: "Not found, or not visible to the caller (another organization's, another member's private one); "
    "or a model the caller may not use (`model_not_found`).",
}


def _errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {code: OpenApiResponse(ErrorOutputSerializer, description=_ERRORS[code]) for code in statuses}


_MASK_EXAMPLE = {
    "id": "Tq4ZbvVp3hc8bUqFYgM1p",
    "createdAt": 1733200000000,
    "avatar": "1f916",
    "name": "Translator",
    "context": [
        {"id": "a1", "date": "", "role": "system", "content": "Translate the user's text into English."},
        {"id": "a2", "date": "", "role": "user", "content": "Bonjour"},
        {"id": "a3", "date": "", "role": "assistant", "content": "Hello"},
    ],
    "syncGlobalConfig": False,
    "modelConfig": {"model": "gpt-4o-mini", "temperature": 0.3, "top_p": 1, "max_tokens": 2000},
    "lang": "en",
    "builtin": False,
}

_MASKS_SCHEMA = {
    "oneOf": [
        NEXTCHAT_MASK_SCHEMA,
        {"type": "array", "minItems": 1, "maxItems": 1000, "items": NEXTCHAT_MASK_SCHEMA},
    ]
}


class ConversationTemplateFilter(django_filters.FilterSet):
    """``?visibility=`` and ``?model=``."""

    visibility = AnyChoiceFilter(choices=ConversationTemplate.Visibility.choices, help_text="empty: any")
    model = django_filters.CharFilter(field_name="model_name", help_text="the model's name")

    class Meta:
        model = ConversationTemplate
        fields = ["visibility", "model"]


@extend_schema_view(
    list=extend_schema(
        summary="List the templates the caller may use: their own, their teams' and the organization's",
        responses={200: ConversationTemplateOutputSerializer, **_errors(400, 401, 403)},
    ),
    create=extend_schema(
        summary="Create a template (private unless shared with a team or the organization)",
        request=ConversationTemplateInputSerializer,
        responses={201: ConversationTemplateOutputSerializer, **_errors(400, 401, 403, 404)},
    ),
    retrieve=extend_schema(
        summary="Get a template", responses={200: ConversationTemplateOutputSerializer, **_errors(401, 403, 404)}
    ),
    update=extend_schema(
        summary="Replace a template (fields left out take their defaults)",
        request=ConversationTemplateInputSerializer,
        responses={200: ConversationTemplateOutputSerializer, **_errors(400, 401, 403, 404)},
    ),
    partial_update=extend_schema(
        summary="Change some of a template's fields",
        request=ConversationTemplateInputSerializer(partial=True),
        responses={200: ConversationTemplateOutputSerializer, **_errors(400, 401, 403, 404)},
    ),
    destroy=extend_schema(
        summary="Delete a template (conversations made from it stay)",
        responses={204: OpenApiResponse(description="Deleted."), **_errors(401, 403, 404)},
    ),
)
@extend_schema(tags=["templates"])
class ConversationTemplateViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Templates: ``?visibility=``, ``?model=``, ``?search=`` (name), ``?ordering=``."""

    serializer_class = ConversationTemplateOutputSerializer
    filter_backends = (
        django_filters.rest_framework.DjangoFilterBackend,
        SearchFilter,
        OrderingFilter,
    )
    filterset_class = ConversationTemplateFilter
    search_fields = ("name",)
    ordering_fields = ("name", "created_at", "updated_at", "id")
    ordering = ("name", "id")
    lookup_value_regex = ID_LOOKUP_REGEX
    # accounts.scopes: reading needs ``read`` (the default), writing and chatting ``chat``.
    api_key_scopes = {method: APIKey.Scope.CHAT for method in ("POST", "PUT", "PATCH", "DELETE")}

    def get_queryset(self) -> QuerySet[ConversationTemplate]:
        if getattr(self, "swagger_fake_view", False):
            return ConversationTemplate.objects.none()
        return template_list(actor=request_principal(self.request))

    def get_object(self) -> ConversationTemplate:
        """The template of the URL: 404 when the caller does not see it; for a write (not a new
        conversation from it), 403 when the caller sees it but may not change it."""
        writing = self.request.method not in SAFE_METHODS and self.action != "conversations"
        return template_get_for(actor=request_principal(self.request), template_id=self.kwargs["pk"], to_change=writing)

    def get_serializer_context(self) -> dict[str, Any]:
        context = dict(super().get_serializer_context())
        if not getattr(self, "swagger_fake_view", False):
            context["actor"] = request_principal(self.request)
        return context

    def _output(self, template: ConversationTemplate) -> dict[str, Any]:
        return ConversationTemplateOutputSerializer(template, context=self.get_serializer_context()).data

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = ConversationTemplateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        template = template_create(
            actor=actor, data=serializer.validated_data, access=model_access_for(principal=actor)
        )
        return Response(self._output(template), status=status.HTTP_201_CREATED)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        partial = kwargs.get("partial", False)
        serializer = ConversationTemplateInputSerializer(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        template = template_update(
            actor=actor,
            template=self.get_object(),
            data=serializer.validated_data,
            access=model_access_for(principal=actor),
        )
        return Response(self._output(template))

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        template_delete(template=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Start a conversation from a template",
        description="The conversation gets the template's system prompt, model (or `model`), parameters "
        "(sent with every reply) and its starter messages as its first messages, in order; the last "
        "one is the active leaf, so the next message sent follows them.",
        operation_id="templates_conversations_create",
        request=TemplateConversationCreateInputSerializer,
        responses={201: ConversationOutputSerializer, **_errors(400, 401, 403, 404)},
    )
    @action(detail=True, methods=["post"], url_path="conversations")
    def conversations(self, request: Request, pk: str) -> Response:
        serializer = TemplateConversationCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = request_principal(request)
        conversation = template_conversation_create(
            actor=actor,
            template=self.get_object(),
            access=model_access_for(principal=actor),
            title=serializer.validated_data["title"],
            model_name=serializer.validated_data["model"],
        )
        return Response(ConversationOutputSerializer(conversation).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="A template as a NextChat mask (JSON NextChat's mask import takes)",
        operation_id="templates_export_retrieve",
        responses={200: NEXTCHAT_MASK_SCHEMA, **_errors(401, 403, 404)},
    )
    @action(detail=True, methods=["get"], url_path="export")
    def export(self, request: Request, pk: str) -> Response:
        template = self.get_object()
        return Response(template_mask(template), headers=_attachment(f"{template.pk}.json"))

    @extend_schema(
        summary="Every template the caller may use, as NextChat's masks file (a list of masks)",
        operation_id="templates_export_list",
        filters=False,
        responses={200: {"type": "array", "items": NEXTCHAT_MASK_SCHEMA}, **_errors(401, 403)},
    )
    @action(detail=False, methods=["get"], url_path="export", pagination_class=None)
    def export_all(self, request: Request) -> Response:
        masks = [template_mask(template) for template in self.get_queryset().order_by("name", "id")]
        return Response(masks, headers=_attachment("masks.json"))

    @extend_schema(
        summary="Import NextChat masks (one mask, or NextChat's exported list) as private templates",
        description="Each mask becomes a private template of the caller; a mask imported before (same "
        "`id`) updates its template. The first context message, when a system one, is the system "
        "prompt; the others are starter messages. All or nothing: an invalid mask is a 400 whose "
        "`param` names it (e.g. `masks[2].context[0].role`).",
        operation_id="templates_import_create",
        request={"application/json": _MASKS_SCHEMA},
        examples=[OpenApiExample("mask", value=_MASK_EXAMPLE, request_only=True)],
        responses={201: TemplateImportOutputSerializer, **_errors(400, 401, 403)},
    )
    @action(detail=False, methods=["post"], url_path="import")
    def import_masks(self, request: Request) -> Response:
        templates = template_import(actor=request_principal(request), document=request.data)
        context = self.get_serializer_context()
        return Response(
            TemplateImportOutputSerializer({"templates": templates}, context=context).data,
            status=status.HTTP_201_CREATED,
        )


def _attachment(filename: str) -> dict[str, str]:
    """Headers that make a browser save the JSON as ``filename`` (what NextChat's import reads)."""
    return {"Content-Disposition": f'attachment; filename="{filename}"'}


__all__ = ["ConversationTemplateViewSet"]
