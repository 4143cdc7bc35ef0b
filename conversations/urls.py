"""Conversations API routes, mounted at ``/api/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import apis, sse
from .sharing import apis as sharing_apis
from .transfer import apis as transfer_apis

app_name = "conversations"

router = SimpleRouter()
router.register("conversations", apis.ConversationViewSet, basename="conversation")

urlpatterns = [
    # GET lists through DRF, POST sends through the async view: one path, two handlers.
    path("conversations/<int:conversation_id>/messages/", sse.conversation_messages_view, name="message-list"),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/stop/",
        apis.ConversationMessageStopApi.as_view(),
        name="message-stop",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/edit/",
        sse.message_edit,
        name="message-edit",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/regenerate/",
        sse.message_regenerate,
        name="message-regenerate",
    ),
    path(
        "conversations/<int:conversation_id>/messages/<int:message_id>/activate/",
        apis.ConversationMessageActivateApi.as_view(),
        name="message-activate",
    ),
    path("conversations/<int:conversation_id>/tree/", apis.ConversationTreeApi.as_view(), name="conversation-tree"),
    path("conversations/export/", transfer_apis.ConversationExportAllApi.as_view(), name="conversation-export-all"),
    path("conversations/import/", transfer_apis.ConversationImportApi.as_view(), name="conversation-import"),
    path(
        "conversations/<int:conversation_id>/export/",
        transfer_apis.ConversationExportApi.as_view(),
        name="conversation-export",
    ),
    path(
        "conversations/<int:conversation_id>/shares/",
        sharing_apis.ConversationShareListCreateApi.as_view(),
        name="conversation-shares",
    ),
    path("shares/<int:share_id>/", sharing_apis.ShareRevokeApi.as_view(), name="share-revoke"),
    path("share/<str:token>/", sharing_apis.SharedConversationApi.as_view(), name="share-detail"),
    *router.urls,
]
