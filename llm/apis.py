"""Models REST API: the models a user may chat with."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.authentication import request_principal
from accounts.model_access import model_access_for
from accounts.scopes import MODELS_SCOPE
from accounts.serializers import ErrorOutputSerializer

from .models import LLMModel
from .selectors import llm_model_list_for
from .serializers import LLMModelOutputSerializer


class LLMModelListApi(ListAPIView):
    """List the enabled models (on enabled providers) by name, with their prices per million tokens.

    A caller sees only the models it may use: those its organization's, its teams' and its key's
    allowlists allow (``accounts.model_access``).
    """

    serializer_class = LLMModelOutputSerializer
    filter_backends = ()
    api_key_scopes = {"GET": MODELS_SCOPE}  # accounts.scopes: chatting or reading

    def get_queryset(self) -> QuerySet[LLMModel]:
        return llm_model_list_for(access=model_access_for(principal=request_principal(self.request)))

    @extend_schema(
        tags=["models"],
        summary="List the enabled models, by name",
        responses={
            200: LLMModelOutputSerializer,
            401: OpenApiResponse(ErrorOutputSerializer, description="Missing, invalid or expired credentials."),
        },
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)
