"""Share links over REST: the owner creates, lists and revokes them; anyone with a token reads one as JSON.

The HTML page of a link is ``views.share_page``. Every answer about a link's content carries
``X-Robots-Tag: noindex`` and ``Referrer-Policy: no-referrer`` (the token is in the URL: a
referrer would leak it) and ``Cache-Control: no-store`` (a revoked link must stop answering).
"""

from __future__ import annotations

from django.http import HttpResponseBase
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import request_principal
from accounts.models import APIKey
from accounts.serializers import ErrorOutputSerializer

from ..apis import _errors
from .selectors import share_get_by_token, share_list
from .serializers import (
    ShareCreatedOutputSerializer,
    ShareCreateInputSerializer,
    SharedConversationOutputSerializer,
    ShareOutputSerializer,
)
from .services import share_create, share_revoke

# What a page holding a share token answers with, whatever its status.
PRIVATE_HEADERS = {"X-Robots-Tag": "noindex, nofollow", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def private(response: HttpResponseBase) -> HttpResponseBase:
    """Add ``PRIVATE_HEADERS`` to ``response`` and return it."""
    for name, value in PRIVATE_HEADERS.items():
        response[name] = value
    return response


class ConversationShareListCreateApi(APIView):
    """The share links of one conversation: its owner's to create and list."""

    api_key_scopes = {"POST": APIKey.Scope.CHAT}  # accounts.scopes: sharing changes what others may read

    @extend_schema(
        tags=["conversations"],
        summary="List the share links of a conversation (the owner's; revoked and expired ones too)",
        operation_id="conversations_shares_list",
        responses={200: ShareOutputSerializer(many=True), **_errors(401, 403, 404)},
    )
    def get(self, request: Request, conversation_id: int) -> Response:
        shares = share_list(actor=request_principal(request), conversation_id=conversation_id)
        return Response(ShareOutputSerializer(shares, many=True).data)

    @extend_schema(
        tags=["conversations"],
        summary="Share a snapshot of a branch (default: the active one) behind a new link; the token is shown once",
        description="The snapshot (title; each message's role, content, model and time) is taken now: later "
        "messages never appear. Anyone with the link reads it, without logging in, at `url` (HTML) and "
        "`json_url` (JSON) until it is revoked (`DELETE /api/shares/{id}/`) or `expires_at` passes. "
        "Only the conversation's owner shares it (its organization's admins: 403). While a reply of "
        "the branch streams: 409 `reply_in_progress` (its text is written when it ends).",
        operation_id="conversations_shares_create",
        request=ShareCreateInputSerializer,
        responses={201: ShareCreatedOutputSerializer, **_errors(400, 401, 403, 404, 409)},
    )
    def post(self, request: Request, conversation_id: int) -> Response:
        serializer = ShareCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created = share_create(
            actor=request_principal(request),
            conversation_id=conversation_id,
            leaf_id=serializer.validated_data.get("leaf"),
            expires_at=serializer.validated_data.get("expires_at"),
        )
        data = dict(ShareOutputSerializer(created.share).data)
        data["token"] = created.token
        data["url"] = request.build_absolute_uri(reverse("share-page", args=[created.token]))
        data["json_url"] = request.build_absolute_uri(reverse("conversations:share-detail", args=[created.token]))
        return Response(data, status=status.HTTP_201_CREATED)


class ShareRevokeApi(APIView):
    """Revoke a share link: it stops answering at once."""

    api_key_scopes = {"DELETE": APIKey.Scope.CHAT}

    @extend_schema(
        tags=["conversations"],
        summary="Revoke a share link (only who made it; anyone else's is a 404)",
        operation_id="shares_revoke",
        responses={204: OpenApiResponse(description="Revoked (or already was)."), **_errors(401, 403, 404)},
    )
    def delete(self, request: Request, share_id: int) -> Response:
        share_revoke(actor=request_principal(request), share_id=share_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SharedConversationApi(APIView):
    """A shared snapshot as JSON, for anyone holding the link's token (no authentication)."""

    authentication_classes = ()  # a token in the URL is the credential; a stale bearer must not 401
    permission_classes = (AllowAny,)

    @extend_schema(
        tags=["conversations"],
        summary="Read a shared conversation (anyone with the link; no authentication)",
        description="404 `share_not_found` for an unknown, revoked or expired link alike.",
        operation_id="shares_read",
        auth=[],
        parameters=[OpenApiParameter("token", str, OpenApiParameter.PATH, description="The link's token.")],
        responses={
            200: SharedConversationOutputSerializer,
            404: OpenApiResponse(ErrorOutputSerializer, description="No live link with this token."),
        },
    )
    def get(self, request: Request, token: str) -> Response:
        return Response(SharedConversationOutputSerializer(share_get_by_token(token=token)).data)

    def finalize_response(self, request: Request, response: Response, *args: object, **kwargs: object) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        private(response)
        return response
